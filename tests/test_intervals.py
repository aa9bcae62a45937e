"""Intervals that stay in their quantity's range and are never built on nothing: the
logit-scale interval of a bounded mean (range, coverage by simulation), minibatches of
distinct samples never drawn twice, `align` on a data set smaller than one minibatch,
check's alignment noise, and the report's alignment band inside [0, 1]."""

import json
import math
import re

import numpy as np
import pytest
import torch
from conftest import run_cli as run
from scipy import stats
from torch.utils.data import TensorDataset

from hessdiag._errors import InputError
from hessdiag.curvature.stats import bounded_mean_interval, mean_interval
from hessdiag.data import DataInfo, batch_fingerprint, draw_minibatches
from hessdiag.records import write_alignment
from hessdiag.results import AlignmentResult
from hessdiag.store import Store

CHECKPOINT = "checkpoints/digits-mlp.pt"


# --------------------------------------------------------------------------- the interval


def test_the_interval_stays_in_range_where_the_t_interval_crosses_zero():
    values = np.array([0.02, 0.05, 0.9])
    _, _, t_lo, t_hi = mean_interval(values)
    assert t_lo < 0  # the case the audit found: [-0.28, 0.88] on three batches
    mean, se, lo, hi = bounded_mean_interval(values)
    assert 0 < lo < mean < hi < 1
    assert se == pytest.approx(values.std(ddof=1) / math.sqrt(3))
    # on [-1, 1] it is Fisher's z of the mean
    signed = np.array([0.95, 0.99, 0.2])
    m, s, lo, hi = bounded_mean_interval(signed, -1.0, 1.0)
    assert mean_interval(signed)[3] > 1 and -1 < lo < m < hi < 1
    half = stats.t.ppf(0.975, 2) * s / (1 - m * m)
    assert math.atanh(lo) == pytest.approx(math.atanh(m) - half)
    assert math.atanh(hi) == pytest.approx(math.atanh(m) + half)


def test_no_interval_from_one_value_and_zero_width_from_equal_values():
    mean, se, lo, hi = bounded_mean_interval(np.array([0.3]))
    assert mean == 0.3 and math.isnan(se) and math.isnan(lo) and math.isnan(hi)
    assert bounded_mean_interval(np.full(4, 0.3))[2:] == (pytest.approx(0.3),
                                                          pytest.approx(0.3))


@pytest.mark.parametrize(("a", "b", "low", "high"), [(2, 5, 0, 1), (0.5, 5, 0, 1),
                                                     (20, 2, 0, 1), (2, 2, -1, 1)])
def test_coverage_by_simulation_on_beta_values(a, b, low, high):
    """2000 simulated sets of 20 values: coverage within a few % of 95%, never out of
    range (Beta(0.5, 5) is skewed: the t-interval covers 91% there)."""
    rng = np.random.default_rng(7)
    mu = low + (high - low) * a / (a + b)
    hits = 0
    for _ in range(2000):
        x = low + (high - low) * rng.beta(a, b, 20)
        _, _, lo, hi = bounded_mean_interval(x, low, high)
        assert low <= lo <= hi <= high
        hits += lo <= mu <= hi
    assert abs(hits / 2000 - 0.95) < 0.025, hits / 2000


# --------------------------------------------------------------------------- minibatches


def _info(n):
    x = torch.arange(n, dtype=torch.float32).reshape(n, 1)
    return DataInfo(dataset=TensorDataset(x, torch.zeros(n, dtype=torch.long)), name="toy",
                    split="train", facts={}, normalization=None, samples=n, root=None)


def _keys(batches):
    return [tuple(sorted(int(v) for v in x.reshape(-1))) for x, _ in batches]


def test_enough_data_gives_disjoint_minibatches_and_no_note():
    drawn = draw_minibatches(_info(100), 5, 16, seed=0)
    keys = _keys(drawn)
    assert len(drawn) == 5 and drawn.note == "" and drawn.requested == 5
    assert len(set().union(*keys)) == 80  # disjoint


def test_a_data_set_smaller_than_one_minibatch_gives_one_minibatch_and_says_so():
    drawn = draw_minibatches(_info(10), 20, 16, seed=0)
    assert len(drawn) == 1 and drawn.batch_size == 10 and drawn.samples == 10
    assert _keys(drawn) == [tuple(range(10))]
    assert "fewer than one minibatch of 16: 1 minibatch of all 10 samples instead of 20" \
        in drawn.note


def test_between_one_and_count_minibatches_each_is_distinct_with_distinct_samples():
    drawn = draw_minibatches(_info(40), 20, 16, seed=0)
    keys = _keys(drawn)
    assert len(drawn) == 20 and len(set(keys)) == 20
    assert all(len(k) == 16 for k in keys)  # no sample twice in a minibatch
    assert "overlap" in drawn.note
    # only 17 distinct minibatches of 16 exist among 17 samples: all of them, said so
    few = draw_minibatches(_info(17), 20, 16, seed=0)
    assert len(few) == 17 and len(set(_keys(few))) == 17
    assert "only 17 distinct minibatches of 16 exist, used instead of 20" in few.note


def test_ready_batches_are_each_used_once():
    batches = [(torch.full((2, 1), float(i)), torch.zeros(2)) for i in range(3)]
    info = DataInfo(dataset=None, name="ready", split="train", facts={}, normalization=None,
                    samples=6, root=None, batches=batches)
    drawn = draw_minibatches(info, 5, 16, seed=0)
    assert len(drawn) == 3 and "3 distinct minibatches instead of 5" in drawn.note


def test_fingerprints_see_a_repeated_batch():
    x = torch.randn(4, 3)
    assert batch_fingerprint((x, {"a": 1})) == batch_fingerprint((x.clone(), {"a": 1}))
    assert batch_fingerprint((x, 1)) != batch_fingerprint((x + 1e-7, 1))
    assert batch_fingerprint((x, object())) is None


# --------------------------------------------------------------------------- align


@pytest.fixture()
def small_data(tmp_path):
    path = tmp_path / "small.py"
    path.write_text("from torch.utils.data import Subset\n"
                    "from hessdiag.data import load_dataset\n\n"
                    "def small():\n"
                    "    return Subset(load_dataset('digits').dataset, range(64))\n")
    return f"{path}:small"


def test_align_on_data_smaller_than_one_minibatch_says_so_and_reports_no_interval(
        tmp_path, small_data):
    store = tmp_path / "s.h5"
    code, out, err = run(["align", CHECKPOINT, "--data", small_data, "--samples", "64",
                          "--store", store, "--quiet"])
    assert code == 0, err
    assert re.search(r"\|cos\| \d\.\d{4} \(1 of 20 batches: no interval\)", out), out
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1, err
    assert ("64 samples, fewer than one minibatch of 128: 1 minibatch of all 64 samples "
            "instead of 20; no interval from a single minibatch") in notes[0]
    code, out, err = run(["align", CHECKPOINT, "--data", small_data, "--samples", "64",
                          "--store", store, "--json"])
    got = json.loads(out)
    assert got["batches"] == 1 and got["batches_requested"] == 20
    assert got["ci95"] == [None, None] or all(v is None or v != v for v in got["ci95"])
    assert got["interval_method"] == "logit-t"
    # the stored analysis reads back with what was used
    from hessdiag.records import read_alignment

    record = Store(store).analyses()[-1]
    back = read_alignment(record)
    assert back.batches == 1 and back.requested == 20 and "single minibatch" in back.note
    assert np.isnan(back.ci95).all()


def test_align_on_the_shipped_checkpoint_with_three_batches_stays_in_range(tmp_path):
    code, out, err = run(["align", CHECKPOINT, "--batches", "3", "--store",
                          tmp_path / "s.h5", "--json"])
    assert code == 0, err
    got = json.loads(out)
    lo, hi = got["ci95"]
    assert 0 <= lo <= got["alignment"] <= hi <= 1
    slo, shi = got["ci95_signed"]
    assert -1 <= slo <= got["alignment_signed"] <= shi <= 1
    assert got["batches"] == 3 and got["note"] == ""
    _, _, t_lo, _ = mean_interval(np.abs(got["cosines"]))
    assert t_lo < 0  # the plain t-interval would have crossed 0 here


def _alignment(cosines):
    cos = np.asarray(cosines, dtype=float)
    _, _, lo, hi = bounded_mean_interval(np.abs(cos))
    return AlignmentResult(
        alignment=float(np.abs(cos).mean()), ci95=(lo, hi), alignment_signed=0.0,
        ci95_signed=(-1.0, 1.0), cosines=cos, batches=len(cos), top_k=1,
        topk_share=None, topk_share_ci95=None, eigenvalues=np.ones(1),
        residuals=np.zeros(1), converged=np.ones(1, bool), rule="sam", alpha=0.0,
        hvps=0, seconds=0.0, seed=0, note="one minibatch" if len(cos) < 2 else "",
        interval_method="logit-t")


def test_checks_alignment_noise_is_the_stderr_and_refuses_one_minibatch():
    from hessdiag.check import metric_values

    result = _alignment

    class Spectrum:
        top = bottom = None

    got = metric_values(Spectrum(), ("alignment",), result([0.1, -0.3, 0.5]))["alignment"]
    assert got["stderr"] == pytest.approx(np.std([0.1, 0.3, 0.5], ddof=1) / math.sqrt(3))
    with pytest.raises(InputError, match="at least two distinct minibatches"):
        metric_values(Spectrum(), ("alignment",), result([0.4]))


# --------------------------------------------------------------------------- figures


@pytest.fixture()
def band_store(tmp_path):
    """A run with 60 logged |cos| values (a run without align analyses) and one with three
    align analyses of its checkpoints, one of them from a single minibatch."""
    rng = np.random.default_rng(0)
    store = Store(tmp_path / "band.h5")
    store.create_run("logged", {"config": {"optimizer": "sam"}})
    store.append_run("logged", {"sharpness": {
        "step": np.arange(60.0), "alignment": rng.beta(0.5, 3, 60),
        "lambda_max": np.ones(60)}})
    store.create_run("aligned", {"config": {"optimizer": "sam"}})
    store.append_run("aligned", {"sharpness": {
        "step": np.arange(3.0) * 10, "alignment": rng.beta(0.5, 3, 3),
        "lambda_max": np.ones(3)}})
    for step, n in ((0, 3), (10, 20), (20, 1)):
        write_alignment(store, _alignment(rng.uniform(-0.2, 0.4, n)),
                        {"run_id": "aligned", "step": step})
    return store


def test_the_alignment_band_is_inside_0_1_from_windows_of_ten_or_more(band_store):
    pytest.importorskip("matplotlib")
    from hessdiag.plot import MIN_BAND_VALUES, figure, moving_band

    fig = figure(band_store, "alignment", runs=["logged"])
    ax = fig.axes[0]
    cos = band_store.run("logged").arrays["sharpness/alignment"]
    (band,) = [c for c in ax.collections if c.get_gid() == "band:logged"]
    ys = np.concatenate([p.vertices[:, 1] for p in band.get_paths()])
    assert len(ys) and ys.min() >= 0 and ys.max() <= 1
    mean, low, high = moving_band(cos, 11)
    drawn = np.isfinite(low)
    half = 5
    for i in range(60):
        part = cos[max(0, i - half): i + half + 1]
        assert drawn[i] == (len(part) >= MIN_BAND_VALUES)  # cut windows: no band
        if not drawn[i]:
            continue
        _, _, lo, hi = bounded_mean_interval(part)
        assert (low[i], high[i]) == (pytest.approx(lo), pytest.approx(hi))
        assert 0 <= low[i] <= mean[i] <= high[i] <= 1


def test_checkpoints_intervals_come_from_the_stored_cosines(band_store):
    pytest.importorskip("matplotlib")
    from hessdiag.plot import figure

    fig = figure(band_store, "alignment", runs=["aligned"])
    ax = fig.axes[0]
    (bars,) = [c for c in ax.containers if c.lines[0].get_gid() == "checkpoints:aligned"]
    np.testing.assert_array_equal(bars.lines[0].get_xdata(), [0, 10, 20])
    records = sorted((r for r in band_store.analyses()), key=lambda r: r.attrs["step"])
    segments = bars.lines[2][0].get_segments()
    for record, segment, y in zip(records, segments, bars.lines[0].get_ydata(), strict=True):
        cos = np.abs(record.arrays["alignment/cosine"])
        mean, _, lo, hi = bounded_mean_interval(cos)
        assert y == pytest.approx(mean)
        if len(cos) < 2:  # one minibatch: no bar
            assert segment[0, 1] == segment[1, 1] == pytest.approx(mean)
        else:
            assert (segment[0, 1], segment[1, 1]) == (pytest.approx(lo), pytest.approx(hi))
            assert 0 <= lo and hi <= 1
    # no moving band from three logged values
    assert not [c for c in ax.collections if c.get_gid() == "band:aligned"]


def test_the_reports_alignment_figure_stays_in_0_1(band_store, tmp_path):
    pytest.importorskip("matplotlib")
    from hessdiag.report import CAPTIONS, write_report

    path = write_report(band_store, tmp_path / "r.html")
    text = path.read_text()
    assert "id=alignment" in text and "logit" in CAPTIONS["alignment"]
    assert "moving mean and its 95% t-interval" not in text


def test_measure_alignment_leaves_out_repeated_minibatches():
    from torch import nn

    from hessdiag.align import measure_alignment

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    loss = nn.CrossEntropyLoss()
    batches = [(torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,)))
               for _ in range(3)]
    given = [batches[0], batches[1], (batches[0][0].clone(), batches[0][1].clone()),
             batches[2]]
    result = measure_alignment(model, loss, batches[0], given, tol=1e-8)
    assert result.batches == 3 and result.repeats == 1 and result.requested == 4
    assert "1 minibatches repeated an earlier one" in result.note
    assert 0 <= result.ci95[0] <= result.alignment <= result.ci95[1] <= 1
    alone = measure_alignment(model, loss, batches[0], batches, tol=1e-8)
    np.testing.assert_allclose(np.sort(result.cosines), np.sort(alone.cosines))
    assert alone.note == "" and alone.repeats == 0


def test_t_quantiles_are_scipy_stats_own_and_a_check_does_not_import_scipy_stats():
    """`t_interval` uses scipy.special.stdtrit (what scipy.stats.t.ppf calls) to keep
    scipy.stats (about 0.9 s of imports) out of a command's start-up."""
    import subprocess
    import sys

    from hessdiag.curvature.stats import t_interval

    for n in (2, 3, 10, 99, 1000):
        for confidence in (0.9, 0.95, 0.99):
            half = t_interval(0.0, 1.0, n, confidence)[1]
            assert half == float(stats.t.ppf(0.5 + confidence / 2, n - 1))
    code = ("import sys, hessdiag.check, hessdiag.cli.app\n"
            "from hessdiag.curvature.stats import bounded_mean_interval, mean_interval\n"
            "mean_interval([1.0, 2.0, 4.0]); bounded_mean_interval([0.2, 0.4, 0.5])\n"
            "print('scipy.stats' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False"
