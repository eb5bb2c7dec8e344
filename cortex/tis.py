"""Temporary: ``read_tis_file``, which ``cortex/significance.py`` still imports from ``cortex.tis``, looked up in its
new home (``cortex.attribution.store``) at each access. The TIS driver is ``cortex.attribution.tis``; the lead
deletes this module when significance.py moves. Nothing else may import it (tests/test_architecture.py)."""
from importlib import import_module

_HOMES = {"read_tis_file": "cortex.attribution.store"}


def __getattr__(name):
    if name in _HOMES:
        return getattr(import_module(_HOMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
