"""The ``hessdiag`` command: one function per command; options map onto the library's
settings (:mod:`hessdiag.settings`, whose defaults they show), and the library's errors
become one line and exit code 2.

Exit codes: 0 success; 1 a check failed (a diverged training run); 2 bad input (or a
check's measurement that did not converge within its budget); 3 an internal error (a
bug: the one line points to ``--debug`` for the traceback).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from hessdiag.cli import render
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from hessdiag import __version__
from hessdiag._errors import InputError, first_line
from hessdiag.settings import (
    ASCENT_MAX_STEPS,
    ASCENT_METHODS,
    ASCENT_TOL,
    BASES,
    BATCH_VECTORS,
    CHECK_MAX_HVPS,
    CURVATURES,
    DTYPES,
    FISHER_KINDS,
    HVP_MODES,
    METHODS,
    OPTIMIZERS,
    RULES,
    SCHEDULES,
    SHARPNESS_MEASURES,
    SPLITS,
    STARTS,
    TRACE_METHODS,
    AlignSettings,
    DataSettings,
    LandscapeSettings,
    SpectrumSettings,
    TrainConfig,
)

EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3

SPECTRUM, ALIGN, DATA = SpectrumSettings(), AlignSettings(), DataSettings()
LANDSCAPE = LandscapeSettings()
TRAIN = TrainConfig(model="", data="")

# library parameter -> the option that sets it, where the names differ
FLAGS = {"root": "--data-root", "model_spec": "--model", "unsafe": "--unsafe-load",
         "rule": "--perturbation", "init_from": "--from", "data": "--data",
         "method": "--method", "x_range": "--range", "y_range": "--range",
         "y_resolution": "--resolution"}


MATRIX_NAMES = {"hessian": "Hessian", "ggn": "Gauss-Newton", "fisher": "Fisher"}

# options shared by several commands (one declaration each)
MODEL_OPTION = typer.Option(None, "--model", help="Architecture: a name from `hessdiag "
                            "models`, package.module:factory or file.py:factory (analyses: "
                            "default the checkpoint's; needed for plain state_dict files).")
DATA_OPTION = typer.Option(None, "--data", help="Data: a name from `hessdiag datasets`, "
                           "imagefolder:PATH, or a factory spec (analyses: default the "
                           "checkpoint's).")
LOSS_OPTION = typer.Option(None, "--loss", help="cross-entropy, nll, bce, mse, "
                           "package.module:factory or file.py:factory (default: the "
                           "checkpoint's, else the data's, else cross-entropy).")
MODEL_OUTPUT_OPTION = typer.Option(None, "--model-output", metavar="KEY", help="Which of the "
                                   "model's outputs the loss takes: a key of a dict or "
                                   "ModelOutput, or a tuple index (default: logits, else the "
                                   "first tensor; train records it in its checkpoints).")
DATA_ROOT_OPTION = typer.Option(None, "--data-root", help="Folder holding the data set's "
                                "files.")
STORE_OPTION = typer.Option(Path("hessdiag.h5"), "--store", help="HDF5 store to append to.")
JSON_OPTION = typer.Option(False, "--json", help="JSON on stdout (one object per result), "
                           "nothing else.")
QUIET_OPTION = typer.Option(False, "--quiet", help="No progress bar.")
DEBUG_OPTION = typer.Option(False, "--debug", help="Show tracebacks.")
UNSAFE_OPTION = typer.Option(False, "--unsafe-load", help="Trust the files' code: unpickle "
                             "checkpoints that hold pickled Python objects, and import the "
                             "factory specs (module:factory, file.py:factory) a checkpoint "
                             "or baseline records. Both run code: only for files you trust; "
                             "naming a spec with --model/--data/--loss runs only that one.")
NONFINITE_OPTION = typer.Option(False, "--allow-nonfinite", help="Measure a checkpoint whose "
                                "weights hold NaN or inf (refused by default).")


# settings of a spectrum measurement, shared by spectrum and baseline
SAMPLES_OPTION = typer.Option(DATA.samples, "--samples", help="Use the first N samples in "
                              "dataset order (default: all).")
BATCH_SIZE_OPTION = typer.Option(DATA.batch_size, "--batch-size", help="Samples per batch; "
                                 "the Hessian is of the mean loss over all samples either way.")
TOP_K_OPTION = typer.Option(SPECTRUM.top_k, "--top-k", help="Top eigenvalues to compute.")
TRACE_HVPS_OPTION = typer.Option(SPECTRUM.trace_hvps, "--trace-hvps", help="Products for the "
                                 "trace (and for each layer's).")
TOL_OPTION = typer.Option(SPECTRUM.tol, "--tol", help="Relative residual ||Hu - θu|| / |θ| at "
                          "which an eigenpair counts as converged (default: 1e-3 in float32, "
                          "1e-6 in float64).")
HVP_MODE_OPTION = typer.Option(SPECTRUM.hvp_mode, "--hvp-mode", help=", ".join(HVP_MODES) + ".")
DTYPE_OPTION = typer.Option(SPECTRUM.dtype, "--dtype", help=", ".join(DTYPES) + ".")
DEVICE_OPTION = typer.Option(SPECTRUM.device, "--device", help="auto, cpu, cuda, cuda:N or mps.")
SEED_OPTION = typer.Option(SPECTRUM.seed, "--seed", help="Seed of every random start and probe.")
CURVATURE_OPTION = typer.Option(SPECTRUM.curvature, "--curvature", help=", ".join(CURVATURES)
                                + ": the matrix analysed, the Hessian, the generalised "
                                "Gauss-Newton matrix J^T H_out J or the Fisher (see "
                                "--fisher-kind); ggn and fisher are positive semi-definite.")
FISHER_KIND_OPTION = typer.Option(SPECTRUM.fisher_kind, "--fisher-kind",
                                  help=", ".join(FISHER_KINDS) + ": with --curvature "
                                  "fisher, targets sampled from the model (mc, seeded by "
                                  "--seed) or the data's (empirical). Needs cross-entropy, "
                                  "nll, bce or mse.")
FISHER_SAMPLES_OPTION = typer.Option(SPECTRUM.fisher_samples, "--fisher-samples",
                                     help="--fisher-kind mc: sampled targets per term.")

# ------------------------------------------------------------------------- help layout
# Every option of every command sits in a named help panel: the panel of its long name,
# unless the command files it elsewhere. One table, so that an option is in the same place
# in every command; tests/test_help.py fails on an option no panel names.
DATA_PANEL = "Model, data and loss"
COMPUTE_PANEL = "What to compute"
SOLVER_PANEL = "Solver"
RESOURCES_PANEL = "Precision, device and memory"
OUTPUT_PANEL = "Output"
TRUST_PANEL = "Trust and loading"
OPTIMIZER_PANEL = "Optimizer"
RUN_PANEL = "Training run"
LIMITS_PANEL = "Baseline and limits"
FOLLOW_PANEL = "Watching a directory (--follow)"

_PANEL_OPTIONS = {
    DATA_PANEL: ("--model", "--data", "--loss", "--model-output", "--model-kwargs",
                 "--data-root", "--download",
                 "--split", "--samples", "--batch-size"),
    COMPUTE_PANEL: ("--top-k", "--lambda-min", "--trace", "--trace-method", "--trace-hvps",
                    "--density", "--slq-probes", "--slq-steps", "--params", "--per-layer",
                    "--curvature", "--fisher-kind", "--fisher-samples", "--preconditioner",
                    "--metric", "--measure", "--rho", "--perturbation", "--alpha",
                    "--batches", "--dims", "--directions", "--range", "--resolution",
                    "--filter-norm", "--bias", "--what", "--runs", "--analysis", "--sigma",
                    "--title", "--format"),
    SOLVER_PANEL: ("--method", "--tol", "--max-hvps", "--start", "--seed", "--max-steps",
                   "--ascent"),
    RESOURCES_PANEL: ("--hvp-mode", "--memory-budget", "--basis-device", "--compile",
                      "--batch-vectors", "--dtype", "--device"),
    OUTPUT_PANEL: ("--store", "--json", "--quiet", "--plot", "--output", "--resume", "--junit",
                   "--out", "--force", "--salvage", "--debug", "--help", "--version",
                   "--install-completion", "--show-completion"),
    TRUST_PANEL: ("--unsafe-load", "--allow-nonfinite"),
    FOLLOW_PANEL: ("--follow", "--poll", "--timeout"),
}
PANELS = {option: panel for panel, options in _PANEL_OPTIONS.items() for option in options}
# where a command files an option elsewhere
COMMAND_PANELS = {
    "train": {**dict.fromkeys(("--optimizer", "--base", "--lr", "--momentum", "--weight-decay",
                               "--nesterov", "--epochs", "--rho", "--alpha", "--eig-every",
                               "--eig-iters", "--adaptive", "--renormalize", "--schedule",
                               "--label-smoothing", "--augment", "--sync-perturbation"),
                              OPTIMIZER_PANEL),
              **dict.fromkeys(("--checkpoint-every", "--sharpness-every",
                               "--sharpness-samples", "--run-name", "--checkpoint-dir", "--from",
                               "--resume"), RUN_PANEL)},
    "check": dict.fromkeys(("--baseline", "--rtol", "--max-lambda", "--max-trace", "--max-ratio",
                            "--max-drop"), LIMITS_PANEL),
}


def panel_of(command: str | None, option: str) -> str | None:
    """The help panel of a command's option (``None``: not filed, Typer's "Options")."""
    return COMMAND_PANELS.get(command or "", {}).get(option) or PANELS.get(option)


# the order of the panels in every command's help
PANEL_ORDER = (LIMITS_PANEL, DATA_PANEL, COMPUTE_PANEL, OPTIMIZER_PANEL, RUN_PANEL, SOLVER_PANEL,
               RESOURCES_PANEL, FOLLOW_PANEL, TRUST_PANEL, OUTPUT_PANEL)


def _laid_out(command: Any, params: list) -> list:
    """``params`` filed into their help panels (arguments first, then the options panel by
    panel in :data:`PANEL_ORDER`), flags shown as flags.

    Typer 0.29 shows every option's type beside it, ``<bool>`` for a flag too
    (``TyperOption.display_type_rich`` does not look at ``is_flag``); a flag takes no value,
    so its type column is left empty (an empty metavar)."""
    for param in params:
        if not isinstance(param, typer.core.TyperOption):
            continue
        if param.is_flag and param.metavar is None:
            param.metavar = ""
        if getattr(param, "rich_help_panel", None) is None:
            long = [o for o in param.opts if o.startswith("--")] or list(param.opts)
            param.rich_help_panel = panel_of(command.name, long[0])

    def rank(param: Any) -> int:
        if not isinstance(param, typer.core.TyperOption):
            return -1  # arguments keep their order, before the options
        panel = param.rich_help_panel
        return PANEL_ORDER.index(panel) if panel in PANEL_ORDER else len(PANEL_ORDER)

    return sorted(params, key=rank)


class Command(typer.core.TyperCommand):
    """A command whose help files its options into panels and shows flags as flags."""

    def get_params(self, ctx: Any) -> list:
        return _laid_out(self, super().get_params(ctx))


class Group(typer.core.TyperGroup):
    """The ``hessdiag`` group, laid out as its commands are."""

    def get_params(self, ctx: Any) -> list:
        return _laid_out(self, super().get_params(ctx))


app = typer.Typer(
    cls=Group,
    name="hessdiag",
    help="How sharp is your network? Hessian spectra of PyTorch models, and flatter training.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)


def flag(param: str) -> str:
    """The option of a library parameter: ``batch_size`` -> ``--batch-size``."""
    return FLAGS.get(param, "--" + param.replace("_", "-"))


def translate(exc: BaseException) -> str:
    """An error's first line, with the library parameters it names as options."""
    return translate_text(first_line(exc, 2000), getattr(exc, "param", None))


def translate_text(message: str, params: str | tuple[str, ...] | None) -> str:
    """``message`` with the library parameters ``params`` written as options."""
    for param in ([params] if isinstance(params, str) else list(params or [])):
        option = flag(param)
        message = re.sub(rf"(?<![\w-]){re.escape(param)}=True(?![\w-])", option, message)
        message = re.sub(rf"^{re.escape(param)}(?= )", option, message)
        message = re.sub(rf"\b(pass|give|use|needs|another|set|as|with) {re.escape(param)}"
                         rf"(?![\w-])", rf"\1 {option}", message)
        if "_" in param:  # an identifier no sentence uses as a word: replace it anywhere
            message = re.sub(rf"(?<![\w-]){re.escape(param)}(?![\w-])", option, message)
    return message


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
    """Bad input: one clear line on stderr and exit code 2. Anything else is a bug: one
    line saying so and exit code 3. ``--debug`` shows the traceback instead."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = bool(kwargs.get("debug"))
        try:
            _require_utf8(kwargs)
            with _trusted_code_warnings():
                return func(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            render.stderr.print(f"{_rank_prefix()}interrupted")
            raise typer.Exit(130) from None
        except SystemExit as exc:  # user code (a factory, a loss) called sys.exit
            if debug:
                raise
            render.stderr.print(f"{_rank_prefix()}[bold red]stopped:[/bold red] code run for "
                                f"this command (a model, data or loss factory) raised "
                                f"SystemExit({render.escape(repr(exc.code))}) before it "
                                "finished: nothing was decided (rerun with --debug for the "
                                "traceback)", soft_wrap=True)
            raise typer.Exit(EXIT_INTERNAL) from None
        except (ValueError, OSError) as exc:  # InputError and every error about the input
            if debug:
                raise
            render.stderr.print(f"{_rank_prefix()}[bold red]error:[/bold red] "
                                f"{render.escape(translate(exc))}", soft_wrap=True)
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except Exception as exc:
            if debug:
                raise
            peer = _peer_failure(exc)
            if peer is not None:  # another process of a distributed job failed first
                render.stderr.print(f"{_rank_prefix()}stopped: {render.escape(peer)}",
                                    soft_wrap=True)
                raise typer.Exit(EXIT_INTERNAL) from None
            render.stderr.print(f"{_rank_prefix()}[bold red]internal error:[/bold red] "
                                f"{type(exc).__name__}: {render.escape(first_line(exc))} (a "
                                "bug in hessdiag: rerun with --debug for the traceback, and "
                                "report it)", soft_wrap=True)
            raise typer.Exit(EXIT_INTERNAL) from None

    return wrapper


def _require_utf8(kwargs: dict[str, Any]) -> None:
    """Every path and text argument must be UTF-8 (an undecodable file name reaches Python
    as surrogates, which fail only when printed or stored, after the work is done)."""
    for name, value in kwargs.items():
        for item in value if isinstance(value, list | tuple) else [value]:
            if not isinstance(item, str | Path):
                continue
            try:
                str(item).encode("utf-8")
            except UnicodeEncodeError:
                shown = os.fsencode(str(item)).decode("ascii", "backslashreplace")
                raise InputError(f"{name.replace('_', '-')} {shown} is not valid UTF-8: hessdiag "
                                 "records every path in its results and store as text; "
                                 "rename the file or folder") from None


@contextlib.contextmanager
def _trusted_code_warnings() -> Any:
    """Code a file names runs only when trusted; say so on stderr, before it runs."""
    import warnings

    from hessdiag.specs import TrustedCodeWarning

    with warnings.catch_warnings():
        warnings.simplefilter("always", TrustedCodeWarning)
        shown = warnings.showwarning

        def show(message: Any, category: type, *args: Any, **kwargs: Any) -> None:
            if issubclass(category, TrustedCodeWarning):
                render.stderr.print(f"{_rank_prefix()}[yellow]warning:[/yellow] "
                                    f"{render.escape(translate_text(str(message), 'unsafe'))}",
                                    soft_wrap=True)
            else:
                shown(message, category, *args, **kwargs)

        warnings.showwarning = show
        yield


def _rank_prefix() -> str:
    """``rank R: `` in a job of several processes (``torchrun``), else nothing."""
    from hessdiag.distributed import launched

    try:
        env = launched()
    except ValueError:
        return ""
    return "" if env is None else f"rank {env.rank}: "


def _peer_failure(exc: BaseException) -> str | None:
    """What to say when ``exc`` only reports that another process of the job failed."""
    from hessdiag.distributed import PeerFailed

    if isinstance(exc, PeerFailed):
        return first_line(exc)
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):
        return f"lost contact with another process of the job ({first_line(exc, 160)})"
    return None


def _join(device: str = "auto") -> None:
    """Join the other processes when launched by ``torchrun`` (nothing otherwise)."""
    from hessdiag.distributed import init

    init(device)


def with_progress(enabled: bool, label: str, job: Callable[[Any], Any]) -> Any:
    """Run ``job(progress)`` with a rich progress bar on stderr counting HVPs, or with
    ``progress=None`` when output is not a terminal, the bar is disabled or this is not
    rank 0 of a distributed job."""
    if not enabled or not render.stderr.is_terminal or _rank_prefix() not in ("", "rank 0: "):
        return job(None)
    bar = Progress(TextColumn(label), BarColumn(), TextColumn("{task.completed} HVPs"),
                   TimeElapsedColumn(), console=render.stderr, transient=True)
    with bar:
        task = bar.add_task("hvps", total=None)
        return job(lambda done, total: bar.advance(task))


def with_points_progress(enabled: bool, label: str, job: Callable[[Any], Any]) -> Any:
    """Run ``job(progress)`` with a progress bar of grid points and its ETA on stderr (or
    with ``progress=None`` off a terminal, and on ranks other than 0)."""
    if not enabled or not render.stderr.is_terminal or _rank_prefix() not in ("", "rank 0: "):
        return job(None)
    bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("points"),
                   TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                   console=render.stderr, transient=True)
    with bar:
        task = bar.add_task("points", total=None)
        return job(lambda done, total: bar.update(task, completed=done, total=total))


def _choices(values: tuple[str, ...]) -> str:
    return ", ".join(values)


def _json_kwargs(text: str | None) -> dict[str, Any]:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"model_kwargs is not JSON ({exc.msg}): give an object such as "
                         "'{\"hidden\": 64}'", param="model_kwargs") from exc
    if not isinstance(value, dict):
        raise InputError("model_kwargs must be a JSON object such as '{\"hidden\": 64}'",
                         param="model_kwargs")
    return value


@app.command(cls=Command, short_help=(
    "Top eigenvalues, trace and spectral density of the loss Hessian."))
@handles_errors
def spectrum(
    checkpoints: list[Path] = typer.Argument(..., help="Checkpoint files (several: a run's "
                                             "series, analysed in the order given)."),
    model: str | None = MODEL_OPTION,
    data: str | None = DATA_OPTION,
    loss: str | None = LOSS_OPTION,
    model_output: str | None = MODEL_OUTPUT_OPTION,
    data_root: Path | None = DATA_ROOT_OPTION,
    download: bool = typer.Option(DATA.download, "--download", help="Download the data set "
                                  "into --data-root if it is missing."),
    split: str = typer.Option(DATA.split, "--split", help=_choices(SPLITS) + "."),
    samples: int | None = SAMPLES_OPTION,
    batch_size: int = BATCH_SIZE_OPTION,
    top_k: int = TOP_K_OPTION,
    lambda_min: bool = typer.Option(SPECTRUM.lambda_min, "--lambda-min", help="Also the most "
                                    "negative eigenvalue and lambda_max/|lambda_min|."),
    trace: bool = typer.Option(SPECTRUM.trace, "--trace", help="Also the trace."),
    trace_method: str = typer.Option(SPECTRUM.trace_method, "--trace-method",
                                     help=_choices(TRACE_METHODS) + "."),
    trace_hvps: int = TRACE_HVPS_OPTION,
    density: bool = typer.Option(SPECTRUM.density, "--density", help="Also the spectral "
                                 "density (SLQ)."),
    slq_probes: int = typer.Option(SPECTRUM.slq_probes, "--slq-probes", help="SLQ probe "
                                   "vectors."),
    slq_steps: int = typer.Option(SPECTRUM.slq_steps, "--slq-steps", help="Lanczos steps per "
                                  "probe."),
    params: str | None = typer.Option(SPECTRUM.params, "--params", help="Only the parameters "
                                      "a pattern selects: glob, regular expression or module "
                                      "prefix (e.g. 'encoder.*', 'fc1')."),
    per_layer: bool = typer.Option(SPECTRUM.per_layer, "--per-layer", help="Also lambda_max "
                                   "and trace of each parameterised module's diagonal "
                                   "Hessian block (and the whole trace)."),
    method: str = typer.Option(SPECTRUM.method, "--method", help=_choices(METHODS) + " (power "
                               "iteration with deflation) for the top eigenvalues."),
    tol: float | None = TOL_OPTION,
    hvp_mode: str = HVP_MODE_OPTION,
    memory_budget: float | None = typer.Option(SPECTRUM.memory_budget, "--memory-budget",
                                               help="GiB the gradient graphs kept by "
                                               "--hvp-mode auto may use (default: a quarter "
                                               "of the available memory, half of a GPU's "
                                               "free memory)."),
    basis_device: str | None = typer.Option(SPECTRUM.basis_device, "--basis-device",
                                            help="Where Lanczos keeps its basis and its "
                                            "products (default: the --device); cpu keeps "
                                            "them in host memory for a large model on a "
                                            "GPU."),
    compile: bool = typer.Option(SPECTRUM.compile, "--compile", help="Compute "
                                 "forward-over-reverse products through torch.compile "
                                 "(compiling takes tens of seconds first; needs --hvp-mode "
                                 "auto or forward-over-reverse)."),
    batch_vectors: str = typer.Option(SPECTRUM.batch_vectors, "--batch-vectors",
                                      help=_choices(BATCH_VECTORS) + ": several "
                                      "Hessian-vector products in one pass per batch "
                                      "(batched, checked once against the loop), one at a "
                                      "time (loop), or auto: batched on CUDA where the "
                                      "first block is faster, the loop elsewhere."),
    start: str = typer.Option(SPECTRUM.start, "--start", help=_choices(STARTS) + ": the top "
                              "eigenvalues' starting vector: Gaussian (random, and auto), or "
                              "the loss gradient plus a Gaussian (gradient: sometimes fewer "
                              "products on small networks, more on a ResNet-18; a top-1 "
                              "from it runs the multiplicity check)."),
    preconditioner: str = typer.Option(SPECTRUM.preconditioner, "--preconditioner",
                                       help="none, or adam: the spectrum of P^-1/2 H P^-1/2 "
                                       "with Adam's second moments from the checkpoint's "
                                       "optimizer state (preconditioned sharpness; its "
                                       "stability threshold is (2+2 beta1)/((1-beta1) lr))."),
    curvature: str = CURVATURE_OPTION,
    fisher_kind: str = FISHER_KIND_OPTION,
    fisher_samples: int = FISHER_SAMPLES_OPTION,
    dtype: str = DTYPE_OPTION,
    device: str = DEVICE_OPTION,
    seed: int = SEED_OPTION,
    store: Path = STORE_OPTION,
    plot: Path | None = typer.Option(None, "--plot", help="Write the density figure here "
                                     "(PNG; needs --density; with several checkpoints, "
                                     "one file each, numbered)."),
    unsafe_load: bool = UNSAFE_OPTION,
    allow_nonfinite: bool = NONFINITE_OPTION,
    as_json: bool = JSON_OPTION,
    quiet: bool = QUIET_OPTION,
    debug: bool = DEBUG_OPTION,
) -> None:
    """Top eigenvalues (with residuals), lambda_min, trace, spectral density and per-layer
    sharpness of the training-loss Hessian at each checkpoint, for any model, data and
    loss; each analysis is appended to the store."""
    from hessdiag.spectrum import analyse_checkpoint, check_settings
    from hessdiag.store import Store
    from hessdiag.task import load_task

    _join(device)
    if plot is not None and not density:
        raise InputError("--plot draws the spectral density: add --density")
    settings = SpectrumSettings(top_k=top_k, lambda_min=lambda_min, trace=trace,
                                trace_method=trace_method, density=density, method=method,
                                tol=tol, trace_hvps=trace_hvps, slq_probes=slq_probes,
                                slq_steps=slq_steps, params=params, per_layer=per_layer,
                                dtype=dtype, device=device, hvp_mode=hvp_mode,
                                memory_budget=memory_budget, seed=seed,
                                basis_device=basis_device, compile=compile,
                                batch_vectors=batch_vectors, start=start,
                                preconditioner=preconditioner, curvature=curvature,
                                fisher_kind=fisher_kind, fisher_samples=fisher_samples)
    data_settings = DataSettings(spec=data, root=None if data_root is None else str(data_root),
                                 download=download, split=split, samples=samples,
                                 batch_size=batch_size)
    target = Store(store)
    target.check_writable()
    # every input is checked before anything is computed or written
    for path in checkpoints:
        check_settings(load_task(str(path), data=data_settings, model_spec=model, loss=loss,
                                     output=model_output,
                                 unsafe=unsafe_load, allow_nonfinite=allow_nonfinite),
                       settings)
    for n, path in enumerate(checkpoints):
        done = with_progress(
            not quiet and not as_json, path.name,
            lambda progress, path=path: analyse_checkpoint(
                str(path), settings=settings, data=data_settings, model_spec=model, loss=loss,
                output=model_output,
                unsafe=unsafe_load, allow_nonfinite=allow_nonfinite, store=target,
                progress=progress),
        )
        figure = None
        if plot is not None:
            from hessdiag.plot import plot_density

            out = plot if len(checkpoints) == 1 else plot.with_name(
                f"{plot.stem}-{n + 1}{plot.suffix or '.png'}")
            figure = plot_density(done.result.density, out,
                                  eigenvalues=done.result.top.eigenvalues,
                                  title=f"{path.name}: {MATRIX_NAMES[curvature]} spectral "
                                  "density")
        ck = done.task.checkpoint
        if as_json:
            render.emit_json({"checkpoint": str(path), "step": ck.step,
                              **done.result.to_dict(), "loss": done.task.loss.spec,
                              "analysis_id": done.analysis_id})
            continue
        step = "" if ck.step is None else f", step {ck.step}"
        render.stdout.print(render.spectrum_table(
            done.result, f"{path}{step}: {done.task.model_spec} on {done.task.data.name} "
                         f"({done.task.data.split}), loss {done.task.loss.spec}"))
        if done.result.layers:
            render.stdout.print(render.layers_table(
                [layer.to_dict() for layer in done.result.layers], done.result))
        render.stdout.print(f"analysis {done.analysis_id} written to {store}"
                            + (f"; figure {figure}" if figure else ""))


@app.command(cls=Command, short_help=(
    "Critical, worst-case (SAM) and adaptive sharpness of checkpoints."))
@handles_errors
def sharpness(
    checkpoints: list[Path] = typer.Argument(..., help="Checkpoint files."),
    measure: str = typer.Option("critical", "--measure", help=_choices(SHARPNESS_MEASURES)
                                + ": critical = 2/lr_c by a line search along the gradient "
                                "(forward passes only); worst-case = max loss rise within "
                                "||delta|| <= rho; adaptive = the same in the ball scaled by "
                                "|theta| on every parameter (Andriushchenko et al. 2023); "
                                "adaptive-asam = ASAM's |w| + 0.01 on weights only."),
    rho: float = typer.Option(0.05, "--rho", help="worst-case, adaptive: the radius."),
    tol: float = typer.Option(ASCENT_TOL, "--tol", help="worst-case, adaptive: the ascent "
                              "stops when the value changes by less than this (relative)."),
    max_steps: int = typer.Option(ASCENT_MAX_STEPS, "--max-steps", "--steps",
                                  help="worst-case, adaptive: the ascent's step budget; a "
                                  "value that has not converged within it is flagged."),
    method: str = typer.Option("krylov", "--ascent", help="worst-case, adaptive: krylov "
                               "(trust-region steps in a Krylov subspace, on the true loss) "
                               "or gradient (projected gradient ascent)."),
    model: str | None = MODEL_OPTION,
    data: str | None = DATA_OPTION,
    loss: str | None = LOSS_OPTION,
    model_output: str | None = MODEL_OUTPUT_OPTION,
    data_root: Path | None = DATA_ROOT_OPTION,
    split: str = typer.Option(DATA.split, "--split", help=_choices(SPLITS) + "."),
    samples: int | None = SAMPLES_OPTION,
    batch_size: int = BATCH_SIZE_OPTION,
    dtype: str = DTYPE_OPTION,
    device: str = DEVICE_OPTION,
    store: Path = STORE_OPTION,
    unsafe_load: bool = UNSAFE_OPTION,
    allow_nonfinite: bool = NONFINITE_OPTION,
    as_json: bool = JSON_OPTION,
    debug: bool = DEBUG_OPTION,
) -> None:
    """Sharpness measures beside the eigenvalues: critical sharpness (2/lr_c), worst-case
    (SAM's) and adaptive (ASAM's) sharpness, each stored as an analysis."""
    from hessdiag.sharpness import sharpness_of_checkpoint
    from hessdiag.store import Store
    from hessdiag.task import load_task

    if measure not in SHARPNESS_MEASURES:
        raise InputError(f"unknown sharpness measure {measure!r}; choose one of "
                         f"{', '.join(SHARPNESS_MEASURES)}", param="measure")
    if not rho > 0 or max_steps < 1 or not tol > 0:
        raise InputError("--rho and --tol must be positive and --max-steps at least 1")
    if method not in ASCENT_METHODS:
        raise InputError(f"--ascent must be one of {', '.join(ASCENT_METHODS)}; got {method!r}")
    DataSettings(split=split)  # validates
    data_settings = DataSettings(spec=data, root=None if data_root is None else str(data_root),
                                 split=split, samples=samples, batch_size=batch_size)
    SpectrumSettings(dtype=dtype, device=device)
    target = Store(store)
    target.check_writable()
    for path in checkpoints:
        load_task(str(path), data=data_settings, model_spec=model, loss=loss, output=model_output,
                  unsafe=unsafe_load, allow_nonfinite=allow_nonfinite)
    for path in checkpoints:
        result, task, analysis_id = sharpness_of_checkpoint(
            str(path), measure, rho=rho, tol=tol, max_steps=max_steps, method=method,
            data=data_settings, model_spec=model,
            loss=loss,
            output=model_output, unsafe=unsafe_load, allow_nonfinite=allow_nonfinite, dtype=dtype,
            device=device, store=target)
        if result.reason:
            render.stderr.print(f"[yellow]warning:[/yellow] {path}: {result.measure} "
                                f"sharpness: {result.reason}", soft_wrap=True)
        if as_json:
            render.emit_json({"checkpoint": str(path), **result.to_dict(),
                              "analysis_id": analysis_id})
            continue
        low, high = result.interval
        state = "converged" if result.converged else "NOT converged"
        bound = (f"[{render.fmt(low)}, {render.fmt(high)}]" if math.isfinite(high)
                 else f"a lower bound (ascent, {result.steps} steps, {state})")
        extra = (f", lr_c = {render.fmt(result.lr_c)}" if result.lr_c is not None
                 else f", rho = {result.rho}")
        render.stdout.print(
            f"{path}: {result.measure} sharpness = {render.fmt(result.value)} {bound}{extra}; "
            f"loss {render.fmt(result.loss)} on {result.samples} terms, "
            f"{result.forward_passes} forward + {result.backward_passes} backward passes"
            f"{f' + {result.hvps} Hessian-vector products' if result.hvps else ''}, "
            f"{result.seconds:.2f} s")
        render.stdout.print(f"analysis {analysis_id} written to {store}")


def _numbers(text: str, option: str, kind: type, counts: tuple[int, ...]) -> list:
    """``"a,b"`` -> ``[a, b]`` for an option that takes one of ``counts`` numbers."""
    try:
        values = [kind(part) for part in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in counts:
        what = " or ".join(str(c) for c in counts)
        raise InputError(f"{option} takes {what} comma-separated numbers; got {text!r}")
    return values


@app.command(cls=Command, short_help="The loss on a 1-D or 2-D grid around a checkpoint.")
@handles_errors
def landscape(
    checkpoint: Path = typer.Argument(..., help="The checkpoint at the centre of the grid."),
    dims: int = typer.Option(LANDSCAPE.dims, "--dims", help="1 (a curve) or 2 (a surface)."),
    directions: str = typer.Option(LANDSCAPE.directions, "--directions",
                                   help="random (filter-normalised Gaussian, Li et al. 2018) "
                                   "or eigen (the top Hessian eigenvectors, unit length)."),
    grid_range: str = typer.Option("-1,1", "--range", help="MIN,MAX of both coordinates, or "
                                   "XMIN,XMAX,YMIN,YMAX (in units of the directions)."),
    resolution: str = typer.Option(str(LANDSCAPE.resolution), "--resolution",
                                   help="Points per coordinate: N, or NX,NY."),
    filter_norm: bool = typer.Option(LANDSCAPE.filter_norm, "--filter-norm/--no-filter-norm",
                                     help="random: rescale each filter of the direction to "
                                     "the norm of the weights' filter (else: unit length)."),
    bias: str = typer.Option(LANDSCAPE.bias, "--bias", help="With filter normalisation, the "
                             "direction of biases and other 1-D parameters: zero or weights."),
    model: str | None = MODEL_OPTION,
    data: str | None = DATA_OPTION,
    loss: str | None = LOSS_OPTION,
    model_output: str | None = MODEL_OUTPUT_OPTION,
    data_root: Path | None = DATA_ROOT_OPTION,
    split: str = typer.Option(DATA.split, "--split", help=_choices(SPLITS) + "."),
    samples: int | None = SAMPLES_OPTION,
    batch_size: int = BATCH_SIZE_OPTION,
    tol: float | None = TOL_OPTION,
    dtype: str = DTYPE_OPTION,
    device: str = DEVICE_OPTION,
    seed: int = SEED_OPTION,
    store: Path = STORE_OPTION,
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted landscape "
                                "of this checkpoint with the same settings and store (its "
                                "finished points are kept beside the store)."),
    plot: Path | None = typer.Option(None, "--plot", help="Also draw the landscape here "
                                     "(.png, .svg or .pdf)."),
    unsafe_load: bool = UNSAFE_OPTION,
    allow_nonfinite: bool = NONFINITE_OPTION,
    as_json: bool = JSON_OPTION,
    quiet: bool = QUIET_OPTION,
    debug: bool = DEBUG_OPTION,
) -> None:
    """The training loss (and accuracy) on a 1-D or 2-D grid around a checkpoint, along
    filter-normalised random directions or the top Hessian eigenvectors, for any task;
    stored as an analysis, resumable after an interruption."""
    from hessdiag.landscape import landscape_of_checkpoint
    from hessdiag.store import Store
    from hessdiag.task import load_task

    _join(device)
    bounds = _numbers(grid_range, "--range", float, (2, 4))
    points = _numbers(resolution, "--resolution", int, (1, 2))
    settings = LandscapeSettings(
        dims=dims, directions=directions, x_range=tuple(bounds[:2]),
        y_range=tuple(bounds[2:]) if len(bounds) == 4 else None, resolution=points[0],
        y_resolution=points[1] if len(points) == 2 else None, filter_norm=filter_norm,
        bias=bias, tol=tol, dtype=dtype, device=device, seed=seed)
    if dims == 1 and (len(bounds) == 4 or len(points) == 2):
        raise InputError("--dims 1 takes one range MIN,MAX and one --resolution N")
    data_settings = DataSettings(spec=data, root=None if data_root is None else str(data_root),
                                 split=split, samples=samples, batch_size=batch_size)
    if plot is not None:
        from hessdiag.plot import check_path

        check_path(plot)
    target = Store(store)
    target.check_writable()
    load_task(str(checkpoint), data=data_settings, model_spec=model, loss=loss, output=model_output,
              unsafe=unsafe_load, allow_nonfinite=allow_nonfinite)  # checked before the grid

    def job(progress: Any) -> Any:
        return landscape_of_checkpoint(
            str(checkpoint), settings=settings, data=data_settings, model_spec=model,
            loss=loss,
            output=model_output, unsafe=unsafe_load, allow_nonfinite=allow_nonfinite, store=target,
            resume=resume, progress=progress)

    result, task, analysis_id = with_points_progress(not quiet and not as_json,
                                                     checkpoint.name, job)
    figure = None
    if plot is not None and analysis_id is not None:  # rank 0 draws
        from hessdiag.plot import landscape_figure, save

        figure = save(landscape_figure(target.analysis(analysis_id)), plot)
    if as_json:
        render.emit_json({"checkpoint": str(checkpoint), **result.to_dict(),
                          "loss_spec": task.loss.spec, "analysis_id": analysis_id})
        return
    render.stdout.print(render.landscape_table(
        result, f"{checkpoint}: {task.model_spec} on {task.data.name} ({task.data.split}), "
                f"loss {task.loss.spec}"))
    render.stdout.print(f"analysis {analysis_id} written to {store}"
                        + (f"; figure {figure}" if figure else ""))


@app.command(cls=Command, short_help=(
    "Train or fine-tune with SGD, SAM or Eigen-SAM, logging sharpness."))
@handles_errors
def train(
    model: str | None = MODEL_OPTION,
    data: str | None = DATA_OPTION,
    loss: str | None = LOSS_OPTION,
    model_output: str | None = MODEL_OUTPUT_OPTION,
    model_kwargs: str | None = typer.Option(None, "--model-kwargs", help="JSON object of the "
                                            "model's keyword arguments, e.g. "
                                            "'{\"hidden\": 64}'."),
    data_root: Path | None = DATA_ROOT_OPTION,
    download: bool = typer.Option(TRAIN.download, "--download", help="Download the data if "
                                  "missing."),
    samples: int | None = typer.Option(TRAIN.samples, "--samples", help="Train on the first N "
                                       "samples only."),
    optimizer: str = typer.Option(TRAIN.optimizer, "--optimizer", help=_choices(OPTIMIZERS)
                                  + "."),
    base: str = typer.Option(TRAIN.base, "--base", help="Base optimizer: " + _choices(BASES)
                             + "."),
    lr: float = typer.Option(TRAIN.lr, "--lr", help="Peak learning rate."),
    momentum: float = typer.Option(TRAIN.momentum, "--momentum", help="SGD momentum."),
    weight_decay: float = typer.Option(TRAIN.weight_decay, "--weight-decay",
                                       help="Weight decay."),
    nesterov: bool = typer.Option(TRAIN.nesterov, "--nesterov", help="Nesterov momentum "
                                  "(SGD)."),
    epochs: int = typer.Option(TRAIN.epochs, "--epochs", help="Epochs."),
    batch_size: int = typer.Option(TRAIN.batch_size, "--batch-size", help="Minibatch size."),
    rho: float = typer.Option(TRAIN.rho, "--rho", help="SAM / Eigen-SAM perturbation radius."),
    alpha: float = typer.Option(TRAIN.alpha, "--alpha", help="Eigen-SAM: weight of the top "
                                "eigenvector in the perturbation."),
    eig_every: int = typer.Option(TRAIN.eig_every, "--eig-every", help="Eigen-SAM: steps "
                                  "between eigenvector updates (p)."),
    eig_iters: int = typer.Option(TRAIN.eig_iters, "--eig-iters", help="Eigen-SAM: power "
                                  "iterations per update (k)."),
    adaptive: bool = typer.Option(TRAIN.adaptive, "--adaptive", help="Adaptive SAM (ASAM)."),
    renormalize: bool = typer.Option(TRAIN.renormalize, "--renormalize", help="Eigen-SAM: "
                                     "rescale the perturbation to length rho."),
    schedule: str = typer.Option(TRAIN.schedule, "--schedule", help=_choices(SCHEDULES) + "."),
    label_smoothing: float = typer.Option(TRAIN.label_smoothing, "--label-smoothing",
                                          help="Label smoothing (cross-entropy)."),
    augment: bool = typer.Option(TRAIN.augment, "--augment", help="Random crops (and flips "
                                 "for CIFAR) of image inputs."),
    seed: int = typer.Option(TRAIN.seed, "--seed", help="Seed of initialisation, data order, "
                             "augmentation and estimators."),
    device: str = typer.Option(TRAIN.device, "--device", help="auto, cpu, cuda, cuda:N or "
                               "mps."),
    checkpoint_every: int | None = typer.Option(TRAIN.checkpoint_every, "--checkpoint-every",
                                                help="Write a checkpoint every N steps (and "
                                                "at the end)."),
    sharpness_every: int | None = typer.Option(TRAIN.sharpness_every, "--sharpness-every",
                                               help="Log lambda_max and alignment every N "
                                               "steps (from step 0, and at the end)."),
    sharpness_samples: int = typer.Option(TRAIN.sharpness_samples, "--sharpness-samples",
                                          help="Training samples in the fixed measurement "
                                          "set."),
    run_name: str | None = typer.Option(TRAIN.run_name, "--run-name", help="Run id (default: "
                                        "generated)."),
    checkpoint_dir: Path = typer.Option(Path(TRAIN.checkpoint_dir), "--checkpoint-dir",
                                        help="Checkpoints go to DIR/<run>/."),
    init_from: Path | None = typer.Option(TRAIN.init_from, "--from", help="Fine-tune from this "
                                          "checkpoint."),
    unsafe_load: bool = typer.Option(False, "--unsafe-load", help="Trust the files' code: "
                                     "a pickled --from checkpoint, and the factory specs "
                                     "a --from checkpoint or a resumed run records (runs "
                                     "code: only for files you trust)."),
    resume: str | None = typer.Option(None, "--resume", help="Continue this run from its "
                                      "last checkpoint."),
    sync_perturbation: bool = typer.Option(TRAIN.sync_perturbation, "--sync-perturbation",
                                           help="torchrun: all-reduce SAM's first gradient "
                                           "too, so every process perturbs by the whole "
                                           "minibatch's gradient (single-process SAM); by "
                                           "default each perturbs by its own part's."),
    store: Path = STORE_OPTION,
    as_json: bool = JSON_OPTION,
    quiet: bool = QUIET_OPTION,
    debug: bool = DEBUG_OPTION,
) -> None:
    """Train or fine-tune with SGD, SAM or Eigen-SAM; metrics, sharpness and checkpoints
    go to the store."""
    from hessdiag.store import Store
    from hessdiag.train import TrainConfig
    from hessdiag.train import train as run_training

    _join(device)
    target = Store(store)
    target.check_writable()
    if resume is None:
        if model is None or data is None:
            raise InputError("train needs --model and --data (or --resume RUN)")
        cfg = TrainConfig(
            model=model, data=data, loss=loss,
            output=model_output, model_kwargs=_json_kwargs(model_kwargs),
            data_root=None if data_root is None else str(data_root),
            download=download, samples=samples, optimizer=optimizer, base=base, lr=lr,
            momentum=momentum, weight_decay=weight_decay, nesterov=nesterov, epochs=epochs,
            batch_size=batch_size, rho=rho, alpha=alpha, eig_every=eig_every,
            eig_iters=eig_iters, adaptive=adaptive, renormalize=renormalize,
            schedule=schedule, label_smoothing=label_smoothing, augment=augment, seed=seed,
            device=device, checkpoint_every=checkpoint_every, sharpness_every=sharpness_every,
            sharpness_samples=sharpness_samples, run_name=run_name,
            checkpoint_dir=str(checkpoint_dir),
            init_from=None if init_from is None else str(init_from),
            sync_perturbation=sync_perturbation)
    else:
        cfg = None
    named = tuple(spec for spec in (model, data, loss) if spec is not None)
    show_bar = (not quiet and not as_json and render.stderr.is_terminal
                and _rank_prefix() in ("", "rank 0: "))
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

            result = run_training(cfg, store=target, resume=resume, progress=report,
                                  unsafe=unsafe_load, named=named)
    else:
        result = run_training(cfg, store=target, resume=resume, unsafe=unsafe_load,
                              named=named)
    from dataclasses import asdict

    if as_json:
        render.emit_json(asdict(result))
    elif result.nothing_to_do:  # resumed a finished run: one line saying so
        render.stdout.print(render.escape(result.message), soft_wrap=True)
    else:
        render.stdout.print(render.train_summary(result, store))
    if result.status != "finished":
        if _rank_prefix() in ("", "rank 0: "):
            render.stderr.print(f"[bold red]error:[/bold red] {result.message}")
        raise typer.Exit(EXIT_CHECK_FAILED)


@app.command(cls=Command, short_help="How well SAM-type perturbations follow the top eigenvector.")
@handles_errors
def align(
    targets: list[Path] = typer.Argument(..., help="Checkpoints, or directories of "
                                         "checkpoints (a run's series, in step order)."),
    perturbation: str = typer.Option(ALIGN.rule, "--perturbation", help=_choices(RULES)
                                     + ": eigensam is the perturbation the Eigen-SAM "
                                     "optimizer applied (its own eigenvector, from the "
                                     "checkpoint); eigensam-exact uses the exact top "
                                     "eigenvector instead."),
    alpha: float | None = typer.Option(ALIGN.alpha, "--alpha", help="Eigen-SAM's eigenvector "
                                       "weight (default: the run's, else 0.2)."),
    batches: int = typer.Option(ALIGN.batches, "--batches", help="Minibatches to average "
                                "over (B)."),
    batch_size: int = typer.Option(ALIGN.batch_size, "--batch-size", help="Samples per "
                                   "minibatch."),
    top_k: int = typer.Option(ALIGN.top_k, "--top-k", help="Also the share of the "
                              "perturbation in the top-K eigenspace (K > 1)."),
    samples: int = typer.Option(ALIGN.samples, "--samples", help="Training samples in the "
                                "fixed measurement set of the Hessian."),
    tol: float = typer.Option(ALIGN.tol, "--tol", help="Relative residual of the top "
                              "eigenvector."),
    model: str | None = MODEL_OPTION,
    data: str | None = DATA_OPTION,
    loss: str | None = LOSS_OPTION,
    model_output: str | None = MODEL_OUTPUT_OPTION,
    data_root: Path | None = DATA_ROOT_OPTION,
    seed: int = typer.Option(ALIGN.seed, "--seed", help="Seed of the minibatch draw and "
                             "Lanczos."),
    device: str = typer.Option(ALIGN.device, "--device", help="auto, cpu, cuda, cuda:N or "
                               "mps."),
    follow: bool = typer.Option(False, "--follow", help="Watch the directory while "
                                "`hessdiag train` writes it; stop after its final checkpoint."),
    poll: float = typer.Option(1.0, "--poll", help="--follow: seconds between looks."),
    timeout: float | None = typer.Option(None, "--timeout", help="--follow: give up after "
                                         "this many seconds without a new checkpoint."),
    store: Path = STORE_OPTION,
    unsafe_load: bool = UNSAFE_OPTION,
    allow_nonfinite: bool = NONFINITE_OPTION,
    as_json: bool = JSON_OPTION,
    quiet: bool = QUIET_OPTION,
    debug: bool = DEBUG_OPTION,
) -> None:
    """Alignment |cos(e, v)| between SAM-type perturbations e and the top Hessian
    eigenvector v, with 95% confidence intervals, at each checkpoint."""
    import time

    from hessdiag.align import align_checkpoint
    from hessdiag.checkpoints import checkpoint_files
    from hessdiag.runtime import resolve_device
    from hessdiag.store import Store

    _join(device)
    settings = AlignSettings(rule=perturbation, alpha=alpha, batches=batches,
                             batch_size=batch_size, top_k=top_k, samples=samples, tol=tol,
                             seed=seed, device=device)
    if follow and (len(targets) != 1 or not targets[0].is_dir()):
        raise InputError("--follow watches one directory (a run's checkpoint folder)")
    resolve_device(device)
    target_store = Store(store)
    target_store.check_writable()
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
                raise InputError(f"{t} does not exist")
            else:
                out.append(t)
        return out

    def measure(path: Path) -> bool:
        done = with_progress(not quiet and not as_json, path.name,
                             lambda progress: align_checkpoint(
                                 str(path), settings=settings, data=data_settings,
                                 model_spec=model, loss=loss,
                                 output=model_output, unsafe=unsafe_load,
                                 allow_nonfinite=allow_nonfinite, store=target_store,
                                 progress=progress))
        if as_json:
            render.emit_json({"checkpoint": str(path), "step": done.task.checkpoint.step,
                              **done.result.to_dict(), "analysis_id": done.analysis_id})
        else:
            render.stdout.print(render.alignment_line(path, done))
            if done.result.note:
                render.stderr.print(render.escape(f"note: {path.name}: {done.result.note}"),
                                    soft_wrap=True)
        return done.final

    noted: set[str] = set()
    if not follow:
        paths = files()
        if not paths:
            raise InputError(f"no checkpoints (*.pt) in {', '.join(map(str, targets))}")
        for path in paths:
            measure(path)
        return
    from hessdiag.distributed import broadcast_object

    seen: set[str] = set()
    last_new = time.monotonic()
    try:
        while True:
            new = [p for p in files() if str(p) not in seen]
            expired = timeout is not None and not new and time.monotonic() - last_new > timeout
            # under torchrun, rank 0's view of the directory decides for every process
            new, expired = broadcast_object((new, expired))
            for path in new:
                seen.add(str(path))
                last_new = time.monotonic()
                if measure(path):
                    render.stderr.print(f"measured the run's final checkpoint {path}: done")
                    return
            if expired:
                render.stderr.print(f"no new checkpoint for {timeout:g} s: stopping")
                return
            time.sleep(poll)
    except KeyboardInterrupt:
        render.stderr.print(f"stopped; {len(seen)} checkpoints measured")


def _max_hvps_help(default: str) -> str:
    return ("Budget of Hessian-vector products of each eigenvalue solve (lambda_max, "
            "lambda_min, the top-k): it bounds the wall time; an eigenvalue that has not "
            "converged to its tolerance within it is one error line and exit 2, never "
            "compared "
            f"(default: {default}).")


CHECK_METRIC_OPTION = typer.Option(None, "--metric", help="lambda_max, lambda_min, "
                                   "lambda_ratio, trace, top_k, alignment (mean |cos| of "
                                   "SAM perturbations), critical_sharpness or "
                                   "adaptive_sharpness; repeat the option; default: "
                                   "lambda_max and trace.")


@app.command(cls=Command, short_help="Record a checkpoint's sharpness for `check` to compare with.")
@handles_errors
def baseline(
    checkpoint: Path = typer.Argument(..., help="The checkpoint whose sharpness is the "
                                      "reference."),
    output: Path = typer.Option(Path("sharpness-baseline.json"), "-o", "--output",
                                help="The baseline file to write."),
    metric: list[str] | None = CHECK_METRIC_OPTION,
    model: str | None = MODEL_OPTION,
    data: str | None = DATA_OPTION,
    loss: str | None = LOSS_OPTION,
    model_output: str | None = MODEL_OUTPUT_OPTION,
    data_root: Path | None = DATA_ROOT_OPTION,
    samples: int | None = SAMPLES_OPTION,
    batch_size: int = BATCH_SIZE_OPTION,
    top_k: int = TOP_K_OPTION,
    trace_hvps: int = TRACE_HVPS_OPTION,
    tol: float | None = TOL_OPTION,
    max_hvps: int = typer.Option(CHECK_MAX_HVPS, "--max-hvps", help=_max_hvps_help(
        f"{CHECK_MAX_HVPS}; recorded in the baseline, which the check reuses")),
    hvp_mode: str = HVP_MODE_OPTION,
    curvature: str = CURVATURE_OPTION,
    fisher_kind: str = FISHER_KIND_OPTION,
    fisher_samples: int = FISHER_SAMPLES_OPTION,
    dtype: str = DTYPE_OPTION,
    device: str = DEVICE_OPTION,
    seed: int = SEED_OPTION,
    unsafe_load: bool = UNSAFE_OPTION,
    allow_nonfinite: bool = NONFINITE_OPTION,
    as_json: bool = JSON_OPTION,
    quiet: bool = QUIET_OPTION,
    debug: bool = DEBUG_OPTION,
) -> None:
    """Record sharpness metrics of a checkpoint, with every setting that produced them,
    as the baseline `hessdiag check` compares with. Exit 2 (nothing written) when an
    eigenvalue does not converge within --max-hvps products."""
    from hessdiag.check import DEFAULT_METRICS, check_metrics, make_baseline, write_baseline

    _join(device)
    check_metrics(tuple(metric or ()))
    settings = SpectrumSettings(top_k=top_k, trace_hvps=trace_hvps, tol=tol,
                                max_hvps=max_hvps,
                                hvp_mode=hvp_mode, dtype=dtype, device=device, seed=seed,
                                curvature=curvature, fisher_kind=fisher_kind,
                                fisher_samples=fisher_samples)
    data_settings = DataSettings(spec=data, root=None if data_root is None else str(data_root),
                                 samples=samples, batch_size=batch_size)
    made = with_progress(not quiet and not as_json, checkpoint.name, lambda progress:
                         make_baseline(str(checkpoint), metrics=tuple(metric or DEFAULT_METRICS),
                                       settings=settings, data=data_settings, model_spec=model,
                                       loss=loss, output=model_output, unsafe=unsafe_load,
                                       allow_nonfinite=allow_nonfinite, progress=progress))
    from hessdiag.distributed import is_main

    path = write_baseline(made, output) if is_main() else output  # rank 0 writes
    if as_json:
        render.emit_json({"baseline": str(path), **made.to_json()})
        return
    render.stdout.print(render.baseline_table(made, str(path)))


@app.command(cls=Command, short_help=(
    "Fail (exit 1) when a checkpoint is sharper than its baseline."))
@handles_errors
def check(
    checkpoint: Path = typer.Argument(..., help="The checkpoint to check."),
    baseline_source: str | None = typer.Option(None, "--baseline", help="A file written by "
                                               "`hessdiag baseline`, or STORE:ANALYSIS_ID."),
    metric: list[str] | None = typer.Option(None, "--metric", help="Check only these of "
                                            "the baseline's metrics (repeat the option)."),
    rtol: float = typer.Option(0.1, "--rtol", help="Allowed relative increase beyond the "
                               "measurements' noise."),
    max_lambda: float | None = typer.Option(None, "--max-lambda", help="Absolute limit on "
                                            "lambda_max."),
    max_trace: float | None = typer.Option(None, "--max-trace", help="Absolute limit on the "
                                           "trace."),
    max_ratio: float | None = typer.Option(None, "--max-ratio", help="Absolute limit on "
                                           "lambda_max / |lambda_min|."),
    seed: int | None = typer.Option(None, "--seed", help="Override the baseline's seed."),
    max_hvps: int | None = typer.Option(None, "--max-hvps", help=_max_hvps_help(
        f"the baseline's; {CHECK_MAX_HVPS} without one")),
    junit: Path | None = typer.Option(None, "--junit", help="Write JUnit XML here (one test "
                                      "case per metric)."),
    max_drop: float | None = typer.Option(None, "--max-drop", help="Also fail when a sharpness "
                                          "metric fell by more than this fraction of its "
                                          "baseline beyond the noise (default: a warning "
                                          "beyond 0.5): a saturated or damaged model looks "
                                          "flat too."),
    store: Path | None = typer.Option(None, "--store", help="Also append the measurement "
                                      "to this store."),
    model: str | None = MODEL_OPTION,
    data: str | None = DATA_OPTION,
    loss: str | None = LOSS_OPTION,
    model_output: str | None = MODEL_OUTPUT_OPTION,
    unsafe_load: bool = UNSAFE_OPTION,
    allow_nonfinite: bool = NONFINITE_OPTION,
    as_json: bool = JSON_OPTION,
    quiet: bool = QUIET_OPTION,
    debug: bool = DEBUG_OPTION,
) -> None:
    """Fail (exit 1) when a checkpoint is sharper than its baseline beyond --rtol and the
    measurements' noise, or above an absolute limit; exit 0 when it is not; exit 2 when
    it cannot be checked as asked (bad input, or an eigenvalue that does not converge
    within --max-hvps products)."""
    import os

    from hessdiag.check import check as run_check
    from hessdiag.check import check_metrics, junit_xml, read_baseline
    from hessdiag.store import Store

    _join()
    check_metrics(tuple(metric or ()))
    base = None if baseline_source is None else read_baseline(baseline_source,
                                                               tuple(metric or ()))
    target = None
    if store is not None:
        target = Store(store)
        target.check_writable()
    data_settings = DataSettings(spec=data) if base is None or data is not None else None
    result = with_progress(not quiet and not as_json, checkpoint.name, lambda progress:
                           run_check(str(checkpoint), baseline=base, rtol=rtol,
                                     metrics=tuple(metric) if metric else None,
                                     max_lambda=max_lambda, max_trace=max_trace,
                                     max_ratio=max_ratio, data=data_settings,
                                     model_spec=model, loss=loss, output=model_output, seed=seed,
                                     max_hvps=max_hvps, max_drop=max_drop,
                                     unsafe=unsafe_load, allow_nonfinite=allow_nonfinite,
                                     store=target, progress=progress))
    from hessdiag.distributed import is_main

    if junit is not None and is_main():  # across processes, rank 0 writes
        junit.write_text(junit_xml(result, str(checkpoint)))
    if os.environ.get("GITHUB_ACTIONS") == "true":
        for row in result.rows:
            if not row.passed:
                sys.stdout.write(f"::error title=hessdiag check::{checkpoint}: {row.metric} "
                                 f"{row.now:.6g} above its limit {row.limit:.6g} (baseline "
                                 f"{row.baseline}, noise {row.noise:.3g})\n")
    if as_json:
        render.emit_json({"checkpoint": str(checkpoint), **result.to_dict()})
    else:
        render.stdout.print(render.check_table(result, str(checkpoint)))
        for warning in result.warnings:
            text = render.escape(translate_text(warning, "max_drop"))
            render.stderr.print(f"[yellow]warning:[/yellow] {text}", soft_wrap=True)
    if not result.passed:
        raise typer.Exit(EXIT_CHECK_FAILED)


@app.command(cls=Command, short_help="The runs and analyses in a store, or one analysis in full.")
@handles_errors
def show(
    store: Path = typer.Argument(Path("hessdiag.h5"), help="The store to read."),
    analysis_id: str | None = typer.Argument(None, help="Show one analysis in full."),
    as_json: bool = JSON_OPTION,
    debug: bool = DEBUG_OPTION,
) -> None:
    """The runs and analyses in a store, or one analysis in full."""
    from hessdiag.records import (
        eigenvalue_rows,
        layer_rows,
        read_result,
        run_row,
        summary,
    )
    from hessdiag.store import Store

    source = Store(store)
    if not store.exists():
        raise InputError(f"store {store} does not exist (run `hessdiag spectrum` first, or "
                         "give the path of a store)")
    if analysis_id is not None:
        record = source.analysis(analysis_id)
        row, eig, layers = summary(record), eigenvalue_rows(record), layer_rows(record)
        if as_json:
            render.emit_json({**row, "eigenvalues": eig, "layers": layers,
                              "result": read_result(record).to_dict(), "attrs": record.attrs})
            return
        render.stdout.print(render.analysis_detail(row, eig))
        if layers:
            render.stdout.print(render.layers_table(layers))
        return
    records = source.analyses()
    rows = [summary(r) for r in records]
    runs = [run_row(r) for r in source.runs()]
    if as_json:
        render.emit_json({"store": str(store), **source.info(), "runs": runs,
                          "analyses": rows})
        return
    if runs:
        render.stdout.print(render.runs_table(runs, f"{store}: {len(runs)} runs"))
        for line in render.stability_lines(runs):
            render.stdout.print(render.escape(line), soft_wrap=True)
    spectra = [r for r in rows if r["kind"] == "spectrum"]
    alignments = [r for r in rows if r["kind"] == "alignment"]
    if spectra or len(spectra) == len(rows):
        render.stdout.print(render.analyses_table(spectra, f"{store}: {len(spectra)} spectrum "
                                                  "analyses"))
    if alignments:
        render.stdout.print(render.alignments_table(alignments, f"{store}: {len(alignments)} "
                                                    "alignment analyses"))
    measures = [{key: row[key] for key in ("analysis_id", "checkpoint_path", "step", "measure",
                                           "sharpness", "sharpness_low", "sharpness_high",
                                           "rho", "lr_c", "samples", "forward_passes",
                                           "ascent_steps", "all_converged")}
                for row in rows if row["kind"] == "sharpness"]
    if measures:
        for row in measures:
            done = row.pop("all_converged")
            row["converged"] = {True: "yes", False: "[red]no[/red]"}.get(done, "-")
            row["checkpoint_path"] = Path(row["checkpoint_path"] or "-").name
            row.update({k: render.fmt(v) for k, v in row.items() if isinstance(v, float)})
            row.update({k: "-" for k, v in row.items() if v is None})
        render.stdout.print(render.rows_table(measures, f"{store}: {len(measures)} sharpness "
                                              "measurements (low/high: bounds; no high: an "
                                              "ascent's lower bound; converged no: not "
                                              "converged, or undefined)"))
    landscapes = [{key: row[key] for key in ("analysis_id", "checkpoint_path", "step",
                                             "method", "measure", "landscape_points",
                                             "landscape_loss0", "landscape_loss_max",
                                             "lambda_max", "samples", "seconds")}
                  for row in rows if row["kind"] == "landscape"]
    if landscapes:
        for row in landscapes:
            row["checkpoint_path"] = Path(row["checkpoint_path"] or "-").name
            row["directions"] = row.pop("method").removeprefix("landscape-")
            row["grid"] = row.pop("measure").removeprefix("landscape-")
            row.update({k: render.fmt(v) for k, v in row.items() if isinstance(v, float)})
            row.update({k: "-" for k, v in row.items() if v is None})
        render.stdout.print(render.rows_table(landscapes, f"{store}: {len(landscapes)} loss "
                                              "landscapes (lambda_max: of the eigen "
                                              "direction)"))
    for record in records:
        if "slq/density" in record.arrays:
            render.stdout.print(render.density_sketch(record))


@app.command(cls=Command, short_help="Flat tables of a store, for pandas and spreadsheets.")
@handles_errors
def export(
    store: Path = typer.Argument(..., help="The store to export."),
    fmt: str = typer.Option("csv", "--format", help="csv, json or tensorboard."),
    out: Path | None = typer.Option(None, "--out", help="csv: a directory with one file per "
                                    "table (analyses.csv, eigenvalues.csv, layers.csv, "
                                    "runs.csv, ...; default: analyses.csv on stdout); json: "
                                    "a file (default: stdout); tensorboard: a directory "
                                    "with one subdirectory of event files per run "
                                    "(required)."),
    force: bool = typer.Option(False, "--force", help="Replace the files of an earlier "
                               "export at --out."),
    debug: bool = DEBUG_OPTION,
) -> None:
    """Flat tables of everything in a store, for pandas and spreadsheets; or every run's
    step series as TensorBoard event files (--format tensorboard)."""
    from hessdiag.records import flat_tables
    from hessdiag.store import Store

    if fmt not in ("csv", "json", "tensorboard"):
        raise InputError(f"--format must be csv, json or tensorboard; got {fmt!r}")
    if not store.exists():
        raise InputError(f"store {store} does not exist")
    if fmt == "tensorboard":
        from hessdiag.integrations.tensorboard import export_tensorboard

        if out is None:
            raise InputError("--format tensorboard writes event files: give the directory "
                             "with --out DIR")
        exported = export_tensorboard(_open_store(store), out, force=force)
        render.stderr.print(f"wrote {sum(e.scalars for e in exported)} values of "
                            f"{len(exported)} runs to {out} (tensorboard --logdir {out})")
        return
    tables = flat_tables(Store(store))
    if out is not None and not force:
        there = [out] if fmt == "json" and out.exists() else [
            out / f"{n}.csv" for n in tables if (out / f"{n}.csv").exists()] \
            if out.is_dir() else ([out] if out.exists() else [])
        if there:
            raise InputError(f"--out {out}: {there[0]} already exists (an earlier export?); "
                             "pass --force to replace it, or choose another --out")
    if fmt == "json":
        text = json.dumps(tables, default=render.json_default, indent=1) + "\n"
        if out is None:
            sys.stdout.write(text)
        else:
            from hessdiag._files import replacing

            with replacing(out) as tmp:
                tmp.write_text(text)
        return
    if out is None:
        render.write_csv(sys.stdout, tables["analyses"])
        return
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file: csv exports to a directory")
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in tables.items():
        with open(out / f"{name}.csv", "w", newline="") as fh:
            render.write_csv(fh, rows)
    render.stderr.print(f"wrote {', '.join(f'{out / n}.csv' for n in tables)}")


def _names(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def _open_store(store: Path) -> Any:
    from hessdiag.store import Store

    if not store.exists():
        raise InputError(f"store {store} does not exist (run `hessdiag train` or `hessdiag "
                         "spectrum --store` first, or give the path of a store)")
    source = Store(store)
    source.validate()
    return source


@app.command(cls=Command, short_help=(
    "Draw spectra, training, sharpness or landscapes from a store."))
@handles_errors
def plot(
    store: Path = typer.Argument(..., help="The store to draw from."),
    what: str = typer.Option(..., "--what", help="density, eigenvalues, training, sharpness, "
                             "alignment, layers or landscape."),
    output: Path = typer.Option(..., "--output", "-o", help="The figure: .png, .svg or .pdf."),
    runs: str | None = typer.Option(None, "--runs", help="Runs to draw, comma-separated ids "
                                    "or unique prefixes (default: all)."),
    analysis: str | None = typer.Option(None, "--analysis", help="Analyses to draw, "
                                        "comma-separated ids or unique prefixes (default: "
                                        "every one that applies; the last for layers and "
                                        "landscape)."),
    sigma: float | None = typer.Option(None, "--sigma", help="density: Gaussian width of the "
                                       "smoothing (default: the stored one's rule)."),
    title: str | None = typer.Option(None, "--title", help="The figure's title."),
    debug: bool = DEBUG_OPTION,
) -> None:
    """Draw a figure from a store: spectra, training curves, sharpness along training with
    the stability threshold, alignment, per-layer sharpness, loss landscapes."""
    from hessdiag.plot import check_path, figure, save

    check_path(output)
    source = _open_store(store)
    fig = figure(source, what, runs=_names(runs), analyses=_names(analysis), sigma=sigma,
                 title=title)
    render.stdout.print(f"wrote {save(fig, output)}")


@app.command(cls=Command, short_help="Merge a store's journal into its HDF5 file.")
@handles_errors
def compact(
    store: Path = typer.Argument(..., help="The store whose journal to merge."),
    debug: bool = DEBUG_OPTION,
) -> None:
    """Merge a store's journal into its HDF5 file, so that the file alone holds every
    record (for h5py and other tools that do not read the journal)."""
    source = _open_store(store)
    merged = source.pending()
    source.compact()
    render.stdout.print(f"{store}: {merged} journal records merged; the file holds every "
                        "record")


@app.command(cls=Command, short_help="Check a store's checksums; --salvage copies intact records.")
@handles_errors
def verify(
    store: Path = typer.Argument(..., help="The store to check."),
    salvage: Path | None = typer.Option(None, "--salvage", help="Also write a new store at "
                                        "this path with every intact record (the checked "
                                        "store is only read)."),
    as_json: bool = JSON_OPTION,
    debug: bool = DEBUG_OPTION,
) -> None:
    """Check every record and journal frame of a store against its checksums: exit 0 if
    intact, 1 if damaged (each damage named), 2 for bad input. --salvage copies the intact
    records to a new store."""
    from hessdiag.store.verify import salvage as salvage_store
    from hessdiag.store.verify import verify as verify_store

    if salvage is None:
        checked, salvaged = verify_store(store), None
    else:
        checked, salvaged = salvage_store(store, salvage)
    if as_json:
        render.emit_json({**checked.to_dict(),
                          "salvage": None if salvaged is None else salvaged.to_dict()})
    else:
        for line in render.verify_lines(checked, salvaged):
            render.stdout.print(render.escape(line), soft_wrap=True)
    if not checked.intact:
        raise typer.Exit(EXIT_CHECK_FAILED)


@app.command(cls=Command, short_help="One self-contained HTML page of a store's runs and analyses.")
@handles_errors
def report(
    store: Path = typer.Argument(..., help="The store to summarise."),
    output: Path = typer.Option(Path("report.html"), "--output", "-o", help="The HTML file."),
    debug: bool = DEBUG_OPTION,
) -> None:
    """One self-contained HTML page (figures embedded, no network) of a store's runs and
    analyses."""
    from hessdiag.report import write_report

    if output.suffix.lower() not in (".html", ".htm"):
        raise InputError(f"the report is HTML: end {str(output)!r} with .html",
                         param="output")
    source = _open_store(store)
    render.stdout.print(f"wrote {write_report(source, output)}")


@app.command(cls=Command, short_help="The model registry: names usable as --model.")
@handles_errors
def models(
    as_json: bool = JSON_OPTION,
    debug: bool = DEBUG_OPTION,
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


@app.command(cls=Command, short_help="The data registry: names usable as --data.")
@handles_errors
def datasets(
    as_json: bool = JSON_OPTION,
    debug: bool = DEBUG_OPTION,
) -> None:
    """The data registry: names usable as --data (plus imagefolder:PATH and factory specs)."""
    from dataclasses import asdict

    from hessdiag.data import list_datasets

    rows = [asdict(d) for d in list_datasets()]
    if as_json:
        render.emit_json(rows)
        return
    render.stdout.print(render.rows_table(rows, "data sets"))


def _exit(code: Any) -> None:
    """``sys.exit(code)``, after ``gc.freeze()`` when torch was imported: the interpreter's
    collections at exit would otherwise walk every object torch (and torch._dynamo, which
    its optimizers import) created, about 0.4-0.7 s of CPU per process for nothing. (No
    collection first: in a process forked from a large one, as the tutorial test's server
    forks, it would touch every inherited object. Nothing of hessdiag's needs a finalizer
    at exit: stores, checkpoints and outputs are closed when written.)"""
    if "torch" in sys.modules:
        import gc

        gc.freeze()
    sys.exit(code)


def main() -> None:
    from hessdiag.distributed import launched

    try:
        env = launched()
    except ValueError as exc:
        render.stderr.print(f"[bold red]error:[/bold red] {render.escape(translate(exc))}",
                            soft_wrap=True)
        sys.exit(EXIT_BAD_INPUT)
    if env is None:
        try:
            app(prog_name="hessdiag")  # the usage line names the command, not python -m
        except SystemExit as exc:
            _exit(exc.code)
        return
    # torchrun: every process runs the command; only rank 0 prints results and writes
    import os

    from hessdiag.distributed import shutdown

    quiet = None
    if env.rank != 0:
        quiet = open(os.devnull, "w")  # noqa: SIM115 (closed below)
        sys.stdout = quiet
    code: Any = 0
    try:
        app(prog_name="hessdiag")
    except SystemExit as exc:
        code = exc.code
    finally:
        try:
            shutdown()
        except Exception:  # noqa: BLE001 (a group torn down by a failure: nothing to do)
            pass
        if quiet is not None:
            sys.stdout = sys.__stdout__
            quiet.close()
    _exit(code)
