"""Factory specs: ``package.module:factory`` or ``path/to/file.py:factory``.

Model and data specs that are not registry names name a callable this way; loading one
imports (and so runs) that module, which is what the user asked for by naming it.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def is_factory_spec(spec: str) -> bool:
    """True for ``a.b:f`` and ``some/file.py:f`` (a registry name has no colon)."""
    if ":" not in spec:
        return False
    target, _, attr = spec.rpartition(":")
    return bool(target) and bool(attr) and attr.isidentifier()


def load_factory(spec: str, what: str = "factory") -> Callable[..., Any]:
    """The callable named by ``spec``; ``ValueError`` with a clear message otherwise."""
    target, _, attr = spec.rpartition(":")
    if not target or not attr.isidentifier():
        raise ValueError(f"{what} spec {spec!r} must look like package.module:factory or "
                         "path/to/file.py:factory")
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target)
        if not path.is_file():
            raise ValueError(f"{what} spec {spec!r}: file {path} does not exist")
        name = f"hessdiag_user_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise ValueError(f"{what} spec {spec!r}: cannot import {path}")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[name]
            raise ValueError(f"{what} spec {spec!r}: importing {path} failed: "
                             f"{type(exc).__name__}: {exc}") from exc
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise ValueError(f"{what} spec {spec!r}: cannot import module {target!r} "
                             f"({exc})") from exc
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise ValueError(f"{what} spec {spec!r}: {target} has no callable {attr!r}")
    return factory
