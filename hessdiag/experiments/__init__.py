"""Experiments that regenerate the numbers and pages of the documentation.

``python -m hessdiag.experiments NAME [--quick] [--out DIR]``; each experiment is a module
with ``run(out, quick=False, progress=None)`` returning the page it wrote.
"""

from hessdiag.experiments import eigensam_digits, measures, sam_families

EXPERIMENTS = {module.NAME: module for module in (eigensam_digits, measures, sam_families)}

__all__ = ["EXPERIMENTS"]
