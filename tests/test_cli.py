"""The command line: version, help, python -m, and the shipped demo checkpoint."""

import json
import subprocess
import sys
from pathlib import Path

from hessdiag.cli.app import app
from typer.testing import CliRunner

from hessdiag import __version__

runner = CliRunner()
DEMO = Path(__file__).parent.parent / "checkpoints" / "digits-mlp.pt"


def test_version_and_help():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"hessdiag {__version__}"
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("spectrum", "show", "export", "models", "datasets"):
        assert command in result.stdout


def test_python_dash_m_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "hessdiag", "--version"], capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == f"hessdiag {__version__}"


def test_shipped_demo_checkpoint_analyses_with_no_other_arguments(tmp_path):
    result = runner.invoke(app, ["spectrum", str(DEMO), "--samples", "300", "--top-k", "2",
                                 "--trace", "--json", "--store", str(tmp_path / "s.h5")])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1  # --json: one JSON object, nothing else on stdout
    data = json.loads(lines[0])
    assert data["dim"] == 3466 and data["samples"] == 300 and all(data["converged"])
    assert data["eigenvalues"][0] > data["eigenvalues"][1] > 0
    assert data["trace"] > data["eigenvalues"][0]  # PSD-dominated: the top is part of the trace


def test_usage_errors_exit_2():
    result = runner.invoke(app, ["spectrum", str(DEMO), "--top-k", "0"])
    assert result.exit_code == 2
    result = runner.invoke(app, ["frobnicate"])
    assert result.exit_code == 2
