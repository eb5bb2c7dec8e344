"""Test helpers: run an experiment script's main() in-process (see cortex.scripts)."""
from cortex.scripts import REPO, load_script, run_script  # noqa: F401
