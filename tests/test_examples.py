"""The shipped example tasks: their generating rules hold (checked independently of the
generators), their batching is right, their models behave as documented, and each trains
with `hessdiag train` and is analysed by `spectrum` and `align` end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import run_cli as run

from hessdiag.data import load_dataset
from hessdiag.data.synthetic import (
    ATOMS,
    PAD,
    VOCABULARY,
    collate_graphs,
    ecg,
    molecules,
    tabular,
    tabular_target,
    text,
)
from hessdiag.models import build_model


def test_splits_are_deterministic_disjoint_draws():
    for load in (ecg, tabular):
        a, b, test = load("train"), load("train"), load("test")
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
        assert not torch.equal(a.x[: len(test)], test.x)
    assert [int(y) for _, y in molecules("train").items[:20]] == \
        [int(y) for _, y in molecules("train").items[:20]]


def test_ecg_classes_are_balanced_and_rates_follow_the_class():
    data = ecg("train")
    assert data.x.shape == (1000, 96, 1) and torch.bincount(data.y).tolist() == [200] * 5
    assert load_dataset("ecg").facts["seq_len"] == 96

    def peaks(signal):  # R peaks: local maxima above 0.6
        s = signal.squeeze(-1)
        return int(((s[1:-1] > 0.6) & (s[1:-1] >= s[:-2]) & (s[1:-1] >= s[2:])).sum())

    mean_peaks = {c: np.mean([peaks(data.x[i]) for i in range(200) if int(data.y[i]) == c])
                  for c in (0, 1, 2)}
    # 2.4 s of signal: about 2.8 beats at 0.85 s, 5.3 at 0.45 s, 1.7 at 1.4 s
    assert mean_peaks[1] > mean_peaks[0] > mean_peaks[2]
    inverted = [float(data.x[i].min()) for i in range(200) if int(data.y[i]) == 4]
    normal = [float(data.x[i].min()) for i in range(200) if int(data.y[i]) == 0]
    assert np.mean(inverted) < np.mean(normal)


def _on_a_cycle(adj, node):
    """Independent check: a node is on a cycle iff removing one of its bonds leaves the
    two atoms connected."""
    n = len(adj)
    for other in torch.nonzero(adj[node]).flatten().tolist():
        seen, stack = {node}, [node]
        while stack:
            u = stack.pop()
            for v in torch.nonzero(adj[u]).flatten().tolist():
                if (u, v) in ((node, other), (other, node)) or v in seen:
                    continue
                seen.add(v)
                stack.append(v)
        if other in seen:
            return True
    return n < 0


def test_molecule_labels_follow_the_ring_rule_and_batches_are_block_diagonal():
    data = molecules("test")
    assert len(data) == 200 and sum(y for _, y in data.items) == 100
    for graph, label in data.items[:60]:
        adj, types = graph["adj"], graph["x"].argmax(1)
        assert torch.equal(adj, adj.T) and adj.diagonal().sum() == 0
        assert 6 <= len(adj) <= 20 and graph["x"].shape[1] == len(ATOMS)
        oxygen_on_ring = any(_on_a_cycle(adj, a) for a in range(len(adj)) if int(types[a]) == 2)
        assert label == int(oxygen_on_ring)
    samples = [data[i] for i in range(3)]
    inputs, y = collate_graphs(samples)
    sizes = [len(g["x"]) for g, _ in samples]
    assert inputs["adj"].shape == (sum(sizes), sum(sizes)) and y.tolist() == \
        [s[1] for s in samples]
    start = 0
    for k, (graph, _) in enumerate(samples):
        stop = start + sizes[k]
        a = graph["adj"] + torch.eye(sizes[k])
        deg = a.sum(1)
        expected = a / torch.sqrt(deg[:, None] * deg[None, :])
        assert torch.allclose(inputs["adj"][start:stop, start:stop], expected)
        assert inputs["adj"][start:stop, stop:].abs().sum() == 0  # no bond across graphs
        assert (inputs["graph_index"][start:stop] == k).all()
        start = stop


def test_text_targets_are_the_next_tokens_and_padding_is_not_counted():
    data = text("train")
    lengths = {len(x) for x, _ in data.samples}
    assert min(lengths) >= 12 and max(lengths) <= 32 and len(lengths) > 5
    tokens, targets = data[0]
    assert torch.equal(tokens[1:], targets[:-1]) and int(tokens[0]) == VOCABULARY.index("<s>")
    batch_a = data.collate_fn([data[i] for i in range(4)])
    batch_b = data.collate_fn([data[i] for i in range(4, 8)])
    counts = [int((t != -100).sum()) for _, t in (batch_a, batch_b)]
    assert counts[0] != counts[1] and counts[0] == sum(len(data[i][1]) for i in range(4))
    x, t = batch_a
    assert ((x == PAD) == (t == -100)).all()


def test_tabular_noise_is_what_the_rule_says():
    data = tabular("train")
    residual = data.y - tabular_target(data.x)
    assert float(residual.std()) == pytest.approx(0.1, rel=0.1)


def test_models_fit_their_data_and_behave_as_documented():
    gcn = build_model("gcn", num_features=4, num_classes=2)
    data = molecules("test")
    graph, _ = data[0]
    perm = torch.randperm(len(graph["x"]), generator=torch.Generator().manual_seed(0))
    permuted = {"x": graph["x"][perm], "adj": graph["adj"][perm][:, perm]}
    a, _ = collate_graphs([(graph, 0)])
    b, _ = collate_graphs([(permuted, 0)])
    assert torch.allclose(gcn(**a), gcn(**b), atol=1e-6)  # node order does not matter

    lm = build_model("tiny-lm", vocab_size=len(VOCABULARY), seq_len=32).eval()
    ids = torch.randint(0, len(VOCABULARY), (2, 10))
    changed = ids.clone()
    changed[:, 6] = (changed[:, 6] + 1) % len(VOCABULARY)
    with torch.no_grad():
        before, after = lm(ids), lm(changed)
    assert before.shape == (2, 10, len(VOCABULARY))
    assert torch.allclose(before[:, :6], after[:, :6], atol=1e-6)  # causal
    assert not torch.allclose(before[:, 6:], after[:, 6:])

    series = build_model("transformer", num_classes=5, seq_len=96, num_features=1)
    assert series(torch.randn(3, 50, 1)).shape == (3, 5)  # shorter than seq_len too


@pytest.mark.parametrize("data, model, extra", [
    ("ecg", "transformer", ["--samples", "48", "--model-kwargs",
                            '{"d_model": 8, "heads": 2, "layers": 1, "dim_feedforward": 16}']),
    ("molecules", "gcn", ["--samples", "64", "--base", "adam", "--lr", "0.01"]),
    ("text", "tiny-lm", ["--samples", "32", "--model-kwargs",
                         '{"d_model": 8, "heads": 2, "layers": 1, "dim_feedforward": 16}']),
    ("tabular", "mlp", ["--samples", "64", "--model-kwargs", '{"hidden": 8}', "--lr", "0.05"]),
])
def test_each_example_trains_then_spectrum_then_align(data, model, extra, tmp_path):
    store = tmp_path / "s.h5"
    code, out, err = run(["train", "--model", model, "--data", data, "--optimizer", "eigensam",
                          "--eig-every", "2", "--epochs", "1", "--batch-size", "16",
                          "--sharpness-every", "2", "--sharpness-samples", "16",
                          "--run-name", "r", "--checkpoint-dir", tmp_path / "ckpt", "--store",
                          store, "--json", *extra])
    assert code == 0, err
    summary = json.loads(out)
    assert summary["status"] == "finished" and math.isfinite(summary["lambda_max"])
    accuracy_applies = data != "tabular"
    assert math.isfinite(summary["train_accuracy"]) == accuracy_applies
    final = summary["final_checkpoint"]
    code, out, err = run(["spectrum", final, "--samples", "16", "--top-k", "2", "--trace",
                          "--trace-hvps", "6", "--json", "--store", store])
    assert code == 0, err
    result = json.loads(out)
    assert result["loss"] == ("mse" if data == "tabular" else "cross-entropy")
    assert len(result["eigenvalues"]) == 2 and result["samples"] >= 16
    code, out, err = run(["align", final, "--perturbation", "eigensam", "--batches", "2",
                          "--batch-size", "8", "--samples", "16", "--json", "--store", store])
    assert code == 0, err
    aligned = json.loads(out)
    assert 0 <= aligned["alignment"] <= 1 and aligned["batches"] == 2
    code, out, err = run(["show", store])
    assert code == 0 and "1 spectrum" in out and "1 alignment" in out
