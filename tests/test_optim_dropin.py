"""SAM and Eigen-SAM as drop-in optimizers in a user's own loop (docs/optim.md): the page's
code runs as written; gradient accumulation over equal micro-batches is the full-batch
step; bfloat16 autocast keeps the perturbation and the return to ``w`` in float32."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from hessdiag.optim import SAM, EigenSAM

PAGE = Path(__file__).resolve().parents[1] / "docs" / "optim.md"


def test_the_page_runs_as_written(capsys):
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)
    assert len(blocks) >= 6
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(PAGE), "exec"), namespace)  # noqa: S102 - the page's code
    printed = capsys.readouterr().out.split("\n")
    losses = [float(line.split()[1]) for line in printed[:3]]
    assert losses[2] < losses[0] and losses[2] < 0.5  # it trains
    eigenvalue, residual, alignment = (float(v) for v in printed[3].split())
    assert eigenvalue > 0 and residual >= 0 and 0 <= alignment <= 1


def _net(dtype=torch.float64, batchnorm=False):
    torch.manual_seed(0)
    layers = [nn.Linear(6, 8)] + ([nn.BatchNorm1d(8)] if batchnorm else []) + [
        nn.Tanh(), nn.Linear(8, 3)]
    return nn.Sequential(*layers).to(dtype)


def _data(dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 6, generator=g, dtype=dtype), torch.randint(0, 3, (32,), generator=g)


def _make(kind, model):
    if kind == "sam":
        return SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.2, momentum=0.9)
    return EigenSAM(model.parameters(), torch.optim.SGD, rho=0.1, alpha=0.3, eig_every=2,
                    eig_iters=4, lr=0.2, momentum=0.9)


def _steps(kind, micro, steps=3):
    """Weights after ``steps`` SAM-type steps on the same 32 samples, the batch split in
    ``micro`` equal micro-batches (1: the whole batch at once), both passes accumulated."""
    model, (x, y) = _net(), _data()
    opt = _make(kind, model)
    loss_fn = nn.CrossEntropyLoss()
    parts = list(zip(x.chunk(micro), y.chunk(micro), strict=True))
    for _ in range(steps):
        if kind == "eigensam":
            opt.maybe_update_eigenvector(model, loss_fn, x, y)
        for xm, ym in parts:
            (loss_fn(model(xm), ym) / micro).backward()
        opt.first_step(zero_grad=True)
        for xm, ym in parts:
            (loss_fn(model(xm), ym) / micro).backward()
        opt.second_step(zero_grad=True)
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), opt


@pytest.mark.parametrize("kind", ["sam", "eigensam"])
def test_gradient_accumulation_is_the_full_batch_step(kind):
    whole, opt_whole = _steps(kind, 1)
    accumulated, opt_acc = _steps(kind, 4)
    torch.testing.assert_close(accumulated, whole, rtol=1e-12, atol=1e-12)
    assert opt_acc.last_grad_norm == pytest.approx(opt_whole.last_grad_norm, rel=1e-12)
    if kind == "eigensam":
        assert opt_acc.eig_updates == opt_whole.eig_updates == 2
        torch.testing.assert_close(opt_acc.eigenvector, opt_whole.eigenvector)
    moved = torch.cat([p.detach().reshape(-1) for p in _net().parameters()])
    assert float(torch.linalg.vector_norm(whole - moved)) > 1e-2  # the steps did something


def _sam_step(net, opt, loss_fn, x, y, autocast):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = loss_fn(net(x), y)
    loss.backward()
    opt.first_step(zero_grad=True)
    e = opt.perturbation_vector()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss_fn(net(x), y).backward()
    opt.second_step(zero_grad=True)
    return loss, e


@pytest.mark.parametrize("kind", ["sam", "eigensam"])
def test_bfloat16_autocast_keeps_float32_where_it_matters(kind):
    model, (x, y) = _net(torch.float32, batchnorm=True), _data(torch.float32)
    reference = copy.deepcopy(model)
    opt, ref_opt = _make(kind, model), _make(kind, reference)
    loss_fn = nn.CrossEntropyLoss()
    for step in range(3):
        for net, o, autocast in ((model, opt, True), (reference, ref_opt, False)):
            if kind == "eigensam":
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    o.maybe_update_eigenvector(net, loss_fn, x, y)  # inside: autocast off
            loss, e = _sam_step(net, o, loss_fn, x, y, autocast)
            assert e.dtype == torch.float32
            assert all(p.dtype == torch.float32 for p in net.parameters())
            if kind == "sam":  # ||e|| = rho in float32, however the gradient was computed
                assert float(torch.linalg.vector_norm(e)) == pytest.approx(0.1, rel=1e-6)
        if kind == "eigensam" and step == 0:
            # the first refresh, at equal weights, was of the float32 model in both
            assert torch.equal(opt.eigenvector, ref_opt.eigenvector)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model[0](x).dtype == torch.bfloat16  # autocast did compute in bfloat16
    # the trajectory under bfloat16 stays within bfloat16's precision of the float32 one
    got = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    want = torch.cat([p.detach().reshape(-1) for p in reference.parameters()])
    start = torch.cat([p.detach().reshape(-1) for p in _net(torch.float32, True).parameters()])
    assert 0 < float(torch.linalg.vector_norm(got - want)) < 0.05 * float(
        torch.linalg.vector_norm(want - start))


def test_the_return_to_w_is_exact_under_autocast():
    """With lr 0 the base step moves nothing: after first_step, a bfloat16 second pass and
    second_step, every weight is its old value bit for bit (copied back, not subtracted)."""
    model, (x, y) = _net(torch.float32), _data(torch.float32)
    before = [p.detach().clone() for p in model.parameters()]
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=0.0)
    _sam_step(model, opt, nn.CrossEntropyLoss(), x, y, autocast=True)
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before,
                                                          strict=True))
