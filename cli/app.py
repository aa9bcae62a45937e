"""The ``hessdiag`` command: one function per command, errors as one line and exit code 2."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from hessdiag.cli import render
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from hessdiag import __version__

EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT = 0, 1, 2

app = typer.Typer(
    name="hessdiag",
    help="How sharp is your network? Hessian spectra of PyTorch models, and flatter training.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)


class UsageError(Exception):
    """Bad input found by the CLI itself (exit code 2)."""


def _version(value: bool) -> None:
    if value:
        typer.echo(f"hessdiag {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """hessdiag: Hessian eigenvalues, trace and spectral density through Hessian-vector
    products; SAM and Eigen-SAM training; sharpness checks for CI."""


def handles_errors(func: Callable) -> Callable:
    """Turn bad input into one clear line on stderr and exit code 2 (traceback with --debug)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = bool(kwargs.get("debug"))
        try:
            return func(*args, **kwargs)
        except typer.Exit:
            raise
        except (UsageError, ValueError, TypeError, FileNotFoundError, PermissionError,
                OSError, KeyError) as exc:
            if debug:
                raise
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            render.stderr.print(f"[bold red]error:[/bold red] {message}", soft_wrap=True)
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except KeyboardInterrupt:
            render.stderr.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper


def progress_bar(enabled: bool, label: str):
    """A rich progress bar on stderr, or ``None`` when output is not a terminal or --quiet."""
    if not enabled or not render.stderr.is_terminal:
        return None
    return Progress(TextColumn(label), BarColumn(), TextColumn("{task.completed} HVPs"),
                    TimeElapsedColumn(), console=render.stderr, transient=True)


@app.command()
@handles_errors
def demo(
    out_dir: Path = typer.Option(Path("demo-output"), "--out-dir",
                                 help="Where to write spectrum.json and density.png."),
    epochs: int = typer.Option(30, min=1, help="Training epochs on the digits train split."),
    seed: int = typer.Option(0, help="Seed for training and every stochastic estimator."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON only."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Fit a small network to the bundled digits data and report its Hessian spectrum.

    Trains a 64-32-10 tanh MLP (2,410 parameters) on the 1,437 training digits, then
    computes, over all of them, the top-5 eigenvalues (Lanczos, with residuals), the most
    negative eigenvalue, the trace (Hutch++, with its standard error) and the spectral
    density (SLQ); writes OUT_DIR/spectrum.json and OUT_DIR/density.png.
    """
    from hessdiag.demo import run_demo
    from hessdiag.plot import plot_density

    out_dir.mkdir(parents=True, exist_ok=True)
    bar = progress_bar(not quiet and not as_json, "Hessian spectrum")
    if bar is None:
        result = run_demo(epochs=epochs, seed=seed)
    else:
        with bar:
            task = bar.add_task("hvps", total=None)
            result = run_demo(epochs=epochs, seed=seed,
                              progress=lambda done, total: bar.advance(task))
    spectrum = result.spectrum
    payload = {"train_accuracy": result.train_accuracy, "test_accuracy": result.test_accuracy,
               "epochs": result.epochs, "parameters": result.parameters,
               **spectrum.to_dict()}
    (out_dir / "spectrum.json").write_text(json.dumps(payload, indent=2) + "\n")
    figure = plot_density(spectrum.density, out_dir / "density.png",
                          eigenvalues=spectrum.top.eigenvalues)
    if as_json:
        render.emit_json(payload)
        return
    render.stdout.print(
        f"digits MLP: {result.parameters} parameters, {result.epochs} epochs, "
        f"train accuracy {result.train_accuracy:.3f}, test accuracy {result.test_accuracy:.3f}"
    )
    render.stdout.print(render.spectrum_table(spectrum, "Hessian of the training loss"))
    render.stdout.print(f"wrote {out_dir / 'spectrum.json'} and {figure}")


def main() -> None:
    try:
        app()
    except SystemExit as exc:
        sys.exit(exc.code)
