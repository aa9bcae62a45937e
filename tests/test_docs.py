"""The docs agree with this checkout.

* The printed outputs between ``<!-- begin output: COMMAND -->`` and ``<!-- end output -->``
  are what ``python docs/regenerate.py`` writes: the fast blocks are run again here (the
  ``slow`` ones, a spectrum or a landscape of several seconds each, only by the script).
* Every ``--option`` a command page names is an option of a hessdiag command, and every option
  written in a ``hessdiag COMMAND ...`` command line (a code block, with its continuation
  lines, or an inline code span) of a page or the README is an option of that COMMAND,
  as ``--help`` lists it.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]

# options of other programs that a page shows (report.md: headless Chromium's)
FOREIGN = {"--headless", "--screenshot", "--window-size", "--no-sandbox", "--disable-gpu"}

_OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
_INVOCATION = re.compile(r"(?:^|[\s`(])hessdiag\s+([a-z][a-z-]*)\b(.*)")


def _regenerate():
    spec = importlib.util.spec_from_file_location("docs_regenerate", DOCS / "regenerate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _options_by_command() -> dict[str, set[str]]:
    import typer
    from hessdiag.cli.app import app

    def names(params) -> set[str]:
        return {opt for param in params for opt in (*param.opts, *param.secondary_opts)
                if opt.startswith("--")} | {"--help"}

    group = typer.main.get_command(app)
    return {"": names(group.params),
            **{name: names(command.params) for name, command in group.commands.items()}}


def _command_lines(text: str) -> list[str]:
    """``hessdiag COMMAND ...`` lines with their continuations: in code blocks, lines
    ending in a backslash or followed by indented lines; in prose, inline code spans."""
    lines: list[str] = []
    fenced = re.findall(r"^```[a-z]*\n(.*?)^```", text, re.S | re.M)
    for block in fenced:
        current: str | None = None
        for line in block.splitlines():
            if current is not None and (current.endswith("\\") or line.startswith("    ")):
                current = current.rstrip("\\") + " " + line.strip()
                continue
            if current is not None:
                lines.append(current)
            current = line if _INVOCATION.search(line) else None
        if current is not None:
            lines.append(current)
    prose = re.sub(r"^```[a-z]*\n.*?^```", "", text, flags=re.S | re.M)
    lines += [span for span in re.findall(r"`([^`\n]+)`", prose.replace("\n", " "))
              if _INVOCATION.search(span)]
    return lines


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_option_a_page_names_exists(page):
    """On the command pages every ``--option`` is hessdiag's (other pages also show
    pip's, torchrun's, Slurm's); on every page, a hessdiag command line's are its own."""
    options = _options_by_command()
    known = set().union(*options.values()) | FOREIGN
    text = page.read_text()
    if page.parent.name == "commands":
        unknown = sorted(set(_OPTION.findall(text)) - known)
        assert not unknown, f"{page.name} names options no hessdiag command has: {unknown}"
    wrong = []
    for line in _command_lines(text):
        for match in _INVOCATION.finditer(line):
            command, rest = match.groups()
            if command not in options or not command:
                continue  # prose such as "hessdiag never downloads"
            rest = re.split(r";|\s\|\s|&&|\s#|\bhessdiag\s", rest)[0]  # to the next command
            wrong += [f"hessdiag {command} {opt}" for opt in _OPTION.findall(rest)
                      if opt not in options[command]]
    assert not wrong, f"{page.name}: options that command does not have: {sorted(set(wrong))}"


def test_output_markers_are_well_formed_and_no_block_is_empty():
    regenerate = _regenerate()
    pages = [p for p in PAGES if "begin output" in p.read_text()]
    names = {p.relative_to(ROOT).as_posix() for p in pages}
    assert {"docs/commands/check.md", "docs/ci.md", "docs/quickstart.md"} <= names
    for page in pages:
        for match in regenerate.blocks(page.read_text()):
            body = match.group("body")
            assert body.startswith(f"$ {match.group('command')}\n"), page.name
            assert len(body.splitlines()) > 1, f"{page.name}: {match.group('command')} " \
                "has no output: run python docs/regenerate.py"


def test_fast_output_blocks_are_what_the_commands_print(tmp_path):
    regenerate = _regenerate()
    runner = regenerate.Runner(tmp_path)
    stale = []
    for page in PAGES:
        text = page.read_text()
        if "begin output" in text and regenerate.regenerate(text, runner, fast=True) != text:
            stale.append(page.relative_to(ROOT).as_posix())
    assert not stale, f"outputs drifted in {stale}: run python docs/regenerate.py"


def test_the_command_table_lists_every_command():
    text = (DOCS / "cli.md").read_text()
    first = text[text.index("| command | what | page |"):].split("\n\n")[0]
    table = re.findall(r"^\| `([a-z-]+)` \|", first, re.M)
    assert sorted(table) == sorted(name for name in _options_by_command() if name)


def test_every_option_of_a_command_is_on_its_page():
    """An option ``--help`` lists is documented on the command's page (any one of its
    names; ``--debug`` and ``--help`` are on cli.md, ``compact``'s in store.md)."""
    import typer
    from hessdiag.cli.app import app

    group = typer.main.get_command(app)
    assert "`--debug`" in (DOCS / "cli.md").read_text()
    pages = {"baseline": "commands/check.md", "check": "commands/check.md",
             "compact": "store.md"}
    missing = []
    for name, command in group.commands.items():
        text = (DOCS / pages.get(name, f"commands/{name}.md")).read_text()
        for param in command.params:
            names = [opt for opt in (*param.opts, *param.secondary_opts)
                     if opt.startswith("-") and opt not in ("--debug", "--help")]
            if names and not any(re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", text)
                                 for opt in names):
                missing.append(f"hessdiag {name} {'/'.join(names)}")
    assert not missing, f"options no page documents: {missing}"
