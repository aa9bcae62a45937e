"""Atomic file replacement, shared by the store and checkpoints."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


class WriteError(OSError):
    """Writing ``path`` failed (a full disk, no permission): the message names ``path``,
    never the temporary file it was being written to."""

    def __init__(self, path: Path, cause: OSError) -> None:
        reason = cause.strerror or type(cause).__name__
        super().__init__(cause.errno, f"cannot write {path}: {reason}")
        self.filename = str(path)

    def __str__(self) -> str:
        return str(self.args[1])


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write the new file to. When the block ends
    without an exception the file gets the usual mode (``mkstemp`` makes 0600), is fsynced
    and renamed over ``path``; otherwise it is deleted and ``path`` is untouched. Either
    way, a process killed at any moment leaves ``path`` old or new, never partial. An
    ``OSError`` names ``path``, never the temporary file."""
    directory = path.parent
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise WriteError(path, exc) from exc
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        try:
            yield tmp_path
            os.chmod(tmp_path, 0o666 & ~current_umask())
            with open(tmp_path, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp_path, path)
            _fsync_dir(directory)
        except OSError as exc:  # name the file being written, not the temporary one
            raise WriteError(path, exc) from exc
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
