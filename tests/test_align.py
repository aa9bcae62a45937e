"""Alignment: closed form on a quadratic, the probe leaves training alone, the command on
checkpoints and directories, --follow beside a training run, and bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hessdiag.cli.app import app
from torch import nn
from typer.testing import CliRunner

from hessdiag.align import AlignmentProbe, measure_alignment
from hessdiag.optim import SAM
from hessdiag.store import Store
from hessdiag.train import TrainConfig, train

F64 = torch.float64


class Quadratic(nn.Module):
    """A 'model' whose output is its parameter vector; with ``QuadraticLoss`` the loss is
    ``0.5 w^T A w - b^T w``: Hessian ``A`` and gradient ``A w - b`` for every batch."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, x):
        return self.w


class QuadraticLoss:
    def __init__(self, A, b):
        self.A, self.b = A, b

    def __call__(self, out, y):
        return 0.5 * out @ self.A.to(out) @ out - self.b.to(out) @ out


@pytest.mark.parametrize("rule", ["sam", "asam", "eigensam", "eigensam-exact"])
def test_alignment_equals_the_closed_form_on_a_quadratic(rule):
    g_ = torch.Generator().manual_seed(0)
    n = 12
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g_, dtype=F64))
    eig = torch.cat([torch.tensor([9.0, 4.0], dtype=F64), torch.linspace(-1, 2, n - 2,
                                                                         dtype=F64)])
    A = (Q * eig) @ Q.T
    b = torch.randn(n, generator=g_, dtype=F64)
    w = torch.randn(n, generator=g_, dtype=F64)
    model = Quadratic(w).double()
    dummy = [(torch.zeros(1), torch.zeros(1))] * 3
    alpha = 0.2
    v = Q[:, 0]
    # the optimizer's estimate: near v, not v (what Eigen-SAM holds after a few power steps)
    u = v + 0.4 * torch.randn(n, generator=g_, dtype=F64)
    u = u / u.norm()
    result = measure_alignment(model, QuadraticLoss(A, b), dummy[0], dummy, rule=rule,
                               alpha=alpha, tol=1e-10, top_k=2,
                               eigenvector=u if rule == "eigensam" else None)
    g = A @ w - b
    if rule == "sam":
        e = g
    elif rule == "asam":
        e = w.abs() ** 2 * g
    else:
        d = u if rule == "eigensam" else v * torch.sign(g @ v)  # the measured v's sign is
        gh = g / g.norm()                                        # arbitrary; e's is not
        d = d * torch.sign(g @ d)
        e = gh + alpha * (d - (gh @ d) * gh)
    cos = float(e @ v / e.norm())
    assert result.alignment == pytest.approx(abs(cos), abs=1e-6)
    assert abs(result.alignment_signed) == pytest.approx(abs(cos), abs=1e-6)
    assert result.lambda_max == pytest.approx(9.0, rel=1e-8)
    share = float(((Q[:, :2].T @ e) ** 2).sum() / (e @ e))
    assert result.topk_share == pytest.approx(share, abs=1e-6)
    # the same minibatch three times is one minibatch: no interval from it
    assert result.batches == 1 and result.repeats == 2 and result.requested == 3
    assert np.isnan(result.ci95).all() and "single minibatch" in result.note


def test_eigensam_rule_needs_the_optimizers_eigenvector():
    model = Quadratic(torch.ones(3, dtype=F64)).double()
    loss = QuadraticLoss(torch.eye(3, dtype=F64), torch.zeros(3, dtype=F64))
    dummy = [(torch.zeros(1), torch.zeros(1))] * 2
    with pytest.raises(ValueError, match="eigensam-exact"):
        measure_alignment(model, loss, dummy[0], dummy, rule="eigensam")


def _sam_run(probe_every=None, store=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen))
            for _ in range(6)]
    loss_fn = nn.CrossEntropyLoss()
    opt = SAM(model.parameters(), "sgd", rho=0.05, lr=0.1, momentum=0.9)
    probe = None if probe_every is None else AlignmentProbe(
        model, loss_fn, data[:2], every=probe_every, store=store, run="mine")
    for step in range(12):
        x, y = data[step % 6]
        model.train()
        loss_fn(model(x), y).backward()
        if probe is not None:
            probe.probe(step)
        opt.first_step(zero_grad=True)
        loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)
    return model, probe


def test_probe_records_alignment_without_changing_training(tmp_path):
    plain, _ = _sam_run()
    store = Store(tmp_path / "s.h5")
    probed, probe = _sam_run(probe_every=4, store=store)
    for a, b in zip(plain.state_dict().values(), probed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert [row["step"] for row in probe.history] == [0, 4, 8]
    assert all(0 <= row["alignment"] <= 1 for row in probe.history)
    run = store.run("mine")
    assert run.arrays["alignment/step"].tolist() == [0, 4, 8]
    np.testing.assert_allclose(run.arrays["alignment/alignment"],
                               [row["alignment"] for row in probe.history])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(model="mlp", data="digits", model_kwargs={"hidden": 16}, samples=256,
                      batch_size=64, epochs=2, optimizer="sam", checkpoint_every=4,
                      run_name="r", checkpoint_dir=str(tmp / "ckpt"))
    train(cfg, store=Store(tmp / "train.h5"))
    return tmp / "ckpt" / "r"


def run_cli(args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def test_align_directory_in_step_order_linked_to_the_run(run_dir, tmp_path):
    (run_dir / "notes.txt").write_text("not a checkpoint")
    store = tmp_path / "a.h5"
    code, out, err = run_cli(["align", run_dir, "--batches", 4, "--batch-size", 32,
                              "--samples", 64, "--top-k", 2, "--json", "--store", store])
    assert code == 0, err
    rows = [json.loads(line) for line in out.strip().splitlines()]
    assert [r["step"] for r in rows] == [4, 8]
    for r in rows:
        assert set(r) >= {"checkpoint", "step", "alignment", "alignment_signed", "ci95",
                          "batches", "lambda_max", "analysis_id"}
        assert r["ci95"][0] <= r["alignment"] <= r["ci95"][1] and r["batches"] == 4
        assert 0 <= r["topk_share"] <= 1
    assert "skipping" in err and "notes.txt" in err
    records = Store(store).analyses()
    assert [rec.kind for rec in records] == ["alignment", "alignment"]
    assert {rec.attrs["run_id"] for rec in records} == {"r"}
    np.testing.assert_allclose(np.abs(records[0].arrays["alignment/cosine"]).mean(),
                               rows[0]["alignment"])


def test_align_bad_input(run_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli(["align", empty, "--store", tmp_path / "a.h5"])
    assert code == 2 and "no checkpoints" in err
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "step-000001.pt").write_bytes((run_dir / "step-000004.pt").read_bytes())
    (mixed / "step-000002.pt").write_bytes(b"garbage")
    store = tmp_path / "m.h5"
    code, out, err = run_cli(["align", mixed, "--batches", 3, "--batch-size", 16,
                              "--samples", 32, "--json", "--store", store])
    assert code == 2 and "step-000002.pt" in err
    assert len(out.strip().splitlines()) == 1  # the earlier result was printed and kept
    assert len(Store(store).analyses()) == 1
    code, _, err = run_cli(["align", run_dir, "--perturbation", "magic",
                            "--store", tmp_path / "x.h5"])
    assert code == 2 and "--perturbation" in err
    # a SAM run's checkpoint holds no Eigen-SAM eigenvector: nothing to measure
    code, _, err = run_cli(["align", run_dir / "step-000004.pt", "--perturbation", "eigensam",
                            "--store", tmp_path / "x.h5"])
    assert code == 2 and "eigensam-exact" in err and not (tmp_path / "x.h5").exists()


def test_follow_measures_each_checkpoint_of_a_live_run_exactly_once(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    store = tmp_path / "shared.h5"
    ckpt = tmp_path / "ckpt"
    trainer = subprocess.Popen(
        [sys.executable, "-m", "hessdiag", "train", "--model", "mlp", "--data", "digits",
         "--samples", "256", "--batch-size", "32", "--epochs", "3", "--optimizer", "sam",
         "--checkpoint-every", "6", "--sharpness-every", "8", "--run-name", "live",
         "--checkpoint-dir", str(ckpt), "--store", str(store), "--quiet"], env=env)
    (ckpt / "live").mkdir(parents=True, exist_ok=True)
    follower = subprocess.run(
        [sys.executable, "-m", "hessdiag", "align", str(ckpt / "live"), "--follow",
         "--poll", "0.2", "--timeout", "120", "--batches", "3", "--batch-size", "16",
         "--samples", "32", "--json", "--store", str(store)],
        env=env, capture_output=True, text=True, timeout=300)
    assert trainer.wait(timeout=300) == 0
    assert follower.returncode == 0, follower.stderr
    rows = [json.loads(line) for line in follower.stdout.strip().splitlines()]
    steps = [r["step"] for r in rows]
    assert steps == [6, 12, 18, 24]  # every checkpoint once, in order, the final included
    assert "final checkpoint" in follower.stderr
    s = Store(store)
    assert len(s.analyses()) == 4
    run = s.run("live")
    assert run.attrs["status"] == "finished" and len(run.arrays["metrics/step"]) == 24


def test_eigensam_measures_the_perturbation_the_optimizer_applied(tmp_path):
    """`--perturbation eigensam` on an Eigen-SAM checkpoint uses the eigenvector estimate in
    its optimizer state (what the optimizer applied), not the exact top eigenvector."""
    from hessdiag.checkpoints import load_checkpoint
    from hessdiag.data import load_dataset, random_minibatches
    from hessdiag.settings import DataSettings
    from hessdiag.task import load_task

    cfg = TrainConfig(model="mlp", data="digits", model_kwargs={"hidden": 8}, samples=128,
                      batch_size=32, epochs=1, optimizer="eigensam", eig_every=1, eig_iters=1,
                      alpha=0.5, checkpoint_every=4, run_name="e",
                      checkpoint_dir=str(tmp_path / "ckpt"))
    train(cfg, store=Store(tmp_path / "train.h5"))
    path = tmp_path / "ckpt" / "e" / "step-000004.pt"
    results = {}
    for rule in ("eigensam", "eigensam-exact"):
        code, out, err = run_cli(["align", path, "--perturbation", rule, "--batches", 3,
                                  "--batch-size", 16, "--samples", 64, "--json",
                                  "--store", tmp_path / "a.h5"])
        assert code == 0, err
        results[rule] = json.loads(out)
    assert results["eigensam"]["alpha"] == 0.5  # the run's alpha
    u = load_checkpoint(path).optimizer_state["sam"]["eigenvector"]
    task = load_task(str(path), data=DataSettings(samples=64))
    again = measure_alignment(task.model, task.loss, task.batches(256),
                              random_minibatches(load_dataset("digits"), 3, 16, seed=0),
                              rule="eigensam", alpha=0.5, eigenvector=u, device="cpu")
    assert results["eigensam"]["alignment"] == pytest.approx(again.alignment, abs=1e-6)
    assert results["eigensam"]["alignment"] != pytest.approx(
        results["eigensam-exact"]["alignment"], abs=1e-3)


SMALL_TASK = '''
import torch
from torch import nn
from torch.utils.data import TensorDataset


def data(split="train"):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(64, 4, generator=g), torch.randint(0, 3, (64,), generator=g))


def model():
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
'''


def test_align_on_64_samples_says_what_its_defaults_became(tmp_path):
    """512 measurement samples and 20 minibatches of 128 asked (the defaults), 64 samples
    held: one note line on stderr says what was used instead."""
    from hessdiag.checkpoints import save_checkpoint
    from hessdiag.data import load_dataset

    factory = tmp_path / "small.py"
    factory.write_text(SMALL_TASK)
    torch.manual_seed(0)
    spec = {"model": f"{factory}:model", "data": f"{factory}:data"}
    path = tmp_path / "small.pt"
    save_checkpoint(path, nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)),
                    model_spec=spec["model"], data={"spec": spec["data"], "split": "train"})
    code, out, err = run_cli(["align", path, "--model", spec["model"], "--data", spec["data"],
                              "--store", tmp_path / "a.h5"])
    assert code == 0, err
    name = load_dataset(spec["data"]).name
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert notes == [
        f"note: small.pt: the measurement set is all 64 samples of data {name} instead of "
        f"512; data {name} has 64 samples, fewer than one minibatch of 128: 1 minibatch of "
        "all 64 samples instead of 20; no interval from a single minibatch"], err
