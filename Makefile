# hessdiag: `make demo` and `make test` set everything up from nothing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# test processes (pytest-xdist); each test runs its torch on one thread
JOBS   ?= 2
PIP    := $(BIN)/pip install --no-compile --disable-pip-version-check -q -c constraints.txt
# pip byte-compiles one file after another (about a minute for torch, transformers and the
# rest); compileall does it on $(JOBS) processes instead (about 15 s), leaving out what is
# never imported (pip itself, the ~250 model families of transformers but those the tests
# use). Without bytecode on disk the first test run's processes, a dozen of them starting
# at once, would each compile torch anew (a first `make test` took 90 s longer). Third-party
# files that are not Python (templates) fail to compile: expected, hence the silence and
# the `|| true`.
COMPILE = $(BIN)/python -m compileall -q -j $(JOBS) \
	-x '/pip/|/transformers/models/(?!(auto|gpt2|bert)/)' \
	"$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" hessdiag cli \
	>/dev/null 2>&1 || true
# and what compileall left out is compiled once, by the first process that imports it,
# also where PYTHONDONTWRITEBYTECODE is set in the calling shell
unexport PYTHONDONTWRITEBYTECODE

.PHONY: demo test lint bench docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) -e '.[plot]'
	$(COMPILE)
	touch $@

# one resolve for everything the tests need (it includes what demo needs)
$(VENV)/.installed-test: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) -e '.[plot,test]'
	$(COMPILE)
	touch $(VENV)/.installed $@

demo: $(VENV)/.installed
	rm -rf demo-output && mkdir -p demo-output
	$(BIN)/hessdiag train --model mlp --data digits --optimizer eigensam --epochs 10 \
		--eig-every 10 --sharpness-every 24 --run-name demo \
		--checkpoint-dir demo-output/checkpoints --store demo-output/hessdiag.h5
	$(BIN)/hessdiag spectrum demo-output/checkpoints/demo/step-000120.pt --lambda-min --trace \
		--density --store demo-output/hessdiag.h5
	$(BIN)/hessdiag show demo-output/hessdiag.h5
	$(BIN)/hessdiag plot demo-output/hessdiag.h5 --what sharpness -o demo-output/sharpness.png
	$(BIN)/hessdiag plot demo-output/hessdiag.h5 --what density -o demo-output/density.png
	$(BIN)/hessdiag landscape demo-output/checkpoints/demo/step-000120.pt --dims 2 \
		--range -0.5,0.5 --resolution 15 --quiet --store demo-output/hessdiag.h5 \
		--plot demo-output/landscape.png
	$(BIN)/hessdiag report demo-output/hessdiag.h5 -o demo-output/report.html

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -n $(JOBS)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check hessdiag cli tests benchmarks

bench: $(VENV)/.installed-test
	$(PIP) -e '.[bench]'
	$(BIN)/python benchmarks/bench_spectrum.py

# the printed outputs shown in docs/ (tests/test_docs.py checks them)
docs: $(VENV)/.installed
	$(BIN)/python docs/regenerate.py

clean:
	rm -rf $(VENV) demo-output
