"""Shared test fixtures: a zoo of small models and dense float64 Hessians as the truth."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import os
import socket
from pathlib import Path

import pytest
import torch
from torch import nn

# the tests use tiny problems: one thread avoids thread start-up and spin-wait costs that
# dominate (and vary wildly on a loaded machine) at these sizes
torch.set_num_threads(1)


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


_DENSE_CACHE: dict[str, torch.Tensor] = {}


def _dense_key(model: nn.Module, loss_fn, batches, names) -> str | None:
    """A digest of everything the dense Hessian depends on (the model's class, structure,
    parameters and buffers, the loss, the batches, the parameter names), or ``None`` when
    the loss is not a plain torch loss module (a function could close over anything)."""
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


class SharedWeights(nn.Module):
    """The same linear layer applied twice (weight sharing)."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


class GRUClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(3, 4, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.gru(x)[0][:, -1])


class TinyTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(4, 2, dim_feedforward=6, dropout=0.1,
                                                  batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.encoder(x).mean(dim=1))


def _cnn_bn():
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)
    )
    with torch.no_grad():  # non-trivial running statistics and affine parameters
        model.train()
        for _ in range(3):
            model(torch.randn(16, 1, 6, 6) * 2 + 0.5)
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    return model


class _Block(nn.Module):
    """A ResNet basic block: two 3x3 convolutions with BatchNorm, and a strided 1x1
    convolution with BatchNorm on the shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def _resnet_bn():
    """A ResNet in miniature (stem, an identity block, a strided block with a projection
    shortcut, global pooling): 510 parameters, BatchNorm in eval mode with non-trivial
    running statistics and affine parameters."""
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3),
                          nn.ReLU(), _Block(3, 3), _Block(3, 4, stride=2),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():
        model.train()
        for _ in range(3):
            model(torch.randn(16, 1, 6, 6) * 2 + 0.5)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


def _batches(make_x, n_classes=3, sizes=(7, 5, 8)):
    return [(make_x(n), torch.randint(0, n_classes, (n,))) for n in sizes]


ZOO = {
    "mlp-tanh": (lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)),
                 lambda n: torch.randn(n, 4)),
    "cnn-batchnorm-eval": (_cnn_bn, lambda n: torch.randn(n, 1, 6, 6)),
    "resnet-batchnorm-eval": (_resnet_bn, lambda n: torch.randn(n, 1, 6, 6)),
    "mlp-dropout": (lambda: nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.5),
                                          nn.Linear(6, 3)), lambda n: torch.randn(n, 4)),
    "weight-sharing": (SharedWeights, lambda n: torch.randn(n, 4)),
    "gru": (GRUClassifier, lambda n: torch.randn(n, 5, 3)),
    "transformer-encoder": (TinyTransformer, lambda n: torch.randn(n, 3, 4)),
}


@pytest.fixture(params=sorted(ZOO))
def zoo_case(request):
    """(name, model, loss_fn, batches of unequal sizes) for each model of the zoo."""
    torch.manual_seed(1234)
    make_model, make_x = ZOO[request.param]
    model = make_model()
    return request.param, model, nn.CrossEntropyLoss(), _batches(make_x)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection or fetch weights fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

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
