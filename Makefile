# hessdiag: `make demo` and `make test` set everything up from nothing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# test processes (pytest-xdist); each test runs its torch on one thread
JOBS   ?= 2
PIP    := $(BIN)/pip install --no-compile --disable-pip-version-check -q -c constraints.txt
# Python writes the bytecode of what it imports, once, wherever PYTHONDONTWRITEBYTECODE is
# set in the calling shell: pip's own byte-compiling of every installed file (about a
# minute for torch, transformers and the rest, most of it never imported) is left out,
# and without bytecode on disk every process would compile what it imports anew.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: demo test lint bench docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) -e '.[plot]'
	touch $@

# one resolve for everything the tests need (it includes what demo needs)
$(VENV)/.installed-test: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) -e '.[plot,test]'
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
