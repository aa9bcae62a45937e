"""A file hessdiag reads is data, never code: a hostile corpus of checkpoints, baselines and
pickles through every command that reads one. No code runs unless the user names it on
the command line or trusts the file (--unsafe-load), and no hostile file ends in exit 0.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import run_cli as run

from hessdiag.checkpoints import save_checkpoint
from hessdiag.models import build_model

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "checkpoints" / "digits-mlp.pt"
DEMO_BASELINE = ROOT / "checkpoints" / "digits-mlp.baseline.json"
TRUST = "(or --unsafe-load to trust every spec and pickle in the file)"


def hostile_checkpoint(tmp_path: Path, name: str, **record) -> Path:
    """A well-formed hessdiag checkpoint of the digits mlp, with some records replaced."""
    model = build_model("mlp", num_classes=10, in_shape=(1, 8, 8))
    path = tmp_path / f"{name}.pt"
    save_checkpoint(path, model, model_spec=record.pop("model_spec", "mlp"),
                    model_kwargs=record.pop("model_kwargs", {"num_classes": 10,
                                                              "in_shape": [1, 8, 8]}),
                    data=record.pop("data", {"spec": "digits", "split": "train"}),
                    loss=record.pop("loss", None), step=1)
    assert not record
    return path


@pytest.fixture
def pwned(tmp_path):
    """A file that exists only if hostile code ran, and a module that creates it on import."""
    mark = tmp_path / "PWNED"
    evil = tmp_path / "evil.py"
    evil.write_text(textwrap.dedent(f'''
        import pathlib
        pathlib.Path({str(mark)!r}).write_text("ran")

        def factory(*args, **kwargs):
            pathlib.Path({str(mark)!r}).write_text("ran")
            raise SystemExit(0)
    '''))
    return mark, evil


def commands(path: Path, store: Path) -> dict[str, list]:
    """Every command that reads a checkpoint, cheap settings."""
    return {
        "spectrum": ["spectrum", path, "--top-k", 1, "--store", store, "--quiet"],
        "sharpness": ["sharpness", path, "--measure", "critical", "--store", store],
        "landscape": ["landscape", path, "--resolution", 3, "--store", store, "--quiet"],
        "align": ["align", path, "--batches", 2, "--store", store, "--quiet"],
        "baseline": ["baseline", path, "-o", store.with_suffix(".json"), "--quiet"],
        "check": ["check", path, "--max-lambda", 1e9, "--quiet"],
    }


def one_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("command", ["spectrum", "sharpness", "landscape", "align", "baseline",
                                     "check"])
def test_a_recorded_os_system_never_runs(command, tmp_path, pwned):
    mark, _ = pwned
    path = hostile_checkpoint(tmp_path, "system", model_spec="os:system",
                              model_kwargs={"command": f"touch {mark}"})
    code, out, err = run(commands(path, tmp_path / "s.h5")[command])
    assert code == 2
    assert one_error(err) == (
        f"error: checkpoint {path} records model spec 'os:system', a factory spec: importing "
        "it would run code the file names, which hessdiag never does on its own; to run it, "
        f"pass --model os:system {TRUST}")
    assert not mark.exists()
    assert not (tmp_path / "s.h5").exists()  # nothing half-written either


@pytest.mark.parametrize("part", ["model", "data", "loss"])
def test_a_recorded_file_spec_is_never_imported(part, tmp_path, pwned):
    mark, evil = pwned
    spec = f"{evil}:factory"
    record = {"model": {"model_spec": spec}, "data": {"data": {"spec": spec, "split": "train"}},
              "loss": {"loss": spec}}[part]
    path = hostile_checkpoint(tmp_path, part, **record)
    code, out, err = run(["spectrum", path, "--top-k", 1, "--store", tmp_path / "s.h5"])
    assert code == 2 and not mark.exists()
    option = {"model": "--model", "data": "--data", "loss": "--loss"}[part]
    assert one_error(err) == (
        f"error: checkpoint {path} records {part} spec {spec!r}, a factory spec: importing it "
        "would run code the file names, which hessdiag never does on its own; to run it, "
        f"pass {option} {spec} {TRUST}")


def test_train_from_a_checkpoint_recording_a_hostile_loss(tmp_path, pwned):
    mark, _ = pwned
    path = hostile_checkpoint(tmp_path, "loss", loss="os:system")
    code, out, err = run(["train", "--model", "mlp", "--data", "digits", "--from", path,
                          "--epochs", 1, "--store", tmp_path / "s.h5",
                          "--checkpoint-dir", tmp_path / "ck"])
    assert code == 2 and not mark.exists()
    assert "records loss spec 'os:system', a factory spec" in one_error(err)


def test_naming_the_spec_or_trusting_the_file_runs_it(tmp_path, pwned):
    """The two ways to run a recorded factory: name it, or --unsafe-load (with a warning
    before it runs). A factory that raises SystemExit(0) is never a success."""
    mark, evil = pwned
    spec = f"{evil}:factory"
    path = hostile_checkpoint(tmp_path, "file", model_spec=spec)
    code, out, err = run(["spectrum", path, "--top-k", 1, "--model", spec, "--store",
                          tmp_path / "s.h5"])
    assert code == 3 and mark.exists()
    assert one_error(err).startswith("stopped: code run for this command (a model, data or "
                                     "loss factory) raised SystemExit(0) before it finished: "
                                     "nothing was decided")
    mark.unlink()
    code, out, err = run(["spectrum", path, "--top-k", 1, "--unsafe-load", "--store",
                          tmp_path / "s.h5"])
    assert code == 3 and mark.exists()
    warning, stopped = [line for line in err.splitlines() if line.strip()]
    assert warning == (f"warning: checkpoint {path} names model spec {spec!r}: importing and "
                       "running it (trusted with --unsafe-load)")
    assert stopped.startswith("stopped:")
    assert not (tmp_path / "s.h5").exists()


def test_a_registry_spec_in_a_file_is_fine(tmp_path):
    path = hostile_checkpoint(tmp_path, "plain", loss="cross-entropy")
    code, out, err = run(["spectrum", path, "--top-k", 1, "--store", tmp_path / "s.h5",
                          "--quiet"])
    assert code == 0, err


# --------------------------------------------------------------------------- baselines


def hostile_baseline(tmp_path: Path, data_spec: str) -> Path:
    payload = json.loads(DEMO_BASELINE.read_text())
    payload["data"]["spec"] = data_spec
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps(payload))
    return path


def test_a_baseline_cannot_run_code_or_turn_the_gate_green(tmp_path, pwned):
    mark, evil = pwned
    spec = f"{evil}:factory"
    baseline = hostile_baseline(tmp_path, spec)
    code, out, err = run(["check", DEMO, "--baseline", baseline, "--quiet"])
    assert code == 2 and not mark.exists()
    assert one_error(err) == (
        f"error: baseline {baseline} records data spec {spec!r}, a factory spec: importing it "
        "would run code the file names, which hessdiag never does on its own; to run it, pass "
        f"--data {spec} {TRUST}")
    # trusted, the factory's SystemExit(0) (at import) still ends without a verdict
    code, out, err = run(["check", DEMO, "--baseline", baseline, "--quiet", "--unsafe-load"])
    assert code == 3 and mark.exists() and "pass" not in out
    assert one_error(err.split("\n", 1)[1]).startswith("stopped: code run for this command")
    mark.unlink()
    code, out, err = run(["check", DEMO, "--baseline", baseline, "--quiet", "--data", spec])
    assert code == 3 and mark.exists()
    # naming other data than the baseline's: nothing would compare
    code, out, err = run(["check", DEMO, "--baseline", baseline, "--data", "digits"])
    assert code == 2
    assert one_error(err) == (f"error: the baseline was measured on data {spec!r}, not "
                              "'digits': nothing would compare (record a new baseline, or "
                              "do not pass --data)")


def test_a_store_baseline_is_data_too(tmp_path):
    """STORE:ANALYSIS_ID: a data factory the analysis records runs only when named."""
    factory = tmp_path / "tiny.py"
    factory.write_text(textwrap.dedent('''
        import torch
        from torch.utils.data import TensorDataset

        def data(split="train"):
            g = torch.Generator().manual_seed(0)
            return TensorDataset(torch.randn(32, 1, 8, 8, generator=g),
                                 torch.randint(0, 10, (32,), generator=g))
    '''))
    spec = f"{factory}:data"
    store = tmp_path / "s.h5"
    code, out, err = run(["spectrum", DEMO, "--data", spec, "--top-k", 1, "--store", store,
                          "--json", "--quiet"])
    assert code == 0, err
    analysis = json.loads(out)["analysis_id"]
    code, out, err = run(["check", DEMO, "--baseline", f"{store}:{analysis}", "--quiet",
                          "--metric", "lambda_max"])
    assert code == 2
    assert one_error(err).startswith(f"error: baseline {store}:{analysis} records data spec "
                                     f"{spec!r}, a factory spec")
    code, out, err = run(["check", DEMO, "--baseline", f"{store}:{analysis}", "--quiet",
                          "--metric", "lambda_max", "--data", spec])
    assert code == 0, err


# --------------------------------------------------------------------------- pickles


@pytest.fixture
def pickled_module(tmp_path, monkeypatch):
    """A whole pickled model whose unpickling writes a line to a counter and to stderr."""
    counter = tmp_path / "ran.txt"
    module = tmp_path / "evilmodel.py"
    module.write_text(textwrap.dedent(f'''
        import sys
        from torch import nn

        class Evil(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(64, 10)

            def forward(self, x):
                return self.fc(x.flatten(1))

            def __setstate__(self, state):
                with open({str(counter)!r}, "a") as fh:
                    fh.write("ran\\n")
                sys.stderr.write("pickle ran\\n")
                super().__setstate__(state)
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    evilmodel = importlib.import_module("evilmodel")
    path = tmp_path / "pickled.pt"
    torch.manual_seed(0)
    torch.save(evilmodel.Evil(), path)
    yield path, counter
    import sys

    sys.modules.pop("evilmodel", None)


@pytest.mark.parametrize("command", ["spectrum", "sharpness", "landscape", "align", "baseline",
                                     "check"])
def test_pickles_are_refused_everywhere(command, tmp_path, pickled_module):
    path, counter = pickled_module
    code, out, err = run([*commands(path, tmp_path / "s.h5")[command], "--data", "digits"])
    assert code == 2 and not counter.exists()
    assert one_error(err) == (f"error: checkpoint {path} contains pickled Python objects that "
                              "safe loading refuses (running them could execute code); if you "
                              "trust the file, pass --unsafe-load")


def test_unsafe_load_runs_a_pickle_once_and_warns_before(tmp_path, pickled_module):
    path, counter = pickled_module
    code, out, err = run(["spectrum", path, "--data", "digits", "--top-k", 1, "--unsafe-load",
                          "--store", tmp_path / "s.h5", "--quiet"])
    assert code == 0, err
    assert counter.read_text() == "ran\n"  # checked, then measured: unpickled once
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == [f"warning: checkpoint {path} holds pickled Python objects: unpickling it "
                     "runs the code they name (trusted with --unsafe-load)", "pickle ran"]


# --------------------------------------------------------------------------- bad files


def test_nonfinite_weights_are_refused_with_the_tensor_name(tmp_path):
    model = build_model("mlp", num_classes=10, in_shape=(1, 8, 8))
    with torch.no_grad():
        first = next(iter(model.state_dict()))
        model.state_dict()[first].view(-1)[:3] = torch.tensor([float("nan"), float("inf"), 1.0])
    path = tmp_path / "nan.pt"
    save_checkpoint(path, model, model_spec="mlp", model_kwargs={"num_classes": 10,
                                                                  "in_shape": [1, 8, 8]},
                    data={"spec": "digits", "split": "train"})
    total = model.state_dict()[first].numel()
    code, out, err = run(["spectrum", path, "--top-k", 1, "--store", tmp_path / "s.h5"])
    assert code == 2
    assert one_error(err) == (f"error: checkpoint {path}: tensor {first} has 2 non-finite "
                              f"values (NaN or inf) of {total}: the model diverged or the file "
                              "is damaged; pass --allow-nonfinite to measure it anyway")
    code, out, err = run(["spectrum", path, "--top-k", 1, "--store", tmp_path / "s.h5",
                          "--allow-nonfinite", "--quiet"])
    assert code == 2 and "the loss is nan on batch 0" in err  # measured: it is not finite


def test_a_non_utf8_path_is_refused_before_any_work(tmp_path):
    import os

    name = os.fsdecode(b"ck-\xff.pt")
    store = tmp_path / "s.h5"
    code, out, err = run(["spectrum", str(DEMO), "--top-k", 1, "--store", tmp_path / name])
    assert code == 2 and not store.exists()
    assert one_error(err) == (f"error: store {tmp_path}/ck-\\xff.pt is not valid UTF-8: "
                              "hessdiag records every path in its results and store as text; "
                              "rename the file or folder")


def test_a_failing_loss_factory_is_bad_input(tmp_path):
    code, out, err = run(["spectrum", DEMO, "--top-k", 1, "--loss", "math:sqrt", "--store",
                          tmp_path / "s.h5"])
    assert code == 2
    assert one_error(err).startswith("error: --loss 'math:sqrt': the factory raised "
                                     "TypeError: math.sqrt() takes exactly one argument")


def test_export_does_not_overwrite_an_earlier_export(tmp_path):
    store = tmp_path / "s.h5"
    assert run(["spectrum", DEMO, "--top-k", 1, "--store", store, "--quiet"])[0] == 0
    out_dir = tmp_path / "tables"
    assert run(["export", store, "--out", out_dir])[0] == 0
    before = (out_dir / "analyses.csv").read_bytes()
    (out_dir / "analyses.csv").write_text("mine")
    code, out, err = run(["export", store, "--out", out_dir])
    assert code == 2 and (out_dir / "analyses.csv").read_text() == "mine"
    assert one_error(err) == (f"error: --out {out_dir}: {out_dir / 'analyses.csv'} already "
                              "exists (an earlier export?); pass --force to replace it, or "
                              "choose another --out")
    assert run(["export", store, "--out", out_dir, "--force"])[0] == 0
    assert (out_dir / "analyses.csv").read_bytes() == before


def test_a_write_error_names_the_target_not_a_temporary_file(tmp_path, monkeypatch):
    import errno

    from hessdiag import _files

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_files.os, "fsync", full)
    out = tmp_path / "b.json"
    code, _, err = run(["baseline", DEMO, "-o", out, "--quiet"])
    assert code == 2 and not out.exists()
    assert one_error(err) == f"error: cannot write {out}: No space left on device"
    assert not list(tmp_path.glob(".b.json.*"))


# --------------------------------------------------------------------------- stores


def test_resuming_a_run_does_not_import_the_specs_its_store_records(tmp_path, monkeypatch):
    """A store is data too: a run of a file.py model resumes only when the model is named
    again (or trusted), and the refusal leaves the store as it was."""
    import hessdiag.train as train_module

    mark = tmp_path / "IMPORTED"
    factory = tmp_path / "net.py"
    factory.write_text(textwrap.dedent(f'''
        import pathlib
        from torch import nn
        pathlib.Path({str(mark)!r}).write_text("imported")

        def net(num_classes):
            return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))
    '''))
    spec = f"{factory}:net"
    store = tmp_path / "s.h5"
    real, calls = train_module._epoch_order, []

    def killed(n, seed, epoch):
        calls.append(epoch)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(n, seed, epoch)

    monkeypatch.setattr(train_module, "_epoch_order", killed)
    code, _, err = run(["train", "--model", spec, "--data", "digits", "--samples", 64,
                        "--batch-size", 32, "--epochs", 2, "--checkpoint-every", 1,
                        "--run-name", "r", "--store", store, "--checkpoint-dir",
                        tmp_path / "ck", "--quiet"])
    assert code == 130, err
    monkeypatch.undo()
    mark.unlink()
    before = store.read_bytes()
    code, out, err = run(["train", "--resume", "r", "--store", store, "--quiet"])
    assert code == 2 and not mark.exists() and store.read_bytes() == before
    assert one_error(err) == (
        f"error: store {store} (run r) records model spec {spec!r}, a factory spec: importing "
        "it would run code the file names, which hessdiag never does on its own; to run it, "
        f"pass --model {spec} {TRUST}")
    code, out, err = run(["train", "--resume", "r", "--store", store, "--model", spec,
                          "--quiet", "--json"])
    assert code == 0, err
    assert json.loads(out)["steps"] == 4
