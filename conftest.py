"""The framework integrations import their framework: without it installed, their modules
are not collected (for doctests) rather than failing collection."""

import importlib.util

collect_ignore = [f"hessdiag/integrations/{name}.py" for name in ("lightning", "transformers")
                  if importlib.util.find_spec(name) is None]
