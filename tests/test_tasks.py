"""Any model, any loss, any data: ``hessdiag spectrum`` on tabular regression, sequences,
token ids in a dict with a padding mask, a per-token language-model loss over batches of
different token counts and graphs of different sizes, each against a dense float64
Hessian of the mean loss written out independently in the test; per-layer sharpness
against the dense Hessian's diagonal blocks; bad tasks refused in one line."""

from __future__ import annotations

import json
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import run_cli as run
from torch import nn

from hessdiag.checkpoints import save_checkpoint
from hessdiag.specs import load_factory

FACTORIES = textwrap.dedent('''
    import torch
    from torch import nn
    from torch.utils.data import Dataset, TensorDataset

    def gen(seed):
        return torch.Generator().manual_seed(seed)

    # ---- tabular regression: 5 features, 1 target
    def tabular(split="train"):
        g = gen(0 if split == "train" else 1)
        x = torch.randn(40, 5, generator=g)
        y = (torch.sin(x[:, :1]) + 0.5 * x[:, 1:2] * x[:, 2:3]).float()
        return TensorDataset(x, y)

    def tanh_mlp(num_features, num_outputs):
        return nn.Sequential(nn.Linear(num_features, 6), nn.Tanh(), nn.Linear(6, num_outputs))

    # ---- sequences (T, F), 3 classes
    def sequences(split="train"):
        g = gen(2)
        return TensorDataset(torch.randn(30, 7, 3, generator=g),
                             torch.randint(0, 3, (30,), generator=g))

    class GRUClassifier(nn.Module):
        def __init__(self, num_features, num_classes):
            super().__init__()
            self.gru = nn.GRU(num_features, 4, batch_first=True)
            self.head = nn.Linear(4, num_classes)

        def forward(self, x):
            return self.head(self.gru(x)[0][:, -1])

    def gru(num_features, num_classes):
        return GRUClassifier(num_features, num_classes)

    # ---- token ids with a padding mask, in a dict: sequence classification
    class Tokens(Dataset):
        meta = {"vocab_size": 11}

        def __init__(self):
            g = gen(3)
            self.lengths = torch.randint(3, 9, (24,), generator=g)
            self.ids = torch.randint(1, 11, (24, 8), generator=g)
            self.labels = torch.randint(0, 2, (24,), generator=g)

        def __len__(self):
            return 24

        def __getitem__(self, i):
            n = int(self.lengths[i])
            return {"ids": self.ids[i, :n]}, int(self.labels[i])

        @staticmethod
        def collate_fn(samples):
            longest = max(len(s[0]["ids"]) for s in samples)
            ids = torch.zeros(len(samples), longest, dtype=torch.long)
            mask = torch.ones(len(samples), longest, dtype=torch.bool)  # True: padding
            for i, (x, _) in enumerate(samples):
                ids[i, :len(x["ids"])] = x["ids"]
                mask[i, :len(x["ids"])] = False
            return {"ids": ids, "padding_mask": mask}, torch.tensor([y for _, y in samples])

    def tokens(split="train"):
        return Tokens()

    class TokenTransformer(nn.Module):
        def __init__(self, vocab_size, num_classes):
            super().__init__()
            self.embed = nn.Embedding(vocab_size, 4)
            self.encoder = nn.TransformerEncoderLayer(4, 2, dim_feedforward=6, dropout=0.0,
                                                      batch_first=True)
            self.head = nn.Linear(4, num_classes)

        def forward(self, ids, padding_mask):
            h = self.encoder(self.embed(ids), src_key_padding_mask=padding_mask)
            keep = (~padding_mask).unsqueeze(-1).to(h.dtype)
            return self.head((h * keep).sum(1) / keep.sum(1))

    def token_transformer(vocab_size, num_classes):
        return TokenTransformer(vocab_size, num_classes)

    # ---- next-token language modelling: ready batches of different token counts
    def lm_batches(split="train"):
        g = gen(4)
        out = []
        for b, (n, length) in enumerate([(3, 6), (2, 9), (4, 4)]):
            ids = torch.randint(0, 9, (n, length + 1), generator=g)
            targets = ids[:, 1:].clone()
            if b == 1:
                targets[0, -3:] = -100  # padding: not counted
            out.append((ids[:, :-1], targets))
        return out

    class TinyLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(9, 4)
            self.mix = nn.Linear(4, 4)
            self.head = nn.Linear(4, 9)

        def forward(self, ids):
            h = torch.tanh(self.mix(self.embed(ids)))
            # causal running mean over positions
            h = h.cumsum(1) / torch.arange(1, ids.shape[1] + 1, dtype=h.dtype)[:, None]
            return self.head(h)

    def tiny_lm():
        return TinyLM()

    # ---- graphs of different sizes: one block-diagonal normalised adjacency
    class Graphs(Dataset):
        def __init__(self):
            g = gen(5)
            self.items = []
            for i in range(10):
                n = 3 + i % 4
                a = (torch.rand(n, n, generator=g) < 0.5).float()
                a = torch.triu(a, 1)
                a = a + a.T
                x = torch.randn(n, 3, generator=g)
                self.items.append(({"x": x, "adj": a}, i % 2))

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.items[i]

    def collate_graphs(samples):
        xs, blocks, index = [], [], []
        for k, (g, _) in enumerate(samples):
            a = g["adj"] + torch.eye(len(g["adj"]))
            d = a.sum(1).rsqrt()
            blocks.append(d[:, None] * a * d[None, :])
            xs.append(g["x"])
            index.append(torch.full((len(g["x"]),), k, dtype=torch.long))
        return ({"x": torch.cat(xs), "adj": torch.block_diag(*blocks),
                 "graph_index": torch.cat(index)},
                torch.tensor([y for _, y in samples]))

    def graphs(split="train"):
        return Graphs(), collate_graphs

    class GCN(nn.Module):
        def __init__(self, num_features, num_classes):
            super().__init__()
            self.w1 = nn.Linear(num_features, 4)
            self.head = nn.Linear(4, num_classes)

        def forward(self, x, adj, graph_index):
            h = torch.tanh(adj @ self.w1(x))
            count = int(graph_index.max()) + 1
            pooled = torch.zeros(count, h.shape[1], dtype=h.dtype).index_add(0, graph_index, h)
            sizes = torch.bincount(graph_index, minlength=count).to(h.dtype)
            return self.head(pooled / sizes[:, None])

    def gcn(num_features, num_classes):
        return GCN(num_features, num_classes)

    # ---- bad inputs
    def not_data(split="train"):
        return {"x": torch.zeros(3)}

    def per_sample_loss():
        return nn.MSELoss(reduction="none")
''')


@pytest.fixture(scope="module")
def factories(tmp_path_factory):
    path = tmp_path_factory.mktemp("factories") / "tasks.py"
    path.write_text(FACTORIES)
    return path


def checkpoint(tmp_path, factories, model, data, loss, **kwargs):
    """A checkpoint of a randomly initialised factory model, recording its task."""
    from hessdiag.data import load_dataset
    from hessdiag.task import new_task

    torch.manual_seed(0)
    info = load_dataset(f"{factories}:{data}")
    task = new_task(f"{factories}:{model}", info, loss=loss, model_kwargs=kwargs)
    path = tmp_path / f"{model}.pt"
    save_checkpoint(path, task.model, model_spec=task.model_spec, model_kwargs=task.model_kwargs,
                    data={"spec": info.name, "split": "train"}, loss=task.loss.spec)
    return path, task.model


def dense(model, mean_loss):
    """The float64 Hessian of ``mean_loss(model, params)`` with respect to the flat vector
    of the model's parameters (reverse-over-reverse, row by row: not vmap, which is wrong
    through attention in torch 2.14)."""
    import copy

    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = copy.deepcopy(model).double().eval()
    names = [n for n, p in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(flat):
        state = {n: c.view(s) for n, c, s in zip(names, torch.split(flat, sizes), shapes,
                                                  strict=True)}
        return mean_loss(lambda *a, **k: torch.func.functional_call(model, state, a, k))

    with sdpa_kernel([SDPBackend.MATH]):
        return torch.autograd.functional.hessian(f, flat0)


def named(path):
    """The checkpoint's own model, data and loss specs as options: a factory spec recorded
    in a file runs only when the user names it (tests/test_trust.py)."""
    payload = torch.load(path, weights_only=True)
    return ["--model", payload["model"]["spec"], "--data", payload["data"]["spec"],
            "--loss", payload["loss"]]


def spectrum_json(path, store, *extra):
    code, out, err = run(["spectrum", path, "--dtype", "float64", "--tol", 1e-10, "--top-k", 3,
                          "--lambda-min", "--batch-size", 8, "--json", "--store", store,
                          *named(path), *extra])
    assert code == 0, err
    return json.loads(out)


def assert_spectrum(data, H):
    truth = torch.linalg.eigvalsh(H).numpy()
    np.testing.assert_allclose(data["eigenvalues"], truth[::-1][:3], rtol=1e-6)
    assert data["lambda_min"] == pytest.approx(truth[0], rel=1e-6)
    assert data["dim"] == H.shape[0]


def test_tanh_mlp_on_tabular_data_with_mse(factories, tmp_path):
    path, model = checkpoint(tmp_path, factories, "tanh_mlp", "tabular", "mse")
    data = spectrum_json(path, tmp_path / "s.h5")
    x, y = load_factory(f"{factories}:tabular")().tensors
    H = dense(model, lambda m: ((m(x.double()) - y.double()) ** 2).mean())
    assert_spectrum(data, H)
    assert data["loss"] == "mse" and data["samples"] == 40


def test_gru_on_sequences(factories, tmp_path):
    path, model = checkpoint(tmp_path, factories, "gru", "sequences", None)
    data = spectrum_json(path, tmp_path / "s.h5")
    x, y = load_factory(f"{factories}:sequences")().tensors
    H = dense(model, lambda m: nn.functional.cross_entropy(m(x.double()), y))
    assert_spectrum(data, H)


def test_transformer_with_token_ids_and_padding_mask_in_a_dict(factories, tmp_path):
    path, model = checkpoint(tmp_path, factories, "token_transformer", "tokens", None)
    data = spectrum_json(path, tmp_path / "s.h5")
    ds = load_factory(f"{factories}:tokens")()
    inputs, y = ds.collate_fn([ds[i] for i in range(len(ds))])  # one batch: all samples
    H = dense(model, lambda m: nn.functional.cross_entropy(m(**inputs), y))
    assert_spectrum(data, H)
    assert data["samples"] == 24


def test_per_token_lm_loss_over_batches_of_different_token_counts(factories, tmp_path):
    path, model = checkpoint(tmp_path, factories, "tiny_lm", "lm_batches", None)
    data = spectrum_json(path, tmp_path / "s.h5")
    batches = load_factory(f"{factories}:lm_batches")()

    def mean_over_tokens(m):
        total = sum(nn.functional.cross_entropy(m(ids).reshape(-1, 9), t.reshape(-1),
                                                ignore_index=-100, reduction="sum")
                    for ids, t in batches)
        return total / sum(int((t != -100).sum()) for _, t in batches)

    H = dense(model, mean_over_tokens)
    assert_spectrum(data, H)
    # weighting batches by samples instead of tokens would give another matrix
    by_samples = dense(model, lambda m: sum(
        nn.functional.cross_entropy(m(ids).reshape(-1, 9), t.reshape(-1), ignore_index=-100)
        * len(t) for ids, t in batches) / sum(len(t) for _, t in batches))
    assert not np.allclose(torch.linalg.eigvalsh(by_samples).numpy()[-1],
                           data["eigenvalues"][0], rtol=1e-4)


def test_gcn_on_a_batch_of_graphs_of_different_sizes(factories, tmp_path):
    path, model = checkpoint(tmp_path, factories, "gcn", "graphs", None)
    data = spectrum_json(path, tmp_path / "s.h5", "--batch-size", 4)  # 3 batches: 4, 4, 2
    ds, collate = load_factory(f"{factories}:graphs")()
    batches = [collate([ds[i] for i in range(b, min(b + 4, len(ds)))]) for b in (0, 4, 8)]
    batches = [({k: v.double() if v.is_floating_point() else v for k, v in g.items()}, y)
               for g, y in batches]
    H = dense(model, lambda m: sum(nn.functional.cross_entropy(m(**g), y, reduction="sum")
                                   for g, y in batches) / len(ds))
    assert_spectrum(data, H)


def test_per_layer_blocks_and_their_traces(factories, tmp_path):
    path, model = checkpoint(tmp_path, factories, "tanh_mlp", "tabular", "mse")
    store = tmp_path / "s.h5"
    data = spectrum_json(path, store, "--per-layer", "--trace-hvps", 300)
    x, y = load_factory(f"{factories}:tabular")().tensors
    H = dense(model, lambda m: ((m(x.double()) - y.double()) ** 2).mean())
    layers = data["layers"]
    assert [layer["layer"] for layer in layers] == ["0", "2"]
    start = 0
    for layer in layers:
        block = H[start:start + layer["dim"], start:start + layer["dim"]]
        start += layer["dim"]
        top = float(torch.linalg.eigvalsh(block)[-1])
        assert layer["lambda_max"] == pytest.approx(top, rel=1e-6)
        assert layer["lambda_max_converged"]
        assert abs(layer["trace"] - float(block.trace())) <= 3 * layer["trace_stderr"] + 1e-8
    total = sum(layer["trace"] for layer in layers)
    se = sum(layer["trace_stderr"] ** 2 for layer in layers) ** 0.5
    assert abs(total - data["trace"]) <= 3 * (se ** 2 + data["trace_stderr"] ** 2) ** 0.5 + 1e-8
    assert abs(data["trace"] - float(H.trace())) <= 3 * data["trace_stderr"] + 1e-8
    # the table is stored, shown and exported
    code, out, err = run(["show", store, data["analysis_id"], "--json"])
    assert code == 0, err
    shown = json.loads(out)
    assert [row["lambda_max"] for row in shown["layers"]] == [la["lambda_max"] for la in layers]
    code, out, err = run(["export", store, "--out", tmp_path / "tables"])
    assert code == 0, err
    assert (tmp_path / "tables" / "layers.csv").read_text().count("\n") == 3


def test_params_pattern_restricts_the_hessian(factories, tmp_path):
    path, model = checkpoint(tmp_path, factories, "tanh_mlp", "tabular", "mse")
    data = spectrum_json(path, tmp_path / "s.h5", "--params", "2.*")
    x, y = load_factory(f"{factories}:tabular")().tensors
    H = dense(model, lambda m: ((m(x.double()) - y.double()) ** 2).mean())
    block = H[-7:, -7:]  # layer 2: weight (1, 6) and bias (1,)
    assert data["dim"] == 7
    assert data["eigenvalues"][0] == pytest.approx(float(torch.linalg.eigvalsh(block)[-1]),
                                                   rel=1e-6)


BAD_TASKS = {
    "loss returns a non-scalar": (
        lambda f, p: ["--loss", f"{f}:per_sample_loss"], "not a scalar"),
    "regression target with cross-entropy": (
        lambda f, p: ["--loss", "cross-entropy"], "needs integer class targets"),
    "factory returning neither a dataset nor batches": (
        lambda f, p: ["--data", f"{f}:not_data"], "neither a map-style"),
    "params pattern matching nothing": (
        lambda f, p: ["--params", "encoder.*"], "available: 0.weight, 0.bias"),
    "model output that does not fit the loss": (
        lambda f, p: ["--data", f"{f}:sequences"], "cannot take the inputs"),
    "unknown loss": (lambda f, p: ["--loss", "hinge"], "unknown loss 'hinge'"),
}


@pytest.mark.parametrize("case", sorted(BAD_TASKS))
def test_bad_tasks_exit_2_in_one_line_and_leave_the_store_alone(case, factories, tmp_path):
    path, _ = checkpoint(tmp_path, factories, "tanh_mlp", "tabular", "mse")
    store = tmp_path / "s.h5"
    assert run(["spectrum", path, "--top-k", 1, "--store", store, *named(path)])[0] == 0
    before = store.read_bytes()
    extra, message = BAD_TASKS[case]
    code, out, err = run(["spectrum", path, "--store", store, *named(path),
                          *extra(factories, path)])
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and message in lines[0], (case, err)
    assert store.read_bytes() == before


def test_model_output_not_fitting_the_targets_is_named(factories, tmp_path):
    from hessdiag.data import load_dataset
    from hessdiag.task import new_task

    info = load_dataset(f"{factories}:tabular")
    with pytest.raises(ValueError, match=r"outputs \(4, 3\) do not fit loss mse with targets "
                                         r"\(4, 1\)"):
        new_task(f"{factories}:tanh_mlp", info, loss="mse", model_kwargs={"num_outputs": 3})


def test_samples_of_inconsistent_structure_exit_2(tmp_path):
    path = tmp_path / "mixed.py"
    path.write_text(textwrap.dedent('''
        import torch
        from torch.utils.data import Dataset

        class Mixed(Dataset):
            def __len__(self):
                return 4

            def __getitem__(self, i):
                return (torch.zeros(3) if i < 3 else {"x": torch.zeros(3)}), 0

        def mixed():
            return Mixed()
    '''))
    ck = tmp_path / "m.pt"
    save_checkpoint(ck, nn.Linear(3, 2), model_spec="mlp", model_kwargs={"in_shape": [3]})
    code, out, err = run(["spectrum", ck, "--data", f"{path}:mixed", "--store",
                          tmp_path / "s.h5"])
    assert code == 2 and "inconsistent structure: sample 3" in err
    assert not (tmp_path / "s.h5").exists()
    sys.modules.pop("mixed", None)


def test_samples_and_loss_terms_named_apart_in_spectrum_and_baseline(tmp_path):
    """A per-token language-model loss averages over tokens, not over the sequences:
    ``spectrum`` and ``baseline`` print the same sample count (sequences) and, apart, the
    loss's term count (tokens, padding left out)."""
    from hessdiag.data import load_dataset
    from hessdiag.task import new_task

    data = load_dataset("text", samples=9)
    torch.manual_seed(0)
    task = new_task("tiny-lm", data, model_kwargs={"d_model": 8, "heads": 2, "layers": 1})
    path = tmp_path / "lm.pt"
    save_checkpoint(path, task.model, model_spec="tiny-lm", model_kwargs=task.model_kwargs,
                    data={"spec": "text", "split": "train"}, loss=task.loss.spec)
    tokens = sum(int((y != -100).sum()) for _, y in (data.dataset[i] for i in range(9)))
    common = ["--samples", 9, "--batch-size", 4, "--top-k", 1, "--quiet"]
    code, out, err = run(["spectrum", path, *common, "--store", tmp_path / "s.h5"])
    assert code == 0, err
    assert f"9 samples, {tokens} loss terms" in " ".join(out.split()), out  # caption wraps
    code, out, err = run(["baseline", path, *common, "--metric", "lambda_max",
                          "-o", tmp_path / "b.json"])
    assert code == 0, err
    assert f"9 samples, {tokens} loss terms" in " ".join(out.split()), out  # caption wraps
    recorded = json.loads((tmp_path / "b.json").read_text())["task"]
    assert recorded["samples"] == 9 and recorded["loss_terms"] == tokens
    code, out, err = run(["spectrum", path, *common, "--json", "--store", tmp_path / "s.h5"])
    assert code == 0, err
    result = json.loads(out)
    assert result["samples"] == 9 and result["loss_terms"] == tokens > 9


def test_a_result_stored_before_loss_terms_reads_its_terms_from_samples():
    from hessdiag.results import SpectrumResult

    old = SpectrumResult(top=None, bottom=None, trace=None, density=None,
                         operator={"samples": 204}, hvps=0, seconds=0.0, seed=0)
    assert old.loss_terms == 204 and old.samples is None
