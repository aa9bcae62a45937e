"""The help a new user reads first: ``hessdiag --help`` and ``hessdiag spectrum --help`` as
a 100-column terminal shows them (screenshots taken in tmux, kept as test artifacts), every
command's options filed into named panels, flags shown as flags."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import typer
from hessdiag.cli.app import app

ROOT = Path(__file__).resolve().parent.parent
TMUX = shutil.which("tmux")
PANEL_TITLE = re.compile(r"^╭─ (.+?) ─")


def screenshot(args: list[str], out: Path, width: int = 100, height: int = 60) -> str:
    """What ``python -m hessdiag ARGS`` shows in a ``width`` x ``height`` tmux terminal,
    scrollback included; also written to ``out``."""
    socket = f"hessdiag-help-{uuid.uuid4().hex[:8]}"
    done = "__hessdiag_help_done__"
    command = (f"cd {ROOT} && PYTHONPATH={ROOT} {sys.executable} -m hessdiag "
               + " ".join(args) + f"; echo {done}; sleep 60")
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "TMUX")}
    env["TERM"] = "xterm-256color"
    tmux = [TMUX, "-L", socket, "-f", "/dev/null"]
    subprocess.run([*tmux, "new-session", "-d", "-x", str(width), "-y", str(height), "-s", "help",
                    command], check=True, env=env)
    try:
        text = ""
        for _ in range(600):
            text = subprocess.run([*tmux, "capture-pane", "-p", "-S", "-", "-t", "help"],
                                  capture_output=True, text=True, check=True).stdout
            if done in text:
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"hessdiag {' '.join(args)} did not finish in tmux:\n{text}")
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)
    text = text[:text.index(done)].rstrip() + "\n"
    out.write_text(text)
    return text


def panels(text: str) -> dict[str, list[str]]:
    """Each panel's title and the lines inside its box."""
    out: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        title = PANEL_TITLE.match(line)
        if title:
            current = out.setdefault(title.group(1), [])
        elif line.startswith("╰"):
            current = None
        elif current is not None:
            current.append(line.strip().strip("│").rstrip())
    return out


@pytest.mark.skipif(TMUX is None, reason="tmux is not installed")
def test_top_level_help_has_one_line_per_command(tmp_path):
    text = screenshot(["--help"], tmp_path / "help-hessdiag.txt")
    assert max(len(line) for line in text.splitlines()) <= 100
    rows = panels(text)["Commands"]
    names = [cmd.name for cmd in typer.main.get_command(app).commands.values()]
    # one row per command, each summary whole on its line: no continuation rows
    assert [row.split()[0] for row in rows] == names, text
    assert all(row.rstrip().endswith(".") for row in rows), text
    assert "<bool>" not in text and "BOOLEAN" not in text


@pytest.mark.skipif(TMUX is None, reason="tmux is not installed")
def test_spectrum_help_groups_its_options_and_shows_flags_as_flags(tmp_path):
    text = screenshot(["spectrum", "--help"], tmp_path / "help-spectrum.txt")
    found = panels(text)
    named = [title for title in found if title not in ("Arguments", "Options")]
    assert len(named) >= 4, list(found)
    assert "Options" not in found  # every option is in a named panel
    for title in ("Model, data and loss", "What to compute", "Solver", "Output",
                  "Trust and loading"):
        assert title in found, list(found)
    assert "<bool>" not in text and "BOOLEAN" not in text
    # a flag's row holds its name and then its help, no type in between
    trace = next(row for row in found["What to compute"] if row.split()[:1] == ["--trace"])
    assert trace.split()[1] == "Also", trace


def test_every_option_of_every_command_is_in_a_named_panel():
    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        ctx = typer.Context(command, info_name=name)
        for param in command.get_params(ctx):
            if isinstance(param, typer.core.TyperOption):
                assert param.rich_help_panel, f"{name} {param.opts}: no help panel"
                if param.is_flag:
                    assert param.display_type_rich(ctx) == "", f"{name} {param.opts}"


def test_every_summary_fits_a_row_of_an_80_column_terminal():
    """`hessdiag --help` at 80 columns leaves 65 characters for a summary."""
    import typer.main
    from hessdiag.cli.app import app

    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        summary = command.get_short_help_str(limit=1000)
        assert len(summary) <= 65, (name, len(summary), summary)
