"""A pytest helper for teams that check sharpness inside their own test suite.

>>> from hessdiag.testing import assert_not_sharper       # doctest: +SKIP
>>> def test_model_is_not_sharper():                      # doctest: +SKIP
...     assert_not_sharper("model.pt", "sharpness-baseline.json", rtol=0.1)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hessdiag.check import Baseline, CheckResult, check, read_baseline


def assert_not_sharper(checkpoint: str | Path, baseline: str | Path | Baseline | None = None,
                       *, metrics: tuple[str, ...] | None = None, rtol: float = 0.1,
                       **limits: Any) -> CheckResult:
    """Check ``checkpoint`` against ``baseline`` (a file, ``STORE:ANALYSIS_ID`` or a
    :class:`~hessdiag.check.Baseline`) and absolute ``limits`` (``max_lambda``,
    ``max_trace``, ``max_ratio``); raise ``AssertionError`` with the table when a metric is
    sharper beyond its limit. Returns the :class:`~hessdiag.check.CheckResult`."""
    if isinstance(baseline, str | Path):
        baseline = read_baseline(str(baseline), metrics)
    result = check(str(checkpoint), baseline=baseline, metrics=metrics, rtol=rtol, **limits)
    if not result.passed:
        raise AssertionError(f"{checkpoint} is sharper than allowed:\n{result.table()}")
    return result
