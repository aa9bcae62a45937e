"""What a spectrum run costs and where it runs: ``peak_memory`` in results, JSON, the store
and the table; the Lanczos basis on another device than the operator; compiled products."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hessdiag.cli.app import app
from torch import nn
from typer.testing import CliRunner

from hessdiag._errors import InputError
from hessdiag.curvature import HessianOperator, lanczos
from hessdiag.curvature.linear import MatrixOperator
from hessdiag.data import load_dataset
from hessdiag.records import provenance, read_spectrum, write_spectrum
from hessdiag.runtime import PeakMemory
from hessdiag.settings import SpectrumSettings
from hessdiag.spectrum import compute_spectrum
from hessdiag.store import Record, Store
from hessdiag.task import new_task


@pytest.fixture(scope="module")
def task():
    torch.manual_seed(0)
    return new_task("mlp", load_dataset("digits", samples=64), model_kwargs={"hidden": 6})


def _tiny():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(24, 5), torch.randint(0, 3, (24,))
    return model, (x, y)


# --------------------------------------------------------------------------- peak memory

CPU_KINDS = ("block-peak-rss", "process-peak-rss")  # Linux with /proc, or elsewhere


def test_peak_memory_is_reported_stored_and_read_back(task, tmp_path):
    result = compute_spectrum(task.model, task.loss, task.batches(32),
                              SpectrumSettings(top_k=2, dtype="float64"))
    d = result.to_dict()
    assert d["peak_memory_kind"] in CPU_KINDS
    assert isinstance(d["peak_memory"], int) and d["peak_memory"] > 0
    assert isinstance(d["peak_memory_growth"], int) and 0 <= d["peak_memory_growth"] \
        <= d["peak_memory"]
    json.dumps(d)
    store = Store(tmp_path / "s.h5")
    analysis = write_spectrum(store, result, provenance(task))
    record = store.analysis(analysis)
    assert record.attrs["peak_memory"] == result.peak_memory
    back = read_spectrum(record)
    assert (back.peak_memory, back.peak_memory_growth, back.peak_memory_kind) == \
        (result.peak_memory, result.peak_memory_growth, result.peak_memory_kind)
    # a record written before peak memory was measured still reads, without it
    old = {k: v for k, v in record.attrs.items() if not k.startswith("peak_memory")}
    legacy = read_spectrum(Record(record.id, record.group, old, record.arrays))
    assert legacy.peak_memory is None and legacy.to_dict()["peak_memory"] is None
    assert legacy.to_dict()["eigenvalues"] == result.to_dict()["eigenvalues"]


def test_peak_memory_on_cpu_is_the_peak_resident_set_size():
    with PeakMemory("cpu") as memory:
        block = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, touched
        del block
    assert memory.kind in CPU_KINDS and memory.peak > 64 << 20
    assert memory.growth is not None and 0 <= memory.growth <= memory.peak
    # in a fresh process (where no earlier, freed memory can be reused without raising the
    # resident set) the block's own 64 MiB show as growth when the peak can be reset
    script = textwrap.dedent("""
        import torch
        from hessdiag.runtime import PeakMemory
        with PeakMemory("cpu") as memory:
            block = torch.ones(64 << 20, dtype=torch.uint8)
            del block
        print(memory.kind, memory.growth)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    kind, growth = proc.stdout.split()
    if kind == "block-peak-rss":  # the peak was reset at the start: the block's own
        assert int(growth) >= 60 << 20


def test_a_large_retained_graph_has_a_larger_peak_than_a_tiny_run():
    """In a fresh process (so no earlier test's peak hides it): a tiny spectrum, then one
    whose kept graph holds over 100 MB (wide activations, few parameters); the second
    raises the peak by at least half its estimate."""
    script = textwrap.dedent("""
        import json, torch
        from torch import nn
        from hessdiag.spectrum import compute_spectrum
        from hessdiag.settings import SpectrumSettings
        torch.manual_seed(0)
        out = {}
        for name, n, width in (("tiny", 8, 4), ("large", 8192, 2048)):
            model = nn.Sequential(nn.Linear(16, width), nn.Tanh(), nn.Linear(width, 3))
            x, y = torch.randn(n, 16), torch.randint(0, 3, (n,))
            r = compute_spectrum(model, nn.CrossEntropyLoss(), [(x, y)],
                                 SpectrumSettings(top_k=1, tol=1e-1))
            out[name] = {"peak": r.peak_memory, "growth": r.peak_memory_growth,
                         "mode": r.operator["mode"],
                         "estimate": r.operator["memory_estimate"]}
            del model, x, y, r
        print(json.dumps(out))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    tiny, large = out["tiny"], out["large"]
    assert large["mode"] == "retained-graph" and large["estimate"] > 100e6
    assert large["peak"] > tiny["peak"] + 0.5 * large["estimate"]
    assert large["growth"] >= 0.5 * large["estimate"]


def test_the_table_caption_and_json_show_peak_memory(tmp_path):
    from hessdiag.checkpoints import save_checkpoint
    from hessdiag.models import build_model

    torch.manual_seed(0)
    kw = {"num_classes": 10, "in_shape": [1, 8, 8], "hidden": 4}
    path = tmp_path / "m.pt"
    save_checkpoint(path, build_model("mlp", **kw), model_spec="mlp", model_kwargs=kw,
                    data={"spec": "digits", "split": "train"})
    runner = CliRunner()
    res = runner.invoke(app, ["spectrum", str(path), "--samples", "48", "--top-k", "1",
                              "--store", str(tmp_path / "s.h5")])
    assert res.exit_code == 0, res.stderr
    assert "peak memory" in " ".join(res.stdout.split()) and "RSS" in res.stdout
    res = runner.invoke(app, ["spectrum", str(path), "--samples", "48", "--top-k", "1",
                              "--basis-device", "cpu", "--json",
                              "--store", str(tmp_path / "s.h5")])
    assert res.exit_code == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["peak_memory"] > 0 and data["peak_memory_kind"] in CPU_KINDS


# --------------------------------------------------------------------------- basis device


class _ElsewhereOperator:
    """A dense matrix that says it lives on ``cpu:0`` (not the same device as ``cpu`` to
    the solver), and checks that every vector it gets is on its device."""

    def __init__(self, matrix: torch.Tensor) -> None:
        self.inner = MatrixOperator(matrix)
        self.dim, self.dtype = self.inner.dim, self.inner.dtype
        self.device = torch.device("cpu", 0)
        self.received = 0

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        assert v.device.type == self.device.type and v.shape == (self.dim,)
        self.received += 1
        return self.inner.matvec(v)


def test_the_basis_can_live_on_another_device_than_the_operator():
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(60, 60, generator=gen, dtype=torch.float64))
    A = q @ torch.diag(torch.linspace(-2, 5, 60, dtype=torch.float64)) @ q.T
    op = _ElsewhereOperator(A)
    moved = lanczos(op, k=3, tol=1e-10, seed=1, basis_device="cpu")
    plain = lanczos(MatrixOperator(A), k=3, tol=1e-10, seed=1)
    assert op.received == moved.hvps == plain.hvps
    assert moved.settings["basis_device"] == "cpu" and moved.eigenvectors.device.type == "cpu"
    np.testing.assert_array_equal(moved.eigenvalues, plain.eigenvalues)
    torch.testing.assert_close(moved.eigenvectors, plain.eigenvectors, rtol=0, atol=0)


def test_spectrum_with_the_basis_on_the_cpu_is_identical(task):
    base = SpectrumSettings(top_k=3, lambda_min=True, dtype="float64")
    a = compute_spectrum(task.model, task.loss, task.batches(32), base)
    b = compute_spectrum(task.model, task.loss, task.batches(32),
                         dataclasses.replace(base, basis_device="cpu"))
    np.testing.assert_array_equal(a.top.eigenvalues, b.top.eigenvalues)
    np.testing.assert_array_equal(a.top.residuals, b.top.residuals)
    assert a.lambda_min == b.lambda_min and a.hvps == b.hvps
    assert b.settings["basis_device"] == "cpu"


def test_a_basis_device_this_machine_lacks_is_one_line_of_bad_input(task, tmp_path):
    with pytest.raises(InputError) as caught:
        compute_spectrum(task.model, task.loss, task.batches(32),
                         SpectrumSettings(top_k=1, basis_device="nonsense"))
    assert caught.value.param == "basis_device"
    if not torch.cuda.is_available():
        with pytest.raises(InputError) as caught:
            compute_spectrum(task.model, task.loss, task.batches(32),
                             SpectrumSettings(top_k=1, basis_device="cuda"))
        assert caught.value.param == "basis_device" and "CUDA" in str(caught.value)


# --------------------------------------------------------------------------- compile


def _compile_works() -> bool:
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        return False
    try:
        import torch._dynamo  # noqa: F401

        return bool(torch._dynamo.is_dynamo_supported())
    except Exception:  # noqa: BLE001 - any failure means: not available here
        return False


@pytest.mark.skipif(not _compile_works(), reason="torch.compile is not available here")
def test_compiled_products_equal_eager_ones_in_float64():
    model, batch = _tiny()
    eager = HessianOperator(model, nn.CrossEntropyLoss(), batch, dtype=torch.float64,
                            mode="forward-over-reverse")
    compiled = HessianOperator(model, nn.CrossEntropyLoss(), batch, dtype=torch.float64,
                               compile=True)
    assert compiled.mode == "forward-over-reverse" and compiled.describe()["compile"]
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        v = torch.randn(eager.dim, generator=gen, dtype=torch.float64)
        a, b = eager.matvec(v), compiled.matvec(v)
        assert float((a - b).abs().max()) <= 1e-10 * max(1.0, float(a.abs().max()))


def test_compile_refuses_the_reverse_only_modes():
    model, batch = _tiny()
    for mode in ("double-backward", "retained-graph"):
        with pytest.raises(InputError) as caught:
            HessianOperator(model, nn.CrossEntropyLoss(), batch, mode=mode, compile=True)
        assert caught.value.param == "compile"
    with pytest.raises(InputError) as caught:
        SpectrumSettings(compile=True, hvp_mode="double-backward")
    assert caught.value.param == "compile"
    with pytest.raises(InputError) as caught:
        SpectrumSettings(compile=True, curvature="ggn")
    assert caught.value.param == "compile"
    res = CliRunner().invoke(app, ["spectrum", "missing.pt", "--compile", "--hvp-mode",
                                   "retained-graph"])
    assert res.exit_code == 2 and res.stderr.startswith("error: --compile must be off")


def test_a_failing_compile_is_one_line_of_bad_input(monkeypatch):
    from torch._dynamo.exc import TorchDynamoException

    def broken(fn):
        def call(*args, **kwargs):
            raise TorchDynamoException("no working C compiler\nmore lines")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    model, batch = _tiny()
    op = HessianOperator(model, nn.CrossEntropyLoss(), batch, compile=True)
    with pytest.raises(ValueError, match="torch.compile could not compile the product "
                                         r"\(no working C compiler\); run without compile"):
        op.matvec(torch.ones(op.dim))
