"""`hessdiag plot` and `hessdiag report`: every figure drawn from a small store shows the
stored numbers (read back through the matplotlib objects), files are valid images of the
expected size, and bad input is one line with exit code 2."""

import base64
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from hessdiag.cli.app import app
from typer.testing import CliRunner

from hessdiag.plot import DPI, SIZE, figure, moving_band, stability_threshold
from hessdiag.records import read_spectrum
from hessdiag.store import Store
from hessdiag.train import TrainConfig, train

matplotlib = pytest.importorskip("matplotlib")

SMALL = dict(model="mlp", data="digits", model_kwargs={"hidden": 12}, samples=256,
             batch_size=64, epochs=2, lr=0.05, seed=1, eig_every=2, sharpness_every=2,
             sharpness_samples=64, checkpoint_every=4)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Two runs (SGD, SAM) with sharpness and alignment logs, and spectrum analyses of the
    SGD run's checkpoints (one with a density and a per-layer table)."""
    root = tmp_path_factory.mktemp("plots")
    path = root / "s.h5"
    source = Store(path)
    results = {}
    for opt in ("sgd", "sam"):
        cfg = TrainConfig(**SMALL, optimizer=opt, run_name=f"run-{opt}",
                          checkpoint_dir=str(root / "ckpt"))
        results[opt] = train(cfg, store=source)
    checkpoints = [p.decode() if isinstance(p, bytes) else str(p)
                   for p in source.run("run-sgd").arrays["checkpoints/path"]]
    runner = CliRunner()
    for i, ck in enumerate(checkpoints):
        extra = ["--density", "--per-layer", "--lambda-min"] if i == len(checkpoints) - 1 \
            else ["--lambda-min"]
        out = runner.invoke(app, ["spectrum", ck, "--samples", "128", "--top-k", "2",
                                  "--store", str(path), "--quiet", *extra])
        assert out.exit_code == 0, out.output
    # align on the SAM run's checkpoints: per-checkpoint intervals for the alignment figure
    for ck in source.run("run-sam").arrays["checkpoints/path"]:
        ck = ck.decode() if isinstance(ck, bytes) else str(ck)
        out = runner.invoke(app, ["align", ck, "--batches", "6", "--batch-size", "32",
                                  "--samples", "64", "--store", str(path), "--quiet"])
        assert out.exit_code == 0, out.output
    return source


@pytest.fixture(scope="module")
def report_page(store, tmp_path_factory):
    """The store's report, written once for the tests that only read it."""
    from hessdiag.report import write_report

    return write_report(store, tmp_path_factory.mktemp("report") / "report.html")


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


def _line(ax, gid):
    hits = [line for line in ax.get_lines() if line.get_gid() == gid]
    assert len(hits) == 1, [line.get_gid() for line in ax.get_lines()]
    return hits[0]


def test_training_curves_are_the_stored_metrics(store):
    fig = figure(store, "training")
    loss_ax, acc_ax = fig.axes[:2]
    for run in store.runs():
        x = run.arrays
        line = _line(loss_ax, f"loss:{run.id}")
        np.testing.assert_array_equal(line.get_xdata(), x["metrics/step"])
        np.testing.assert_array_equal(line.get_ydata(), x["metrics/loss"])
        test = _line(acc_ax, f"test_acc:{run.id}")
        keep = np.isfinite(x["metrics/test_acc"])
        np.testing.assert_array_equal(test.get_ydata(), x["metrics/test_acc"][keep])


def test_sharpness_shows_lambda_max_and_the_stability_threshold_at_the_logged_lr(store):
    fig = figure(store, "sharpness", runs=["run-sgd", "run-sam"])
    ax = fig.axes[0]
    for run in store.runs():
        x = run.arrays
        container = [c for c in ax.containers if c.lines[0].get_gid() == f"lambda_max:{run.id}"]
        assert len(container) == 1
        data_line = container[0].lines[0]
        np.testing.assert_array_equal(data_line.get_xdata(), x["sharpness/step"])
        np.testing.assert_array_equal(data_line.get_ydata(), x["sharpness/lambda_max"])
        threshold = _line(ax, f"threshold:{run.id}")
        momentum, lr = run.attrs["config"]["momentum"], x["metrics/lr"]
        np.testing.assert_allclose(threshold.get_ydata(), 2 * (1 + momentum) / lr)
        np.testing.assert_array_equal(threshold.get_xdata(), x["metrics/step"])


def test_stability_threshold_is_two_over_lr_without_momentum_and_absent_for_adam():
    class Run:
        def __init__(self, config):
            self.attrs = {"config": config}
            self.arrays = {"metrics/step": np.array([1.0, 2.0]),
                           "metrics/lr": np.array([0.1, 0.05])}

    steps, values = stability_threshold(Run({"momentum": 0.0, "base": "sgd"}))
    np.testing.assert_allclose(values, [20.0, 40.0])
    assert stability_threshold(Run({"momentum": 0.9, "base": "adam"})) is None
    # Nesterov: 2(1+b)/((1+2b) lr), not heavy ball's 2(1+b)/lr
    _, values = stability_threshold(Run({"momentum": 0.9, "nesterov": True, "base": "sgd"}))
    np.testing.assert_allclose(values, [2 * 1.9 / (2.8 * 0.1), 2 * 1.9 / (2.8 * 0.05)])
    _, values = stability_threshold(Run({"momentum": 0.9, "base": "sgd"}))
    np.testing.assert_allclose(values, [38.0, 76.0])


def test_alignment_intervals_are_per_checkpoint_from_the_stored_cosines(store):
    """A run with align analyses of its checkpoints: error bars from each analysis's
    per-minibatch cosines (logit-scale intervals, inside [0, 1]); its few logged values
    (fewer than MIN_BAND_VALUES) get no moving band."""
    from hessdiag.curvature.stats import bounded_mean_interval
    from hessdiag.plot import MIN_BAND_VALUES

    fig = figure(store, "alignment", runs=["run-sam"])
    ax = fig.axes[0]
    x = store.run("run-sam").arrays
    cos = x["sharpness/alignment"]
    keep = np.isfinite(cos)
    np.testing.assert_array_equal(_line(ax, "alignment:run-sam").get_ydata(), cos[keep])
    assert keep.sum() < MIN_BAND_VALUES
    assert not [c for c in ax.collections if c.get_gid() == "band:run-sam"]
    (bars,) = [c for c in ax.containers if c.lines[0].get_gid() == "checkpoints:run-sam"]
    records = sorted((r for r in store.analyses() if r.kind == "alignment"
                      and r.attrs.get("run_id") == "run-sam"), key=lambda r: r.attrs["step"])
    assert len(records) >= 2
    np.testing.assert_array_equal(bars.lines[0].get_xdata(),
                                  [r.attrs["step"] for r in records])
    for record, segment in zip(records, bars.lines[2][0].get_segments(), strict=True):
        mean, _, lo, hi = bounded_mean_interval(np.abs(record.arrays["alignment/cosine"]))
        assert (segment[0, 1], segment[1, 1]) == (pytest.approx(lo), pytest.approx(hi))
        assert 0 <= lo <= mean <= hi <= 1


def test_moving_band_of_constant_values_has_zero_width():
    mean, low, high = moving_band(np.full(7, 0.4), 3, min_values=2)
    np.testing.assert_allclose(mean, 0.4)
    np.testing.assert_allclose(low, 0.4)
    np.testing.assert_allclose(high, 0.4)
    # windows of fewer than MIN_BAND_VALUES values: no band
    assert np.isnan(moving_band(np.full(7, 0.4), 3)[1]).all()


def test_eigenvalues_across_checkpoints_with_residual_error_bars(store):
    fig = figure(store, "eigenvalues", runs=["run-sgd"])
    ax = fig.axes[0]
    records = sorted((r for r in store.analyses() if r.attrs.get("run_id") == "run-sgd"),
                     key=lambda r: r.attrs["step"])
    assert len(records) >= 2
    results = [read_spectrum(r) for r in records]
    top = [c for c in ax.containers if c.lines[0].get_gid() == "top:0"][0]
    np.testing.assert_array_equal(top.lines[0].get_xdata(), [r.attrs["step"] for r in records])
    np.testing.assert_allclose(top.lines[0].get_ydata(),
                               [res.top.eigenvalues[0] for res in results])
    # the error bar's half-height is the residual
    segments = top.lines[2][0].get_segments()
    np.testing.assert_allclose([s[1][1] - s[0][1] for s in segments],
                               [2 * res.top.residuals[0] for res in results], rtol=1e-6)
    bottom = [c for c in ax.containers if c.lines[0].get_gid() == "bottom"][0]
    np.testing.assert_allclose(bottom.lines[0].get_ydata(),
                               [res.bottom.eigenvalues[0] for res in results])


def test_density_is_recomputed_from_the_stored_nodes_and_weights(store):
    record = [r for r in store.analyses() if "slq/nodes" in r.arrays][0]
    result = read_spectrum(record)
    for sigma in (None, 0.05):
        fig = figure(store, "density", sigma=sigma)
        line = _line(fig.axes[0], f"density:{record.id}")
        grid, dens, _ = result.density.density(sigma=sigma)
        np.testing.assert_allclose(line.get_xdata(), grid)
        floor = max(float(dens.max()) * 1e-8, 1e-300)
        np.testing.assert_allclose(line.get_ydata(), np.maximum(dens, floor))
        marks = [ln for ln in fig.axes[0].get_lines() if ln.get_gid() == f"eigenvalue:{record.id}"]
        np.testing.assert_allclose([m.get_xdata()[0] for m in marks], result.top.eigenvalues)


def test_layers_bars_are_the_per_layer_lambda_max(store):
    record = [r for r in store.analyses() if "layers/lambda_max" in r.arrays][0]
    result = read_spectrum(record)
    fig = figure(store, "layers", analyses=[record.id])
    bars = [p for p in fig.axes[0].patches]
    np.testing.assert_allclose([b.get_width() for b in bars],
                               [layer.lambda_max for layer in result.layers])


@pytest.mark.parametrize("suffix", [".png", ".svg", ".pdf"])
def test_plot_command_writes_an_image_of_the_expected_size(store, tmp_path, suffix):
    out = tmp_path / f"sharp{suffix}"
    res = CliRunner().invoke(app, ["plot", str(store.path), "--what", "sharpness", "-o", str(out)])
    assert res.exit_code == 0, res.output
    data = out.read_bytes()
    if suffix == ".png":
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", data[16:24])
        assert (width, height) == (round(SIZE[0] * DPI), round(SIZE[1] * DPI))
    elif suffix == ".svg":
        assert b"<svg" in data[:500] and b"</svg>" in data[-100:]
    else:
        assert data.startswith(b"%PDF") and b"%%EOF" in data[-50:]


@pytest.mark.parametrize("args, message", [
    (["--what", "bogus"], "unknown figure 'bogus'"),
    (["--what", "training", "--runs", "nope"], "run 'nope' is not in"),
    (["--what", "layers", "--analysis", "zzz"], "analysis 'zzz' is not a spectrum analysis"),
    (["--what", "density", "--sigma", "-1"], "sigma must be positive"),
])
def test_plot_bad_input_is_one_line_and_exit_2(store, tmp_path, args, message):
    res = CliRunner().invoke(app, ["plot", str(store.path), *args, "-o", str(tmp_path / "f.png")])
    assert res.exit_code == 2
    assert message in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert not (tmp_path / "f.png").exists()


def test_plot_refuses_an_unknown_format_and_a_missing_store(store, tmp_path):
    res = CliRunner().invoke(app, ["plot", str(store.path), "--what", "training",
                                   "-o", str(tmp_path / "f.jpgx")])
    assert res.exit_code == 2 and "figure format" in res.output
    res = CliRunner().invoke(app, ["plot", str(tmp_path / "none.h5"), "--what", "training",
                                   "-o", str(tmp_path / "f.png")])
    assert res.exit_code == 2 and "does not exist" in res.output


def test_report_is_one_self_contained_page_with_every_figure(store, tmp_path):
    out = tmp_path / "report.html"
    res = CliRunner().invoke(app, ["report", str(store.path), "-o", str(out)])
    assert res.exit_code == 0, res.output
    text = out.read_text()
    assert "http://" not in text and "https://" not in text and "<script" not in text
    ids = re.findall(r"<figure id=(\w+)>", text)
    assert ids == ["training", "sharpness", "alignment", "eigenvalues", "density", "layers"]
    for data in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", text):
        assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"
    for run in store.runs():
        assert run.id in text
    for record in store.analyses():
        assert record.id in text


def test_report_of_an_empty_store_says_nothing_to_draw(tmp_path):
    from hessdiag.report import render_report

    path = tmp_path / "e.h5"
    Store(path).create_run("r", {"config": {}})
    assert "nothing to draw yet" in render_report(Store(path))


def test_figures_never_need_the_checkpoints(store, tmp_path, monkeypatch):
    """Figures come from the store alone: moving the checkpoints away changes nothing."""
    monkeypatch.chdir(tmp_path)
    ckpt = Path(store.path).parent / "ckpt"
    moved = ckpt.with_name("moved")
    ckpt.rename(moved)
    try:
        for what in ("training", "sharpness", "alignment", "eigenvalues", "density", "layers"):
            figure(store, what)
    finally:
        moved.rename(ckpt)


CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser",
                             "/usr/bin/google-chrome") if Path(p).exists()), None)


@pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium on this machine "
                    "(apt-get install chromium)")
def test_report_renders_in_headless_chromium(report_page, tmp_path):
    """The page as a browser draws it, offline: the screenshot holds the figures (the
    embedded images decode and draw far more than the same page without them)."""
    import re
    import subprocess

    def ink(page):
        shot = page.with_suffix(".png")
        subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                        "--disable-background-networking", "--no-first-run",
                        f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,2400",
                        f"--screenshot={shot}", page.as_uri()],
                       check=True, capture_output=True, timeout=120)
        image = matplotlib.image.imread(shot)
        assert image.shape[:2] == (2400, 1200)
        return float((image[..., :3] < 0.9).any(axis=2).mean())

    page = report_page
    # the same page with every image's data removed: what the text alone draws
    blank = tmp_path / "blank.html"
    blank.write_text(re.sub(r"src='data:image/png;base64,[^']*'", "src=''",
                            page.read_text()))
    with_figures, text_only = ink(page), ink(blank)
    # the figures (lines, markers, error bars, bands) add far more than the text draws
    assert with_figures > 0.04 and with_figures - text_only > 0.02, (with_figures, text_only)


# --------------------------------------------------------------------------- first-hour fixes


class FakeRun:
    """A run as the figures read it: id, attrs (the config) and arrays."""

    group = "runs"

    def __init__(self, run_id, config, arrays):
        self.id, self.attrs, self.arrays = run_id, {"config": config}, arrays


class FakeStore:
    def __init__(self, runs):
        self._runs = runs

    def runs(self):
        return self._runs


def _adam_run(values=(114.0, 118.5, 121.0, 126.0)):
    steps = np.arange(len(values), dtype=float)
    return FakeRun("adam-1", {"optimizer": "sgd", "base": "adam", "lr": 1e-3, "momentum": 0.9},
                   {"sharpness/step": steps, "sharpness/lambda_max": np.array(values),
                    "metrics/step": steps, "metrics/lr": np.full(len(values), 1e-3)})


def _sgd_run():
    steps = np.arange(4, dtype=float)
    return FakeRun("sgd-1", {"optimizer": "sgd", "base": "sgd", "lr": 0.05, "momentum": 0.0},
                   {"sharpness/step": steps, "sharpness/lambda_max": np.full(4, 30.0),
                    "metrics/step": steps, "metrics/lr": np.full(4, 0.05)})


def _tick_texts(fig, axis):
    """The texts of the tick labels drawn inside the axis's view (major and minor)."""
    fig.canvas.draw()
    low, high = sorted(axis.get_view_interval())
    out = []
    for which in ("major", "minor"):
        ticks = axis.get_major_ticks() if which == "major" else axis.get_minor_ticks()
        out += [t.label1.get_text() for t in ticks
                if t.label1.get_visible() and t.label1.get_text()
                and low * (1 - 1e-9) <= t.get_loc() <= high * (1 + 1e-9)]
    return out


def test_a_log_axis_spanning_less_than_a_decade_has_plain_ticks():
    """lambda_max from 114 to 126 on the log axis: plain numbers (no 1.2x10^2)."""
    from hessdiag.plot import sharpness_figure

    fig = sharpness_figure([_adam_run()])
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    texts = _tick_texts(fig, ax.yaxis)
    assert len(texts) >= 2, texts
    for text in texts:
        assert "10^" not in text and "times" not in text and "$" not in text, texts
        float(text.replace("\u2212", "-"))
    assert [float(t) for t in texts] == sorted(float(t) for t in texts)
    # an axis spanning decades keeps its powers of ten
    fig = sharpness_figure([_adam_run((0.5, 5.0, 50.0, 500.0))])
    assert any("10^" in t for t in _tick_texts(fig, fig.axes[0].yaxis))


def test_an_adam_runs_caption_and_figure_promise_no_threshold_line():
    from hessdiag.plot import sharpness_figure
    from hessdiag.report import caption

    runs = [_sgd_run(), _adam_run()]
    fig = sharpness_figure(runs)
    ax = fig.axes[0]
    gids = [line.get_gid() for line in ax.get_lines()]
    assert "threshold:sgd-1" in gids and "threshold:adam-1" not in gids
    text = caption(FakeStore(runs), "sharpness", fig)
    assert "sgd-1: dotted: 2/lr at the logged lr" in text
    assert ("adam-1: no threshold line: Adam's threshold bounds the preconditioned "
            "sharpness") in text and "which training does not log" in text
    assert "where one applies" in fig._suptitle.get_text()
    # only Adam runs: neither caption nor title speaks of a dotted line
    fig = sharpness_figure([_adam_run()])
    text = caption(FakeStore([_adam_run()]), "sharpness", fig)
    assert "dotted" not in text and "dotted" not in fig._suptitle.get_text()


def test_one_checkpoints_eigenvalues_are_bars_with_their_values(store):
    from matplotlib.container import BarContainer

    from hessdiag.report import caption

    record = [r for r in store.analyses() if r.kind == "spectrum"][0]
    result = read_spectrum(record)
    fig = figure(store, "eigenvalues", analyses=[record.id])
    ax = fig.axes[0]
    assert ax.get_gid() == "eigenvalues:bars"
    (bars,) = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert not [line for line in ax.get_lines() if line.get_marker() not in ("None", "_")]
    expected = list(result.top.eigenvalues) + [result.bottom.eigenvalues[0]]
    np.testing.assert_allclose([p.get_height() for p in bars.patches], expected, rtol=1e-6)
    # the error bars' half-heights are the residuals
    segments = bars.errorbar.lines[2][0].get_segments()
    np.testing.assert_allclose([(s[1][1] - s[0][1]) / 2 for s in segments],
                               list(result.top.residuals) + [result.bottom.residuals[0]],
                               rtol=1e-5, atol=1e-12)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["lambda_1", "lambda_2",
                                                            "lambda_min"]
    labels = [t.get_text() for t in ax.texts]
    assert labels == [f"{v:.4g}" for v in expected]
    assert "one analysed checkpoint" in caption(store, "eigenvalues", fig)
    # two checkpoints: a curve against the step, as before
    fig = figure(store, "eigenvalues", runs=["run-sgd"])
    assert fig.axes[0].get_gid() == "eigenvalues:steps"
    assert "across a run's checkpoints" in caption(store, "eigenvalues", fig)


def test_the_density_legend_is_clear_of_the_lambda_1_line(store):
    fig = figure(store, "density")
    ax = fig.axes[0]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legend = ax.get_legend().get_window_extent(renderer)
    marks = [ln for ln in ax.get_lines() if ln.get_gid().startswith("eigenvalue:")]
    lam1 = max(marks, key=lambda ln: ln.get_xdata()[0])
    assert not legend.overlaps(lam1.get_window_extent(renderer))
    # outside the data altogether, and inside the figure
    assert legend.y1 <= ax.get_window_extent(renderer).y0
    assert legend.y0 >= 0 and legend.x0 >= 0 and legend.x1 <= fig.bbox.width


def test_show_tells_float32_and_float64_analyses_apart(store, tmp_path):
    import json
    import shutil

    copy = tmp_path / "copy.h5"
    shutil.copy(store.path, copy)
    checkpoint = [r for r in store.analyses() if r.kind == "spectrum"][-1].attrs[
        "checkpoint_path"]
    runner = CliRunner()
    out = runner.invoke(app, ["spectrum", checkpoint, "--samples", "64", "--top-k", "1",
                              "--dtype", "float64", "--store", str(copy), "--quiet"])
    assert out.exit_code == 0, out.output
    out = runner.invoke(app, ["show", str(copy), "--json"])
    assert out.exit_code == 0, out.output
    rows = [r for r in json.loads(out.stdout)["analyses"] if r["kind"] == "spectrum"]
    assert {r["dtype"] for r in rows} == {"float32", "float64"}
    out = runner.invoke(app, ["show", str(copy)], terminal_width=250)
    header = next(line for line in out.stdout.splitlines() if "analysis" in line
                  and "λ_max" in line)
    assert "dtype" in header
    for row in rows:
        line = next(line for line in out.stdout.splitlines() if row["analysis_id"] in line)
        assert row["dtype"] in line


@pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium on this machine "
                    "(apt-get install chromium)")
def test_report_fits_a_1280_pixel_window_in_headless_chromium(report_page, tmp_path):
    """Measured by the browser: a copy of the page with a script that writes the page's
    scrollWidth and each table's right edge into the body (``--dump-dom``), and a
    1280-pixel screenshot whose right margin is blank."""
    import json
    import subprocess

    page = report_page
    probe = tmp_path / "probe.html"
    script = ("<script>var d=document.documentElement;var r={page:d.scrollWidth,"
              "view:d.clientWidth,tables:Array.from(document.querySelectorAll('table'),"
              "function(t){return Math.ceil(t.getBoundingClientRect().left+t.scrollWidth)})};"
              "document.body.innerHTML='<pre id=probe>'+JSON.stringify(r)+'</pre>';</script>")
    probe.write_text(page.read_text().replace("</body>", script + "</body>"))
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
             "--disable-background-networking", "--no-first-run",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,2000"]
    dom = subprocess.run([*flags, "--dump-dom", probe.as_uri()], check=True,
                         capture_output=True, text=True, timeout=120).stdout
    measured = json.loads(re.search(r"<pre id=\"?probe\"?>(.*?)</pre>", dom).group(1))
    assert measured["page"] <= 1280 and measured["page"] <= measured["view"], measured
    assert len(measured["tables"]) == 2  # runs and analyses
    assert max(measured["tables"]) <= measured["view"], measured  # no table scrolls
    shot = tmp_path / "report.png"
    subprocess.run([*flags, f"--screenshot={shot}", page.as_uri()], check=True,
                   capture_output=True, timeout=120)
    image = matplotlib.image.imread(shot)
    assert image.shape[:2] == (2000, 1280)
    # right of the centred 1100-pixel column, left of the scroll bar: nothing drawn
    margin = image[:, 1200:1260, :3]
    assert (margin > 0.98).all(), float((margin <= 0.98).mean())
