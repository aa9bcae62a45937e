"""The model families of :mod:`hessdiag.models.families` on the example tasks: their
shapes, sizes and documented invariances, and both Hessian-vector product modes
(forward-over-reverse through ``torch.func`` and double backward) agree with each other
and with finite differences of the gradient."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from hessdiag.data.synthetic import ecg, molecules, text
from hessdiag.models.families import GCN, SequenceTransformer, TinyLM


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _ecg_batch(n=3, length=96):
    data = ecg("test")
    return data.x[:n, :length], data.y[:n]


def _graph_batch(n=3):
    data = molecules("test")
    return data.collate_fn([data[i] for i in range(n)])


def _text_batch(n=3):
    data = text("test")
    return data.collate_fn([data[i] for i in range(n)])


def test_constructor_signatures_are_shapes_then_keyword_only_options():
    expected = {
        SequenceTransformer: (["num_classes", "seq_len", "num_features"],
                              {"d_model": 32, "heads": 4, "layers": 2, "dim_feedforward": 64,
                               "dropout": 0.0}),
        GCN: (["num_features", "num_classes"], {"hidden": 32, "layers": 2}),
        TinyLM: (["vocab_size", "seq_len"], {"d_model": 32, "heads": 2, "layers": 2,
                                            "dim_feedforward": 64, "dropout": 0.0}),
    }
    for cls, (shapes, options) in expected.items():
        params = list(inspect.signature(cls).parameters.values())
        assert [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD] == shapes
        assert {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY} == options


def test_default_models_are_small_and_give_the_documented_shapes():
    torch.manual_seed(0)
    series = SequenceTransformer(5, 96, 1)
    assert _count(series) == 20389
    x, _ = _ecg_batch(4)
    assert series(x).shape == (4, 5)
    assert series(x[:, :50]).shape == (4, 5)  # shorter than seq_len
    assert series(torch.randn(2, 96, 3)[..., :1]).dtype == torch.float32

    gcn = GCN(4, 2)
    assert _count(gcn) == 1282
    inputs, y = _graph_batch(5)
    assert gcn(**inputs).shape == (5, 2) == (len(y), 2)

    lm = TinyLM(36, 32)
    assert _count(lm) == 20452
    tokens, _ = _text_batch(4)
    assert lm(tokens).shape == (*tokens.shape, 36)
    for length in (1, 7, 32):  # any length up to seq_len
        assert lm(torch.zeros(2, length, dtype=torch.long)).shape == (2, length, 36)
    # the options change the size
    assert _count(SequenceTransformer(5, 96, 1, d_model=16, heads=2, layers=1,
                                      dim_feedforward=32)) < 5000
    assert _count(GCN(4, 2, hidden=64, layers=3)) > _count(gcn)


def test_gcn_is_invariant_to_node_order_and_graphs_do_not_interact():
    torch.manual_seed(0)
    gcn = GCN(4, 2).double()
    data = molecules("test")
    samples = [data[i] for i in range(4)]
    inputs, _ = data.collate_fn(samples)
    before = gcn(**{k: v.double() if v.is_floating_point() else v for k, v in inputs.items()})

    def logits(graphs):
        batch, _ = data.collate_fn(graphs)
        batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
        return gcn(**batch)

    graph, label = samples[1]
    perm = torch.randperm(len(graph["x"]), generator=torch.Generator().manual_seed(1))
    permuted = {"x": graph["x"][perm], "adj": graph["adj"][perm][:, perm]}
    after = logits([samples[0], (permuted, label), *samples[2:]])
    assert torch.allclose(after, before, atol=1e-6)
    # each graph's logits are its own: alone, in another batch, in another order
    assert torch.allclose(logits([samples[2]])[0], before[2], atol=1e-10)
    assert torch.allclose(logits(samples[::-1]), before.flip(0), atol=1e-10)
    # the nodes interact through the adjacency: a different bond changes the logits
    changed = {"x": graph["x"], "adj": graph["adj"].clone()}
    i, j = torch.nonzero(graph["adj"])[0].tolist()
    changed["adj"][i, j] = changed["adj"][j, i] = 0
    k = next(v for v in range(len(graph["x"])) if v not in (i, j) and not graph["adj"][i, v])
    changed["adj"][i, k] = changed["adj"][k, i] = 1
    assert not torch.allclose(logits([(changed, label)])[0], before[1], atol=1e-6)


def test_tiny_lm_is_causal_and_padding_does_not_reach_back():
    torch.manual_seed(0)
    lm = TinyLM(36, 32).double()
    tokens = torch.randint(2, 36, (2, 12), generator=torch.Generator().manual_seed(0))
    for train, grad_enabled in ((False, True), (True, True), (False, False)):
        lm.train(train)
        for t in (0, 5, 11):
            changed = tokens.clone()
            changed[:, t] = (changed[:, t] + 1) % 36
            with torch.set_grad_enabled(grad_enabled):  # without grad: the fused fast path
                before, after = lm(tokens), lm(changed)
            assert torch.allclose(before[:, :t], after[:, :t], atol=1e-10)
            assert not torch.allclose(before[:, t], after[:, t], atol=1e-6)
    # a padded batch gives each sample's logits at its real positions
    data = text("test")
    samples = [data[i] for i in range(4)]
    padded, _ = data.collate_fn(samples)
    batch = lm(padded)
    for row, (x, _) in enumerate(samples):
        assert torch.allclose(batch[row, :len(x)], lm(x[None])[0], atol=1e-10)


def _task(name):
    """A float64 model on a tiny batch of its data, with its loss."""
    torch.manual_seed(0)
    if name == "transformer":
        x, y = _ecg_batch(3, 40)
        model = SequenceTransformer(5, 96, 1, d_model=8, heads=2, layers=2, dim_feedforward=16)
        args, kwargs = (x.double(),), {}
    elif name == "gcn":
        inputs, y = _graph_batch(3)
        model = GCN(4, 2, hidden=8)
        args = ()
        kwargs = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    else:
        tokens, y = _text_batch(3)
        model = TinyLM(36, 32, d_model=8, heads=2, layers=2, dim_feedforward=16)
        args, kwargs = (tokens,), {}
    model = model.double()

    def loss(params):
        out = functional_call(model, params, args, kwargs)
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1),
                               ignore_index=-100)

    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return model, params, loss


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", ["transformer", "gcn", "tiny-lm"])
def test_both_hessian_vector_product_modes_agree(name, train):
    model, params, loss = _task(name)
    model.train(train)
    names = list(params)
    gen = torch.Generator().manual_seed(2)
    with sdpa_kernel([SDPBackend.MATH]):
        for _ in range(2):  # a loop over vectors, no vmap
            v = {n: torch.randn(p.shape, generator=gen, dtype=p.dtype)
                 for n, p in params.items()}
            # forward-over-reverse
            _, forward = jvp(grad(loss), (params,), (v,))
            # double backward
            leaves = {n: p.clone().requires_grad_() for n, p in params.items()}
            g = torch.autograd.grad(loss(leaves), list(leaves.values()), create_graph=True)
            gv = sum((gi * v[n]).sum() for gi, n in zip(g, names, strict=True))
            backward = dict(zip(names, torch.autograd.grad(gv, list(leaves.values())),
                                strict=True))
            scale = max(float(b.abs().max()) for b in backward.values())
            assert scale > 1e-3  # a real curvature, not zeros
            for n in names:
                assert torch.allclose(forward[n], backward[n], rtol=0, atol=1e-8), n
            # and both are the derivative of the gradient (central differences)
            eps = 1e-5
            plus = grad(loss)({n: p + eps * v[n] for n, p in params.items()})
            minus = grad(loss)({n: p - eps * v[n] for n, p in params.items()})
            for n in names:
                difference = (plus[n] - minus[n]) / (2 * eps)
                assert torch.allclose(difference, backward[n], rtol=0, atol=1e-6 * scale), n


def test_the_sequence_transformer_learns_ecg_well_above_chance():
    torch.manual_seed(0)
    train, test = ecg("train"), ecg("test")
    model = SequenceTransformer(5, 96, 1, d_model=16, heads=2, layers=1, dim_feedforward=32)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(3):
        for batch in torch.randperm(len(train)).split(50):
            opt.zero_grad()
            F.cross_entropy(model(train.x[batch]), train.y[batch]).backward()
            opt.step()
    with torch.no_grad():
        accuracy = float((model(test.x).argmax(1) == test.y).float().mean())
    assert accuracy > 0.45  # chance is 0.2
