"""notebooks/quickstart.ipynb runs: its code cells are executed in order, in a temporary folder.

No Jupyter is needed (nor installed by requirements.txt): the cells are read from the .ipynb JSON and run with
``exec`` in one namespace, as a kernel would, with the Agg backend. The notebook is stored without outputs.
"""
import json

import matplotlib
import pytest

from cortex.scripts import REPO

NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"


def code_cells(nb: dict) -> list[str]:
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def test_notebook_is_stored_without_outputs():
    nb = json.loads(NOTEBOOK.read_text())
    assert nb["nbformat"] == 4 and len(code_cells(nb)) >= 5
    for c in nb["cells"]:
        if c["cell_type"] == "code":
            assert c["outputs"] == [] and c["execution_count"] is None, "clear the notebook's outputs before committing"


def test_quickstart_runs(tmp_path, monkeypatch):
    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CORTEX_QUICKSTART_DIR", str(tmp_path / "world"))
    ns: dict = {"__name__": "__main__"}
    for i, src in enumerate(code_cells(json.loads(NOTEBOOK.read_text()))):
        try:
            exec(compile(src, f"{NOTEBOOK.name}[cell {i}]", "exec"), ns)
        except Exception as e:
            pytest.fail(f"code cell {i} of {NOTEBOOK.name} failed: {e!r}\n--- cell ---\n{src}")
    root = tmp_path / "world"
    assert ns["root"] == root and (root / "datasets" / "ground_truth.json").exists()
    assert 0.0 <= ns["accuracy"] <= 1.0
    assert all(s.shape == (256,) for s in ns["tis"].values())
    assert len(ns["concept"]) == ns["k"] and set(ns["hits"]) <= set(ns["truth"][ns["label"]])
    assert 0 < int(ns["where"].sum()) < 256 and (ns["masked"] == 0).any()
    for fig in ("tis.png", "masking.png"):  # figures go to results/ (git-ignored)
        assert (root / "results" / "quickstart" / fig).stat().st_size > 0
