"""`hessdiag landscape`: filter-normalised directions as Li et al. 2018 define them, eigen
directions whose 1-D curve has the eigenvalue as its second difference at 0, straight rows
and columns on non-square grids (a loss known in closed form), any task, resuming after a
SIGKILL with no finished point lost, figures that show the stored grid, bad input."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import dense_hessian
from conftest import run_cli as run
from torch import nn

from hessdiag.landscape import compute_landscape, grid_axes, partial_dir, random_direction
from hessdiag.losses import resolve_loss
from hessdiag.records import read_landscape
from hessdiag.settings import LandscapeSettings
from hessdiag.store import Store
from hessdiag.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "checkpoints" / "digits-mlp.pt"


# --------------------------------------------------------------------------- directions


def test_filter_normalised_direction_matches_each_filters_norm_and_zeroes_biases():
    torch.manual_seed(0)
    conv, lin = nn.Conv2d(3, 4, 3), nn.Linear(5, 2)
    theta = [conv.weight.detach(), conv.bias.detach(), lin.weight.detach(),
             lin.bias.detach()]
    d = random_direction(theta, torch.Generator().manual_seed(7))
    for x, t in ((d[0], theta[0]), (d[2], theta[2])):
        np.testing.assert_allclose(x.reshape(x.shape[0], -1).norm(dim=1),
                                   t.reshape(t.shape[0], -1).norm(dim=1), rtol=1e-5)
        assert not torch.allclose(x, t)  # a random direction, not the weights
    assert float(d[1].abs().sum()) == 0 and float(d[3].abs().sum()) == 0
    with_bias = random_direction(theta, torch.Generator().manual_seed(7), bias="weights")
    assert torch.equal(with_bias[1], theta[1]) and torch.equal(with_bias[0], d[0])
    again = random_direction(theta, torch.Generator().manual_seed(7))
    assert all(torch.equal(a, b) for a, b in zip(d, again, strict=True))
    plain = random_direction(theta, torch.Generator().manual_seed(7), filter_norm=False)
    assert math.isclose(math.sqrt(sum(float((x.double() ** 2).sum()) for x in plain)), 1.0,
                        rel_tol=1e-6)
    assert float(plain[1].abs().sum()) > 0  # biases move too without filter normalisation


def test_eigen_direction_second_difference_at_zero_is_the_dense_top_eigenvalue():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    batches = [(torch.randn(n, 4, dtype=torch.float64), torch.randint(0, 3, (n,)))
               for n in (9, 6)]
    loss = resolve_loss("cross-entropy")
    evals = torch.linalg.eigvalsh(dense_hessian(model, loss, batches))
    h = 1e-4
    result = compute_landscape(model, loss, batches, LandscapeSettings(
        dims=1, directions="eigen", x_range=(-h, h), resolution=3, dtype="float64",
        device="cpu", tol=1e-10))
    f = result.loss
    second = (f[2] - 2 * f[1] + f[0]) / h ** 2
    assert math.isclose(result.directions["eigenvalues"][0], float(evals[-1]), rel_tol=1e-8)
    assert math.isclose(second, float(evals[-1]), rel_tol=1e-4)
    assert math.isclose(f[1], result.loss0, rel_tol=1e-12)  # the middle point is theta
    assert result.directions["norms"] == pytest.approx([1.0])


def test_non_square_grid_keeps_rows_and_columns_straight_on_a_closed_form_loss():
    """Linear regression with mse: L(theta + a d1 + b d2) is the mean of the squared
    residuals r + a X d1 + b X d2, computed here independently of the model."""
    torch.manual_seed(5)
    X, y = torch.randn(20, 3, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
    model = nn.Linear(3, 1).double()
    loss = resolve_loss("mse")
    settings = LandscapeSettings(dims=2, x_range=(-1.0, 2.0), y_range=(-0.5, 0.25),
                                 resolution=7, y_resolution=4, filter_norm=False,
                                 dtype="float64", device="cpu", seed=11)
    result = compute_landscape(model, loss, [(X[:12], y[:12]), (X[12:], y[12:])], settings)
    assert result.loss.shape == (4, 7) and result.accuracy.shape == (4, 7)
    assert np.isnan(result.accuracy).all()  # mse has no accuracy
    gen = torch.Generator().manual_seed(11)
    theta = [model.weight.detach(), model.bias.detach()]
    d1, d2 = (random_direction(theta, gen, filter_norm=False) for _ in range(2))
    xs, ys = grid_axes(settings)

    def closed_form(a, b):
        w = theta[0] + a * d1[0] + b * d2[0]
        c = theta[1] + a * d1[1] + b * d2[1]
        return float(((X @ w.reshape(-1) + c - y) ** 2).mean())

    expected = np.array([[closed_form(a, b) for a in xs] for b in ys])
    np.testing.assert_allclose(result.loss, expected, rtol=1e-12)


# --------------------------------------------------------------------------- the command


def test_landscape_command_stores_the_grid_and_plots_it(tmp_path):
    store = tmp_path / "s.h5"
    code, out, err = run(["landscape", CHECKPOINT, "--samples", "200", "--resolution", "5",
                          "--store", store, "--json", "--seed", "3"])
    assert code == 0, err
    result = json.loads(out)
    assert result["dims"] == 1 and len(result["loss"]) == 5 and result["samples"] == 200
    assert result["forward_passes"] == 6  # the grid and the centre
    assert result["directions"]["kind"] == "random" and result["directions"]["filter_norm"]
    record = Store(store).analysis(result["analysis_id"])
    land = read_landscape(record)
    np.testing.assert_allclose(land.loss, result["loss"])
    assert 0 <= np.nanmin(land.accuracy) <= np.nanmax(land.accuracy) <= 1
    assert land.loss[2] == pytest.approx(land.loss0)  # x = 0 is the checkpoint
    assert not (tmp_path / ".s.h5.landscape").exists()  # the partial grid is gone
    from hessdiag.plot import figure

    fig = figure(Store(store), "landscape")
    line = [ln for ln in fig.axes[0].get_lines() if ln.get_gid() == "loss"][0]
    np.testing.assert_array_equal(line.get_xdata(), land.xs)
    np.testing.assert_array_equal(line.get_ydata(), land.loss)
    code, out, err = run(["show", store])
    assert code == 0 and "1 loss landscapes" in out


def test_two_dimensional_eigen_landscape_contour_is_the_stored_grid(tmp_path):
    store = tmp_path / "s.h5"
    png = tmp_path / "surface.png"
    code, out, err = run(["landscape", CHECKPOINT, "--samples", "120", "--dims", "2",
                          "--directions", "eigen", "--resolution", "4,3", "--range",
                          "-0.2,0.2,-0.1,0.3", "--store", store, "--plot", png, "--json"])
    assert code == 0, err
    result = json.loads(out)
    assert np.array(result["loss"]).shape == (3, 4)
    assert result["y"] == pytest.approx([-0.1, 0.1, 0.3]) and len(result["x"]) == 4
    eig = result["directions"]["eigenvalues"]
    assert len(eig) == 2 and eig[0] >= eig[1] and all(result["directions"]["converged"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from hessdiag.plot import figure

    land = read_landscape(Store(store).analysis(result["analysis_id"]))
    fig = figure(Store(store), "landscape")
    np.testing.assert_allclose(land.loss, np.array(result["loss"]))
    ax = fig.axes[0]
    contour = [c for c in ax.collections if c.get_gid() == "loss"]
    assert len(contour) == 1, "no filled contour of the loss"
    # matplotlib refuses a grid whose shape is not (len(ys), len(xs)): a 3x4 grid drawn
    # over these axes is the stored one the right way round
    assert contour[0].zmin == pytest.approx(land.loss.min())
    assert contour[0].zmax == pytest.approx(land.loss.max())
    assert ax.get_xlim() == pytest.approx((land.xs[0], land.xs[-1]))
    assert ax.get_ylim() == pytest.approx((land.ys[0], land.ys[-1]))


def _trained(tmp_path, data, model, extra):
    cfg = TrainConfig(model=model, data=data, epochs=1, batch_size=16, seed=0,
                      run_name=f"{data}-run", checkpoint_dir=str(tmp_path / "ckpt"),
                      device="cpu", **extra)
    return train(cfg, store=Store(tmp_path / "train.h5")).final_checkpoint


@pytest.mark.parametrize("data, model, extra, accuracy", [
    ("tabular", "mlp", {"samples": 48, "model_kwargs": {"hidden": 8}, "lr": 0.05}, False),
    ("text", "tiny-lm", {"samples": 24, "model_kwargs": {"d_model": 8, "heads": 2, "layers": 1,
                                                         "dim_feedforward": 16}}, True),
])
def test_landscape_of_any_task(tmp_path, data, model, extra, accuracy):
    checkpoint = _trained(tmp_path, data, model, extra)
    code, out, err = run(["landscape", checkpoint, "--samples", "16", "--resolution", "3",
                          "--store", tmp_path / "s.h5", "--json"])
    assert code == 0, err
    result = json.loads(out)
    assert all(math.isfinite(v) for v in result["loss"])
    assert all(v is not None for v in result["accuracy"]) == accuracy
    assert result["loss_spec"] == ("mse" if data == "tabular" else "cross-entropy")


@pytest.mark.parametrize("args, message", [
    (["--range", "1,-1"], "--range must be two numbers MIN,MAX with MIN < MAX"),
    (["--range", "0,0"], "--range must be two numbers"),
    (["--range", "a,b"], "--range takes 2 or 4 comma-separated numbers"),
    (["--resolution", "1"], "--resolution must be at least 2"),
    (["--dims", "2", "--resolution", "5,1"], "--resolution must be at least 2"),
    (["--dims", "3"], "--dims must be 1 or 2"),
    (["--directions", "hessian"], "--directions must be one of random, eigen"),
    (["--bias", "ones"], "--bias must be one of zero, weights"),
    (["--dims", "1", "--resolution", "5,5"], "--dims 1 takes one range"),
    (["--plot", "x.gif"], "gif"),
])
def test_landscape_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, args, message):
    store = tmp_path / "s.h5"
    code, out, err = run(["landscape", CHECKPOINT, "--store", store, *args])
    assert code == 2, (out, err)
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not store.exists()


def test_plot_landscape_of_a_store_without_one_is_exit_2(tmp_path):
    store = Store(tmp_path / "s.h5")
    store.create_run("r", {"status": "finished"})
    code, out, err = run(["plot", tmp_path / "s.h5", "--what", "landscape", "-o",
                          tmp_path / "f.png"])
    assert code == 2 and "no landscape analysis" in err


# --------------------------------------------------------------------------- resuming


def _grid_done(directory: Path) -> int:
    try:
        with np.load(directory / "grid.npz") as z:
            return int(z["done"].sum())
    except (OSError, ValueError, KeyError, EOFError):
        return 0


def test_sigkill_mid_grid_loses_no_finished_point_and_resume_completes_it(tmp_path):
    store = tmp_path / "s.h5"
    args = [str(CHECKPOINT), "--dims", "2", "--resolution", "12,10", "--samples", "600",
            "--store", str(store), "--quiet", "--dtype", "float64"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "hessdiag", "landscape", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    parent = store.with_name(f".{store.name}.landscape")
    deadline = time.time() + 120
    directory = None
    while time.time() < deadline and proc.poll() is None:
        dirs = list(parent.glob("*")) if parent.exists() else []
        if dirs and _grid_done(dirs[0]) >= 30:
            directory = dirs[0]
            break
        time.sleep(0.02)
    assert directory is not None, proc.stderr.read() if proc.poll() is not None else "slow"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with np.load(directory / "grid.npz") as z:
        before = {k: z[k].copy() for k in ("loss", "done")}
    finished = int(before["done"].sum())
    assert 30 <= finished < 120 and np.isnan(before["loss"][~before["done"]]).all()
    assert not store.exists() or Store(store).analyses() == []
    code, out, err = run(["landscape", *args[:-3], "--dtype", "float64", "--resume",
                          "--json"])
    assert code == 0, err
    resumed = json.loads(out)
    assert resumed["resumed_points"] == finished
    assert resumed["forward_passes"] == 120 - finished + 1
    loss = np.array(resumed["loss"])
    np.testing.assert_array_equal(loss[before["done"]], before["loss"][before["done"]])
    # the same grid as an uninterrupted run
    code, out, err = run(["landscape", *args[:-3], "--dtype", "float64", "--json"])
    fresh = json.loads(out)
    np.testing.assert_allclose(loss, np.array(fresh["loss"]), rtol=1e-12)
    assert fresh["resumed_points"] == 0
    assert not parent.exists()
    assert partial_dir(store, "x").parent == parent
