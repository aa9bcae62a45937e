"""hessdiag across two processes (torchrun, Gloo on the CPU) against one process: the
spectrum of an image and of a padded token task, alignment, landscapes whose grid points
are split across the processes, SGD / SAM / Eigen-SAM training, and a
failure on one rank. Each torchrun launch costs seconds (torch is imported by torchrun and
by each process), so the distributed side of every test but the failing rank's runs in one
launch (a script running several commands in one process group, the last as
`python -m hessdiag` runs it)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hessdiag.cli.app import app
from typer.testing import CliRunner

from hessdiag.checkpoints import save_checkpoint
from hessdiag.data import load_dataset
from hessdiag.distributed import World, shard
from hessdiag.store import Store
from hessdiag.task import new_task

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "checkpoints" / "digits-mlp.pt"
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch without torch.distributed")

SPECTRUM = ["--dtype", "float64", "--top-k", "3", "--lambda-min", "--trace", "--trace-hvps",
            "30", "--json", "--quiet"]
TRAIN = ["train", "--model", "mlp", "--data", "digits", "--samples", "200", "--batch-size",
         "45", "--epochs", "1", "--lr", "0.1", "--sharpness-every", "2",
         "--sharpness-samples", "65", "--device", "cpu", "--json", "--quiet"]
RUNS = {"sgd": ["--optimizer", "sgd"],
        "sam-sync": ["--optimizer", "sam", "--sync-perturbation"],
        "sam": ["--optimizer", "sam"],
        "eigensam-sync": ["--optimizer", "eigensam", "--sync-perturbation", "--eig-every", "2",
                          "--eig-iters", "3"]}

# several commands in one process group: rank 0's stdout of each goes to NAME.json; the
# last job, if named "main", runs as `python -m hessdiag` does (hessdiag.cli.app.main: it
# mutes the other ranks and leaves the process group), printing to the real stdout
JOBS = '''
import json, os, sys
from hessdiag.cli.app import app, main
from hessdiag.distributed import init, is_main, shutdown

init("cpu")
jobs, out = json.loads(sys.argv[1]), sys.argv[2]
for name, args in jobs:
    if name == "main":
        sys.argv = ["hessdiag", *args]
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code
        print(f"{name} exit {code}", file=sys.stderr)
        continue
    with open(f"{out}/{name}.json" if is_main() else "/dev/null", "w") as fh:
        sys.stdout = fh
        try:
            app(args)
        except SystemExit as exc:
            code = exc.code
        sys.stdout = sys.__stdout__
    print(f"{name} exit {code}", file=sys.stderr)
shutdown()
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)  # torch's interpreter teardown costs each process about a second
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# what the `torchrun` script runs, leaving without the interpreter's exit-time collections
# over everything torch created (half a second of CPU)
TORCHRUN = ("import atexit, gc, sys; atexit.register(gc.freeze); "
            "from torch.distributed.run import main; sys.exit(main())")


def torchrun(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", TORCHRUN, "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def one_process(args: list[str], cwd: Path) -> dict:
    here = os.getcwd()
    os.chdir(cwd)
    try:
        result = CliRunner().invoke(app, [str(a) for a in args])
    finally:
        os.chdir(here)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def assert_same_spectrum(one: dict, two: dict, rtol: float = 1e-8) -> None:
    assert two["eigenvalues"] == pytest.approx(one["eigenvalues"], rel=rtol)
    assert two["lambda_min"] == pytest.approx(one["lambda_min"], rel=rtol)
    assert two["trace"] == pytest.approx(one["trace"], rel=rtol)
    assert two["samples"] == one["samples"] and two["loss_terms"] == one["loss_terms"]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=False, map_location="cpu")["state_dict"]


def max_difference(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    return max(float((wa[k] - wb[k]).abs().max() / wa[k].abs().max().clamp_min(1e-12))
               for k in wa)


def test_shards_are_disjoint_contiguous_and_cover_everything():
    for n in (1, 2, 7, 100, 101):
        for size in (1, 2, 3, 4):
            if n < size:
                with pytest.raises(ValueError, match="processes"):
                    shard(n, 0, size)
                continue
            parts = [shard(n, r, size) for r in range(size)]
            assert [i for p in parts for i in p] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert World().size == 1 and not World().distributed


@pytest.fixture(scope="module")
def two_process_jobs(tmp_path_factory):
    """The commands of the tests below, run in one two-process launch (the last as
    `python -m hessdiag` runs it)."""
    where = tmp_path_factory.mktemp("dist")
    data = load_dataset("text", samples=9)  # padded token sequences, per-token loss
    torch.manual_seed(0)
    task = new_task("tiny-lm", data, model_kwargs={"d_model": 8, "heads": 2, "layers": 1})
    save_checkpoint(where / "text.pt", task.model, model_spec="tiny-lm",
                    model_kwargs=task.model_kwargs, data={"spec": "text", "split": "train"},
                    loss=task.loss.spec)
    jobs = {"text": ["spectrum", "text.pt", "--samples", "9", "--batch-size", "4", *SPECTRUM,
                     "--store", "two.h5"],
            "align": ["align", str(DIGITS), "--samples", "99", "--batches", "5",
                      "--batch-size", "32", "--json", "--quiet", "--device", "cpu",
                      "--store", "two.h5"],
            "surface": ["landscape", str(DIGITS), "--samples", "99", "--dims", "2",
                        "--resolution", "4,3", "--dtype", "float64", "--json", "--quiet",
                        "--device", "cpu", "--store", "two.h5"],
            "curve": ["landscape", str(DIGITS), "--samples", "99", "--directions", "eigen",
                      "--resolution", "5", "--range", "-0.5,0.5", "--dtype", "float64",
                      "--json", "--quiet", "--device", "cpu", "--store", "two.h5"]}
    for name, extra in RUNS.items():
        jobs[name] = [*TRAIN, *extra, "--run-name", name, "--checkpoint-dir", "two",
                      "--store", "two.h5"]
    # 151 samples: shards of 76 and 75, batches of 40 that the shards cut differently
    jobs["main"] = ["spectrum", str(DIGITS), "--samples", "151", "--batch-size", "40",
                    *SPECTRUM, "--store", "main.h5"]
    script = where / "jobs.py"
    script.write_text(JOBS)
    done = torchrun([str(script), json.dumps(list(jobs.items())), str(where)], where,
                    timeout=180)
    assert done.returncode == 0, done.stderr
    for name in jobs:
        assert f"{name} exit 0" in done.stderr, done.stderr
    (where / "stdout.txt").write_text(done.stdout)  # the "main" job's, of both ranks
    return where, jobs


def test_spectrum_on_two_processes_equals_one_process(two_process_jobs):
    where, jobs = two_process_jobs
    lines = (where / "stdout.txt").read_text().strip().splitlines()
    assert len(lines) == 1  # rank 1 prints nothing
    two = json.loads(lines[0])
    one = one_process([*jobs["main"][:-1], "one.h5"], where)
    assert_same_spectrum(one, two)
    analyses = Store(where / "main.h5").analyses()  # rank 0 alone wrote it
    assert [a.id for a in analyses] == [two["analysis_id"]]


def test_token_task_spectrum_on_two_processes_equals_one_process(two_process_jobs):
    where, jobs = two_process_jobs
    two = json.loads((where / "text.json").read_text())
    one = one_process([*jobs["text"][:-1], "one.h5"], where)
    assert_same_spectrum(one, two)
    assert one["samples"] == 9 and one["loss_terms"] == 204  # tokens, padding left out


def test_alignment_on_two_processes_equals_one_process(two_process_jobs):
    where, jobs = two_process_jobs
    two = json.loads((where / "align.json").read_text())
    one = one_process([*jobs["align"][:-1], "one.h5"], where)
    assert two["cosines"] == pytest.approx(one["cosines"], rel=1e-5, abs=1e-6)
    assert two["eigenvalues"] == pytest.approx(one["eigenvalues"], rel=1e-5)


@pytest.mark.parametrize("name", ["surface", "curve"])
def test_landscape_grid_split_across_two_processes_equals_one_process(two_process_jobs, name):
    where, jobs = two_process_jobs
    two = json.loads((where / f"{name}.json").read_text())
    one = one_process([*jobs[name][:-1], "one.h5"], where)
    np.testing.assert_allclose(np.array(two["loss"], dtype=float),
                               np.array(one["loss"], dtype=float), rtol=1e-12)
    np.testing.assert_allclose(np.array(two["accuracy"], dtype=float),
                               np.array(one["accuracy"], dtype=float), rtol=1e-12)
    assert two["directions"]["norms"] == pytest.approx(one["directions"]["norms"], rel=1e-12)
    stored = {a.id for a in Store(where / "two.h5").analyses() if a.kind == "landscape"}
    assert two["analysis_id"] in stored  # rank 0 wrote it, once
    assert not (where / ".two.h5.landscape").exists() or not any(
        (where / ".two.h5.landscape").iterdir())


@pytest.mark.parametrize("name", ["sgd", "sam-sync", "eigensam-sync"])
def test_training_on_two_processes_equals_one_process(two_process_jobs, name):
    where, _ = two_process_jobs
    two = json.loads((where / f"{name}.json").read_text())
    one = one_process([*TRAIN, *RUNS[name], "--run-name", name, "--checkpoint-dir", "one",
                       "--store", "one.h5"], where)
    assert two["steps"] == one["steps"] == 5
    assert max_difference(where / one["final_checkpoint"],
                          where / two["final_checkpoint"]) < 1e-5
    assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-5)
    assert two["lambda_max"] == pytest.approx(one["lambda_max"], rel=1e-4)
    runs = {r.id: r for r in Store(where / "two.h5").runs()}
    assert runs[name].attrs["processes"] == 2
    assert list(runs[name].arrays["metrics/step"]) == [1, 2, 3, 4, 5]  # logged once


def test_unsynced_sam_runs_and_differs_from_one_process(two_process_jobs):
    where, _ = two_process_jobs
    two = json.loads((where / "sam.json").read_text())
    assert two["status"] == "finished"
    one = one_process([*TRAIN, *RUNS["sam"], "--run-name", "sam", "--checkpoint-dir", "one",
                       "--store", "one.h5"], where)
    # each process perturbs by its own half's gradient: another (m-sharpness) update
    assert max_difference(where / one["final_checkpoint"],
                          where / two["final_checkpoint"]) > 1e-4


BROKEN = '''
import torch
from torch.utils.data import TensorDataset


def data(split="train"):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, generator=g)
    y = x[:, :1] ** 2
    x[30, 2] = float("nan")  # one corrupted sample, in the second half
    return TensorDataset(x, y)
'''


def test_a_failing_rank_stops_the_job_and_is_named(tmp_path):
    (tmp_path / "broken.py").write_text(BROKEN)
    torch.manual_seed(0)
    data = load_dataset(f"{tmp_path / 'broken.py'}:data")
    task = new_task("mlp", data, loss="mse", model_kwargs={"hidden": 4})
    save_checkpoint(tmp_path / "ckpt.pt", task.model, model_spec="mlp",
                    model_kwargs=task.model_kwargs,
                    data={"spec": f"{tmp_path / 'broken.py'}:data", "split": "train"},
                    loss="mse")
    store = Store(tmp_path / "s.h5")
    store.create_run("before", {"status": "finished"})
    done = torchrun(["-m", "hessdiag", "spectrum", "ckpt.pt", "--top-k", "1", "--quiet",
                     "--data", f"{tmp_path / 'broken.py'}:data", "--store", "s.h5"], tmp_path)
    assert done.returncode != 0
    assert "rank 1: error: the loss is nan on batch 0: not finite" in done.stderr, done.stderr
    assert "rank 0: stopped:" in done.stderr
    assert "rank 0: error" not in done.stderr  # rank 0's data is fine
    store.validate()
    assert [r.id for r in store.runs()] == ["before"] and not store.analyses()
