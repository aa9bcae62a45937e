"""Store records: every result kind comes back from the store equal to what was written,
and `show` / `export` display every quantity a record holds; the command line's defaults
are the library's; library errors name library parameters and the command line names its
options; a bug is not reported as bad input."""

from __future__ import annotations

import dataclasses
import inspect
import json

import numpy as np
import pytest
import torch
from conftest import run_cli as run
from hessdiag.cli.app import translate
from torch import nn

from hessdiag._errors import InputError
from hessdiag.data import load_dataset
from hessdiag.records import (
    SUMMARY_COLUMNS,
    flat_tables,
    read_alignment,
    read_spectrum,
    summary,
    write_alignment,
    write_spectrum,
)
from hessdiag.settings import AlignSettings, DataSettings, SpectrumSettings, TrainConfig
from hessdiag.spectrum import compute_spectrum
from hessdiag.store import Store
from hessdiag.task import new_task


@pytest.fixture(scope="module")
def task():
    torch.manual_seed(0)
    return new_task("mlp", load_dataset("digits", samples=64), model_kwargs={"hidden": 6})


def _full_spectrum(task):
    settings = SpectrumSettings(top_k=2, lambda_min=True, trace=True, density=True,
                                slq_probes=2, slq_steps=8, per_layer=True, trace_hvps=12,
                                dtype="float64")
    return compute_spectrum(task.model, task.loss, task.batches(32), settings)


def test_spectrum_round_trip_holds_every_field(task, tmp_path):
    from hessdiag.records import provenance

    result = _full_spectrum(task)
    store = Store(tmp_path / "s.h5")
    origin = provenance(task)
    analysis = write_spectrum(store, result, origin)
    back = read_spectrum(store.analysis(analysis))
    assert back.to_dict() == result.to_dict()
    for part in ("top", "bottom", "trace", "density"):
        assert getattr(back, part).to_dict() == getattr(result, part).to_dict(), part
    np.testing.assert_array_equal(back.trace.samples, result.trace.samples)
    assert [la.to_dict() for la in back.layers] == [la.to_dict() for la in result.layers]
    assert [la.top.to_dict() for la in back.layers] == [la.top.to_dict() for la in result.layers]
    attrs = store.analysis(analysis).attrs
    assert attrs["loss"] == "cross-entropy" and attrs["model_kwargs"]["hidden"] == 6
    assert attrs["data"]["facts"]["in_shape"] == [1, 8, 8] and attrs["versions"]["torch"]


def test_alignment_round_trip_and_alignment_in_show_and_export(task, tmp_path):
    from hessdiag.align import measure_alignment
    from hessdiag.data import random_minibatches
    from hessdiag.records import provenance

    result = measure_alignment(task.model, task.loss, task.batches(32),
                               random_minibatches(task.data, 5, 16, seed=0), top_k=2)
    store = Store(tmp_path / "a.h5")
    analysis = write_alignment(store, result, provenance(task))
    back = read_alignment(store.analysis(analysis))
    assert back.to_dict() == result.to_dict()
    row = summary(store.analysis(analysis))
    assert row["alignment"] == result.alignment
    assert (row["alignment_ci95_low"], row["alignment_ci95_high"]) == result.ci95
    code, out, err = run(["show", tmp_path / "a.h5"])
    assert code == 0, err
    assert f"{result.alignment:.4g}" in out and f"{result.ci95[0]:.4g}" in out
    code, out, err = run(["export", tmp_path / "a.h5"])
    assert code == 0, err
    header, line = out.splitlines()[:2]
    values = dict(zip(header.split(","), line.split(","), strict=True))
    assert float(values["alignment"]) == pytest.approx(result.alignment)
    assert float(values["alignment_ci95_high"]) == pytest.approx(result.ci95[1])
    tables = flat_tables(store)
    assert len(tables["alignment_cosines"]) == 5


def test_summary_rows_share_one_set_of_columns(task, tmp_path):
    store = Store(tmp_path / "s.h5")
    write_spectrum(store, _full_spectrum(task), {"samples": 64})
    rows = flat_tables(store)["analyses"]
    assert list(rows[0]) == list(SUMMARY_COLUMNS)


def _cli_defaults(command):
    """``{parameter: default}`` of a command's options."""
    return {name: param.default.default
            for name, param in inspect.signature(command).parameters.items()
            if hasattr(param.default, "default")}


@pytest.mark.parametrize("command, settings, renames", [
    ("spectrum", SpectrumSettings(), {}),
    ("spectrum", DataSettings(), {"spec": "data", "root": "data_root"}),
    ("align", AlignSettings(), {"rule": "perturbation"}),
    ("train", TrainConfig(model="m", data="d"), {}),
])
def test_every_cli_default_equals_the_library_default(command, settings, renames):
    from hessdiag.cli import app as cli

    defaults = _cli_defaults(getattr(cli, command).__wrapped__)
    checked = 0
    for f in dataclasses.fields(settings):
        option = renames.get(f.name, f.name)
        if option not in defaults or f.name in ("model", "data", "model_kwargs"):
            continue
        value = getattr(settings, f.name)
        cli_value = defaults[option]
        cli_value = str(cli_value) if cli_value is not None and isinstance(value, str) \
            else cli_value
        assert cli_value == value, (command, f.name)
        checked += 1
    assert checked >= 5


def test_library_errors_name_parameters_and_the_cli_names_options():
    message = translate(InputError("samples must be positive; got 0", param="samples"))
    assert message == "--samples must be positive; got 0"
    message = translate(InputError("needs root (a folder), or download=True to fetch it",
                                   param=("root", "download")))
    assert message == "needs --data-root (a folder), or --download to fetch it"
    message = translate(InputError("give a baseline or a limit (max_lambda or max_trace)",
                                   param=("baseline", "max_lambda", "max_trace")))
    assert message == "give a baseline or a limit (--max-lambda or --max-trace)"
    with pytest.raises(InputError) as caught:
        DataSettings(batch_size=0)
    assert str(caught.value).startswith("batch_size must be") and caught.value.param == \
        "batch_size"


def test_a_bug_is_an_internal_error_not_bad_input(monkeypatch, tmp_path):
    import hessdiag.records

    def broken(store):
        raise KeyError("surprise")

    monkeypatch.setattr(hessdiag.records, "flat_tables", broken)
    store = Store(tmp_path / "s.h5")
    store.create_run("r", {})
    code, out, err = run(["export", tmp_path / "s.h5"])
    assert code == 3 and "internal error: KeyError" in err and "--debug" in err
    assert len([line for line in err.splitlines() if line.strip()]) == 1


def test_an_old_record_without_solver_metadata_still_reads(task, tmp_path):
    result = _full_spectrum(task)
    store = Store(tmp_path / "s.h5")
    analysis = write_spectrum(store, result, {"samples": 64})
    import h5py

    with h5py.File(tmp_path / "s.h5", "r+") as f:  # as schema-1 stores wrote it
        del f["analyses"][analysis].attrs["solvers"]
        del f["analyses"][analysis].attrs["checksum_attrs"]  # nor checksums
    back = read_spectrum(store.analysis(analysis))
    np.testing.assert_array_equal(back.top.eigenvalues, result.top.eigenvalues)
    assert back.trace.estimate == result.trace.estimate and back.layers == ()
    json.dumps(summary(store.analysis(analysis)))


def test_layer_of_a_model_without_parameters_in_the_root(task):
    from hessdiag.spectrum import parameterised_modules

    model = nn.Sequential(nn.Linear(2, 3), nn.Sequential(nn.Tanh(), nn.Linear(3, 1)))
    names = [n for n, _ in model.named_parameters()]
    assert parameterised_modules(model, names) == [("0", ["0.weight", "0.bias"]),
                                                   ("1.1", ["1.1.weight", "1.1.bias"])]
    assert parameterised_modules(model, ["1.1.bias"]) == [("1.1", ["1.1.bias"])]
