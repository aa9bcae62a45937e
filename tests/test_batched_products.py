"""Several Hessian-vector products per pass (``HessianOperator(batch_vectors=...)``):
exact against the loop and the dense Hessian on the model zoo, the exactness guard and its
fallback, the solvers' blocks of probes, and the setting through to the CLI and the store."""

import json

import numpy as np
import pytest
import torch
from conftest import dense_hessian
from hessdiag.cli.app import app
from model_zoo import ZOO, _batches
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from typer.testing import CliRunner

from hessdiag._errors import InputError
from hessdiag.checkpoints import save_checkpoint
from hessdiag.curvature import (
    GGNOperator,
    HessianOperator,
    NondeterministicOperatorError,
    hutchinson,
    hutchpp,
    lanczos,
    slq,
)
from hessdiag.curvature.linear import Counter, MatrixOperator, generator, operator_info, rademacher
from hessdiag.curvature.preconditioned import PreconditionedOperator
from hessdiag.models import build_model
from hessdiag.settings import SpectrumSettings
from hessdiag.store import Store

F64 = torch.float64
MODES = ("forward-over-reverse", "double-backward", "retained-graph")


def _vectors(dim, k, seed=0):
    return torch.randn(dim, k, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _rel(a, b):
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-300)


def _zoo(name):
    torch.manual_seed(1234)
    make_model, make_x = ZOO[name]
    return make_model(), nn.CrossEntropyLoss(), _batches(make_x)


@pytest.fixture
def mlp():
    return _zoo("mlp-tanh")


# --------------------------------------------------------------------------- exactness


def test_batched_matmat_equals_the_loop_and_the_dense_hessian(zoo_case):
    """Every zoo model (attention, GRU, BatchNorm, weight sharing, dropout in eval mode) in
    every mode: the batched block equals the looped one and the dense Hessian times V. In
    torch 2.14 no zoo model needs the guard's fallback (torch.func.hessian's wrong Hessian
    through a TransformerEncoderLayer comes from vmapping the *first* backward, through
    LayerNorm, which no batched product here does): the guard passes everywhere."""
    name, model, loss_fn, batches = zoo_case
    truth = {"all": dense_hessian(model, loss_fn, batches),
             "one": dense_hessian(model, loss_fn, batches[:1])}
    for mode in MODES:
        data, H = (batches[0], truth["one"]) if mode == "retained-graph" \
            else (batches, truth["all"])
        batched = HessianOperator(model, loss_fn, data, dtype=F64, mode=mode,
                                  batch_vectors="batched")
        looped = HessianOperator(model, loss_fn, data, dtype=F64, mode=mode,
                                 batch_vectors="loop")
        V = _vectors(batched.dim, 4, seed=1)
        got, want = batched.matmat(V), looped.matmat(V)
        assert batched.vector_batch == "batched", (name, mode, batched.vector_batch_reason)
        assert batched.describe()["vector_batch"] == "batched"
        assert looped.describe()["vector_batch"] == "loop"
        assert _rel(got, want) <= 1e-10, (name, mode)
        assert _rel(got, H @ V) <= 1e-10, (name, mode)
        # after the guard: the batched pass itself, raw and through matmat
        W = _vectors(batched.dim, 3, seed=2)
        assert _rel(batched._batched_matmat(W), H @ W) <= 1e-10, (name, mode)
        assert _rel(batched.matmat(W), H @ W) <= 1e-10, (name, mode)


def test_sum_reduction_is_divided_by_the_samples_as_matvec_does(mlp):
    model, _, batches = mlp
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    H = dense_hessian(model, nn.CrossEntropyLoss(), batches)  # the per-sample mean
    for mode in ("forward-over-reverse", "double-backward"):
        op = HessianOperator(model, loss_fn, batches, dtype=F64, mode=mode,
                             batch_vectors="batched")
        V = _vectors(op.dim, 3)
        assert _rel(op.matmat(V), H @ V) <= 1e-10
        assert op.vector_batch == "batched"


# --------------------------------------------------------------------------- the guard


def test_the_guard_catches_a_wrong_batched_product_and_loops_from_then_on(mlp, monkeypatch):
    model, loss_fn, batches = mlp
    op = HessianOperator(model, loss_fn, batches, dtype=F64, mode="double-backward",
                         batch_vectors="batched")
    calls = []
    right = op._batched_matmat

    def wrong(V):  # what a vmap without a correct batching rule could give
        calls.append(V.shape[1])
        out = right(V)
        return out + 1e-3 * out.abs().max()

    monkeypatch.setattr(op, "_batched_matmat", wrong)
    V = _vectors(op.dim, 4)
    want = HessianOperator(model, loss_fn, batches, dtype=F64, mode="double-backward",
                           batch_vectors="loop").matmat(V)
    got = op.matmat(V)
    assert _rel(got, want) <= 1e-14
    assert op.vector_batch == "loop"
    assert op.vector_batch_reason.startswith("batched product differs from looped by")
    assert op.describe()["vector_batch_reason"] == op.vector_batch_reason
    # the first column by matvec, 3 batched (counted: they were computed), the guard's
    # looped product, then the 2 columns the guard did not cover, looped
    assert op.hvp_count == 1 + 3 + 1 + 2
    op.matmat(V)
    assert calls == [3] and op.hvp_count == 7 + 4


def test_the_guard_falls_back_when_the_batched_pass_raises(mlp, monkeypatch):
    model, loss_fn, batches = mlp
    op = HessianOperator(model, loss_fn, batches[0], dtype=F64, mode="retained-graph",
                         batch_vectors="batched")

    def broken(V):
        raise RuntimeError("vmap: no batching rule for aten::something\nsecond line")

    monkeypatch.setattr(op, "_batched_matmat", broken)
    V = _vectors(op.dim, 5)
    want = HessianOperator(model, loss_fn, batches[0], dtype=F64, mode="retained-graph",
                           batch_vectors="loop").matmat(V)
    assert _rel(op.matmat(V), want) <= 1e-14
    assert op.vector_batch == "loop"
    assert op.vector_batch_reason == ("the batched product raised RuntimeError: vmap: no "
                                      "batching rule for aten::something")
    assert op.hvp_count == 5  # nothing counted for the failed pass


def test_a_real_vmap_error_falls_back_too():
    """Dropout in train mode: vmap refuses random ops (randomness="error"), so the
    forward-over-reverse block falls back to the loop; the reason is torch's message."""
    model, loss_fn, batches = _zoo("mlp-dropout")
    op = HessianOperator(model, loss_fn, batches, dtype=F64, mode="forward-over-reverse",
                         train_mode=True, check_determinism=False, batch_vectors="batched")
    op.matmat(_vectors(op.dim, 3))
    assert op.vector_batch == "loop"
    assert "random operation" in op.vector_batch_reason
    assert op.hvp_count == 3


def test_every_product_is_counted_including_the_guards(mlp):
    model, loss_fn, batches = mlp
    op = HessianOperator(model, loss_fn, batches, dtype=F64, mode="forward-over-reverse",
                         batch_vectors="batched")
    V = _vectors(op.dim, 4)
    op.matmat(V)  # column 0 by matvec, 3 batched, 1 guard
    assert op.hvp_count == 5 and op.vector_batch == "batched"
    assert op.describe()["hvps"] == 5
    op.matmat(V)
    op.matmat(V[:, :1])  # one column: a matvec
    assert op.hvp_count == 5 + 4 + 1
    assert op.hvp_seconds > 0


def test_the_determinism_check_still_runs_when_matmat_comes_first():
    """A loader that shuffles and drops the last incomplete batch yields other samples on
    every pass (a shuffled pass over all samples is the same mean: nothing to catch)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    dataset = TensorDataset(torch.randn(23, 4), torch.randint(0, 3, (23,)))
    loader = DataLoader(dataset, batch_size=5, shuffle=True, drop_last=True)
    op = HessianOperator(model, nn.CrossEntropyLoss(), loader, dtype=F64,
                         mode="double-backward", check_determinism=True,
                         batch_vectors="batched")
    with pytest.raises(NondeterministicOperatorError):
        op.matmat(_vectors(op.dim, 4))
    assert op.vector_batch is None  # the batched path was never reached


def test_the_policy_loop_auto_and_operators_without_a_batched_path(mlp):
    model, loss_fn, batches = mlp
    with pytest.raises(ValueError, match="batch_vectors must be one of auto, loop, batched"):
        HessianOperator(model, loss_fn, batches, batch_vectors="vmap")
    auto = HessianOperator(model, loss_fn, batches, dtype=F64)  # on a CPU: the loop
    assert auto.batch_vectors == "auto" and auto.vector_batch == "loop"
    assert "loops on cpu" in auto.vector_batch_reason and not auto.batches_vectors
    ggn = GGNOperator(model, loss_fn, batches, dtype=F64)
    assert ggn.describe()["vector_batch"] == "loop"
    assert "no batched path" in ggn.vector_batch_reason
    pending = HessianOperator(model, loss_fn, batches, dtype=F64, batch_vectors="batched")
    assert pending.vector_batch is None and pending.batches_vectors


# --------------------------------------------------------------------------- solvers


def test_counter_and_dense_matmat():
    A = torch.diag(torch.arange(1.0, 7.0, dtype=F64))
    op = MatrixOperator(A)
    reports = []
    counter = Counter(op, lambda done, total: reports.append(done), budget=10)
    V = _vectors(6, 3)
    assert torch.allclose(counter.matmat(V), A @ V)
    assert counter.hvps == 3 and op.hvp_count == 3 and reports == [3]
    # an operator with matvec only: one product per column
    class Plain:
        dim = 6

        def matvec(self, v):
            return A @ v

    assert torch.allclose(Counter(Plain()).matmat(V), A @ V)
    # the preconditioned operator multiplies its own blocks (not H's, through __getattr__)
    d = torch.arange(1.0, 7.0, dtype=F64)
    pre = PreconditionedOperator(MatrixOperator(A), d)
    assert torch.allclose(pre.matmat(V), torch.stack([pre.matvec(V[:, j]) for j in range(3)],
                                                     dim=1))


def _ops(model, loss_fn, data, mode="double-backward"):
    return {b: HessianOperator(model, loss_fn, data, dtype=F64, mode=mode, batch_vectors=b)
            for b in ("loop", "batched")}


def test_trace_estimators_batched_equal_looped():
    model, loss_fn, batches = _zoo("transformer-encoder")
    ops = _ops(model, loss_fn, batches)
    for estimator, budget in ((hutchinson, 20), (hutchpp, 30)):
        results = {b: estimator(op, budget, seed=3) for b, op in ops.items()}
        a, b = results["loop"], results["batched"]
        assert b.estimate == pytest.approx(a.estimate, rel=1e-8, abs=1e-12)
        np.testing.assert_allclose(b.samples, a.samples, rtol=1e-8, atol=1e-12)
        assert a.hvps == b.hvps == budget
    assert ops["batched"].vector_batch == "batched"


def test_hutchinson_draws_the_same_probes_as_one_at_a_time(mlp):
    """Blocks of probes change nothing: the same probes, the same samples, bit for bit."""
    model, loss_fn, batches = mlp
    op = HessianOperator(model, loss_fn, batches, dtype=F64, batch_vectors="loop")
    result = hutchinson(op, 19, seed=5)
    ref = HessianOperator(model, loss_fn, batches, dtype=F64, batch_vectors="loop")
    gen, info = generator(5), operator_info(ref)
    samples = []
    for _ in range(19):
        z = rademacher(info.dim, 1, gen, info)[:, 0]
        samples.append(float(z @ ref.matvec(z)))
    assert result.samples.tolist() == samples


def test_block_lanczos_batched_equals_looped(mlp):
    model, loss_fn, batches = mlp
    results = {b: lanczos(op, k=3, which="both", block_size=2, tol=1e-10, seed=0)
               for b, op in _ops(model, loss_fn, batches, "forward-over-reverse").items()}
    np.testing.assert_allclose(results["batched"].eigenvalues, results["loop"].eigenvalues,
                               rtol=1e-8)
    assert results["batched"].converged.all()


def test_slq_probes_in_lockstep_equal_one_at_a_time(mlp):
    model, loss_fn, batches = mlp
    ops = _ops(model, loss_fn, batches)
    results = {b: slq(op, n_probes=3, steps=10, seed=2) for b, op in ops.items()}
    a, b = results["loop"], results["batched"]
    np.testing.assert_allclose(b.nodes, a.nodes, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(b.weights, a.weights, rtol=1e-8, atol=1e-10)
    assert a.hvps == b.hvps == 30
    assert ops["batched"].vector_batch == "batched"


# --------------------------------------------------------------------------- settings, CLI


def test_settings_and_cli_record_the_outcome_in_the_result_and_the_store(tmp_path):
    with pytest.raises(InputError) as caught:
        SpectrumSettings(batch_vectors="sometimes")
    assert caught.value.param == "batch_vectors"
    torch.manual_seed(0)
    kw = {"num_classes": 10, "in_shape": [1, 8, 8], "hidden": 3}
    model = build_model("mlp", **kw)
    path = tmp_path / "tiny.pt"
    save_checkpoint(path, model, model_spec="mlp", model_kwargs=kw, step=0,
                    data={"spec": "digits", "split": "train"})
    store = tmp_path / "s.h5"
    result = CliRunner().invoke(app, [
        "spectrum", str(path), "--samples", "48", "--batch-size", "16", "--top-k", "1",
        "--trace", "--trace-hvps", "12", "--dtype", "float64", "--batch-vectors", "batched",
        "--json", "--store", str(store)])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["vector_batch"] == "batched"
    (record,) = Store(store).analyses()
    operator = record.attrs["operator"]
    assert operator["batch_vectors"] == "batched" and operator["vector_batch"] == "batched"
    assert operator["vector_batch_reason"].startswith("batched product agrees with looped")
    bad = CliRunner().invoke(app, ["spectrum", str(path), "--batch-vectors", "vmap"])
    assert bad.exit_code == 2 and "--batch-vectors must be one of" in bad.stderr


def test_auto_keeps_batched_products_only_where_they_are_faster(mlp, monkeypatch):
    """``auto`` (on CUDA; forced here on a CPU) times the guard's batched block against its
    looped product: an exact batched pass that is not faster is dropped for the loop, a
    faster one kept. Either way the block returned is exact."""
    import time as _time

    model, loss_fn, batches = mlp
    V = _vectors(sum(p.numel() for p in model.parameters()), 4)
    truth = dense_hessian(model, loss_fn, batches) @ V
    for slow_side in ("batched", "looped"):
        op = HessianOperator(model, loss_fn, batches, dtype=F64)
        op.matvec(V[:, 0])  # the first product: mode, checks
        op.vector_batch = None  # what auto decides on a CUDA device
        if slow_side == "batched":
            fast = op._batched_matmat
            monkeypatch.setattr(op, "_batched_matmat",
                                lambda W, fast=fast: (_time.sleep(0.3), fast(W))[1])
        else:
            plain = op.matvec
            monkeypatch.setattr(op, "matvec", lambda v, plain=plain: (_time.sleep(0.3),
                                                                        plain(v))[1])
        got = op.matmat(V)
        torch.testing.assert_close(got, truth, rtol=1e-10, atol=1e-12)
        if slow_side == "batched":
            assert op.vector_batch == "loop" and "not faster" in op.vector_batch_reason
        else:
            assert op.vector_batch == "batched" and "per vector" in op.vector_batch_reason


def test_slq_lockstep_holds_no_more_probes_than_fit(monkeypatch):
    import hessdiag.curvature.operator as operator_module
    from hessdiag.curvature.slq import lockstep_group

    info = operator_info(MatrixOperator(torch.eye(1000, dtype=F64)))
    per_probe = (50 + 2) * 1000 * 8  # a probe's basis: steps + 2 vectors
    monkeypatch.setattr(operator_module, "default_memory_budget", lambda device: 3 * per_probe)
    assert lockstep_group(None, info, 50) == 3
    monkeypatch.setattr(operator_module, "default_memory_budget", lambda device: 10)
    assert lockstep_group(None, info, 50) == 1
    monkeypatch.setattr(operator_module, "default_memory_budget", lambda device: 1 << 40)
    assert lockstep_group(None, info, 50) == 8


def test_a_basis_on_another_device_multiplies_blocks_in_one_call():
    from hessdiag.curvature.lanczos import _OnDevice

    A = torch.diag(torch.arange(1.0, 7.0, dtype=F64))
    op = MatrixOperator(A)
    moved = _OnDevice(op, torch.device("cpu"), torch.device("cpu"))
    V = _vectors(6, 3)
    torch.testing.assert_close(moved.matmat(V), A @ V)
    assert op.hvp_count == 3
