"""notebooks/flax_and_gradients.ipynb is committed executed (a reader sees its figures) and still
runs top to bottom on the bundled toy model, producing them again (nbclient)."""

from __future__ import annotations

from pathlib import Path

import nbformat

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "flax_and_gradients.ipynb"


def _images(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
               for o in c.outputs)


def _text(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def test_committed_notebook_has_its_figures():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert _images(nb) >= 3, "commit the notebook executed, with its figures"


def test_notebook_executes_and_reproduces_its_figures(monkeypatch):
    from nbclient import NotebookClient
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for c in nb.cells:
        if c.cell_type == "code":
            c.outputs = []
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
                if o.output_type == "error"]
    assert _images(nb) >= 3
    text = _text(nb)
    assert "(1, 3, 64, 64)" in text and "(4, 1, 3, 64, 64)" in text
    # The Flax module equals the API, and a zero LoRA changes nothing (printed errors < 1e-5).
    loss = [l for l in text.splitlines() if l.startswith("contrastive loss")][0].split()
    assert float(loss[4]) < float(loss[2]), loss  # the NNX step lowered the loss
    for line in text.splitlines():
        if "max |flax - api|" in line or "zero LoRA" in line:
            assert float(line.split()[-1]) < 1e-5, line
