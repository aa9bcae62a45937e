"""The generated example tasks of :mod:`hessdiag.data.synthetic`: their documented rules
hold on the generated samples (recomputed here from the samples, not from the generator's
code), they are deterministic, the splits differ, and their batching is right."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hessdiag.data import synthetic
from hessdiag.data.synthetic import ecg, molecules, tabular, text

LOADERS = {"ecg": ecg, "molecules": molecules, "text": text, "tabular": tabular}
SIZES = {"ecg": (1000, 250), "molecules": (600, 200), "text": (400, 100),
         "tabular": (800, 200)}


def _fresh(load, *args):
    """``load(*args)`` generated anew: the per-process caches of the generated splits
    (``synthetic._ecg_tensors``, ``synthetic._molecule_items``) emptied first."""
    for fn in vars(synthetic).values():
        if callable(getattr(fn, "cache_clear", None)):
            fn.cache_clear()
    return load(*args)


def _flat(sample) -> list[torch.Tensor]:
    """A sample's tensors (and ints) in a fixed order, for comparing samples."""
    if isinstance(sample, dict):
        return [t for k in sorted(sample) for t in _flat(sample[k])]
    if isinstance(sample, tuple | list):
        return [t for part in sample for t in _flat(part)]
    return [torch.as_tensor(sample)]


def _same(a, b) -> bool:
    fa, fb = _flat(a), _flat(b)
    return len(fa) == len(fb) and all(x.shape == y.shape and torch.equal(x, y)
                                      for x, y in zip(fa, fb, strict=True))


# --------------------------------------------------------------------------- all four


@pytest.mark.parametrize("name", list(LOADERS))
def test_each_loader_builds_with_sizes_and_meta(name):
    # (how fast they build is a benchmark's business, not a unit test's)
    load = LOADERS[name]
    train, default = _fresh(load, "train"), _fresh(load)  # the default split is "train"
    assert _same(train[0], default[0]) and len(train) == len(default)
    train, test = load("train"), load("test")
    assert (len(train), len(test)) == SIZES[name]
    assert isinstance(train, torch.utils.data.Dataset)
    meta = train.meta
    assert meta == test.meta
    assert set(meta) >= {"loss", "description"}
    assert meta["loss"] in ("cross-entropy", "mse")
    assert isinstance(meta["description"], str) and "\n" not in meta["description"]
    if meta["loss"] == "cross-entropy":
        assert meta["num_classes"] >= 2
    with pytest.raises(ValueError, match="split"):
        load("validation")


@pytest.mark.parametrize("name", list(LOADERS))
def test_loads_are_deterministic_and_the_splits_differ(name):
    load = LOADERS[name]
    a, b, test = _fresh(load, "train"), _fresh(load, "train"), _fresh(load, "test")
    c = load("train")  # from the cache: the same samples, its own tensors
    assert all(_same(a[i], c[i]) for i in range(len(a)))
    assert all(_same(a[i], b[i]) for i in range(len(a)))
    # the test split is a different draw: hardly any test sample also occurs in train
    # (a small molecule can recur by chance; continuous samples never do)
    train_keys = {tuple(torch.cat([t.reshape(-1).double() for t in _flat(a[i])]).tolist())
                  for i in range(len(a))}
    repeats = sum(tuple(torch.cat([t.reshape(-1).double() for t in _flat(test[i])]).tolist())
                  in train_keys for i in range(len(test)))
    assert repeats <= (0.05 * len(test) if name == "molecules" else 0)


# --------------------------------------------------------------------------- ecg


def _r_peaks(s: np.ndarray) -> list[int]:
    """R peaks: the sharp maxima, where the signal exceeds the mean of its values 3 samples
    (75 ms) either side by more than 0.4 (the R wave, not the broad P and T waves)."""
    sharp = s[3:-3] - (s[:-6] + s[6:]) / 2
    return [k + 3 for k in range(len(sharp))
            if sharp[k] > 0.4 and sharp[k] == sharp[max(0, k - 4):k + 5].max()]


def _ecg_class_by_rule(s: np.ndarray) -> int:
    """The class the documented rule gives, read off the signal: the beat period (40 Hz:
    tachycardia 0.45 s = 18 samples, normal 0.85 s = 34, bradycardia 1.4 s = 56), then
    the width of the R wave above half its height (wide QRS), then the sign of the T wave
    0.25 s (10 samples) after each R peak, against the baseline 3 samples before it."""
    peaks = _r_peaks(s)
    interval = float(np.median(np.diff(peaks))) if len(peaks) >= 2 else float("inf")
    if interval < 25:
        return 1
    if interval > 45:
        return 2
    widths = [(s[i - 3:i + 4] - s[i - 3] > (s[i] - s[i - 3]) / 2).sum() for i in peaks]
    if np.mean(widths) >= 2.2:
        return 3
    t_waves = [s[i + 10] - s[i - 3] for i in peaks if i + 10 < len(s)]
    return 4 if t_waves and np.mean(t_waves) < 0 else 0


def test_ecg_samples_follow_the_documented_rhythm_rules():
    data = ecg("test")
    x, y = data[0]
    assert x.dtype == torch.float32 and x.shape == (96, 1)
    assert torch.as_tensor(y).dtype == torch.int64 and torch.as_tensor(y).dim() == 0
    assert data.meta["num_classes"] == 5 and data.meta["seq_len"] == 96
    assert data.meta["num_features"] == 1 and data.meta["loss"] == "cross-entropy"
    labels = torch.stack([torch.as_tensor(data[i][1]) for i in range(len(data))])
    assert torch.bincount(labels).tolist() == [50] * 5  # balanced
    assert torch.bincount(ecg("train").y).tolist() == [200] * 5
    predicted = torch.tensor([_ecg_class_by_rule(data[i][0][:, 0].double().numpy())
                              for i in range(len(data))])
    agreement = (predicted == labels).float()
    assert float(agreement.mean()) > 0.95
    for c in range(5):
        assert float(agreement[labels == c].mean()) > 0.85, c
    # random phase, wander and noise: the signals of a class differ at every time step
    for c in range(5):
        assert float(data.x[labels == c].std(0).min()) > 0.05


def test_ecg_is_not_trivially_separable_by_a_linear_model():
    torch.manual_seed(0)
    train, test = ecg("train"), ecg("test")
    linear = torch.nn.Linear(96, 5)
    opt = torch.optim.Adam(linear.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(linear(train.x[..., 0]), train.y).backward()
        opt.step()
    with torch.no_grad():
        accuracy = float((linear(test.x[..., 0]).argmax(1) == test.y).float().mean())
    assert accuracy < 0.75  # a linear read-out of the raw samples misses much of it


# --------------------------------------------------------------------------- molecules


def _connected(adj: torch.Tensor, removed: int | None = None) -> list[set[int]]:
    """The connected components of the graph without node ``removed``."""
    nodes = [v for v in range(len(adj)) if v != removed]
    seen: set[int] = set()
    components = []
    for start in nodes:
        if start in seen:
            continue
        component, stack = {start}, [start]
        while stack:
            u = stack.pop()
            for v in torch.nonzero(adj[u]).flatten().tolist():
                if v != removed and v not in component:
                    component.add(v)
                    stack.append(v)
        seen |= component
        components.append(component)
    return components


def _on_a_ring(adj: torch.Tensor, v: int) -> bool:
    """``v`` lies on a cycle iff two of its neighbours stay connected without ``v``."""
    neighbours = torch.nonzero(adj[v]).flatten().tolist()
    components = _connected(adj, removed=v)
    owner = {u: k for k, c in enumerate(components) for u in c}
    return len({owner[u] for u in neighbours}) < len(neighbours)


def test_molecules_are_connected_ring_graphs_labelled_by_the_oxygen_ring_rule():
    data = molecules("test")
    labels = [int(data[i][1]) for i in range(len(data))]
    assert sum(labels) == len(data) // 2  # balanced
    assert sum(int(y) for _, y in molecules("train")) == 300
    assert data.meta["num_classes"] == 2 and data.meta["num_features"] == 4
    sizes, rings = set(), 0
    for i in range(len(data)):
        graph, label = data[i]
        x, adj = graph["x"], graph["adj"]
        n = len(x)
        sizes.add(n)
        assert 6 <= n <= 20 and x.shape == (n, 4) and adj.shape == (n, n)
        assert x.dtype == torch.float32 and adj.dtype == torch.float32
        assert torch.equal(x.sum(1), torch.ones(n)) and set(x.unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(adj, adj.T) and set(adj.unique().tolist()) <= {0.0, 1.0}
        assert float(adj.diagonal().abs().sum()) == 0
        assert len(_connected(adj)) == 1  # one molecule
        closures = int(adj.sum()) // 2 - (n - 1)  # bonds beyond a spanning tree
        assert 0 <= closures <= 2
        assert float(torch.trace(adj @ adj @ adj)) == 0  # every ring has at least 4 atoms
        rings += closures > 0
        types = x.argmax(1)
        oxygen_on_ring = any(_on_a_ring(adj, v) for v in range(n) if int(types[v]) == 2)
        assert label == int(oxygen_on_ring), i
    assert len(sizes) > 10 and 0 < rings < len(data)


def test_collate_fn_batches_graphs_into_one_normalised_block_diagonal_graph():
    data = molecules("train")
    samples = [data[i] for i in range(5)]
    inputs, y = data.collate_fn(samples)
    sizes = [len(g["x"]) for g, _ in samples]
    total = sum(sizes)
    assert set(inputs) == {"x", "adj", "graph_index"}
    assert inputs["x"].shape == (total, 4) and inputs["adj"].shape == (total, total)
    assert inputs["graph_index"].dtype == torch.int64 and y.dtype == torch.int64
    assert y.tolist() == [int(label) for _, label in samples]
    assert inputs["graph_index"].tolist() == [k for k, n in enumerate(sizes) for _ in range(n)]
    start = 0
    for (graph, _), n in zip(samples, sizes, strict=True):
        stop = start + n
        assert torch.equal(inputs["x"][start:stop], graph["x"])
        a = graph["adj"].double() + torch.eye(n, dtype=torch.float64)
        degree = a.sum(1).numpy()
        expected = a.numpy() / np.sqrt(np.outer(degree, degree))
        assert np.allclose(inputs["adj"][start:stop, start:stop].numpy(), expected, atol=1e-6)
        # no bond across graphs: all of this graph's rows outside its block are zero
        outside = torch.cat([inputs["adj"][start:stop, :start], inputs["adj"][start:stop, stop:]],
                            dim=1)
        assert float(outside.abs().sum()) == 0
        start = stop
    assert torch.allclose(inputs["adj"], inputs["adj"].T)
    # the normalised adjacency of each graph has eigenvalues in (-1, 1], top one 1
    eigenvalues = torch.linalg.eigvalsh(inputs["adj"].double())
    assert float(eigenvalues.max()) == pytest.approx(1.0, abs=1e-6)
    assert float(eigenvalues.min()) > -1


# --------------------------------------------------------------------------- text


def test_text_samples_are_sentences_of_the_grammar_shifted_by_one():
    train, test = text("train"), text("test")
    vocab = synthetic.VOCABULARY
    meta = train.meta
    assert meta["vocab_size"] == len(vocab) == meta["num_classes"] <= 64
    assert meta["seq_len"] == 32 and meta["loss"] == "cross-entropy"
    pad = meta["pad_id"]
    assert vocab[pad] == "<pad>"
    determiners, adjectives = {"the", "a"}, set(synthetic._ADJECTIVES)
    nouns, verbs = set(synthetic._NOUNS), set(synthetic._VERBS)
    prepositions = set(synthetic._PREPOSITIONS)
    lengths, used = [], set()
    for data in (train, test):
        for i in range(len(data)):
            tokens, targets = data[i]
            assert tokens.dtype == targets.dtype == torch.int64
            assert tokens.shape == targets.shape and 12 <= len(tokens) <= 32
            assert torch.equal(tokens[1:], targets[:-1])  # next token
            assert pad not in tokens.tolist() and pad not in targets.tolist()
            lengths.append(len(tokens))
            words = [vocab[t] for t in tokens.tolist() + targets[-1:].tolist()]
            if data is train:
                used |= set(words)
            assert words[0] == "<s>" and "<s>" not in words[1:]
            sentences = " ".join(words[1:]).split(" . ")
            for k, sentence in enumerate(sentences):
                w = sentence.removesuffix(" .").split()
                complete = k < len(sentences) - 1 or sentence.endswith(" .")
                # [the|a] [adjective] noun verb [preposition the noun]
                pattern = [determiners] + ([adjectives] if len(w) > 1 and w[1] in adjectives
                                           else []) + [nouns, verbs]
                pattern += [prepositions, {"the"}, nouns]
                assert all(word in allowed for word, allowed in zip(w, pattern, strict=False))
                if complete:
                    assert len(w) in (len(pattern) - 3, len(pattern)), sentence
    assert used == set(vocab) - {"<pad>"}  # the vocabulary is the train corpus's
    assert min(lengths) == 12 and max(lengths) == 32 and len(set(lengths)) == 21


def test_text_collate_fn_pads_inputs_and_masks_targets_with_minus_100():
    data = text("train")
    pad = data.meta["pad_id"]
    counts = set()
    for start in range(0, 40, 4):
        samples = [data[i] for i in range(start, start + 4)]
        tokens, targets = data.collate_fn(samples)
        longest = max(len(x) for x, _ in samples)
        assert tokens.shape == targets.shape == (4, longest)
        assert tokens.dtype == targets.dtype == torch.int64
        for row, (x, t) in enumerate(samples):
            assert torch.equal(tokens[row, :len(x)], x) and torch.equal(targets[row, :len(t)], t)
            assert (tokens[row, len(x):] == pad).all() and (targets[row, len(t):] == -100).all()
        real = int((targets != -100).sum())
        assert real == sum(len(t) for _, t in samples)
        counts.add(real)
    assert len(counts) > 3  # batches hold different numbers of target tokens


# --------------------------------------------------------------------------- tabular


def test_tabular_targets_are_the_rule_plus_noise_of_variance_0_01():
    data = tabular("train")
    x0, y0 = data[0]
    assert x0.shape == (5,) and y0.shape == (1,)
    assert x0.dtype == y0.dtype == torch.float32
    assert data.meta["num_features"] == 5 and data.meta["num_outputs"] == 1
    assert data.meta["loss"] == "mse"
    for split in ("train", "test"):
        data = tabular(split)
        x = np.stack([data[i][0].numpy() for i in range(len(data))]).astype(np.float64)
        y = np.stack([data[i][1].numpy() for i in range(len(data))])[:, 0]
        rule = np.sin(x[:, 0]) + 0.5 * x[:, 1] * x[:, 2] - x[:, 3] ** 2 / 4 + 0.1 * x[:, 4]
        residual = y - rule
        assert residual.var() == pytest.approx(0.01, rel=0.2)
        assert abs(residual.mean()) < 3 * 0.1 / np.sqrt(len(y))
        # noise independent of the features: correlations within 4 standard errors of 0
        correlations = np.corrcoef(np.c_[x, residual].T)[-1, :5]
        assert np.abs(correlations).max() < 4 / np.sqrt(len(y))
        # standard normal features; the rule explains most of the variance
        assert np.abs(x.mean(0)).max() < 0.2 and np.abs(x.std(0) - 1).max() < 0.15
        assert residual.var() < 0.05 * y.var()
