"""notebooks/quickstart.ipynb runs top to bottom on the bundled toy checkpoint (nbclient)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from gem_jax.demo import TOY_MODEL_DIR

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_notebook_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "the notebook has no code cells"
    for c in code:
        assert c.outputs == [] and c.execution_count is None, "strip outputs before committing"


def test_notebook_executes(monkeypatch):
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError
    monkeypatch.setenv("GEM_JAX_CHECKPOINT", str(TOY_MODEL_DIR))
    monkeypatch.setenv("GEM_JAX_SIZE", "64")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, timeout=240, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    try:
        client.execute()
    except CellExecutionError as e:
        pytest.fail(f"notebook cell failed:\n{e}")
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert not errors
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "(3, 4, 64, 64)" in text          # heatmaps of 4 prompts on 3 images
    assert "(4, 1, 4, 64, 64)" in text       # vmap over 4 temperatures
    images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
                 for o in c.outputs)
    assert images >= 6                       # the figures were displayed
