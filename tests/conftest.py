"""Shared test fixtures and helpers: the in-process CLI, dense float64 Hessians as the truth
(for the models of model_zoo.py and others), and the order of the slow tests."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import torch
    from torch import nn

# torch is imported where it is used, not here: pytest-xdist's controller process imports
# this file before it starts the workers, and runs no test.


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """The tests use tiny problems: one thread avoids thread start-up and spin-wait costs
    that dominate (and vary wildly on a loaded machine) at these sizes."""
    import torch

    torch.set_num_threads(1)


def _cache_typer_commands() -> None:
    """typer's ``CliRunner.invoke`` converts the whole Typer app into click commands on
    every call (signatures and annotations of every command: about 20 ms); the suite
    invokes the CLI hundreds of times in-process. A built command is kept per app (click
    commands keep no state between invocations; the app is a real ``hessdiag`` process's)."""
    import weakref

    import typer.testing

    build = typer.testing._get_command
    built: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def get_command(app):
        if app not in built:
            built[app] = build(app)
        return built[app]

    typer.testing._get_command = get_command


_cache_typer_commands()


# Tests that take many seconds, roughly slowest first (measured under pytest-xdist on a
# shared 2-core machine). They are collected first so that the two workers start on them
# together and the short tests fill in around them; a long test left to the end of the run
# would keep one worker busy while the other idles.
SLOW_FIRST = (
    "tests/test_gpu_check.py::test_gpu_check_tiny_on_cpu",
    "tests/test_experiments.py::test_sam_families_quick",
    "tests/test_tutorial.py::test_tutorial_runs_as_written",
    "tests/test_spectrum_resources.py::test_compiled_products_equal_eager_ones",
    "tests/test_distributed.py::",
    "tests/test_integrations.py::",
    "tests/test_train.py::test_resume_after_sigkill",
    "tests/test_class_axis.py::test_square_outputs_mc_fisher",
    "tests/test_store_scaling.py::test_a_sweep_of_three_training_runs",
    "tests/test_store.py::test_sigkill_at_random_moments",
    "tests/test_experiments.py::",
    "tests/test_operator_zoo.py::test_trace_and_slq_moments_match_dense[resnet",
    "tests/test_align.py::test_follow_measures_each_checkpoint",
    "tests/test_spectrum_resources.py::test_a_large_retained_graph",
    "tests/test_store_scaling.py::",
    "tests/test_plot.py::test_report_fits_a_1280_pixel_window_in_headless_chromium",
    "tests/test_plot.py::test_report_renders_in_headless_chromium",
    "tests/test_help.py::",
    "tests/test_train.py::test_logged_sharpness_pairs",
)


# Modules whose tests share an expensive module-scoped fixture (a two-process torchrun
# launch, training runs): pytest-xdist sends each of them whole to one worker, which builds
# the fixture once (with the default `load` scheduling both workers would build it).
SHARED_FIXTURE_MODULES = ("tests/test_distributed.py", "tests/test_plot.py",
                          "tests/test_train_resume.py")

if importlib.util.find_spec("xdist") is not None:
    def pytest_xdist_make_scheduler(config, log):
        """``-n N`` (``--dist load``): load scheduling in collection order (see
        :data:`SLOW_FIRST`), with each module of :data:`SHARED_FIXTURE_MODULES` one unit.
        (``--dist loadgroup`` would do this with ``xdist_group`` marks, but pytest-xdist 3.8
        cannot rename the tests of pytest 9, so the marks are ignored.)"""
        if config.getvalue("dist") != "load":
            return None  # another --dist: pytest-xdist's own scheduler
        from xdist.scheduler import LoadScopeScheduling

        class Scheduling(LoadScopeScheduling):
            def _split_scope(self, nodeid: str) -> str:
                module = nodeid.split("::", 1)[0]
                return module if module in SHARED_FIXTURE_MODULES else nodeid

        config.option.loadscopereorder = False  # keep the collection order: long tests first
        return Scheduling(config, log)


def pytest_collection_modifyitems(session, config, items):
    """Long tests first, in the order of :data:`SLOW_FIRST` (then the rest as collected)."""

    def rank(item) -> int:
        node = item.nodeid
        return next((i for i, prefix in enumerate(SLOW_FIRST) if node.startswith(prefix)),
                    len(SLOW_FIRST))

    items[:] = sorted(items, key=rank)  # stable: the rest keep their collected order


def run_cli(args, env=None):
    """``hessdiag ARGS`` in-process: ``(exit code, stdout, stderr)``."""
    from hessdiag.cli.app import app
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, [str(a) for a in args], env=env)
    return result.exit_code, result.stdout, result.stderr


def trained_digits_mlp(directory: Path, kw: dict, steps: int, samples: int):
    """An ``mlp`` (``kw``) after ``steps`` full-batch SGD steps (lr 0.1) on the first
    ``samples`` bundled digits, saved as a hessdiag checkpoint: ``(path, model)``."""
    import torch
    from torch import nn

    from hessdiag.checkpoints import save_checkpoint
    from hessdiag.data.digits import load_digits
    from hessdiag.models import build_model

    torch.manual_seed(0)
    model = build_model("mlp", **kw)
    x, y = load_digits("train").tensors
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[:samples]), y[:samples]).backward()
        opt.step()
    path = Path(directory) / "small.pt"
    save_checkpoint(path, model, model_spec="mlp", model_kwargs=kw, step=steps,
                    data={"spec": "digits", "split": "train"})
    return path, model


_DENSE_CACHE: dict[str, torch.Tensor] = {}  # key -> Hessian, in this process


def _dense_key(model: nn.Module, loss_fn, batches, names) -> str | None:
    """A digest of everything the dense Hessian depends on (the model's class, structure,
    parameters and buffers, the loss, the batches, the parameter names), or ``None`` when
    the loss is not a plain torch loss module (a function could close over anything)."""
    import torch
    from torch import nn

    if not (isinstance(loss_fn, nn.Module)
            and type(loss_fn).__module__ == "torch.nn.modules.loss"):
        return None
    h = hashlib.sha256()

    def add(obj) -> None:
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update((t.float() if t.dtype == torch.bfloat16 else t).numpy().tobytes())
        elif isinstance(obj, dict):
            for k in sorted(obj):
                h.update(repr(k).encode())
                add(obj[k])
        elif isinstance(obj, list | tuple):
            h.update(f"{type(obj).__name__}{len(obj)}".encode())
            for o in obj:
                add(o)
        else:
            h.update(repr(obj).encode())

    for m in model.modules():
        h.update(f"{type(m).__module__}.{type(m).__qualname__}".encode())
    h.update(repr(model).encode())
    add(dict(model.state_dict(keep_vars=False)))
    add({n: p.requires_grad for n, p in model.named_parameters()})
    h.update(f"{type(loss_fn).__qualname__}{sorted(vars(loss_fn).items(), key=str)!r}".encode())
    add(list(batches))
    add(None if names is None else list(names))
    return h.hexdigest()


def dense_hessian(model: nn.Module, loss_fn, batches, names=None) -> torch.Tensor:
    """The Hessian of the sample-weighted mean loss over ``batches``, in float64, of a
    function of the flat parameter vector (eval mode). Memoised per process (a copy is
    returned): several tests of the zoo take the same model's Hessian as their truth."""
    key = _dense_key(model, loss_fn, batches, names)
    if key is not None and key in _DENSE_CACHE:
        return _DENSE_CACHE[key].clone()
    H = _dense_hessian(model, loss_fn, batches, names)
    if key is not None:
        _DENSE_CACHE[key] = H.clone()
    return H


def _dense_hessian(model: nn.Module, loss_fn, batches, names=None) -> torch.Tensor:
    import torch

    model = copy.deepcopy(model).double().eval()
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    names = list(params) if names is None else list(names)
    fixed = {n: t.detach() for n, t in list(model.named_parameters()) + list(model.named_buffers())
             if n not in names}
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    flat0 = torch.cat([params[n].reshape(-1) for n in names])
    total = sum(int(y.shape[0]) for _, y in batches)

    def mean_loss(flat):
        chunks = torch.split(flat, sizes)
        state = {**fixed, **{n: c.view(s) for n, c, s in zip(names, chunks, shapes, strict=True)}}
        acc = 0.0
        for x, y in batches:
            x = x.double() if x.is_floating_point() else x
            out = torch.func.functional_call(model, state, (x,))
            acc = acc + loss_fn(out, y.double() if y.is_floating_point() else y) * y.shape[0]
        return acc / total

    from torch.nn.attention import SDPBackend, sdpa_kernel

    # torch.autograd.functional.hessian (reverse-over-reverse, one row at a time), not
    # torch.func.hessian: it gives the transformer an asymmetric, wrong Hessian in torch
    # 2.14 (checked against this and against finite differences), wrong in the rows of
    # the LayerNorm weights, from the first backward run under vmap (jacrev).
    with sdpa_kernel([SDPBackend.MATH]):  # the fused kernels have no double-backward
        H = torch.autograd.functional.hessian(mean_loss, flat0)
    assert torch.allclose(H, H.T, atol=1e-12 * float(H.abs().max())), "truth not symmetric"
    return H


def pytest_generate_tests(metafunc):
    """``zoo_case`` runs once per model of :data:`model_zoo.ZOO`."""
    if "zoo_case" in metafunc.fixturenames:
        from model_zoo import ZOO

        metafunc.parametrize("zoo_case", sorted(ZOO), indirect=True)


@pytest.fixture
def zoo_case(request):
    """(name, model, loss_fn, batches of unequal sizes) for each model of the zoo."""
    import torch
    from model_zoo import ZOO, _batches
    from torch import nn

    torch.manual_seed(1234)
    make_model, make_x = ZOO[request.param]
    model = make_model()
    return request.param, model, nn.CrossEntropyLoss(), _batches(make_x)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection or fetch weights fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    import torch

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def read_only_path(tmp_path: Path, name: str) -> Path:
    """A file path in a directory nobody can create files in (root writes through
    permission bits, so for root: sysfs, which refuses everyone)."""
    if os.geteuid() == 0:
        return Path("/sys") / f"hessdiag-test-{name}"
    ro = tmp_path / "read-only"
    ro.mkdir(exist_ok=True)
    ro.chmod(0o555)
    return ro / name


def pytest_unconfigure(config):
    """The session is over (in each pytest-xdist worker too): a last collection, then
    ``gc.freeze()``, so that the interpreter's collections at exit do not walk every object
    torch and the tests created (about a second of CPU per process, at the end of the run)."""
    import gc

    gc.collect()
    gc.freeze()
