"""Figures (matplotlib, optional: ``pip install hessdiag[plot]``). Functions write files and
return their paths; nothing is shown on screen."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hessdiag.curvature import SLQResult


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ValueError("figures need matplotlib: pip install 'hessdiag[plot]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_density(result: SLQResult, path: str | Path, *, sigma: float | None = None,
                 eigenvalues: np.ndarray | None = None, title: str | None = None) -> Path:
    """The SLQ spectral density on a log scale, with the given eigenvalues marked."""
    plt = _pyplot()
    grid, dens, sigma = result.density(sigma=sigma)
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=120)
    floor = max(float(dens.max()) * 1e-8, 1e-300)
    ax.semilogy(grid, np.maximum(dens, floor), color="#1f5fa8", lw=1.4, label="SLQ density")
    if eigenvalues is not None:
        for i, lam in enumerate(np.asarray(eigenvalues)):
            ax.axvline(lam, color="#c0392b", lw=0.8, ls="--",
                       label="top eigenvalues (Lanczos)" if i == 0 else None)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_ylim(bottom=floor)
    ax.set_title(title or f"Hessian spectral density ({result.n_probes} probes x "
                          f"{result.steps} steps, sigma={sigma:.2g})", fontsize=9)
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
