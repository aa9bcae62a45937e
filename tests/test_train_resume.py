"""`hessdiag train --resume` and what is checked before a run is recorded: a finished run is
left byte for byte as it was; a run killed before its first checkpoint, killed mid-run or
stopped by a full disk continues to the weights of an uninterrupted run; a checkpoint
folder that cannot take a checkpoint is refused before anything is written. Everything
through the command line, each with its exact message."""

import errno
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import read_only_path, run_cli

import hessdiag.train as train_module
from hessdiag.checkpoints import load_checkpoint
from hessdiag.store import Store

# 256 samples in minibatches of 64: 4 steps an epoch, 12 steps; checkpoints at 3, 6, 9 and
# 12, sharpness rows at 0, 4, 8 and 12
ARGS = ["--model", "mlp", "--data", "digits", "--model-kwargs", '{"hidden": 16}',
        "--samples", "256", "--batch-size", "64", "--epochs", "3", "--lr", "0.05",
        "--optimizer", "eigensam", "--eig-every", "2", "--augment", "--checkpoint-every", "3",
        "--sharpness-every", "4", "--sharpness-samples", "64", "--seed", "5", "--quiet"]


def _train(tmp_path, name, *extra, store="s.h5"):
    return run_cli(["train", *ARGS, "--run-name", name, "--store", tmp_path / store,
                    "--checkpoint-dir", tmp_path / "ckpt", *extra])


def _resume(tmp_path, name, *extra, store="s.h5"):
    return run_cli(["train", "--resume", name, "--store", tmp_path / store, *extra])


def _ckpt(tmp_path, name, step):
    return (tmp_path / "ckpt" / name / f"step-{step:06d}.pt").resolve()


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """An uninterrupted run: the truth every interrupted one is compared with."""
    directory = tmp_path_factory.mktemp("whole")
    code, out, err = _train(directory, "whole", "--json")
    assert code == 0, err
    return {"summary": json.loads(out), "run": Store(directory / "s.h5").run("whole"),
            "weights": load_checkpoint(_ckpt(directory, "whole", 12)).model.state_dict()}


def _same_as_whole(whole, tmp_path, name):
    weights = load_checkpoint(_ckpt(tmp_path, name, 12)).model.state_dict()
    assert weights.keys() == whole["weights"].keys()
    for key in weights:  # bit for bit
        assert torch.equal(weights[key], whole["weights"][key]), key
    run, truth = Store(tmp_path / "s.h5").run(name), whole["run"]
    assert run.attrs["status"] == "finished"
    assert run.attrs["final_checkpoint"] == str(_ckpt(tmp_path, name, 12))
    for column in ("metrics/step", "metrics/loss", "metrics/test_loss", "sharpness/step",
                   "sharpness/lambda_max", "sharpness/alignment", "checkpoints/step",
                   "checkpoints/final"):
        np.testing.assert_array_equal(run.arrays[column], truth.arrays[column], err_msg=column)


def _files(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- finished


def test_resuming_a_finished_run_changes_nothing_and_says_so(tmp_path, whole):
    code, out, err = _train(tmp_path, "r", "--json")
    assert code == 0, err
    first = json.loads(out)
    before = _files(tmp_path)
    code, out, err = _resume(tmp_path, "r")
    assert code == 0, err
    assert out == (f"run r is finished (step 12, final checkpoint {_ckpt(tmp_path, 'r', 12)}); "
                   "nothing to do\n")
    assert err == ""
    assert _files(tmp_path) == before  # the store, its journal and every checkpoint
    run = Store(tmp_path / "s.h5").run("r")
    assert run.arrays["sharpness/step"].tolist() == [0, 4, 8, 12]
    assert run.attrs["final_checkpoint"] == str(_ckpt(tmp_path, "r", 12))
    # --json: what the run reported when it finished, read back from the store
    code, out, err = _resume(tmp_path, "r", "--json")
    assert code == 0, err
    again = json.loads(out)
    assert again["nothing_to_do"] is True and again["message"].endswith("nothing to do")
    for key in ("run_id", "status", "steps", "epochs", "final_checkpoint", "train_loss",
                "train_accuracy", "test_loss", "test_accuracy", "lambda_max", "alignment"):
        assert again[key] == first[key], key
    assert _files(tmp_path) == before
    assert first["lambda_max"] == whole["summary"]["lambda_max"]


def test_a_run_stopped_after_its_final_checkpoint_is_recorded_as_finished(tmp_path,
                                                                          monkeypatch):
    """Killed between recording its final checkpoint and recording its end: nothing is
    trained again, the end is recorded."""
    real = Store.append_run

    def killed_at_the_end(self, run_id, tables, attrs=None):
        if attrs and attrs.get("status") == "finished":
            raise KeyboardInterrupt
        return real(self, run_id, tables, attrs)

    monkeypatch.setattr(Store, "append_run", killed_at_the_end)
    code, _, err = _train(tmp_path, "r")
    assert code == 130 and err == "interrupted\n"
    monkeypatch.setattr(Store, "append_run", real)
    run = Store(tmp_path / "s.h5").run("r")
    assert run.attrs["status"] == "running" and run.arrays["checkpoints/final"][-1]
    final = _ckpt(tmp_path, "r", 12)
    before = final.read_bytes()
    code, out, err = _resume(tmp_path, "r")
    assert code == 0, err
    assert out == (f"run r had finished (step 12, final checkpoint {final}) when it was "
                   "stopped; recorded it as finished\n")
    run = Store(tmp_path / "s.h5").run("r")
    assert run.attrs["status"] == "finished" and run.attrs["final_checkpoint"] == str(final)
    assert run.arrays["sharpness/step"].tolist() == [0, 4, 8, 12]
    assert final.read_bytes() == before
    code, out, _ = _resume(tmp_path, "r")
    assert code == 0 and out.endswith("; nothing to do\n")


# --------------------------------------------------------------------------- killed


def test_a_run_killed_before_its_first_checkpoint_resumes_from_step_0(tmp_path, whole,
                                                                      monkeypatch):
    """Checkpoints every 6 steps, killed while writing the first: the records of epoch 1
    (metrics of steps 1-4, the sharpness row of step 0) are in the store and no
    checkpoint. Resume drops them and starts again from step 0 with the recorded settings."""
    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_checkpoint", killed)
    code, _, err = _train(tmp_path, "r", "--checkpoint-every", "6")  # the last one counts
    assert code == 130 and err == "interrupted\n"
    monkeypatch.undo()
    run = Store(tmp_path / "s.h5").run("r")
    assert run.attrs["status"] == "running" and "checkpoints/step" not in run.arrays
    assert run.arrays["metrics/step"].tolist() == [1, 2, 3, 4]
    assert run.arrays["sharpness/step"].tolist() == [0]
    # started again under its name: refused, saying how to continue it
    code, _, err = _train(tmp_path, "r")
    assert code == 2
    assert err == (f"error: store {tmp_path / 's.h5'} already has a run 'r': give another "
                   "--run-name, or continue it with --resume r\n")
    code, _, err = _resume(tmp_path, "r")
    assert code == 0, err
    run = Store(tmp_path / "s.h5").run("r")
    assert run.arrays["metrics/step"].tolist() == list(range(1, 13))
    assert run.arrays["checkpoints/step"].tolist() == [6, 12]
    assert run.attrs["config"]["checkpoint_every"] == 6  # its recorded settings
    weights = load_checkpoint(_ckpt(tmp_path, "r", 12)).model.state_dict()
    assert all(torch.equal(weights[k], whole["weights"][k]) for k in weights)
    np.testing.assert_array_equal(run.arrays["metrics/loss"], whole["run"].arrays["metrics/loss"])
    np.testing.assert_array_equal(run.arrays["sharpness/lambda_max"],
                                  whole["run"].arrays["sharpness/lambda_max"])


def test_a_run_killed_mid_run_resumes_to_the_uninterrupted_weights(tmp_path, whole,
                                                                   monkeypatch):
    """Killed after 7 updates (checkpoints 3 and 6 recorded, the sharpness row of step 4
    logged): resume reloads step 6 and ends bit for bit where the uninterrupted run did."""
    real, calls = train_module._epoch_order, []

    def killed_at_step_7(n, seed, epoch):
        calls.append(epoch)
        if len(calls) == 8:  # the order of the 8th step, after 7 updates
            raise KeyboardInterrupt
        return real(n, seed, epoch)

    monkeypatch.setattr(train_module, "_epoch_order", killed_at_step_7)
    code, _, err = _train(tmp_path, "r")
    assert code == 130 and err == "interrupted\n"
    monkeypatch.undo()
    run = Store(tmp_path / "s.h5").run("r")
    assert run.arrays["checkpoints/step"].tolist() == [3, 6]
    assert run.arrays["metrics/step"].tolist() == [1, 2, 3, 4, 5, 6]
    assert run.arrays["sharpness/step"].tolist() == [0, 4]
    # no room for a checkpoint: refused before any row is dropped
    import shutil

    before = _files(tmp_path)
    real_usage = shutil.disk_usage
    monkeypatch.setattr(train_module.shutil, "disk_usage",
                        lambda p: real_usage(p)._replace(free=1000))
    code, _, err = _resume(tmp_path, "r")
    monkeypatch.undo()
    assert code == 2
    assert err.startswith(f"error: not enough free space for a checkpoint in "
                          f"{(tmp_path / 'ckpt' / 'r').resolve()}: about ")
    assert err.endswith(" needed, 1000 B free; free space and continue it with --resume r\n")
    assert _files(tmp_path) == before
    code, out, err = _resume(tmp_path, "r", "--json")
    assert code == 0, err
    assert json.loads(out)["steps"] == 12 and json.loads(out)["nothing_to_do"] is False
    _same_as_whole(whole, tmp_path, "r")


# --------------------------------------------------------------------------- full disk


def test_a_full_disk_at_a_checkpoint_is_one_line_and_the_run_stays_resumable(tmp_path, whole,
                                                                            monkeypatch):
    """The third checkpoint (step 9) hits a full disk part way through: exit 2 with one
    line naming it; no partial file is left or recorded; resume continues from step 6."""
    real, calls = torch.save, []

    def disk_full_at_the_third(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            f.write(b"PK\x03\x04 partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_at_the_third)
    code, out, err = _train(tmp_path, "r")
    monkeypatch.undo()
    assert code == 2
    message = (f"no space left on the device for checkpoint {_ckpt(tmp_path, 'r', 9)} at step "
               f"9: the run stopped and can continue from {_ckpt(tmp_path, 'r', 6)}; free "
               "space there and continue it with --resume r")
    assert err == f"error: {message}\n"
    assert sorted(p.name for p in (tmp_path / "ckpt" / "r").iterdir()) == [
        "step-000003.pt", "step-000006.pt"]  # no partial file, no temporary left
    run = Store(tmp_path / "s.h5").run("r")
    assert run.arrays["checkpoints/step"].tolist() == [3, 6]
    assert run.attrs["status"] == "stopped"
    assert run.attrs["message"] == message.replace("--resume", "resume")
    code, _, err = _resume(tmp_path, "r")
    assert code == 0, err
    _same_as_whole(whole, tmp_path, "r")


def test_a_full_store_disk_is_one_line_and_the_run_stays_resumable(tmp_path, whole,
                                                                   monkeypatch):
    """The store cannot take the record of checkpoint 6 (its disk is full): the checkpoint
    file is there but not recorded, so resume starts from checkpoint 3 and rewrites it."""
    real = Store.append_run

    def full_at_step_6(self, run_id, tables, attrs=None):
        if 6 in tables.get("checkpoints", {}).get("step", []):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, run_id, tables, attrs)

    monkeypatch.setattr(Store, "append_run", full_at_step_6)
    code, _, err = _train(tmp_path, "r")
    monkeypatch.undo()
    assert code == 2
    assert err == (f"error: cannot write store {tmp_path / 's.h5'} at step 6 (no space left on "
                   f"the device): the run stopped and can continue from "
                   f"{_ckpt(tmp_path, 'r', 3)}; free space there and continue it with "
                   "--resume r\n")
    assert Store(tmp_path / "s.h5").run("r").arrays["checkpoints/step"].tolist() == [3]
    code, _, err = _resume(tmp_path, "r")
    assert code == 0, err
    _same_as_whole(whole, tmp_path, "r")


def test_a_full_disk_reaches_the_checkpoint_writer_as_an_oserror(tmp_path, monkeypatch):
    """The real thing, through /dev/full: torch's writer, given a path, reports a full disk
    as an unrelated RuntimeError; hessdiag writes through a file object, whose ENOSPC
    arrives as it is."""
    import contextlib

    import hessdiag.checkpoints as checkpoints

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")

    @contextlib.contextmanager
    def to_dev_full(path):
        yield Path("/dev/full")

    monkeypatch.setattr(checkpoints, "replacing", to_dev_full)
    model = torch.nn.Linear(300, 300)
    with pytest.raises(OSError) as caught:
        checkpoints.save_checkpoint(tmp_path / "x.pt", model, model_spec="mlp")
    assert caught.value.errno == errno.ENOSPC


# --------------------------------------------------------------------------- up front


def test_a_checkpoint_dir_behind_a_regular_file_is_refused_before_anything_is_written(
        tmp_path):
    (tmp_path / "file").write_text("not a folder")
    code, _, err = run_cli(["train", *ARGS, "--run-name", "r", "--store", tmp_path / "s.h5",
                            "--checkpoint-dir", tmp_path / "file" / "ckpt"])
    assert code == 2
    assert err == (f"error: cannot write checkpoints to {tmp_path / 'file' / 'ckpt' / 'r'}: "
                   f"{tmp_path / 'file'} is not a directory; give another --checkpoint-dir\n")
    assert not (tmp_path / "s.h5").exists()  # the run is not recorded


def test_a_read_only_checkpoint_dir_is_refused_before_anything_is_written(tmp_path):
    target = read_only_path(tmp_path, "ckpt")
    try:  # the truth: this folder refuses a new entry
        os.rmdir(tempfile.mkdtemp(dir=target.parent))
        pytest.skip(f"{target.parent} is writable here")
    except OSError as exc:
        reason = exc.strerror
    code, _, err = run_cli(["train", *ARGS, "--run-name", "r", "--store", tmp_path / "s.h5",
                            "--checkpoint-dir", target])
    assert code == 2
    assert err == (f"error: cannot write checkpoints to {target / 'r'}: {target.parent} is "
                   f"not writable ({reason}); give another --checkpoint-dir\n")
    assert not (tmp_path / "s.h5").exists()


def test_too_little_free_space_for_one_checkpoint_is_refused_up_front(tmp_path, monkeypatch):
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(train_module.shutil, "disk_usage",
                        lambda p: real(p)._replace(free=1000))
    code, _, err = _train(tmp_path, "r")
    assert code == 2
    assert err.startswith(f"error: not enough free space for a checkpoint in {tmp_path}: "
                          "about ")
    assert err.endswith(" needed, 1000 B free; free space, or give another --checkpoint-dir\n")
    assert not (tmp_path / "s.h5").exists() and not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("optimizer,base,every", [("sgd", "sgd", None), ("sgd", "adam", 2),
                                                  ("sam", "adamw", None),
                                                  ("eigensam", "sgd", 2)])
def test_the_space_estimate_bounds_a_real_checkpoint(tmp_path, optimizer, base, every):
    """The estimate the free-space check uses is at least the size of the checkpoints the
    run then writes, and not far above it."""
    seen = []
    real = train_module._checkpoint_bytes

    def spy(*args):
        seen.append(real(*args))
        return seen[-1]

    train_module._checkpoint_bytes = spy
    try:
        cfg = train_module.TrainConfig(
            model="mlp", data="digits", model_kwargs={"hidden": 256}, samples=128,
            batch_size=64, epochs=1, optimizer=optimizer, base=base, sharpness_every=every,
            sharpness_samples=64, eig_every=1, checkpoint_dir=str(tmp_path / "ckpt"))
        result = train_module.train(cfg, store=Store(tmp_path / "s.h5"))
    finally:
        train_module._checkpoint_bytes = real
    size = os.path.getsize(result.final_checkpoint)
    assert size <= seen[0] <= 1.6 * size + 2 ** 18
