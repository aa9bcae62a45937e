"""Regenerate the printed outputs shown in the docs: ``python docs/regenerate.py``.

A block of printed output in a page is written between two markers::

    <!-- begin output: hessdiag check checkpoints/digits-mlp.pt --baseline ... -->
    ```
    $ hessdiag check checkpoints/digits-mlp.pt --baseline ...
    (what the command printed)
    ```
    <!-- end output -->

and ``begin output slow:`` marks a block whose command takes more than a few seconds
(the test, ``tests/test_docs.py``, leaves those out; this script runs them all unless
``--fast``). The command after the colon is run as written, in a temporary directory
holding a copy of the shipped ``checkpoints/`` (the digits MLP and its baseline), with
hessdiag's defaults (seed 0) and torch on one thread, through the Typer app the
``hessdiag`` command runs, in this process, with the consoles the CLI makes when stdout
and stderr are not a terminal (160 columns, no colour): what a CI log shows, whether or
not this script runs in a terminal (stdout first, then stderr). A command is run once
however many pages show it.

What must vary from run to run is replaced here, so that the committed text is stable:
wall times (``in 7.5 s`` becomes ``in … s``), peak memory (``… MiB``), the time stamp and
random suffix of an analysis id (``spectrum-…``) and the temporary directory.

``python docs/regenerate.py [--fast] [--check] [PAGE ...]``: rewrite the pages in place
(default: every page under ``docs/``), or with ``--check`` only report the blocks that
differ (exit 1 if any).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SHIPPED = ("digits-mlp.pt", "digits-mlp.baseline.json")

BLOCK = re.compile(
    r"^<!-- begin output(?P<slow> slow)?: (?P<command>.+?) -->\n"
    r"```\n(?P<body>.*?)```\n"
    r"<!-- end output -->", re.S | re.M)
BEGIN = re.compile(r"^<!-- begin output", re.M)  # at a line's start: prose may quote it

_VARYING = (
    (re.compile(r"\b\d+(?:\.\d+)? s\b(?!\.e\.)"), "… s"),             # wall times
    (re.compile(r"\b\d+(?:\.\d+)? MiB\b"), "… MiB"),                   # peak memory
    (re.compile(r"\b([a-z]+(?:-[a-z]+)*)-\d{8}T\d{6}-[0-9a-f]+\b"), r"\1-…"),  # analysis ids
)


def blocks(text: str) -> list[re.Match]:
    """The output blocks of a page; a ``begin output`` marker without its block is an
    error, so a block cannot silently drop out of regeneration."""
    found = list(BLOCK.finditer(text))
    if len(found) != len(BEGIN.findall(text)):
        raise ValueError("a '<!-- begin output: ... -->' marker is not followed by one "
                         "``` block and '<!-- end output -->'")
    return found


def normalise(text: str, workdir: Path) -> str:
    text = text.replace(str(workdir) + os.sep, "").replace(str(workdir), ".")
    for pattern, replacement in _VARYING:
        text = pattern.sub(replacement, text)
    return "\n".join(line.rstrip() for line in text.splitlines())


def run(command: str, workdir: Path) -> str:
    """``$ command`` and what it printed, normalised."""
    import torch
    from hessdiag.cli import render
    from hessdiag.cli.app import app
    from rich.console import Console
    from typer.testing import CliRunner

    args = shlex.split(command)
    if args[0] != "hessdiag":
        raise ValueError(f"an output block runs a hessdiag command, not {command!r}")
    here, threads = Path.cwd(), torch.get_num_threads()
    consoles = render.stdout, render.stderr
    # what a CI log shows, whether or not this script runs in a terminal: no colour, and
    # the width the CLI gives a console that is not a terminal
    plain = {"highlight": False, "width": 160, "force_terminal": False, "color_system": None}
    render.stdout, render.stderr = Console(**plain), Console(stderr=True, **plain)
    torch.set_num_threads(1)  # the same sums in the same order on every machine
    os.chdir(workdir)
    try:
        result = CliRunner().invoke(app, args[1:], env={"GITHUB_ACTIONS": None})
    finally:
        os.chdir(here)
        torch.set_num_threads(threads)
        render.stdout, render.stderr = consoles
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise RuntimeError(f"{command}: {result.exception!r}") from result.exception
    printed = result.stdout + result.stderr
    return f"$ {command}\n{normalise(printed, workdir)}\n"


class Runner:
    """Runs each distinct command once, in one temporary directory with the shipped
    checkpoints."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        (workdir / "checkpoints").mkdir()
        for name in SHIPPED:
            shutil.copy2(ROOT / "checkpoints" / name, workdir / "checkpoints" / name)
        self.outputs: dict[str, str] = {}

    def __call__(self, command: str) -> str:
        if command not in self.outputs:
            self.outputs[command] = run(command, self.workdir)
        return self.outputs[command]


def regenerate(text: str, runner: Runner, *, fast: bool = False) -> str:
    """The page with every output block (every fast one with ``fast``) regenerated."""
    def replace(match: re.Match) -> str:
        if fast and match.group("slow"):
            return match.group(0)
        body = runner(match.group("command"))
        slow = match.group("slow") or ""
        return (f"<!-- begin output{slow}: {match.group('command')} -->\n```\n{body}```\n"
                "<!-- end output -->")

    blocks(text)
    return BLOCK.sub(replace, text)


def pages(names: list[str]) -> list[Path]:
    if names:
        return [Path(name).resolve() for name in names]
    return sorted(p for p in DOCS.rglob("*.md") if BEGIN.search(p.read_text()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python docs/regenerate.py",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("pages", nargs="*", help="pages to regenerate (default: all)")
    parser.add_argument("--fast", action="store_true", help="leave 'slow' blocks as they are")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if a page would change")
    args = parser.parse_args(argv)
    stale = []
    with tempfile.TemporaryDirectory(prefix="hessdiag-docs-") as tmp:
        runner = Runner(Path(tmp))
        for page in pages(args.pages):
            old = page.read_text()
            new = regenerate(old, runner, fast=args.fast)
            if new != old:
                stale.append(page)
                if not args.check:
                    page.write_text(new)
            print(f"{page.relative_to(ROOT)}: {'changed' if new != old else 'unchanged'}"
                  f"{' (not written)' if args.check and new != old else ''}",
                  file=sys.stderr)
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
