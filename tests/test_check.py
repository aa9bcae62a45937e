"""`hessdiag baseline` and `hessdiag check`: a checkpoint passes against its own baseline,
a sharper one fails with the table (exit 1), a baseline of another task is refused
(exit 2), JUnit XML lists each metric with its verdict, the pytest helper fails with the
same table, bad input is one line with exit 2, and so is an eigenvalue that does not
converge within the product budget (never a pass, never a baseline)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from conftest import run_cli as run

from hessdiag.checkpoints import load_checkpoint, save_checkpoint

DEMO = Path(__file__).resolve().parent.parent / "checkpoints" / "digits-mlp.pt"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("check")
    baseline = tmp / "baseline.json"
    # lambda_min of this network is -0.0039, about 1% of its spread from zero: tol 1e-2
    # and 400 products let it converge (tol 1e-3 needs more than 400)
    code, out, err = run(["baseline", DEMO, "-o", baseline, "--samples", 512, "--metric",
                          "lambda_max", "--metric", "trace", "--metric", "lambda_ratio",
                          "--tol", 0.01, "--max-hvps", 400, "--quiet"])
    assert code == 0, err
    # a sharper network of the same architecture: the first layer's weights scaled down
    # (less confident outputs: lambda_max 0.62 -> 1.70 on these 512 samples)
    return tmp, baseline, scaled(tmp / "sharper.pt", 0.7)


def scaled(path: Path, factor: float) -> Path:
    """The shipped network with its first layer's weights times ``factor``, saved at path."""
    loaded = load_checkpoint(DEMO)
    with torch.no_grad():
        loaded.model.net[1].weight.mul_(factor)
    save_checkpoint(path, loaded.model, model_spec=loaded.info.model_spec,
                    model_kwargs=loaded.info.model_kwargs, data=loaded.info.data)
    return path


def test_a_checkpoint_against_its_own_baseline_passes(files):
    tmp, baseline, _ = files
    saved = json.loads(baseline.read_text())
    assert saved["task"] == {"model": "mlp", "data": "digits", "split": "train",
                             "loss": "cross-entropy", "samples": 512, "loss_terms": 512}
    assert saved["settings"]["seed"] == 0 and saved["versions"]["torch"]
    for seed in (None, 3):
        args = ["check", DEMO, "--baseline", baseline, "--json", "--quiet"]
        code, out, err = run(args + ([] if seed is None else ["--seed", seed]))
        assert code == 0, err
        report = json.loads(out)
        assert report["passed"] and [m["metric"] for m in report["metrics"]] == \
            ["lambda_max", "trace", "lambda_ratio"]


def test_a_sharper_checkpoint_fails_with_the_table_and_junit(files):
    tmp, baseline, sharper = files
    junit = tmp / "junit.xml"
    code, out, err = run(["check", sharper, "--baseline", baseline, "--junit", junit,
                          "--quiet"], env={"GITHUB_ACTIONS": "true"})
    assert code == 1, err
    assert "SHARPER" in out and "lambda_max" in out and "limit" in out
    assert "::error title=hessdiag check::" in out
    suite = ET.parse(junit).getroot().find("testsuite")
    cases = {c.get("name"): c for c in suite.findall("testcase")}
    assert set(cases) == {"lambda_max", "trace", "lambda_ratio"}
    assert cases["lambda_max"].find("failure") is not None
    assert "baseline" in cases["lambda_max"].find("failure").text  # the table
    assert int(suite.get("failures")) == sum(c.find("failure") is not None
                                             for c in cases.values())
    # the same checkpoint passes a generous absolute limit and fails a tight one
    assert run(["check", sharper, "--max-lambda", 1e6, "--quiet"])[0] == 0
    assert run(["check", sharper, "--max-lambda", 1e-3, "--quiet"])[0] == 1


def test_the_pytest_helper_fails_with_the_same_table(files):
    from hessdiag.testing import assert_not_sharper

    tmp, baseline, sharper = files
    assert assert_not_sharper(DEMO, baseline).passed
    with pytest.raises(AssertionError, match=r"sharper than allowed:\nmetric +baseline"):
        assert_not_sharper(sharper, baseline)


def test_a_baseline_of_another_task_or_sample_count_is_refused(files, tmp_path):
    tmp, baseline, _ = files
    other = tmp_path / "other.pt"
    from hessdiag.models import build_model

    save_checkpoint(other, build_model("cnn6", in_shape=(1, 8, 8), width=2, hidden=4),
                    model_spec="cnn6", model_kwargs={"in_shape": [1, 8, 8], "width": 2,
                                                     "hidden": 4},
                    data={"spec": "digits", "split": "train"})
    code, out, err = run(["check", other, "--baseline", baseline, "--quiet"])
    assert code == 2 and "model 'mlp'" in err and "'cnn6'" in err
    edited = json.loads(baseline.read_text())
    edited["task"]["samples"] = 100
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps(edited))
    code, out, err = run(["check", DEMO, "--baseline", changed, "--quiet"])
    assert code == 2 and "samples 100" in err


def test_a_store_analysis_is_a_baseline(tmp_path):
    store = tmp_path / "s.h5"
    code, out, err = run(["spectrum", DEMO, "--samples", 256, "--top-k", 2, "--trace",
                          "--store", store, "--json", "--quiet"])
    assert code == 0, err
    analysis = json.loads(out)["analysis_id"]
    code, out, err = run(["check", DEMO, "--baseline", f"{store}:{analysis}", "--json",
                          "--quiet"])
    assert code == 0, err
    assert json.loads(out)["passed"]


BAD = {
    "missing baseline": (["--baseline", "nowhere.json"], "does not exist"),
    "corrupt baseline": (["--baseline", "corrupt.json"], "not valid JSON"),
    "newer schema": (["--baseline", "newer.json"], "schema version 99"),
    "unknown metric": (["--baseline", "baseline.json", "--metric", "sharpness"],
                       "unknown metric 'sharpness' given as --metric; known: lambda_max, "),
    "unknown metric, absolute limit": (["--max-lambda", "1", "--metric", "bogus"],
                                       "unknown metric 'bogus' given as --metric"),
    "limit not positive": (["--max-lambda", "0"], "--max-lambda must be positive"),
    "budget too small": (["--baseline", "baseline.json", "--max-hvps", "1"],
                         "--max-hvps must be at least 2"),
    "nothing to check": ([], "nothing to check against"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_and_exit_2(case, files, tmp_path, monkeypatch):
    tmp, baseline, _ = files
    monkeypatch.chdir(tmp_path)
    Path("corrupt.json").write_text("{not json")
    newer = json.loads(baseline.read_text())
    newer["schema_version"] = 99
    Path("newer.json").write_text(json.dumps(newer))
    Path("baseline.json").write_text(baseline.read_text())
    args, message = BAD[case]
    code, out, err = run(["check", DEMO, *args, "--quiet"])
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and message in lines[0], (case, err)


def test_any_task_is_checked_regression_included(tmp_path):
    from hessdiag.data import load_dataset
    from hessdiag.task import new_task

    torch.manual_seed(0)
    task = new_task("mlp", load_dataset("tabular", samples=64), model_kwargs={"hidden": 4})
    path = tmp_path / "reg.pt"
    save_checkpoint(path, task.model, model_spec=task.model_spec, model_kwargs=task.model_kwargs,
                    data={"spec": "tabular", "split": "train"}, loss=task.loss.spec)
    baseline = tmp_path / "b.json"
    code, out, err = run(["baseline", path, "-o", baseline, "--samples", 64, "--metric",
                          "lambda_max", "--metric", "lambda_min", "--quiet"])
    assert code == 0, err
    assert json.loads(baseline.read_text())["task"]["loss"] == "mse"
    code, out, err = run(["check", path, "--baseline", baseline, "--quiet"])
    assert code == 0, err


def test_alignment_is_a_metric_that_fails_when_it_drops(files, tmp_path):
    from hessdiag.check import compare, make_baseline
    from hessdiag.settings import AlignSettings, DataSettings

    made = make_baseline(str(DEMO), metrics=("alignment",), data=DataSettings(samples=256),
                         align=AlignSettings(batches=4, batch_size=32, samples=128))
    entry = made.metrics["alignment"]
    assert 0 <= entry["value"] <= 1 and entry["stderr"] > 0 and entry["rule"] == "sam"
    path = tmp_path / "b.json"
    from hessdiag.check import write_baseline

    write_baseline(made, path)
    code, out, err = run(["check", DEMO, "--baseline", path, "--json", "--quiet"])
    assert code == 0, err
    assert json.loads(out)["metrics"][0]["metric"] == "alignment"
    lower = {"alignment": {**entry, "value": entry["value"] * 0.5}}
    higher = {"alignment": {**entry, "value": min(1.0, entry["value"] * 2 + 0.5)}}
    assert compare(made.metrics, lower, rtol=0.1)[0].passed is False
    assert compare(made.metrics, higher, rtol=0.1)[0].passed is True


def test_the_baseline_records_its_product_budget_and_the_check_reuses_it(files, tmp_path):
    tmp, baseline, _ = files
    assert json.loads(baseline.read_text())["settings"]["max_hvps"] == 400
    code, out, err = run(["check", DEMO, "--baseline", baseline, "--metric", "lambda_max",
                          "--max-hvps", 500, "--json", "--quiet"])
    assert code == 0, err
    assert json.loads(out)["settings"]["spectrum"]["max_hvps"] == 500  # overridden
    small = tmp_path / "small.json"
    code, out, err = run(["baseline", DEMO, "-o", small, "--samples", 64, "--metric",
                          "lambda_max", "--quiet"])
    assert code == 0, err
    assert json.loads(small.read_text())["settings"]["max_hvps"] == 200  # the default
    code, out, err = run(["check", DEMO, "--baseline", small, "--json", "--quiet"])
    assert code == 0, err
    assert json.loads(out)["settings"]["spectrum"]["max_hvps"] == 200


def test_an_eigenvalue_beyond_its_budget_is_one_line_and_exit_2_never_a_pass(files, tmp_path):
    tmp, baseline, _ = files
    # the check: the baseline converged, this measurement gets 2 products
    code, out, err = run(["check", DEMO, "--baseline", baseline, "--max-hvps", 2, "--quiet"])
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert "lambda_max did not converge to tol 0.01 within 2 Hessian-vector products" \
        in lines[0]
    assert "raise --max-hvps above 2" in lines[0] and "nothing was compared" in lines[0]
    assert "pass" not in out
    # the baseline: nothing is written
    target = tmp_path / "b.json"
    code, out, err = run(["baseline", DEMO, "-o", target, "--samples", 64, "--metric",
                          "lambda_min", "--max-hvps", 3, "--quiet"])
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: lambda_max did not converge")  # the first solve
    assert "--max-hvps" in lines[0] and "--tol" in lines[0] and "no baseline" in lines[0]
    assert not target.exists()


def test_an_unconverged_eigenvalue_is_reported_with_its_value_and_residual():
    from hessdiag.check import NotConverged, make_baseline
    from hessdiag.settings import DataSettings, SpectrumSettings

    # float32 cannot reach a relative residual of 1e-9: the solver stops at its own budget
    settings = SpectrumSettings(tol=1e-9, max_hvps=None)
    with pytest.raises(NotConverged, match=r"^lambda_max did not converge to tol 1e-09 "
                       r"within \d+ Hessian-vector products: [-+.\de]+ with residual "
                       r"[-+.\de]+ \([-+.\de]+ of it\); raise max_hvps .* or set tol "
                       r"looser than 1e-09 \(no baseline was written\)$") as caught:
        make_baseline(str(DEMO), metrics=("lambda_max",), settings=settings,
                      data=DataSettings(samples=64))
    assert caught.value.param == ("max_hvps", "tol")


def test_a_large_drop_warns_and_fails_with_max_drop(files, tmp_path):
    """Saturated logits (the first layer's weights x3) make the network look flat: the
    check says so, and fails on it with --max-drop."""
    _, baseline, _ = files
    flat = scaled(tmp_path / "saturated.pt", 3.0)
    args = ["check", flat, "--baseline", baseline, "--metric", "lambda_max", "--quiet"]
    code, out, err = run([*args, "--json"])
    report = json.loads(out)
    row = report["metrics"][0]
    fell = 1 - row["now"] / row["baseline"]
    assert code == 0 and report["verdict"] == "pass" and fell > 0.9, (err, row)
    assert report["warnings"] == [
        f"lambda_max fell {fell:.1%} below its baseline ({row['baseline']:.6g} -> "
        f"{row['now']:.6g}): a model whose outputs saturated or whose weights were damaged "
        "looks flat too; set max_drop to fail on such a drop"]
    code, out, err = run(args)
    assert code == 0 and "warning: lambda_max fell" in err and "set --max-drop" in err
    code, out, err = run([*args, "--max-drop", 0.5, "--json"])
    report = json.loads(out)
    assert code == 1 and report["verdict"] == "dropped"
    assert report["metrics"][0]["reason"] == (f"dropped {fell:.1%}, beyond max_drop 0.5 and "
                                              "noise")
    code, out, err = run([*args, "--max-drop", 1.5])
    assert code == 2 and "--max-drop must be a fraction in (0, 1); got 1.5" in err


def test_a_baseline_is_portable(tmp_path):
    """The checkpoint is recorded relative to the baseline file, with its sha256: a
    committed baseline reads the same in any clone."""
    import hashlib
    import shutil

    from hessdiag.check import read_baseline

    shipped = DEMO.parent / "digits-mlp.baseline.json"
    record = json.loads(shipped.read_text())["checkpoint"]
    assert record["path"] == "digits-mlp.pt"
    assert read_baseline(str(shipped)).checkpoint["path"] == str(DEMO)
    assert record["sha256"] == hashlib.sha256(DEMO.read_bytes()).hexdigest()

    clone = tmp_path / "a" / "models"
    clone.mkdir(parents=True)
    shutil.copy(DEMO, clone / "net.pt")
    code, out, err = run(["baseline", clone / "net.pt", "-o", tmp_path / "a" / "b.json",
                          "--metric", "lambda_max", "--samples", 128, "--quiet"])
    assert code == 0, err
    assert json.loads((tmp_path / "a" / "b.json").read_text())["checkpoint"]["path"] == \
        "models/net.pt"
    moved = tmp_path / "elsewhere"
    shutil.move(tmp_path / "a", moved)
    assert read_baseline(str(moved / "b.json")).checkpoint["path"] == \
        str(moved / "models" / "net.pt")
    code, out, err = run(["check", moved / "models" / "net.pt", "--baseline", moved / "b.json",
                          "--quiet"])
    assert code == 0, err
