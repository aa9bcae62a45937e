"""Bad input, and turning exceptions into the one-line messages hessdiag reports.

The library names its own parameters in its messages (``samples must be positive``);
an :class:`InputError` also says which parameter it is about, so that the command line
can translate the name into its option (``--samples``) in one place.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input: what is wrong, where, and what to do, in one line.

    ``param`` is the library parameter the message is about (or ``None``); the message
    names it as the library spells it, e.g. ``InputError("samples must be positive; got 0",
    param="samples")``.
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type name if it has none)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:limit]
