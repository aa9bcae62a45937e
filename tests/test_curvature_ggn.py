"""GGNOperator and FisherOperator against dense float64 matrices built independently:
J by torch.autograd.functional.jacobian of the outputs (no vmap), H_out written out in
closed form or by torch.autograd.functional.hessian, per-sample gradients one sample at a
time; and `spectrum --curvature` end to end."""

import copy
import json

import numpy as np
import pytest
import torch
from conftest import run_cli as run
from conftest import trained_digits_mlp
from model_zoo import _cnn_bn as conftest_cnn_bn
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from hessdiag.curvature import FisherOperator, GGNOperator, HessianOperator, lanczos
from hessdiag.data import load_digits
from hessdiag.losses import resolve_loss

F64 = torch.float64
CE = resolve_loss("cross-entropy")


# --------------------------------------------------------------------------- dense truths


def _flat_fn(model, x):
    """outputs(flat parameters) for a copy of the model in float64, eval mode."""
    names = [n for n, p in model.named_parameters()]
    params = dict(model.named_parameters())
    fixed = dict(model.named_buffers())
    shapes, sizes = [params[n].shape for n in names], [params[n].numel() for n in names]
    flat0 = torch.cat([params[n].detach().reshape(-1) for n in names])

    def f(flat):
        chunks = torch.split(flat, sizes)
        state = {**fixed, **{n: c.view(s) for n, c, s in zip(names, chunks, shapes, strict=True)}}
        return torch.func.functional_call(model, state, (x,))

    return f, flat0


def _jacobian(model, x):
    """(outputs, J) with J of shape (outputs.numel(), P), by reverse mode one row at a time."""
    f, flat0 = _flat_fn(model, x)
    with sdpa_kernel([SDPBackend.MATH]):
        out = f(flat0).detach()
        J = torch.autograd.functional.jacobian(f, flat0)
    return out, J.reshape(out.numel(), -1)


def _ce_hessian(out, y):
    """The Hessian of mean cross-entropy over real (non -100) terms w.r.t. the outputs,
    written out: (diag(p) - p p^T) / m on each term's block."""
    rows, t = out.reshape(-1, out.shape[-1]), y.reshape(-1)
    m = int((t != -100).sum())
    C = rows.shape[1]
    H = torch.zeros(rows.numel(), rows.numel(), dtype=F64)
    p = torch.softmax(rows, dim=1)
    for i in range(rows.shape[0]):
        if t[i] != -100:
            block = slice(i * C, (i + 1) * C)
            H[block, block] = (torch.diag(p[i]) - torch.outer(p[i], p[i])) / m
    return H


def _autograd_hessian(loss_fn, out, y):
    def f(flat):
        return loss_fn(flat.reshape(out.shape), y)

    return torch.autograd.functional.hessian(f, out.reshape(-1))


def dense_ggn(model, batches, h_out, weight=None):
    """sum_b (n_b / N) J_b^T H_b J_b with n_b = weight(y) (default: len(y))."""
    model = copy.deepcopy(model).double().eval()
    weight = weight or (lambda y: int(y.shape[0]))
    total = sum(weight(y) for _, y in batches)
    G = 0
    for x, y in batches:
        out, J = _jacobian(model, x)
        G = G + weight(y) / total * J.T @ h_out(out, y) @ J
    return G


def dense_empirical_fisher(model, batches, loss_fn, terms):
    """(1/N) sum_i g_i g_i^T over every term i, g_i = torch.autograd.grad of term i's loss
    alone; ``terms(x, y)`` yields each term's (x_i, y_i)."""
    model = copy.deepcopy(model).double().eval()
    params = list(model.parameters())
    grads = []
    with sdpa_kernel([SDPBackend.MATH]):
        for x, y in batches:
            for xi, yi in terms(x, y):
                g = torch.autograd.grad(loss_fn(model(xi), yi), params)
                grads.append(torch.cat([t.reshape(-1) for t in g]))
    G = torch.stack(grads)
    return G.T @ G / len(grads)


def _products(op):
    """The whole matrix, one column per product (small operators only)."""
    return torch.stack([op.matvec(e) for e in torch.eye(op.dim, dtype=F64)], dim=1)


def _vectors(dim, k=4, seed=0):
    return torch.randn(dim, k, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _close(got, want, rtol=1e-10):
    scale = max(1.0, float(want.abs().max()))
    assert float((got - want).abs().max()) <= rtol * scale, float((got - want).abs().max())


def _psd(M, op=None):
    """``M`` symmetric with smallest eigenvalue >= -1e-10; the operator's smallest Ritz
    value >= minus its tolerance."""
    assert torch.allclose(M, M.T, atol=1e-12 * float(M.abs().max()))
    assert float(torch.linalg.eigvalsh(M)[0]) >= -1e-10
    if op is not None:
        low = lanczos(op, k=1, which="smallest", tol=1e-6, seed=0)
        assert low.eigenvalues[0] >= -1e-6 * float(torch.linalg.matrix_norm(M, ord=2))


def _check(op, M, seed=0):
    """The operator's products of random vectors equal ``M``'s to 1e-10."""
    V = _vectors(op.dim, seed=seed)
    _close(op.matmat(V), M @ V)


# --------------------------------------------------------------------------- models


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _cnn_bn():
    torch.manual_seed(1)
    return conftest_cnn_bn().double().eval()


class TokenTransformer(nn.Module):
    """Tokens -> embedding -> one encoder layer -> per-token logits."""

    def __init__(self, vocab=5, width=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.enc = nn.TransformerEncoderLayer(width, 2, dim_feedforward=6, dropout=0.1,
                                              batch_first=True)
        self.head = nn.Linear(width, vocab)

    def forward(self, x):
        return self.head(self.enc(self.emb(x)))


def _class_batches(make_x, sizes=(7, 5, 8), classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(make_x(n, g), torch.randint(0, classes, (n,), generator=g)) for n in sizes]


def _token_batches():
    """Three batches of token sequences with padding (-100) in unequal amounts."""
    g = torch.Generator().manual_seed(3)
    out = []
    for n, pad in ((3, 2), (2, 0), (4, 5)):
        x = torch.randint(0, 5, (n, 4), generator=g)
        y = torch.randint(0, 5, (n, 4), generator=g)
        y.view(-1)[torch.randperm(n * 4, generator=g)[:pad]] = -100
        out.append((x, y))
    return out


def _sample_terms(x, y):
    return [(x[i:i + 1], y[i:i + 1]) for i in range(len(y))]


def _token_terms(x, y):
    """Each real token alone: its sequence with every other target set to padding."""
    for b in range(y.shape[0]):
        for t in range(y.shape[1]):
            if y[b, t] != -100:
                yt = torch.full_like(y[b:b + 1], -100)
                yt[0, t] = y[b, t]
                yield x[b:b + 1], yt


CLASS_CASES = {
    "mlp-tanh": (_mlp, lambda n, g: torch.randn(n, 4, generator=g, dtype=F64)),
    "cnn-batchnorm-eval": (_cnn_bn, lambda n, g: torch.randn(n, 1, 6, 6, generator=g,
                                                              dtype=F64)),
}


# --------------------------------------------------------------------------- products


@pytest.mark.parametrize("mode", ["jvp", "double-vjp"])
@pytest.mark.parametrize("case", sorted(CLASS_CASES))
def test_ggn_and_empirical_fisher_match_dense_for_cross_entropy(case, mode):
    make_model, make_x = CLASS_CASES[case]
    model, batches = make_model(), _class_batches(make_x)
    G = dense_ggn(model, batches, _ce_hessian)
    op = GGNOperator(model, CE, batches, mode=mode, batch_size_fn=CE.batch_weight)
    _check(op, G)
    _psd(G, op if (case, mode) == ("mlp-tanh", "jvp") else None)
    assert op.describe()["loss_hessian"] == "closed form" and op.mode == mode
    F = dense_empirical_fisher(model, batches, CE, _sample_terms)
    fisher = FisherOperator(model, CE, batches, kind="empirical", mode=mode,
                            batch_size_fn=CE.batch_weight)
    _check(fisher, F)
    _psd(F)


def test_a_torch_loss_and_an_unknown_loss_give_the_same_ggn():
    """nn.CrossEntropyLoss by its closed form; a lambda (no likelihood) by autograd."""
    model, batches = _mlp(), _class_batches(CLASS_CASES["mlp-tanh"][1])
    G = dense_ggn(model, batches, lambda out, y: _autograd_hessian(
        nn.functional.cross_entropy, out, y))
    closed = GGNOperator(model, nn.CrossEntropyLoss(), batches)
    generic = GGNOperator(model, lambda out, y: nn.functional.cross_entropy(out, y), batches)
    assert generic.describe()["loss_hessian"] == "autograd"
    _check(closed, G)
    _check(generic, G)


def test_regression_mse_ggn_and_the_linear_model_closed_form():
    """mse over N samples and D outputs: H_out = 2 I / (N D). For a linear model the
    Hessian is exactly the GGN: (2 / (N D)) I_D kron [X 1]^T [X 1] in (W row-major, b)
    order, written out."""
    mse = resolve_loss("mse")
    g = torch.Generator().manual_seed(2)
    N, F, D = 12, 3, 2
    x, y = torch.randn(N, F, generator=g, dtype=F64), torch.randn(N, D, generator=g, dtype=F64)
    linear = nn.Linear(F, D).double()
    c = 2.0 / (N * D)
    truth = torch.zeros(D * F + D, D * F + D, dtype=F64)
    for d in range(D):
        w, b = slice(d * F, (d + 1) * F), D * F + d
        truth[w, w] = c * x.T @ x
        truth[w, b] = truth[b, w] = c * x.sum(0)
        truth[b, b] = c * N
    for mode in ("jvp", "double-vjp"):
        _close(_products(GGNOperator(linear, mse, (x, y), mode=mode)), truth)
    _close(_products(HessianOperator(linear, mse, (x, y), mode="double-backward")), truth)
    # a tanh MLP over unequal batches: J^T (2 I / (n_b D)) J weighted by n_b / N
    torch.manual_seed(4)
    mlp = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    batches = [(torch.randn(n, 3, generator=g, dtype=F64),
                torch.randn(n, 2, generator=g, dtype=F64)) for n in (5, 9)]
    G = dense_ggn(mlp, batches, lambda out, t: 2.0 * torch.eye(out.numel(), dtype=F64)
                  / out.numel())
    op = GGNOperator(mlp, mse, batches, batch_size_fn=mse.batch_weight)
    _check(op, G)
    _psd(G, op)
    F_ = dense_empirical_fisher(mlp, batches, mse, _sample_terms)
    _check(FisherOperator(mlp, mse, batches, kind="empirical", batch_size_fn=mse.batch_weight),
           F_)


def test_bce_ggn_matches_autograd_output_hessian():
    bce = resolve_loss("bce")
    g = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    batches = [(torch.randn(n, 3, generator=g, dtype=F64),
                torch.randint(0, 2, (n, 2), generator=g).to(F64)) for n in (6, 3)]
    G = dense_ggn(model, batches, lambda out, t: _autograd_hessian(bce, out, t))
    _check(GGNOperator(model, bce, batches, batch_size_fn=bce.batch_weight), G)


def test_transformer_per_token_cross_entropy_with_padding():
    """Per-token cross-entropy over batches with unequal numbers of real tokens: batches
    weighted by their real tokens, padding contributing nothing; J by reverse mode."""
    torch.manual_seed(6)
    model = TokenTransformer().double().eval()
    batches = _token_batches()
    G = dense_ggn(model, batches, _ce_hessian, weight=CE.count)
    for mode in ("jvp", "double-vjp"):
        op = GGNOperator(model, CE, batches, mode=mode, batch_size_fn=CE.batch_weight)
        _check(op, G)
    _psd(G)   # (Lanczos at the zero eigenvalue of this rank-deficient matrix is slow)
    F = dense_empirical_fisher(model, batches, CE, _token_terms)
    fisher = FisherOperator(model, CE, batches, kind="empirical", batch_size_fn=CE.batch_weight)
    _check(fisher, F)
    _psd(F)
    # the mc Fisher keeps padding as padding: the same count of terms, and PSD
    mc = FisherOperator(model, CE, batches, kind="mc", seed=1, batch_size_fn=CE.batch_weight)
    V = _vectors(mc.dim, seed=2)
    FV = mc.matmat(V)
    _close(V.T @ FV, FV.T @ V, rtol=1e-12)
    assert bool((torch.diag(V.T @ FV) >= 0).all())
    assert mc.n_samples == sum(CE.count(y) for _, y in batches)


def test_nll_on_log_softmax_is_cross_entropys_ggn():
    """nll's H_out is diag(softmax(z)): for a model ending in log_softmax, exactly the
    cross-entropy GGN of the same model without it."""
    model, batches = _mlp(), _class_batches(CLASS_CASES["mlp-tanh"][1])
    logsm = nn.Sequential(copy.deepcopy(model), nn.LogSoftmax(dim=-1))
    nll = resolve_loss("nll")
    V = _vectors(sum(p.numel() for p in model.parameters()))
    _close(GGNOperator(logsm, nll, batches).matmat(V), GGNOperator(model, CE, batches).matmat(V))


# --------------------------------------------------------------------------- the mc Fisher


def test_mc_fisher_is_a_fixed_matrix_reproducible_from_its_seed():
    model, batches = _mlp(), _class_batches(CLASS_CASES["mlp-tanh"][1])
    a = FisherOperator(model, CE, batches, seed=3)
    A = _products(a)
    _close(A, A.T, rtol=1e-14)
    _psd(A, a)
    V = _vectors(a.dim)
    _close(a.matmat(V), A @ V, rtol=1e-14)                  # the same matrix every time
    _close(FisherOperator(model, CE, batches, seed=3).matmat(V), A @ V, rtol=1e-14)
    assert not torch.allclose(FisherOperator(model, CE, batches, seed=4).matmat(V), A @ V)
    assert a.describe()["seed"] == 3 and a.describe()["fisher"] == "mc"


@pytest.mark.parametrize("loss", ["cross-entropy", "mse"])
def test_mc_fisher_expectation_is_the_ggn(loss):
    """E[F_mc] = GGN for softmax cross-entropy (and for mse with its Gaussian). K seeds of
    S samples per term: the mean's squared error is sum(Var) / (K S) per single sample,
    estimated from the seeds' spread over all entries; allowed: 4 times that (twice the
    expected error norm)."""
    model, batches = _mlp(), _class_batches(CLASS_CASES["mlp-tanh"][1], sizes=(4, 3))
    fn = resolve_loss(loss)
    if loss == "mse":
        g = torch.Generator().manual_seed(9)
        batches = [(x, torch.randn(len(y), 3, generator=g, dtype=F64)) for x, y in batches]
    V = _vectors(sum(p.numel() for p in model.parameters()), k=3)
    GV = GGNOperator(model, fn, batches).matmat(V)
    K, S = 8, 200
    draws = torch.stack([FisherOperator(model, fn, batches, seed=s, mc_samples=S).matmat(V)
                         for s in range(K)])
    mean = draws.mean(0)
    expected = float(draws.var(0).sum()) / K     # E ||mean - G V||^2
    assert float((mean - GV).square().sum()) <= 4 * expected
    # one sample per term: the error is about sqrt(K S) times larger
    one = FisherOperator(model, fn, batches, seed=0).matmat(V)
    assert float((one - GV).norm()) > 5 * float((mean - GV).norm())


def test_fisher_needs_a_likelihood():
    model, batches = _mlp(), _class_batches(CLASS_CASES["mlp-tanh"][1])
    with pytest.raises(ValueError, match="use GGNOperator"):
        FisherOperator(model, lambda out, y: out.square().mean(), batches)
    smoothed = nn.CrossEntropyLoss(label_smoothing=0.1)
    with pytest.raises(ValueError, match="likelihood"):
        FisherOperator(model, smoothed, batches, kind="empirical")


# --------------------------------------------------------------------------- the CLI

KW = {"num_classes": 10, "in_shape": [1, 8, 8], "hidden": 3}
SAMPLES = 48


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return trained_digits_mlp(tmp_path_factory.mktemp("ckpt"), KW, steps=20, samples=128)


def test_cli_spectrum_ggn_matches_dense_eigvalsh(checkpoint, tmp_path):
    path, model = checkpoint
    store = tmp_path / "s.h5"
    code, out, err = run(["spectrum", path, "--samples", SAMPLES, "--batch-size", 20,
                          "--top-k", 3, "--curvature", "ggn", "--dtype", "float64",
                          "--tol", 1e-9, "--json", "--store", store])
    assert code == 0, err
    data = json.loads(out)
    x, y = load_digits("train").tensors
    x, y = x[:SAMPLES].double(), y[:SAMPLES]
    batches = [(x[i:i + 20], y[i:i + 20]) for i in range(0, SAMPLES, 20)]
    truth = torch.linalg.eigvalsh(dense_ggn(model, batches, _ce_hessian)).numpy()
    np.testing.assert_allclose(data["eigenvalues"], truth[::-1][:3], rtol=1e-6)
    assert data["curvature"] == "ggn" and all(data["converged"])
    code, shown, err = run(["show", store, data["analysis_id"], "--json"])
    assert code == 0, err
    shown = json.loads(shown)
    assert shown["attrs"]["settings"]["curvature"] == "ggn"
    assert shown["attrs"]["operator"]["curvature"] == "ggn" and shown["curvature"] == "ggn"
    # the mc Fisher records its kind and seed
    code, out, err = run(["spectrum", path, "--samples", SAMPLES, "--top-k", 1,
                          "--curvature", "fisher", "--seed", 5, "--json", "--store", store])
    assert code == 0, err
    fisher = json.loads(out)
    assert fisher["curvature"] == "fisher" and fisher["fisher"]["kind"] == "mc"
    assert fisher["fisher"]["seed"] is not None and fisher["eigenvalues"][0] > 0


def test_baseline_with_ggn_is_checked_with_ggn(checkpoint, tmp_path):
    path, _ = checkpoint
    out_file = tmp_path / "base.json"
    code, out, err = run(["baseline", path, "-o", out_file, "--samples", SAMPLES,
                          "--metric", "lambda_max", "--curvature", "ggn", "--json"])
    assert code == 0, err
    assert json.loads(out_file.read_text())["settings"]["curvature"] == "ggn"
    code, out, err = run(["check", path, "--baseline", out_file, "--json"])
    assert code == 0, err
    checked = json.loads(out)
    assert checked["passed"] and checked["settings"]["spectrum"]["curvature"] == "ggn"


FACTORY = "def make():\n    import torch\n    return lambda out, y: torch.nn.functional" \
          ".cross_entropy(out, y)\n"


@pytest.mark.parametrize("case", ["fisher-factory", "unknown-curvature", "retained-ggn"])
def test_bad_curvature_input_exits_2_with_one_line(checkpoint, tmp_path, case):
    path, _ = checkpoint
    (tmp_path / "myloss.py").write_text(FACTORY)
    args = {"fisher-factory": ["--curvature", "fisher", "--loss",
                               f"{tmp_path / 'myloss.py'}:make"],
            "unknown-curvature": ["--curvature", "hessain"],
            "retained-ggn": ["--curvature", "ggn", "--hvp-mode", "retained-graph"]}[case]
    store = tmp_path / "s.h5"
    code, out, err = run(["spectrum", path, "--samples", 16, "--store", store, *args])
    assert code == 2, (out, err)
    assert len(err.strip().splitlines()) == 1, err
    assert ("--hvp-mode" if case == "retained-ggn" else "--curvature") in err, err
    assert not store.exists()
