"""HessianOperator: parameter selection, batching, precision, mode choice and bad input."""

import numpy as np
import pytest
import torch
from conftest import dense_hessian
from torch import nn

from hessdiag.curvature import HessianOperator, NondeterministicOperatorError, lanczos

F64 = torch.float64


@pytest.fixture
def mlp_case():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    batches = [(torch.randn(n, 4), torch.randint(0, 3, (n,))) for n in (9, 4)]
    return model, nn.CrossEntropyLoss(), batches


def _names(model):
    return [n for n, _ in model.named_parameters()]


@pytest.mark.parametrize(
    "selector, expected",
    [
        ("0", ["0.weight", "0.bias"]),
        ("*.weight", ["0.weight", "2.weight"]),
        (["2.bias"], ["2.bias"]),
        (lambda name, p: p.dim() == 1, ["0.bias", "2.bias"]),
    ],
)
def test_parameter_filter_gives_the_matching_block_of_the_full_hessian(mlp_case, selector,
                                                                       expected):
    model, loss_fn, batches = mlp_case
    op = HessianOperator(model, loss_fn, batches, params=selector, dtype=F64)
    assert op.param_names == expected
    block = dense_hessian(model, loss_fn, batches, names=expected)
    v = torch.randn(op.dim, dtype=F64)
    torch.testing.assert_close(op.matvec(v), block @ v, rtol=1e-10, atol=1e-12)


def test_sample_weighting_equals_one_big_batch(mlp_case):
    model, loss_fn, batches = mlp_case
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=F64)
    split = HessianOperator(model, loss_fn, batches, dtype=F64).matvec(v)
    whole = HessianOperator(model, loss_fn, (x, y), dtype=F64).matvec(v)
    torch.testing.assert_close(split, whole, rtol=1e-12, atol=1e-14)
    # a sum-reduced loss is divided by the sample count: the same per-sample mean Hessian
    summed = HessianOperator(model, nn.CrossEntropyLoss(reduction="sum"), batches, dtype=F64)
    torch.testing.assert_close(summed.matvec(v), whole, rtol=1e-12, atol=1e-14)


def test_dataloader_and_dict_inputs_are_accepted(mlp_case):
    model, loss_fn, batches = mlp_case
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=5)
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=F64)
    want = HessianOperator(model, loss_fn, (x, y), dtype=F64).matvec(v)
    torch.testing.assert_close(HessianOperator(model, loss_fn, loader, dtype=F64).matvec(v),
                               want, rtol=1e-12, atol=1e-14)

    class Keyword(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *, features):
            return self.inner(features)

    op = HessianOperator(Keyword(model), loss_fn, ({"features": x}, y), dtype=F64)
    torch.testing.assert_close(op.matvec(v), want, rtol=1e-12, atol=1e-14)


def test_float32_operator_is_close_to_float64(mlp_case):
    model, loss_fn, batches = mlp_case
    op32 = HessianOperator(model, loss_fn, batches)
    op64 = HessianOperator(model, loss_fn, batches, dtype=F64)
    assert op32.dtype == torch.float32
    v = torch.randn(op32.dim, dtype=F64)
    torch.testing.assert_close(op32.matvec(v.float()).double(), op64.matvec(v),
                               rtol=1e-4, atol=1e-6)
    top32 = lanczos(op32, k=2, seed=0)
    top64 = lanczos(op64, k=2, tol=1e-10, seed=0)
    np.testing.assert_allclose(top32.eigenvalues, top64.eigenvalues, rtol=1e-3)


def test_model_state_is_restored_and_parameters_untouched(mlp_case):
    model, loss_fn, batches = mlp_case
    model.append(nn.Dropout(0.3))
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    op = HessianOperator(model, loss_fn, batches, dtype=F64)
    lanczos(op, k=1, seed=0)
    assert model.training and all(m.training for m in model.modules())
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.dtype == torch.float32 and p.grad is None


def test_auto_mode_keeps_graphs_in_memory_within_budget_and_times_otherwise(mlp_case):
    """Batches in memory whose graphs fit the budget: retained-graph with no timing and no
    determinism products. Over budget (or data streamed): the two other modes are timed
    on the first batch, every product counted, and the determinism check runs."""
    model, loss_fn, batches = mlp_case
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=F64)
    kept = HessianOperator(model, loss_fn, batches, dtype=F64)
    kept.matvec(v)
    assert kept.mode == "retained-graph" and kept.mode_timings == {}
    assert kept.hvp_count == 1 and 0 < kept.memory_estimate <= kept.memory_budget
    tight = HessianOperator(model, loss_fn, batches, dtype=F64, memory_budget=1)
    tight.matvec(v)
    assert tight.mode in ("double-backward", "forward-over-reverse")
    assert set(tight.mode_timings) == {"forward-over-reverse", "double-backward"}
    assert tight.hvp_count == 4 + 4 + 1  # a warm-up and three timed each, then one product
    streamed = HessianOperator(model, loss_fn, iter_batches(batches), dtype=F64)
    streamed.matvec(v)
    assert streamed.mode != "retained-graph" and streamed.hvp_count == 4 + 4 + 2
    torch.testing.assert_close(kept.matvec(v), tight.matvec(v), rtol=1e-10, atol=1e-12)


class iter_batches:
    """Batches as a streaming iterable (like a DataLoader), not a list in memory."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


@pytest.mark.parametrize("form", ["bare batch", "list of one batch", "several batches",
                                  "dataloader"])
def test_auto_picks_an_exact_mode_whichever_way_the_data_is_given(form):
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(24, 4), torch.randint(0, 3, (24,))
    chunks = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 24, 8)]
    data = {"bare batch": (x, y), "list of one batch": [(x, y)], "several batches": chunks,
            "dataloader": DataLoader(TensorDataset(x, y), batch_size=8)}[form]
    op = HessianOperator(model, nn.CrossEntropyLoss(), data, dtype=F64)
    H = dense_hessian(model, nn.CrossEntropyLoss(), chunks)
    v = torch.randn(op.dim, dtype=F64)
    torch.testing.assert_close(op.matvec(v), H @ v, rtol=1e-10, atol=1e-12)
    assert (op.mode == "retained-graph") == (form != "dataloader")


def test_a_loader_drawing_random_samples_is_still_caught():
    """A loader that draws another random subset on every pass (a shuffled pass over all
    samples is the same mean, so the same matrix: nothing to catch there)."""
    from torch.utils.data import DataLoader, RandomSampler, TensorDataset

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(24, 4), torch.randint(0, 3, (24,))
    dataset = TensorDataset(x, y)
    loader = DataLoader(dataset, batch_size=5, sampler=RandomSampler(
        dataset, replacement=True, num_samples=12))
    op = HessianOperator(model, nn.CrossEntropyLoss(), loader, dtype=F64)
    with pytest.raises(NondeterministicOperatorError):
        op.matvec(torch.randn(op.dim, dtype=F64))


class NoForwardAD(torch.autograd.Function):
    """x -> x**3 with a double-differentiable backward but no forward-mode formula."""

    @staticmethod
    def forward(x):
        return x**3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * 3 * x**2


class CubeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return NoForwardAD.apply(self.lin(x))


def test_missing_forward_mode_formula_falls_back_to_double_backward():
    torch.manual_seed(0)
    model = CubeNet()
    batch = (torch.randn(6, 3), torch.randn(6, 2))
    loss_fn = nn.MSELoss()
    # no room to keep graphs: auto times the two other modes
    auto = HessianOperator(model, loss_fn, [batch, batch], dtype=F64, memory_budget=1)
    v = torch.randn(auto.dim, dtype=F64)
    got = auto.matvec(v)
    assert auto.mode == "double-backward"
    assert auto.mode_timings["forward-over-reverse"] == float("inf")
    H = dense_hessian(nn.Sequential(model.lin, _Cube()), loss_fn, [batch, batch])
    torch.testing.assert_close(got, H @ v, rtol=1e-10, atol=1e-12)
    forced = HessianOperator(model, loss_fn, batch, dtype=F64, mode="forward-over-reverse")
    with pytest.raises(ValueError, match="forward-mode AD.*double-backward"):
        forced.matvec(v)


class _Cube(nn.Module):
    def forward(self, x):
        return x**3


class Augmenting:
    """An iterable that adds fresh noise to the inputs on every pass."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __iter__(self):
        yield self.x + 0.1 * torch.randn_like(self.x), self.y


def test_augmenting_data_is_caught_by_the_determinism_check(mlp_case):
    model, loss_fn, batches = mlp_case
    op = HessianOperator(model, loss_fn, Augmenting(*batches[0]), dtype=F64)
    with pytest.raises(NondeterministicOperatorError, match="shuffles or augments"):
        op.matvec(torch.randn(op.dim, dtype=F64))


def test_dropout_in_train_mode_is_caught(mlp_case):
    model, loss_fn, batches = mlp_case
    model.insert(2, nn.Dropout(0.5))
    op = HessianOperator(model, loss_fn, batches, dtype=F64, train_mode=True)
    with pytest.raises(NondeterministicOperatorError):
        op.matvec(torch.randn(op.dim, dtype=F64))


def test_bad_input_gives_clear_errors(mlp_case):
    model, loss_fn, batches = mlp_case
    with pytest.raises(ValueError, match="no batches: the data is empty"):
        HessianOperator(model, loss_fn, []).matvec(torch.randn(43))
    with pytest.raises(ValueError, match="selects no trainable parameter.*available: 0.weight"):
        HessianOperator(model, loss_fn, batches, params="conv*")
    with pytest.raises(ValueError, match="not a trainable parameter"):
        HessianOperator(model, loss_fn, batches, params=["fc.weight"])
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        HessianOperator(frozen, loss_fn, batches)
    with pytest.raises(ValueError, match="mode must be one of"):
        HessianOperator(model, loss_fn, batches, mode="fast")
    x, y = batches[0]
    nan_batch = (torch.full_like(x, float("nan")), y)
    with pytest.raises(ValueError, match="loss is nan on batch 1"):
        HessianOperator(model, loss_fn, [batches[0], nan_batch]).matvec(torch.randn(43))
    with pytest.raises(ValueError, match="must be one batch"):
        HessianOperator(model, loss_fn, 3)
    with pytest.raises(ValueError, match="shape"):
        HessianOperator(model, loss_fn, batches).matvec(torch.randn(7))
    with pytest.raises(ValueError, match="scalar"):
        HessianOperator(model, nn.CrossEntropyLoss(reduction="none"), batches).matvec(
            torch.randn(43))


def test_to_scipy_eigsh_agrees_with_lanczos(mlp_case):
    from scipy.sparse.linalg import eigsh

    model, loss_fn, batches = mlp_case
    op = HessianOperator(model, loss_fn, batches, dtype=F64)
    vals = eigsh(op.to_scipy(), k=2, which="LA", tol=1e-12, return_eigenvectors=False)
    ours = lanczos(op, k=2, tol=1e-10, seed=0)
    np.testing.assert_allclose(np.sort(vals)[::-1], ours.eigenvalues, rtol=1e-8)
