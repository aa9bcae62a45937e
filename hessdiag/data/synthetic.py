"""Generated example tasks beyond images: they ship with hessdiag (no download) and cover
the model families the SAM studies apply it to.

Each loader takes ``split`` (``"train"`` or ``"test"``) and returns a map-style data set
with a ``meta`` dict (the facts a model needs and the default ``loss``); the train and
test splits are draws of the same generator from different seeds (``TRAIN_SEED`` 0,
``TEST_SEED`` 1; each task seeds its own ``torch.Generator`` with ``1000 * split seed + k``,
k = 1 ecg, 2 molecules, 3 text, 4 tabular), so they differ and are the same on every
machine. Each builds in well under a second on a CPU, with no download.

``ecg``
    ECG-like signals of ``T = 96`` samples (2.4 s at 40 Hz), one channel: samples
    ``(x (96, 1) float32, class)``, 1,000 train / 250 test, 5 balanced classes. Each beat
    is a sum of Gaussian bumps at fixed offsets from the R peak (P wave +0.15 at -0.18 s,
    Q -0.12 at -0.035 s, R +1.0 at 0, S -0.25 at +0.035 s, T +0.3 at +0.25 s); beats repeat
    at the class's period (scaled by a uniform factor in [0.92, 1.08] per signal) from a
    random phase, each wave's amplitude jittered by a uniform ±15%, plus a baseline wander
    ``0.1 sin(2 pi f t + phi)`` (f in [0.15, 0.4] Hz) and Gaussian noise (sd 0.05).
    Classes: 0 normal (period 0.85 s), 1 tachycardia (0.45 s), 2 bradycardia (1.4 s), 3
    wide QRS (normal rate, Q, R, S three times as wide), 4 inverted T wave (normal rate, T
    amplitude -0.3). Learnable, not trivially: a linear read-out of the raw samples reaches
    about 50% test accuracy, a small ``SequenceTransformer`` about 80% in five epochs.
    Loss cross-entropy.
``molecules``
    Molecule-like graphs of 6 to 20 atoms: samples ``({"x": (n, 4) one-hot atom type,
    "adj": (n, n) symmetric 0/1}, class)``, 600 train / 200 test, balanced. Atom types
    C, N, O, S (probabilities 0.6, 0.15, 0.15, 0.1). Bonds: a random tree (atom ``i``
    bonds to a uniformly chosen earlier atom) plus 0, 1 or 2 ring closures (a bond between
    two atoms at least 3 bonds apart, closing a ring of at least 4 atoms). **Class 1 iff an
    oxygen atom (type 2) lies on a ring**, i.e. on a cycle of the graph. Batched by
    :func:`collate_graphs` into one graph with a block-diagonal normalised adjacency.
    Loss cross-entropy.
``text``
    Next-token language modelling on a generated corpus of simple English sentences from a
    small grammar (``[the|a] [adjective] noun verb [preposition the noun] .``), word-level:
    the vocabulary ``VOCABULARY`` is padding, start and the grammar's 34 tokens (36 in
    all, every word occurring in the train corpus), the same for both splits. Samples
    ``(tokens (L,), targets (L,))`` int64 of length L from 12 to 32 with ``targets``
    the tokens shifted by one, 400 train / 100 test. Token 0 is padding, 1 the start of a
    sample; :meth:`TextData.collate_fn` pads inputs with 0 and targets with -100, so
    batches hold different numbers of real tokens. Loss cross-entropy per token.
``tabular``
    Regression: ``x`` five standard normal features, ``y = sin(x1) + 0.5 x2 x3 - x4^2 / 4
    + 0.1 x5 + 0.1 eps`` (eps standard normal), as float32 ``(5,)`` and ``(1,)``; 800 train
    / 200 test. Loss mse.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

TRAIN_SEED, TEST_SEED = 0, 1


def _seed(split: str, salt: int) -> torch.Generator:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
    return torch.Generator().manual_seed((TRAIN_SEED if split == "train" else TEST_SEED)
                                         * 1000 + salt)


class _Tensors(Dataset):
    """Samples from stacked tensors, with the task's ``meta``."""

    def __init__(self, x: Tensor, y: Tensor, meta: dict[str, Any]) -> None:
        self.x, self.y, self.meta = x, y, meta

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x[i], self.y[i]


# --------------------------------------------------------------------------- ecg

ECG_RATE, ECG_LENGTH = 40.0, 96
ECG_CLASSES = ("normal", "tachycardia", "bradycardia", "wide QRS", "inverted T")
ECG_PERIODS = (0.85, 0.45, 1.4, 0.85, 0.85)  # seconds per beat, by class
_WAVES = {"P": (0.15, -0.18, 0.025), "Q": (-0.12, -0.035, 0.01), "R": (1.0, 0.0, 0.012),
          "S": (-0.25, 0.035, 0.01), "T": (0.3, 0.25, 0.04)}  # amplitude, offset s, width s
_BEATS = torch.arange(-2, 9, dtype=torch.float64)  # enough beats to cover 2.4 s at 0.414 s


def ecg_signals(labels: Tensor, gen: torch.Generator) -> Tensor:
    """ECG-like signals of the classes ``labels`` (see the module docstring), ``(n, T)``
    float32."""
    n = len(labels)
    t = torch.arange(ECG_LENGTH, dtype=torch.float64) / ECG_RATE

    def jitter(*shape: int) -> Tensor:  # uniform on [-1, 1]
        return 2 * torch.rand(*shape, generator=gen, dtype=torch.float64) - 1

    period = torch.tensor(ECG_PERIODS, dtype=torch.float64)[labels] * (1 + 0.08 * jitter(n))
    phase = torch.rand(n, generator=gen, dtype=torch.float64) * period
    centres = phase[:, None] + _BEATS[None, :] * period[:, None]  # R peaks (n, beats)
    amplitudes = 1 + 0.15 * jitter(n, len(_BEATS), len(_WAVES))
    signal = torch.zeros(n, ECG_LENGTH, dtype=torch.float64)
    for w, (name, (amplitude, offset, width)) in enumerate(_WAVES.items()):
        widths = torch.full((n,), width, dtype=torch.float64)
        heights = torch.full((n,), amplitude, dtype=torch.float64)
        if name in "QRS":
            widths[labels == 3] *= 3
        if name == "T":
            heights[labels == 4] *= -1
        z = (t[None, None, :] - centres[:, :, None] - offset) / widths[:, None, None]
        bumps = (heights[:, None] * amplitudes[:, :, w])[:, :, None] * torch.exp(-0.5 * z**2)
        signal += bumps.sum(1)
    f = 0.15 + 0.25 * torch.rand(n, 1, generator=gen, dtype=torch.float64)
    phi = 2 * math.pi * torch.rand(n, 1, generator=gen, dtype=torch.float64)
    signal += 0.1 * torch.sin(2 * math.pi * f * t + phi)
    signal += 0.05 * torch.randn(n, ECG_LENGTH, generator=gen, dtype=torch.float64)
    return signal.float()


@functools.lru_cache(maxsize=2)
def _ecg_tensors(split: str) -> tuple[Tensor, Tensor]:
    """The split's signals and labels, generated once per process (~0.4 s)."""
    gen = _seed(split, 1)
    n = 1000 if split == "train" else 250
    labels = torch.arange(n) % len(ECG_CLASSES)
    labels = labels[torch.randperm(n, generator=gen)]
    return ecg_signals(labels, gen).unsqueeze(-1), labels


def ecg(split: str = "train") -> Dataset:
    """Synthetic ECG-like signals, 5 classes (see the module docstring)."""
    x, labels = (t.clone() for t in _ecg_tensors(split))
    return _Tensors(x, labels, {
        "num_classes": 5, "seq_len": ECG_LENGTH, "num_features": 1, "loss": "cross-entropy",
        "classes": list(ECG_CLASSES),
        "description": "synthetic ECG-like signals (96, 1), 5 rhythm classes"})


# --------------------------------------------------------------------------- molecules

ATOMS = ("C", "N", "O", "S")
_ATOM_P = torch.tensor([0.6, 0.15, 0.15, 0.1])


def _distances(adj: Tensor, source: int) -> list[int]:
    n = len(adj)
    dist = [-1] * n
    dist[source] = 0
    frontier = [source]
    while frontier:
        nxt = []
        for u in frontier:
            for v in torch.nonzero(adj[u]).flatten().tolist():
                if dist[v] < 0:
                    dist[v] = dist[u] + 1
                    nxt.append(v)
        frontier = nxt
    return dist


def random_molecule(gen: torch.Generator) -> tuple[Tensor, Tensor, int]:
    """``(atom types (n,), adjacency (n, n), label)``: label 1 iff an oxygen lies on a
    ring. Rings come from closures of the random tree, each closing the tree path between
    its two atoms; an atom is on a ring iff it is on such a path."""
    n = int(torch.randint(6, 21, (1,), generator=gen))
    types = torch.multinomial(_ATOM_P, n, replacement=True, generator=gen)
    adj = torch.zeros(n, n)
    parent = [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, n)]
    for i in range(1, n):
        adj[i, parent[i]] = adj[parent[i], i] = 1
    on_ring = set()
    for _ in range(int(torch.randint(0, 3, (1,), generator=gen))):
        u = int(torch.randint(0, n, (1,), generator=gen))
        far = [v for v, d in enumerate(_distances(adj, u)) if d >= 3]
        if not far:
            continue
        v = far[int(torch.randint(0, len(far), (1,), generator=gen))]
        # the ring closed by (u, v): the tree path between u and v
        up_u, up_v = [u], [v]
        while up_u[-1] != -1:
            up_u.append(parent[up_u[-1]])
        while up_v[-1] != -1:
            up_v.append(parent[up_v[-1]])
        common = next(a for a in up_u if a in up_v)
        path = up_u[:up_u.index(common) + 1] + up_v[:up_v.index(common)]
        on_ring.update(path)
        adj[u, v] = adj[v, u] = 1
    label = int(any(int(types[a]) == 2 for a in on_ring))
    return types, adj, label


@functools.lru_cache(maxsize=2)
def _molecule_items(split: str) -> tuple[tuple[dict[str, Tensor], int], ...]:
    """The split's graphs, generated once per process (a python loop over a few thousand
    random trees, ~0.4 s); each dataset gets its own copies of the tensors."""
    gen = _seed(split, 2)
    n = 600 if split == "train" else 200
    per_class: list[list[tuple[dict[str, Tensor], int]]] = [[], []]
    while min(len(c) for c in per_class) < n // 2:
        types, adj, label = random_molecule(gen)
        if len(per_class[label]) < n // 2:
            x = torch.nn.functional.one_hot(types, len(ATOMS)).float()
            per_class[label].append(({"x": x, "adj": adj}, label))
    items = per_class[0] + per_class[1]
    order = torch.randperm(len(items), generator=gen)
    return tuple(items[int(i)] for i in order)


class Molecules(Dataset):
    """Molecule-like graphs (see the module docstring); ``collate_fn`` batches them."""

    def __init__(self, split: str) -> None:
        self.items = [({"x": g["x"].clone(), "adj": g["adj"].clone()}, label)
                      for g, label in _molecule_items(split)]
        self.meta = {"num_classes": 2, "num_features": len(ATOMS), "loss": "cross-entropy",
                     "description": "molecule-like graphs of 6-20 atoms; class 1 iff an "
                                    "oxygen lies on a ring"}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[dict[str, Tensor], int]:
        return self.items[i]

    @staticmethod
    def collate_fn(samples: list) -> tuple[dict[str, Tensor], Tensor]:
        return collate_graphs(samples)


def collate_graphs(samples: list) -> tuple[dict[str, Tensor], Tensor]:
    """Graphs ``({"x", "adj"}, label)`` as one graph: node features ``x`` stacked, the
    block-diagonal adjacency normalised per graph as ``D^-1/2 (A + I) D^-1/2`` (Kipf &
    Welling 2017), ``graph_index`` the graph of each node; labels ``(G,)``."""
    xs, blocks, index = [], [], []
    for k, (graph, _) in enumerate(samples):
        a = graph["adj"] + torch.eye(len(graph["adj"]))
        d = a.sum(1).rsqrt()
        blocks.append(d[:, None] * a * d[None, :])
        xs.append(graph["x"])
        index.append(torch.full((len(graph["x"]),), k, dtype=torch.long))
    inputs = {"x": torch.cat(xs), "adj": torch.block_diag(*blocks),
              "graph_index": torch.cat(index)}
    return inputs, torch.tensor([int(y) for _, y in samples])


def molecules(split: str = "train") -> Dataset:
    """Synthetic molecule-like graphs, 2 classes (see the module docstring)."""
    return Molecules(split)


# --------------------------------------------------------------------------- text

_DETERMINERS = ("the", "a")
_ADJECTIVES = ("small", "red", "old", "quiet", "happy", "dark", "tall", "green")
_NOUNS = ("cat", "dog", "bird", "child", "house", "tree", "river", "ship", "garden",
          "teacher")
_VERBS = ("sees", "likes", "finds", "follows", "watches", "hears", "sleeps", "waits")
_PREPOSITIONS = ("near", "under", "behind", "in", "on")
VOCABULARY = ("<pad>", "<s>", ".", *_DETERMINERS, *_ADJECTIVES, *_NOUNS, *_VERBS,
              *_PREPOSITIONS)
PAD, START = 0, 1
TEXT_MAX = 32


def _pick(options: tuple[str, ...], gen: torch.Generator) -> str:
    return options[int(torch.randint(0, len(options), (1,), generator=gen))]


def sentence(gen: torch.Generator) -> list[str]:
    """``[the|a] [adjective] noun verb [preposition the noun] .``"""
    words = [_pick(_DETERMINERS, gen)]
    if float(torch.rand(1, generator=gen)) < 0.5:
        words.append(_pick(_ADJECTIVES, gen))
    words += [_pick(_NOUNS, gen), _pick(_VERBS, gen)]
    if float(torch.rand(1, generator=gen)) < 0.6:
        words += [_pick(_PREPOSITIONS, gen), "the", _pick(_NOUNS, gen)]
    return words + ["."]


class TextData(Dataset):
    """Next-token samples of varying length (see the module docstring)."""

    def __init__(self, split: str) -> None:
        gen = _seed(split, 3)
        index = {w: i for i, w in enumerate(VOCABULARY)}
        self.samples = []
        for _ in range(400 if split == "train" else 100):
            length = int(torch.randint(12, TEXT_MAX + 1, (1,), generator=gen))
            words = ["<s>"]
            while len(words) < length + 1:
                words += sentence(gen)
            ids = torch.tensor([index[w] for w in words[:length + 1]])
            self.samples.append((ids[:-1], ids[1:]))
        self.meta = {"vocab_size": len(VOCABULARY), "num_classes": len(VOCABULARY),
                     "seq_len": TEXT_MAX, "pad_id": PAD, "loss": "cross-entropy",
                     "description": "next-token prediction on generated sentences"}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.samples[i]

    @staticmethod
    def collate_fn(samples: list) -> tuple[Tensor, Tensor]:
        """Pad to the longest sample: inputs with ``PAD``, targets with -100."""
        longest = max(len(x) for x, _ in samples)
        tokens = torch.full((len(samples), longest), PAD, dtype=torch.long)
        targets = torch.full((len(samples), longest), -100, dtype=torch.long)
        for i, (x, y) in enumerate(samples):
            tokens[i, :len(x)] = x
            targets[i, :len(y)] = y
        return tokens, targets


def text(split: str = "train") -> Dataset:
    """Next-token language modelling on a generated corpus (see the module docstring)."""
    return TextData(split)


# --------------------------------------------------------------------------- tabular


def tabular_target(x: Tensor) -> Tensor:
    """The noise-free regression rule, ``(n, 5) -> (n, 1)``."""
    return (torch.sin(x[:, 0]) + 0.5 * x[:, 1] * x[:, 2] - x[:, 3] ** 2 / 4
            + 0.1 * x[:, 4]).unsqueeze(1)


def tabular(split: str = "train") -> Dataset:
    """Tabular regression, 5 features (see the module docstring)."""
    gen = _seed(split, 4)
    n = 800 if split == "train" else 200
    x = torch.randn(n, 5, generator=gen)
    y = tabular_target(x) + 0.1 * torch.randn(n, 1, generator=gen)
    return _Tensors(x, y, {"num_features": 5, "num_outputs": 1, "loss": "mse",
                           "description": "tabular regression, 5 features, 1 target"})
