"""benchmarks/gpu_check.sh runs end to end on a CPU at tiny sizes and prints its table."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
MODELS = ("resnet18", "vit")
MODES = ("forward-over-reverse", "double-backward", "retained-graph")
TIMEOUT = 600  # seconds; the tiny run takes about a minute on an idle 2-core CPU


@pytest.mark.skipif(sys.platform == "win32", reason="a bash script")
def test_gpu_check_tiny_on_cpu(tmp_path):
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--device", "cpu", "--tiny", "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = proc.stdout
    for model in MODELS:
        for mode in MODES:
            for what in ("matvec", "loop x2", "batched x2"):
                row = re.search(rf"^{model}\s+{mode} {what}\s+([0-9.eE+-]+)\s", table, re.M)
                assert row, f"no row for {model} {mode} {what}:\n{table}"
                assert float(row.group(1)) > 0, row.group(0)
        top = re.search(rf"^{model}\s+top-5 hessdiag lanczos tol=1e-3\s+([0-9.eE+-]+)\s",
                        table, re.M)
        assert top and float(top.group(1)) > 0, table
        assert re.search(rf"^{model}\s+top-5 pyhessian", table, re.M), table
        assert re.search(rf"^{model}\s+forward-over-reverse compile=True", table, re.M), table
    assert out.exists()
