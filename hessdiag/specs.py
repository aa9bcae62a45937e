"""Factory specs: ``package.module:factory`` or ``path/to/file.py:factory``.

Model, data and loss specs that are not registry names name a callable this way; loading
one imports (and so runs) that module, which is what the user asked for by naming it.

A spec *found inside a file* (the model, data and loss a checkpoint records, the data a
baseline or a store records) is data, not a request: a file that arrived with a pull
request could name ``os:system``. Such a spec is used only when it is a registry name
(``mlp``, ``digits``, ``cross-entropy``: no code named), when the user names the same spec
themselves, or when the user trusts the file's code (``unsafe=True``, ``--unsafe-load``,
which also lets pickles run). :func:`recorded` enforces that; :class:`UntrustedSpec` says
which spec and what to pass.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hessdiag._errors import InputError, first_line

# registry specs that carry a path after their colon, not a module
DATA_PATH_PREFIXES = ("imagefolder:",)


class UntrustedSpec(InputError):
    """A factory spec found inside a file, which hessdiag does not import on its own."""


class TrustedCodeWarning(UserWarning):
    """Code named by a file is about to run because the user trusted the file
    (``unsafe=True``): a pickle unpickled, or a recorded factory spec imported."""


def names_code(spec: object) -> bool:
    """True for a spec that would import a module (anything with a colon that is not a
    registry name; ``imagefolder:PATH`` names a folder of images, not code)."""
    if not isinstance(spec, str) or ":" not in spec:
        return False
    return not spec.strip().lower().startswith(DATA_PATH_PREFIXES)



def recorded(spec: str | None, *, what: str, source: str, option: str,
             trusted: bool = False) -> str | None:
    """``spec`` as recorded in ``source`` (a checkpoint, baseline or store), if it may be
    used without the user naming it: a registry name always, a factory spec only when
    ``trusted`` (then with a :class:`TrustedCodeWarning`). Otherwise
    :class:`UntrustedSpec`, naming the spec and the two ways to run it: ``option`` (the
    library parameter that names it, e.g. ``model_spec``) or ``unsafe``."""
    if not names_code(spec):
        return spec
    if trusted:
        warnings.warn(TrustedCodeWarning(f"{source} names {what} {spec!r}: importing and "
                                         "running it (trusted with unsafe)"), stacklevel=2)
        return spec
    raise UntrustedSpec(f"{source} records {what} {spec!r}, a factory spec: importing it "
                        f"would run code the file names, which hessdiag never does on its "
                        f"own; to run it, pass {option} {spec} (or unsafe=True to trust "
                        "every spec and pickle in the file)", param=(option, "unsafe"))


def is_factory_spec(spec: str) -> bool:
    """True for ``a.b:f`` and ``some/file.py:f`` (a registry name has no colon)."""
    if ":" not in spec:
        return False
    target, _, attr = spec.rpartition(":")
    return bool(target) and bool(attr) and attr.isidentifier()


def load_factory(spec: str, what: str = "factory") -> Callable[..., Any]:
    """The callable named by ``spec``; ``ValueError`` with a clear message otherwise.

    A ``path/to/file.py`` is imported with its folder importable, as ``python file.py``
    would run it: the folder goes first on ``sys.path`` (and stays there, for imports the
    factory makes when called), so the file can import the modules beside it. Only a spec
    that passed :func:`recorded` (named by the user, or trusted) ever gets here."""
    target, _, attr = spec.rpartition(":")
    if not target or not attr.isidentifier():
        raise ValueError(f"{what} spec {spec!r} must look like package.module:factory or "
                         "path/to/file.py:factory")
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target)
        if not path.is_file():
            raise ValueError(f"{what} spec {spec!r}: file {path} does not exist")
        name = f"hessdiag_user_{abs(hash(str(path.resolve())))}"
        folder = str(path.resolve().parent)
        if folder not in sys.path:
            sys.path.insert(0, folder)
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
        except Exception as exc:  # the module's own code failed while it was imported
            raise ValueError(f"{what} spec {spec!r}: importing {target} failed: "
                             f"{type(exc).__name__}: {exc}") from exc
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise ValueError(f"{what} spec {spec!r}: {target} has no callable {attr!r}")
    return factory


def call_factory(factory: Callable[..., Any], spec: str, what: str, **kwargs: Any) -> Any:
    """``factory(**kwargs)``; an exception it raises is bad input naming the spec
    (:class:`InputError`, ``param`` ``what``). ``SystemExit`` and ``KeyboardInterrupt`` pass:
    the command line stops on them without a verdict."""
    try:
        return factory(**kwargs)
    except InputError:
        raise
    except Exception as exc:  # the user's code: anything
        raise InputError(f"{what} {spec!r}: the factory raised {type(exc).__name__}: "
                         f"{first_line(exc)}", param=what) from exc
