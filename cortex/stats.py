"""Temporary: the names ``cortex/significance.py`` still imports from ``cortex.stats``, looked up in their new homes
at each access. The statistics now live in ``cortex/analysis/`` (ranking, statistics_files, statistics, frequency,
recovery); the lead moves significance.py there after his change to it and then deletes this module. Nothing else
may import it (tests/test_architecture.py)."""
from importlib import import_module

_HOMES = {"top_positions": "cortex.analysis.ranking", "token_matrix": "cortex.analysis.statistics",
          "run_analysis": "cortex.analysis.statistics", "label_files": "cortex.paths"}


def __getattr__(name):
    if name in _HOMES:
        return getattr(import_module(_HOMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
