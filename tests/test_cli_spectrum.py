"""`hessdiag spectrum`, `show` and `export` end to end, against a dense Hessian, and every
kind of bad input: exit code 2, one line on stderr, the store unchanged."""

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import dense_hessian, read_only_path, trained_digits_mlp
from conftest import run_cli as run
from torch import nn

from hessdiag.data import load_digits

KW = {"num_classes": 10, "in_shape": [1, 8, 8], "hidden": 4}
SAMPLES = 96


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    # a few steps, so the Hessian is not that of a random network
    return trained_digits_mlp(tmp_path_factory.mktemp("ckpt"), KW, steps=50, samples=256)


def test_spectrum_json_matches_dense_hessian_in_float64(small_checkpoint, tmp_path):
    path, model = small_checkpoint
    store = tmp_path / "s.h5"
    code, out, err = run(["spectrum", path, "--samples", SAMPLES, "--batch-size", 40,
                          "--top-k", 3, "--lambda-min", "--trace", "--trace-hvps", 300,
                          "--dtype", "float64", "--tol", 1e-9, "--json", "--store", store])
    assert code == 0, err
    data = json.loads(out)
    x, y = load_digits("train").tensors
    x, y = x[:SAMPLES], y[:SAMPLES]
    batches = [(x[i:i + 40], y[i:i + 40]) for i in range(0, SAMPLES, 40)]
    H = dense_hessian(model, nn.CrossEntropyLoss(), batches)
    truth = torch.linalg.eigvalsh(H).numpy()
    np.testing.assert_allclose(data["eigenvalues"], truth[::-1][:3], rtol=1e-6)
    assert data["lambda_min"] == pytest.approx(truth[0], rel=1e-6)
    assert data["lambda_ratio"] == pytest.approx(truth[-1] / abs(truth[0]), rel=1e-6)
    assert abs(data["trace"] - float(truth.sum())) <= 3 * data["trace_stderr"]
    assert all(data["converged"]) and data["samples"] == SAMPLES and data["dim"] == 330
    assert data["step"] == 50 and data["checkpoint"] == str(path)
    # the store holds the same numbers with what produced them
    code, out, err = run(["show", store, data["analysis_id"], "--json"])
    assert code == 0, err
    shown = json.loads(out)
    assert [e["eigenvalue"] for e in shown["eigenvalues"]] == data["eigenvalues"]
    attrs = shown["attrs"]
    assert attrs["checkpoint_sha256"] and attrs["seed"] == 0 and attrs["samples"] == SAMPLES
    assert attrs["settings"]["tol"] == 1e-9 and attrs["data"]["spec"] == "digits"


def test_several_checkpoints_density_plot_show_and_export(small_checkpoint, tmp_path):
    path, _ = small_checkpoint
    store = tmp_path / "s.h5"
    code, out, err = run(["spectrum", path, path, "--samples", 64, "--density",
                          "--slq-steps", 20, "--slq-probes", 2, "--json", "--store", store,
                          "--plot", tmp_path / "d.png"])
    assert code == 0, err
    lines = [json.loads(line) for line in out.strip().splitlines()]
    assert len(lines) == 2 and lines[0]["analysis_id"] != lines[1]["analysis_id"]
    assert lines[0]["eigenvalues"] == lines[1]["eigenvalues"]  # same seed, same numbers
    assert (tmp_path / "d-1.png").exists() and (tmp_path / "d-2.png").exists()
    code, out, err = run(["show", store])
    assert code == 0 and "2 spectrum analyses" in out and "density" in out
    code, out, err = run(["export", store, "--format", "csv"])
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["analysis_id"] for r in rows] == [line["analysis_id"] for line in lines]
    assert float(rows[0]["lambda_max"]) == pytest.approx(lines[0]["eigenvalues"][0])
    code, out, err = run(["export", store, "--format", "csv", "--out", tmp_path / "tables"])
    assert code == 0
    slq_rows = list(csv.DictReader(open(tmp_path / "tables" / "slq_nodes.csv")))
    assert len(slq_rows) > 0 and {r["probe"] for r in slq_rows} == {"0", "1"}
    code, out, err = run(["export", store, "--format", "json"])
    tables = json.loads(out)
    assert len(tables["eigenvalues"]) == 10


def test_models_and_datasets_list_the_registries():
    code, out, _ = run(["models", "--json"])
    names = {m["name"] for m in json.loads(out)}
    assert {"mlp", "cnn6", "resnet18", "resnet50", "wrn28-10", "vit_b_16"} <= names
    code, out, _ = run(["datasets", "--json"])
    names = {d["name"] for d in json.loads(out)}
    assert {"digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "svhn"} <= names


def _hostile(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "hostile.pt"

    class Hostile:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"state_dict": {}, "x": Hostile()}, path)
    return path, marker


BAD = {
    "missing file": (lambda p, t: ["spectrum", t / "nope.pt"], "does not exist"),
    "corrupted checkpoint": (lambda p, t: ["spectrum", _truncated(p, t)],
                             "not a readable PyTorch file"),
    "mismatched architecture": (lambda p, t: ["spectrum", p, "--model", "cnn6"],
                                "does not match model cnn6"),
    "unknown model": (lambda p, t: ["spectrum", p, "--model", "resnet9000"],
                      "unknown model 'resnet9000'"),
    "unknown data": (lambda p, t: ["spectrum", p, "--data", "imagenet21k"], "imagenet21k"),
    "data root without files": (lambda p, t: ["spectrum", p, "--data", "cifar10",
                                              "--data-root", _empty(t)], "--download"),
    "zero samples": (lambda p, t: ["spectrum", p, "--samples", 0], "--samples"),
    "bad method": (lambda p, t: ["spectrum", p, "--method", "magic"], "--method"),
}


def _truncated(path, tmp):
    out = tmp / "truncated.pt"
    out.write_bytes(Path(path).read_bytes()[:3000])
    return out


def _empty(tmp):
    d = tmp / "empty-root"
    d.mkdir(exist_ok=True)
    return d


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_exits_2_with_one_line_and_leaves_the_store_unchanged(
        case, small_checkpoint, tmp_path):
    path, _ = small_checkpoint
    store = tmp_path / "s.h5"
    assert run(["spectrum", path, "--samples", 32, "--top-k", 1, "--store", store])[0] == 0
    before = store.read_bytes()
    make_args, message = BAD[case]
    code, out, err = run(make_args(path, tmp_path) + ["--store", store])
    assert code == 2, (case, out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, (case, err)
    assert store.read_bytes() == before


def test_hostile_pickle_is_refused_and_runs_nothing(tmp_path):
    path, marker = _hostile(tmp_path)
    store = tmp_path / "s.h5"
    code, out, err = run(["spectrum", path, "--model", "mlp", "--data", "digits",
                          "--store", store])
    assert code == 2 and "--unsafe-load" in err
    assert not marker.exists() and not store.exists()


def test_store_in_read_only_place_is_refused_before_computing(small_checkpoint, tmp_path):
    path, _ = small_checkpoint
    store = read_only_path(tmp_path, "s.h5")
    code, out, err = run(["spectrum", path, "--store", store])
    assert code == 2 and "not writable" in err and not store.exists()


def test_non_store_file_is_not_overwritten(small_checkpoint, tmp_path):
    path, _ = small_checkpoint
    store = tmp_path / "notes.txt"
    store.write_text("my notes")
    code, out, err = run(["spectrum", path, "--samples", 32, "--store", store])
    assert code == 2 and "not an HDF5 file" in err and store.read_text() == "my notes"
