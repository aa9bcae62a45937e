"""The command line: version, help, the demo end to end, errors as one line with exit 2."""

import json
import subprocess
import sys

from hessdiag.cli.app import app
from typer.testing import CliRunner

from hessdiag import __version__

runner = CliRunner()


def test_version_and_help():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"hessdiag {__version__}"
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "demo" in result.stdout


def test_python_dash_m_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "hessdiag", "--version"], capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == f"hessdiag {__version__}"


def test_demo_json_is_consistent_and_writes_its_files(tmp_path):
    result = runner.invoke(app, ["demo", "--epochs", "3", "--out-dir", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1  # --json: one JSON object, nothing else on stdout
    data = json.loads(lines[0])
    eig = data["eigenvalues"]
    assert len(eig) == 5 and eig == sorted(eig, reverse=True)
    assert all(data["converged"]) and data["dim"] == 2410 and data["samples"] == 1437
    assert data["lambda_min"] <= eig[-1]
    # two independent trace estimates (Hutch++ and SLQ) agree within their errors
    a, sa = data["trace"], data["trace_stderr"]
    b, sb = data["density"]["trace"], data["density"]["trace_stderr"]
    assert abs(a - b) <= 4 * (sa**2 + sb**2) ** 0.5
    saved = json.loads((tmp_path / "spectrum.json").read_text())
    assert saved["eigenvalues"] == eig
    assert (tmp_path / "density.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_option_value_exits_2_with_one_line(tmp_path):
    result = runner.invoke(app, ["demo", "--epochs", "0", "--out-dir", str(tmp_path)])
    assert result.exit_code == 2
