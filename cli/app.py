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


def with_progress(enabled: bool, label: str, job: Callable[[Any], Any]) -> Any:
    """Run ``job(progress)`` with a rich progress bar on stderr counting HVPs, or with
    ``progress=None`` when output is not a terminal or the bar is disabled."""
    if not enabled or not render.stderr.is_terminal:
        return job(None)
    bar = Progress(TextColumn(label), BarColumn(), TextColumn("{task.completed} HVPs"),
                   TimeElapsedColumn(), console=render.stderr, transient=True)
    with bar:
        task = bar.add_task("hvps", total=None)
        return job(lambda done, total: bar.advance(task))


@app.command()
@handles_errors
def spectrum(
    checkpoints: list[Path] = typer.Argument(..., help="Checkpoint files (several: a run's "
                                             "series, analysed in the order given)."),
    model: str | None = typer.Option(None, "--model", help="Architecture for plain "
                                     "state_dict files, or to override the recorded one: a "
                                     "name from `hessdiag models`, package.module:factory "
                                     "or file.py:factory."),
    data: str | None = typer.Option(None, "--data", help="Data to measure on (default: the "
                                    "checkpoint's): a name from `hessdiag datasets`, "
                                    "imagefolder:PATH, or a factory spec."),
    data_root: Path | None = typer.Option(None, "--data-root", help="Folder holding the "
                                          "data set's files."),
    download: bool = typer.Option(False, "--download", help="Download the data set into "
                                  "--data-root if it is missing."),
    split: str = typer.Option("train", "--split", help="train or test."),
    samples: int | None = typer.Option(None, "--samples", help="Use the first N samples in "
                                       "dataset order (default: all)."),
    batch_size: int = typer.Option(256, "--batch-size", help="Samples per batch; the "
                                   "Hessian is of the mean loss over all samples either way."),
    top_k: int = typer.Option(5, "--top-k", min=1, help="Top eigenvalues to compute."),
    lambda_min: bool = typer.Option(False, "--lambda-min", help="Also the most negative "
                                    "eigenvalue and lambda_max/|lambda_min|."),
    trace: bool = typer.Option(False, "--trace", help="Also the trace (Hutch++)."),
    trace_hvps: int = typer.Option(99, "--trace-hvps", min=6, help="Products for the trace."),
    density: bool = typer.Option(False, "--density", help="Also the spectral density (SLQ)."),
    slq_probes: int = typer.Option(5, "--slq-probes", min=1, help="SLQ probe vectors."),
    slq_steps: int = typer.Option(60, "--slq-steps", min=2, help="Lanczos steps per probe."),
    method: str = typer.Option("lanczos", "--method", help="lanczos or power (iteration "
                               "with deflation) for the top eigenvalues."),
    tol: float = typer.Option(1e-3, "--tol", help="Relative residual ||Hu - θu|| / |θ| at "
                              "which an eigenpair counts as converged."),
    hvp_mode: str = typer.Option("auto", "--hvp-mode", help="auto, forward-over-reverse, "
                                 "double-backward or retained-graph."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 or float64."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    seed: int = typer.Option(0, "--seed", help="Seed of every random start and probe."),
    store: Path = typer.Option(Path("hessdiag.h5"), "--store", help="HDF5 store to append "
                               "the analyses to."),
    plot: Path | None = typer.Option(None, "--plot", help="Write the density figure here "
                                     "(PNG; needs --density; with several checkpoints, "
                                     "one file each, numbered)."),
    unsafe_load: bool = typer.Option(False, "--unsafe-load", help="Allow checkpoints that "
                                     "hold pickled Python objects. Unpickling runs code: "
                                     "only for files you trust."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per checkpoint on "
                                 "stdout, nothing else."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Top eigenvalues (with residuals), lambda_min, trace and spectral density of the
    training-loss Hessian at each checkpoint; each analysis is appended to the store."""
    from hessdiag.spectrum import (
        METHODS,
        DataSettings,
        SpectrumSettings,
        analyse_checkpoint,
        load_for_analysis,
        resolve_device,
    )
    from hessdiag.store import Store

    if method not in METHODS:
        raise UsageError(f"--method must be lanczos or power; got {method!r}")
    if dtype not in ("float32", "float64"):
        raise UsageError(f"--dtype must be float32 or float64; got {dtype!r}")
    if split not in ("train", "test"):
        raise UsageError(f"--split must be train or test; got {split!r}")
    if not tol > 0:
        raise UsageError(f"--tol must be positive; got {tol}")
    if plot is not None and not density:
        raise UsageError("--plot draws the spectral density: add --density")
    resolve_device(device)
    settings = SpectrumSettings(top_k=top_k, lambda_min=lambda_min, trace=trace,
                                density=density, method=method, tol=tol,
                                trace_hvps=trace_hvps, slq_probes=slq_probes,
                                slq_steps=slq_steps, dtype=dtype, device=device,
                                mode=hvp_mode, seed=seed)
    data_settings = DataSettings(spec=data, root=None if data_root is None else str(data_root),
                                 download=download, split=split, samples=samples,
                                 batch_size=batch_size)
    target = Store(store)
    target.check_writable()
    # every input is checked before anything is computed or written
    for path in checkpoints:
        load_for_analysis(str(path), model_spec=model, data=data_settings, unsafe=unsafe_load)
    if unsafe_load:
        render.stderr.print("[yellow]warning:[/yellow] --unsafe-load: pickled objects in "
                            "these checkpoints were allowed to run code")
    for n, path in enumerate(checkpoints):
        done = with_progress(
            not quiet and not as_json, path.name,
            lambda progress, path=path: analyse_checkpoint(
                str(path), settings=settings, data=data_settings, model_spec=model,
                unsafe=unsafe_load, store=target, progress=progress),
        )
        figure = None
        if plot is not None:
            from hessdiag.plot import plot_density

            out = plot if len(checkpoints) == 1 else plot.with_name(
                f"{plot.stem}-{n + 1}{plot.suffix or '.png'}")
            figure = plot_density(done.result.density, out,
                                  eigenvalues=done.result.top.eigenvalues,
                                  title=f"{path.name}: Hessian spectral density")
        if as_json:
            render.emit_json({"checkpoint": str(path), "step": done.checkpoint.step,
                              **done.result.to_dict(), "analysis_id": done.analysis_id})
            continue
        step = "" if done.checkpoint.step is None else f", step {done.checkpoint.step}"
        render.stdout.print(render.spectrum_table(
            done.result, f"{path}{step}: {done.checkpoint.model_spec} on "
                         f"{done.data['spec']} ({done.data['split']})"))
        render.stdout.print(f"analysis {done.analysis_id} written to {store}"
                            + (f"; figure {figure}" if figure else ""))


@app.command()
@handles_errors
def train(
    model: str | None = typer.Option(None, "--model", help="Architecture: a name from "
                                     "`hessdiag models` or a factory spec."),
    data: str | None = typer.Option(None, "--data", help="Data set: a name from "
                                    "`hessdiag datasets` or a factory spec."),
    data_root: Path | None = typer.Option(None, "--data-root", help="Folder holding the "
                                          "data set's files."),
    download: bool = typer.Option(False, "--download", help="Download the data if missing."),
    samples: int | None = typer.Option(None, "--samples", help="Train on the first N "
                                       "samples only."),
    optimizer: str = typer.Option("sgd", "--optimizer", help="sgd, sam or eigensam."),
    base: str = typer.Option("sgd", "--base", help="Base optimizer: sgd, adam or adamw."),
    lr: float = typer.Option(0.1, "--lr", help="Peak learning rate."),
    momentum: float = typer.Option(0.9, "--momentum", help="SGD momentum."),
    weight_decay: float = typer.Option(5e-4, "--weight-decay", help="Weight decay."),
    nesterov: bool = typer.Option(False, "--nesterov", help="Nesterov momentum (SGD)."),
    epochs: int = typer.Option(10, "--epochs", help="Epochs."),
    batch_size: int = typer.Option(128, "--batch-size", help="Minibatch size."),
    rho: float = typer.Option(0.05, "--rho", help="SAM / Eigen-SAM perturbation radius."),
    alpha: float = typer.Option(0.2, "--alpha", help="Eigen-SAM: weight of the top "
                                "eigenvector in the perturbation."),
    eig_every: int = typer.Option(100, "--eig-every", help="Eigen-SAM: steps between "
                                  "eigenvector updates (p)."),
    eig_iters: int = typer.Option(5, "--eig-iters", help="Eigen-SAM: power iterations per "
                                  "update (k)."),
    adaptive: bool = typer.Option(False, "--adaptive", help="Adaptive SAM (ASAM)."),
    renormalize: bool = typer.Option(False, "--renormalize", help="Eigen-SAM: rescale the "
                                     "perturbation to length rho."),
    schedule: str = typer.Option("cosine", "--schedule", help="cosine, step or constant."),
    label_smoothing: float = typer.Option(0.0, "--label-smoothing", help="Label smoothing."),
    augment: bool = typer.Option(False, "--augment", help="Random crops (and flips for "
                                 "CIFAR)."),
    seed: int = typer.Option(0, "--seed", help="Seed of initialisation, data order, "
                             "augmentation and estimators."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    checkpoint_every: int | None = typer.Option(None, "--checkpoint-every", help="Write a "
                                                "checkpoint every N steps (and at the end)."),
    sharpness_every: int | None = typer.Option(None, "--sharpness-every", help="Log "
                                               "lambda_max and alignment every N steps."),
    sharpness_samples: int = typer.Option(512, "--sharpness-samples", help="Training "
                                          "samples in the fixed measurement set."),
    run_name: str | None = typer.Option(None, "--run-name", help="Run id (default: "
                                        "generated)."),
    checkpoint_dir: Path = typer.Option(Path("checkpoints"), "--checkpoint-dir",
                                        help="Checkpoints go to DIR/<run>/."),
    init_from: Path | None = typer.Option(None, "--from", help="Fine-tune from this "
                                          "checkpoint."),
    resume: str | None = typer.Option(None, "--resume", help="Continue this run from its "
                                      "last checkpoint."),
    store: Path = typer.Option(Path("hessdiag.h5"), "--store", help="HDF5 store."),
    as_json: bool = typer.Option(False, "--json", help="A JSON summary on stdout."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Train or fine-tune with SGD, SAM or Eigen-SAM; metrics, sharpness and checkpoints
    go to the store."""
    from hessdiag.store import Store
    from hessdiag.train import TrainConfig
    from hessdiag.train import train as run_training

    target = Store(store)
    target.check_writable()
    if resume is None:
        if model is None or data is None:
            raise UsageError("train needs --model and --data (or --resume RUN)")
        cfg = TrainConfig(
            model=model, data=data, data_root=None if data_root is None else str(data_root),
            download=download, samples=samples, optimizer=optimizer, base=base, lr=lr,
            momentum=momentum, weight_decay=weight_decay, nesterov=nesterov, epochs=epochs,
            batch_size=batch_size, rho=rho, alpha=alpha, eig_every=eig_every,
            eig_iters=eig_iters, adaptive=adaptive, renormalize=renormalize,
            schedule=schedule, label_smoothing=label_smoothing, augment=augment, seed=seed,
            device=device, checkpoint_every=checkpoint_every, sharpness_every=sharpness_every,
            sharpness_samples=sharpness_samples, run_name=run_name,
            checkpoint_dir=str(checkpoint_dir),
            init_from=None if init_from is None else str(init_from))
        cfg.validate()
    else:
        cfg = None
    show_bar = not quiet and not as_json and render.stderr.is_terminal
    if show_bar:
        bar = Progress(TextColumn("{task.description}"), BarColumn(),
                       TextColumn("step {task.completed}/{task.total}"),
                       TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                       console=render.stderr, transient=True)
        with bar:
            task = bar.add_task("train", total=None, info="")

            def report(event: dict) -> None:
                lam = event.get("lambda_max")
                info = (f"epoch {event['epoch']} loss {event['loss']:.4f} "
                        f"acc {event['acc']:.3f}" + ("" if lam is None
                                                     else f" λ_max {lam:.4g}"))
                bar.update(task, completed=event["step"], total=event["total"], info=info)

            result = run_training(cfg, store=target, resume=resume, progress=report)
    else:
        result = run_training(cfg, store=target, resume=resume)
    from dataclasses import asdict

    if as_json:
        render.emit_json(asdict(result))
    else:
        render.stdout.print(render.train_summary(result, store))
    if result.status != "finished":
        render.stderr.print(f"[bold red]error:[/bold red] {result.message}")
        raise typer.Exit(EXIT_CHECK_FAILED)


@app.command()
@handles_errors
def align(
    targets: list[Path] = typer.Argument(..., help="Checkpoints, or directories of "
                                         "checkpoints (a run's series, in step order)."),
    perturbation: str = typer.Option("sam", "--perturbation", help="sam, asam or eigensam."),
    rho: float = typer.Option(0.05, "--rho", help="Perturbation radius."),
    alpha: float = typer.Option(0.2, "--alpha", help="Eigen-SAM's eigenvector weight."),
    batches: int = typer.Option(20, "--batches", help="Minibatches to average over (B)."),
    batch_size: int = typer.Option(128, "--batch-size", help="Samples per minibatch."),
    top_k: int = typer.Option(1, "--top-k", help="Also the share of the perturbation in "
                              "the top-K eigenspace (K > 1)."),
    samples: int = typer.Option(512, "--samples", help="Training samples in the fixed "
                                "measurement set of the Hessian."),
    model: str | None = typer.Option(None, "--model", help="Architecture (default: the "
                                     "checkpoint's)."),
    data: str | None = typer.Option(None, "--data", help="Data (default: the checkpoint's)."),
    data_root: Path | None = typer.Option(None, "--data-root", help="Data files' folder."),
    seed: int = typer.Option(0, "--seed", help="Seed of the minibatch draw and Lanczos."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    follow: bool = typer.Option(False, "--follow", help="Watch the directory while "
                                "`hessdiag train` writes it; stop after its final checkpoint."),
    poll: float = typer.Option(1.0, "--poll", help="--follow: seconds between looks."),
    timeout: float | None = typer.Option(None, "--timeout", help="--follow: give up after "
                                         "this many seconds without a new checkpoint."),
    store: Path = typer.Option(Path("hessdiag.h5"), "--store", help="HDF5 store."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per checkpoint."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Alignment |cos(e, v)| between SAM-type perturbations e and the top Hessian
    eigenvector v, with 95% confidence intervals, at each checkpoint."""
    import time

    from hessdiag.align import RULES, AlignSettings, align_checkpoint
    from hessdiag.checkpoints import checkpoint_files
    from hessdiag.spectrum import DataSettings, resolve_device
    from hessdiag.store import Store

    if perturbation not in RULES:
        raise UsageError(f"--perturbation must be one of {', '.join(RULES)}; got "
                         f"{perturbation!r}")
    for name, value, low in (("--batches", batches, 2), ("--batch-size", batch_size, 1),
                             ("--top-k", top_k, 1), ("--samples", samples, 1)):
        if value < low:
            raise UsageError(f"{name} must be at least {low}; got {value}")
    if not rho > 0:
        raise UsageError(f"--rho must be positive; got {rho}")
    if follow and (len(targets) != 1 or not targets[0].is_dir()):
        raise UsageError("--follow watches one directory (a run's checkpoint folder)")
    resolve_device(device)
    target_store = Store(store)
    target_store.check_writable()
    settings = AlignSettings(rule=perturbation, rho=rho, alpha=alpha, batches=batches,
                             batch_size=batch_size, top_k=top_k, samples=samples, seed=seed,
                             device=device)
    data_settings = DataSettings(spec=data, root=None if data_root is None else str(data_root))

    def files() -> list[Path]:
        out: list[Path] = []
        for t in targets:
            if t.is_dir():
                found, skipped = checkpoint_files(t)
                for s in skipped:
                    if str(s) not in noted:
                        noted.add(str(s))
                        render.stderr.print(f"note: skipping {s} (not a .pt checkpoint)")
                out += found
            elif not t.exists():
                raise UsageError(f"{t} does not exist")
            else:
                out.append(t)
        return out

    def measure(path: Path) -> bool:
        done = with_progress(not quiet and not as_json, path.name,
                             lambda progress: align_checkpoint(
                                 str(path), settings=settings, data=data_settings,
                                 model_spec=model, store=target_store, progress=progress))
        r = done.result
        if as_json:
            render.emit_json({"checkpoint": str(path), "step": done.checkpoint.step,
                              "alignment": r.alignment, "alignment_signed": r.alignment_signed,
                              "ci95": list(r.ci95), "batches": r.batches,
                              "lambda_max": r.lambda_max, "analysis_id": done.analysis_id,
                              **{k: v for k, v in r.to_dict().items()
                                 if k not in ("alignment", "alignment_signed", "ci95",
                                              "batches", "lambda_max")}})
        else:
            render.stdout.print(render.alignment_line(path, done))
        return done.final

    noted: set[str] = set()
    if not follow:
        paths = files()
        if not paths:
            raise UsageError(f"no checkpoints (*.pt) in {', '.join(map(str, targets))}")
        for path in paths:
            measure(path)
        return
    seen: set[str] = set()
    last_new = time.monotonic()
    try:
        while True:
            new = [p for p in files() if str(p) not in seen]
            for path in new:
                seen.add(str(path))
                last_new = time.monotonic()
                if measure(path):
                    render.stderr.print(f"measured the run's final checkpoint {path}: done")
                    return
            if timeout is not None and time.monotonic() - last_new > timeout:
                render.stderr.print(f"no new checkpoint for {timeout:g} s: stopping")
                return
            time.sleep(poll)
    except KeyboardInterrupt:
        render.stderr.print(f"stopped; {len(seen)} checkpoints measured")


@app.command()
@handles_errors
def show(
    store: Path = typer.Argument(Path("hessdiag.h5"), help="The store to read."),
    analysis_id: str | None = typer.Argument(None, help="Show one analysis in full."),
    as_json: bool = typer.Option(False, "--json", help="The same as JSON."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """The runs and analyses in a store, or one analysis in full."""
    from hessdiag.store import Store
    from hessdiag.store.tables import analysis_row, eigenvalue_rows, run_row

    source = Store(store)
    if not store.exists():
        raise UsageError(f"store {store} does not exist (run `hessdiag spectrum` first, or "
                         "give the path of a store)")
    if analysis_id is not None:
        record = source.analysis(analysis_id)
        row, eig = analysis_row(record), eigenvalue_rows(record)
        if as_json:
            render.emit_json({**row, "eigenvalues": eig, "attrs": record.attrs})
            return
        render.stdout.print(render.analysis_detail(row, eig, record))
        return
    records = source.analyses()
    rows = [analysis_row(r) for r in records]
    runs = [run_row(r) for r in source.runs()]
    if as_json:
        render.emit_json({"store": str(store), **source.info(), "runs": runs,
                          "analyses": rows})
        return
    if runs:
        render.stdout.print(render.runs_table(runs, f"{store}: {len(runs)} runs"))
    render.stdout.print(render.analyses_table(rows, f"{store}: {len(rows)} analyses"))
    for record in records:
        if "slq/density" in record.arrays:
            render.stdout.print(render.density_sketch(record))


@app.command()
@handles_errors
def export(
    store: Path = typer.Argument(..., help="The store to export."),
    fmt: str = typer.Option("csv", "--format", help="csv or json."),
    out: Path | None = typer.Option(None, "--out", help="csv: a directory for "
                                    "analyses.csv, eigenvalues.csv and slq_nodes.csv "
                                    "(default: analyses.csv on stdout); json: a file "
                                    "(default: stdout)."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Flat tables of everything in a store, for pandas and spreadsheets."""
    from hessdiag.store import Store
    from hessdiag.store.tables import flat_tables

    if fmt not in ("csv", "json"):
        raise UsageError(f"--format must be csv or json; got {fmt!r}")
    if not store.exists():
        raise UsageError(f"store {store} does not exist")
    tables = flat_tables(Store(store))
    if fmt == "json":
        text = json.dumps(tables, default=render.json_default, indent=1) + "\n"
        if out is None:
            sys.stdout.write(text)
        else:
            out.write_text(text)
        return
    if out is None:
        render.write_csv(sys.stdout, tables["analyses"])
        return
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in tables.items():
        with open(out / f"{name}.csv", "w", newline="") as fh:
            render.write_csv(fh, rows)
    render.stderr.print(f"wrote {', '.join(f'{out / n}.csv' for n in tables)}")


@app.command()
@handles_errors
def models(
    as_json: bool = typer.Option(False, "--json", help="As JSON."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """The model registry: names usable as --model (plus package.module:factory and
    path/to/file.py:factory)."""
    from dataclasses import asdict

    from hessdiag.models import list_models

    rows = [asdict(m) for m in list_models()]
    if as_json:
        render.emit_json(rows)
        return
    render.stdout.print(render.rows_table(rows, "models"))


@app.command()
@handles_errors
def datasets(
    as_json: bool = typer.Option(False, "--json", help="As JSON."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """The data registry: names usable as --data (plus imagefolder:PATH and factory specs)."""
    from dataclasses import asdict

    from hessdiag.data import list_datasets

    rows = [asdict(d) for d in list_datasets()]
    if as_json:
        render.emit_json(rows)
        return
    render.stdout.print(render.rows_table(rows, "data sets"))


def main() -> None:
    try:
        app()
    except SystemExit as exc:
        sys.exit(exc.code)
