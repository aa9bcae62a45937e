"""`hessdiag train`: records in the store, checkpoints, exact resume after SIGKILL, divergence."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from hessdiag.cli.app import app
from typer.testing import CliRunner

from hessdiag.checkpoints import load_checkpoint
from hessdiag.store import Store
from hessdiag.train import TrainConfig, train

SMALL = dict(model="mlp", data="digits", model_kwargs={"hidden": 16}, samples=512,
             batch_size=128, epochs=2, lr=0.05, seed=3)


def _weights(path):
    return load_checkpoint(path).model.state_dict()


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("optimizer", ["sgd", "sam", "eigensam"])
def test_a_run_writes_metrics_sharpness_and_checkpoints(tmp_path, optimizer):
    cfg = TrainConfig(**SMALL, optimizer=optimizer, eig_every=2, sharpness_every=4,
                      checkpoint_every=3, run_name=f"r-{optimizer}",
                      checkpoint_dir=str(tmp_path / "ckpt"))
    store = Store(tmp_path / "s.h5")
    result = train(cfg, store=store)
    assert result.status == "finished" and result.steps == 8 and result.epochs == 2
    run = store.run(f"r-{optimizer}")
    x = run.arrays
    assert x["metrics/step"].tolist() == list(range(1, 9))
    assert np.isfinite(x["metrics/loss"]).all()
    assert np.isfinite(x["metrics/test_acc"][[3, 7]]).all()  # epoch ends
    assert np.isnan(x["metrics/test_acc"][[0, 1, 2, 4, 5, 6]]).all()
    assert x["sharpness/step"].tolist() == [0, 4, 8]  # from step 0, and at the end
    assert (x["sharpness/lambda_max"] > 0).all()
    assert (x["sharpness/lambda_max_converged"] == 1).all()
    # each lambda_max with the step's lr and its distance to 2 (1 + momentum) / lr
    # (the lr of the update that follows the measurement: the metrics row of step s + 1;
    # the final row, after the last update, repeats the last lr)
    lr_of = dict(zip(x["metrics/step"].astype(int), x["metrics/lr"], strict=True))
    np.testing.assert_allclose(x["sharpness/lr"], [lr_of[min(s + 1, 8)]
                                                   for s in x["sharpness/step"]])
    np.testing.assert_allclose(x["sharpness/threshold"], 2 * (1 + 0.9) / x["sharpness/lr"])
    np.testing.assert_allclose(x["sharpness/stability"],
                               x["sharpness/lambda_max"] / x["sharpness/threshold"])
    aligned = x["sharpness/alignment"][:2]
    assert ((aligned >= 0) & (aligned <= 1)).all() and np.isnan(x["sharpness/alignment"][2])
    assert x["checkpoints/step"].tolist() == [3, 6, 8]
    assert x["checkpoints/final"].tolist() == [False, False, True]
    assert run.attrs["status"] == "finished" and run.attrs["config"]["optimizer"] == optimizer
    final = load_checkpoint(result.final_checkpoint)
    assert final.info.step == 8 and final.info.run_id == f"r-{optimizer}"
    assert final.info.data["spec"] == "digits"
    # the lr follows the cosine schedule from the configured peak
    np.testing.assert_allclose(x["metrics/lr"][0], 0.05)
    assert x["metrics/lr"][-1] < 0.05 * 0.05


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["--model", "mlp", "--data", "digits", "--samples", "512", "--batch-size", "64",
            "--epochs", "4", "--optimizer", "eigensam", "--eig-every", "5", "--augment",
            "--checkpoint-every", "8", "--sharpness-every", "12", "--seed", "1", "--quiet"]

    def train_args(extra, store):
        return ["train", *args, *extra, "--store", str(store),
                "--checkpoint-dir", str(tmp_path / "ckpt")]

    # only the killed run needs a process of its own (the SIGKILL is the point); the
    # uninterrupted run and the resume run in this process, one torch thread as there
    proc = subprocess.Popen([sys.executable, "-m", "hessdiag",
                             *train_args(["--run-name", "killed"], tmp_path / "killed.h5")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = tmp_path / "ckpt" / "killed" / "step-000016.pt"
    deadline = time.time() + 120
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert marker.exists()
    store = Store(tmp_path / "killed.h5")
    run = store.run("killed")  # opens after the kill, with every flushed record
    assert run.attrs["status"] == "running"
    # the kill may land between writing a checkpoint file and recording it: the store
    # records a prefix of the checkpoints, and --resume starts from its last one
    assert run.arrays["checkpoints/step"].tolist() in ([8], [8, 16], [8, 16, 24])
    assert not (tmp_path / "ckpt" / "killed" / "step-000032.pt").exists()
    code, _, err = run_cli(train_args(["--run-name", "whole"], tmp_path / "whole.h5"))
    assert code == 0, err
    code, _, err = run_cli(["train", "--resume", "killed", "--store", tmp_path / "killed.h5",
                            "--quiet"])
    assert code == 0, err
    whole = _weights(tmp_path / "ckpt" / "whole" / "step-000032.pt")
    again = _weights(tmp_path / "ckpt" / "killed" / "step-000032.pt")
    assert _equal(whole, again)
    a, b = Store(tmp_path / "whole.h5").run("whole"), Store(tmp_path / "killed.h5").run("killed")
    assert a.arrays["metrics/step"].tolist() == b.arrays["metrics/step"].tolist()
    np.testing.assert_array_equal(a.arrays["metrics/loss"], b.arrays["metrics/loss"])
    np.testing.assert_allclose(a.arrays["sharpness/lambda_max"], b.arrays["sharpness/lambda_max"],
                               rtol=1e-3)
    assert b.attrs["status"] == "finished"


def test_divergence_stops_with_exit_1_and_keeps_records(tmp_path):
    result = CliRunner().invoke(app, [
        "train", "--model", "mlp", "--data", "digits", "--samples", "256", "--epochs", "20",
        "--lr", "1e6", "--schedule", "constant", "--checkpoint-every", "2", "--run-name", "boom",
        "--store", str(tmp_path / "s.h5"), "--checkpoint-dir", str(tmp_path / "ckpt"),
        "--json"])
    assert result.exit_code == 1, result.output
    summary = json.loads(result.stdout)
    assert summary["status"] == "diverged" and "at step" in summary["message"]
    assert "at step" in result.stderr
    run = Store(tmp_path / "s.h5").run("boom")
    assert run.attrs["status"] == "diverged"
    assert len(run.arrays["metrics/step"]) == summary["steps"]
    for path in run.arrays["checkpoints/path"]:
        assert Path(path.decode() if isinstance(path, bytes) else path).exists()


def test_bad_train_input_exits_2(tmp_path):
    runner = CliRunner()
    for args, message in [
        (["--model", "mlp"], "--model and --data"),
        (["--model", "mlp", "--data", "digits", "--optimizer", "adam"], "--optimizer"),
        (["--model", "mlp", "--data", "digits", "--augment", "--samples", "8"], None),
        (["--model", "mlp", "--data", "tabular", "--label-smoothing", "0.1"],
         "--label-smoothing applies to cross-entropy"),
        (["--model", "mlp", "--data", "tabular", "--augment"], "--augment crops and flips"),
        (["--model", "mlp", "--data", "digits", "--model-kwargs", "{hidden"], "--model-kwargs"),
        (["--model", "nope", "--data", "digits"], "unknown model"),
        (["--resume", "ghost"], "no run 'ghost'"),
    ]:
        result = runner.invoke(app, ["train", *args, "--store", str(tmp_path / "s.h5"),
                                     "--checkpoint-dir", str(tmp_path / "ckpt"), "--epochs",
                                     "1"])
        if message is None:  # images: --augment is fine
            assert result.exit_code == 0, (args, result.output)
            continue
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr


def test_fine_tune_from_a_checkpoint_starts_from_its_weights(tmp_path):
    cfg = TrainConfig(**SMALL, checkpoint_dir=str(tmp_path / "ckpt"), run_name="base")
    base = train(cfg, store=Store(tmp_path / "s.h5"))
    tuned_cfg = TrainConfig(**{**SMALL, "lr": 1e-9, "epochs": 1}, optimizer="sam",
                            init_from=base.final_checkpoint, run_name="tuned",
                            checkpoint_dir=str(tmp_path / "ckpt"))
    tuned = train(tuned_cfg, store=Store(tmp_path / "s.h5"))
    a, b = _weights(base.final_checkpoint), _weights(tuned.final_checkpoint)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    fresh = TrainConfig(**{**SMALL, "lr": 1e-9, "epochs": 1}, run_name="fresh",
                        checkpoint_dir=str(tmp_path / "ckpt"))
    c = _weights(train(fresh, store=Store(tmp_path / "s.h5")).final_checkpoint)
    assert not all(torch.allclose(a[k], c[k], atol=1e-3) for k in a)


def test_logged_sharpness_pairs_the_perturbation_and_eigenvector_at_the_same_weights(tmp_path):
    """The row logged at step s is measured at the weights w_s of checkpoint s: lambda_max
    equals the dense Hessian's at w_s, and the alignment is that of SAM's perturbation at
    w_s (the gradient of step s + 1's minibatch) with w_s's top eigenvector. The weights
    move enough between steps that the eigenvector at w_{s+1} gives another answer."""
    from conftest import dense_hessian
    from torch import nn

    from hessdiag.data import batch_of, load_dataset
    from hessdiag.task import load_task

    cfg = TrainConfig(model="mlp", data="digits", model_kwargs={"hidden": 6}, samples=256,
                      batch_size=32, epochs=1, lr=0.5, momentum=0.0, optimizer="sam",
                      rho=0.05, sharpness_every=3, sharpness_samples=64, checkpoint_every=3,
                      run_name="pair", checkpoint_dir=str(tmp_path / "ckpt"), seed=2)
    store = Store(tmp_path / "s.h5")
    train(cfg, store=store)
    run = store.run("pair").arrays
    assert run["sharpness/step"].tolist() == [0, 3, 6, 8]
    assert np.isnan(run["sharpness/alignment"][-1])  # the final weights: no perturbation
    info = load_dataset("digits", samples=256)
    measure = load_dataset("digits", samples=64)
    x_m, y_m = batch_of(measure, range(64))

    def top(step):
        model = load_task(str(tmp_path / "ckpt" / "pair" / f"step-{step:06d}.pt")).model
        H = dense_hessian(model, nn.CrossEntropyLoss(), [(x_m, y_m)])
        values, vectors = torch.linalg.eigh(H)
        return model, float(values[-1]), vectors[:, -1]

    for row, step in ((1, 3), (2, 6)):
        model, lam, v = top(step)
        assert run["sharpness/lambda_max"][row] == pytest.approx(lam, rel=2e-3)
        order = torch.randperm(256, generator=torch.Generator().manual_seed(2 * 1_000_003))
        x, y = batch_of(info, order[step * 32:(step + 1) * 32])  # step s + 1's minibatch
        model.train()
        loss = nn.functional.cross_entropy(model(x), y)
        g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, list(
            model.parameters()))]).double()
        cos = abs(float(g @ v)) / float(g.norm())
        assert run["sharpness/alignment"][row] == pytest.approx(cos, abs=2e-3)
        _, _, v_next = top(step + 3) if step + 3 <= 6 else top(8)
        assert abs(abs(float(g @ v_next)) / float(g.norm()) - cos) > 0.01


def test_fine_tuning_keeps_the_recorded_model_arguments(tmp_path):
    """--from with the same --model and no --model-kwargs builds the recorded architecture
    (hidden 16 here), not the default one."""
    cfg = TrainConfig(**SMALL, checkpoint_dir=str(tmp_path / "ckpt"), run_name="base")
    base = train(cfg, store=Store(tmp_path / "s.h5"))
    tuned = TrainConfig(**{**SMALL, "model_kwargs": {}, "epochs": 1},
                        init_from=base.final_checkpoint, run_name="tuned",
                        checkpoint_dir=str(tmp_path / "ckpt"))
    result = train(tuned, store=Store(tmp_path / "s.h5"))
    assert load_checkpoint(result.final_checkpoint).model.net[1].out_features == 16


def test_fine_tuning_from_a_pickled_module_needs_unsafe_load(tmp_path, monkeypatch):
    from hessdiag.data import load_dataset
    from hessdiag.task import new_task

    # a pickle is unpickled (and warned about) once per process and file content: this test
    # is about the first time, whatever an earlier test in this process unpickled
    monkeypatch.setattr("hessdiag.checkpoints._UNPICKLED", {})
    task = new_task("mlp", load_dataset("digits", samples=64), model_kwargs={"hidden": 8})
    pickled = tmp_path / "module.pt"
    torch.save(task.model, pickled)
    args = ["train", "--model", "mlp", "--data", "digits", "--samples", "64", "--epochs", "1",
            "--batch-size", "32", "--from", str(pickled), "--checkpoint-dir",
            str(tmp_path / "ckpt"), "--store", str(tmp_path / "s.h5"), "--quiet"]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2 and "--unsafe-load" in refused.stderr
    assert not (tmp_path / "s.h5").exists()
    # allowed to unpickle (after a warning), the model still has to be rebuilt by name: one
    # line saying how
    unpickled = CliRunner().invoke(app, [*args, "--unsafe-load"])
    warning, error = unpickled.stderr.strip().splitlines()
    assert unpickled.exit_code == 2 and "model.state_dict()" in error
    assert warning.startswith(f"warning: checkpoint {pickled} holds pickled Python objects")
    weights = tmp_path / "weights.pt"
    torch.save(task.model.state_dict(), weights)
    done = CliRunner().invoke(app, [*[str(weights) if a == str(pickled) else a for a in args],
                                    "--model-kwargs", '{"hidden": 8}', "--json"])
    assert done.exit_code == 0, done.stderr
    assert json.loads(done.stdout)["status"] == "finished"
