"""docs/tutorial.md runs as written.

Every fenced ```bash block of the tutorial is preceded by a marker comment:

* ``<!-- tutorial:setup -->``: the variables (store, checkpoint directory, epochs); this
  block is prepended to every block that runs, so each runs with the same variables;
* ``<!-- tutorial:run -->``: run, must exit 0; ``<!-- tutorial:run exit=1 -->``: run,
  must exit 1 (the failing sharpness check);
* ``<!-- tutorial:skip -->``: not run (installation).

A bash block without a marker fails the test, so a new block cannot be silently left
out. The blocks run in order, each with ``bash -e -o pipefail`` in one temporary
directory, with the venv's ``bin`` on ``PATH`` and ``OMP_NUM_THREADS=1``. The test
changes nothing in the commands; it may only change the values of the setup block's
variables (:data:`OVERRIDES`: the analyses measure on 512 training samples, not all
1,437; the checkpoint names do not change).

Starting Python and importing torch costs 4-6 s a process on a loaded 2-core machine,
which alone would take the 18 commands over a minute. So by default ``hessdiag`` on
``PATH`` is a small client that hands its arguments, environment, working directory and
its stdin/stdout/stderr to a server process which imported ``hessdiag.cli`` (and torch,
matplotlib, h5py, what the commands import lazily) and drew one figure once, and forks a
child per command; the child runs the console script's own entry point,
``hessdiag.cli.app:main``, and its exit code becomes the client's.
``HESSDIAG_TUTORIAL_COLD=1`` runs every command through the venv's real
``hessdiag`` console script instead (several minutes).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIAL = ROOT / "docs" / "tutorial.md"
VENV_BIN = Path(sys.executable).parent
OVERRIDES = {"SAMPLES": "512"}  # NAME -> value for the setup block's `NAME=value` lines

PNG = b"\x89PNG\r\n\x1a\n"
HDF5 = b"\x89HDF\r\n\x1a\n"

_BLOCK = re.compile(r"<!--\s*tutorial:(?P<kind>setup|run|skip)(?:\s+exit=(?P<exit>\d+))?"
                    r"\s*-->\s*\n```bash\n(?P<body>.*?)\n```", re.S)
_FENCE = re.compile(r"^```bash\s*$", re.M)
_WRITES = re.compile(r"(?:\s-o|--out|--plot)\s+(\$OUT/\S+)")

_SERVER = r'''
import contextlib, io, json, os, signal, socket, sys
import pkgutil, importlib
import h5py, matplotlib, torch
# what the commands import as they run (each child would import it anew): scipy.special
# (intervals), the PNG writer's plugins, contours, thread limits, and pydantic (typer
# converts every parameter through it: 0.15 s a command)
import contourpy, PIL.Image, scipy.special, threadpoolctl
PIL.Image.preinit()
with contextlib.suppress(ImportError):
    import typer._adapters
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import hessdiag
from hessdiag.cli.app import main
for mod in pkgutil.walk_packages(hessdiag.__path__, "hessdiag."):
    if ".experiments" not in mod.name and ".integrations" not in mod.name:
        importlib.import_module(mod.name)
torch.optim.SGD([torch.nn.Parameter(torch.empty(1))], lr=0.1)  # imports torch._dynamo
# one figure drawn: the font, text and mathtext caches every plotting child would fill
fig, ax = plt.subplots()
ax.semilogy([1, 2], [1, 100], label="a")
fig.colorbar(ax.contourf([[1, 2], [3, 4]]), ax=ax)
ax.legend()
fig.suptitle("b")
fig.tight_layout()
fig.savefig(io.BytesIO(), format="png")
plt.close(fig)
signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children reap themselves
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(sys.argv[1])
srv.listen(4)
print("ready", flush=True)
while True:
    conn, _ = srv.accept()
    msg, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
    while chunk := conn.recv(1 << 16):
        msg += chunk
    if os.fork() == 0:
        srv.close()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        req = json.loads(msg)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        sys.argv = ["hessdiag", *req["argv"]]
        code = 0
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 3
        sys.stdout.flush()
        sys.stderr.flush()
        conn.sendall(str(code).encode())
        conn.close()
        os._exit(0)
    for fd in fds:
        os.close(fd)
    conn.close()
'''

_CLIENT = r'''#!{python} -IS
import json, os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(os.environ["HESSDIAG_TUTORIAL_SOCKET"])
msg = json.dumps({{"argv": sys.argv[1:], "cwd": os.getcwd(), "env": dict(os.environ)}})
socket.send_fds(s, [msg.encode()], [0, 1, 2])
s.shutdown(socket.SHUT_WR)
reply = b""
while chunk := s.recv(64):
    reply += chunk
sys.exit(int(reply) if reply else 3)
'''


def parse(text: str) -> tuple[str, list[tuple[str, int]]]:
    """The setup block and the (commands, expected exit code) of every block to run."""
    blocks = list(_BLOCK.finditer(text))
    assert len(blocks) == len(_FENCE.findall(text)), (
        "every ```bash block of docs/tutorial.md needs a <!-- tutorial:... --> marker")
    setups = [b["body"] for b in blocks if b["kind"] == "setup"]
    assert len(setups) == 1, "docs/tutorial.md needs exactly one tutorial:setup block"
    runs = [(b["body"], int(b["exit"] or 0)) for b in blocks if b["kind"] == "run"]
    return setups[0], runs


def override(setup: str, values: dict[str, str]) -> str:
    for name, value in values.items():
        setup, n = re.subn(rf"^{name}=\S*", f"{name}={value}", setup, flags=re.M)
        assert n == 1, f"{name} is not a variable of the tutorial's setup block"
    return setup


@pytest.fixture
def hessdiag_env(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg",
               PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if os.environ.get("HESSDIAG_TUTORIAL_COLD") == "1":
        yield env
        return
    shim = tmp_path / "shim"
    shim.mkdir()
    client = shim / "hessdiag"
    client.write_text(_CLIENT.format(python=sys.executable))
    client.chmod(0o755)
    sock = tmp_path / "server.sock"
    env["HESSDIAG_TUTORIAL_SOCKET"] = str(sock)
    env["PATH"] = f"{shim}{os.pathsep}{env['PATH']}"
    server = subprocess.Popen([sys.executable, "-c", _SERVER, str(sock)], env=env,
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        assert line.strip() == "ready", server.stderr.read()
        yield env
    finally:
        server.kill()
        server.wait()


def test_tutorial_runs_as_written(tmp_path, hessdiag_env):
    text = TUTORIAL.read_text()
    setup, runs = parse(text)
    setup = override(setup, OVERRIDES)
    work = tmp_path / "work"
    work.mkdir()
    started = time.monotonic()
    timings = []
    for body, expected in runs:
        block_start = time.monotonic()
        proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", f"{setup}\n{body}\n"],
                              cwd=work, env=hessdiag_env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == expected, (
            f"exit {proc.returncode}, the tutorial says {expected}:\n{body}\n"
            f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}")
        timings.append(f"{time.monotonic() - block_start:5.1f} s  {body.splitlines()[0]}")
        if expected == 1:  # the failing check names the sharper metrics
            assert "sharper" in proc.stdout.lower(), proc.stdout
    seconds = time.monotonic() - started

    out = work / re.search(r"^OUT=(\S+)", setup, re.M)[1]
    store = out / "hessdiag.h5"
    assert store.read_bytes()[:8] == HDF5
    written = {m for body, _ in runs for m in _WRITES.findall(body)}
    pngs = {w for w in written if w.endswith(".png")}
    assert {"$OUT/sharpness.png", "$OUT/alignment.png", "$OUT/density.png",
            "$OUT/landscape.png", "$OUT/report.html",
            "$OUT/sharpness-baseline.json"} <= written
    for name in sorted(written):
        path = out / name.removeprefix("$OUT/")
        assert path.is_file() and path.stat().st_size > 0, name
    for name in pngs:
        assert (out / name.removeprefix("$OUT/")).read_bytes()[:8] == PNG, name
    html = (out / "report.html").read_text()
    assert "<html" in html.lower() and "data:image/png;base64," in html
    for run in ("sgd", "sam", "eigensam"):
        assert sorted((out / "checkpoints" / run).glob("step-*.pt")), run
    print(f"\n{len(runs)} tutorial blocks in {seconds:.1f} s", *timings, sep="\n")
