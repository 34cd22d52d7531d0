"""examples/notebook.ipynb runs in a real Jupyter kernel (nbclient + ipykernel)
and shows an image made with ``devices=["cpu", "cpu"]`` that is bitwise the
emulation's."""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "notebook.ipynb"


def test_notebook_runs_and_shows_the_image(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "bitwise equal to emulation: True" in text, text
    assert "(threads)" in text, text
    assert any("image/png" in o.get("data", {}) for o in outputs if o.output_type == "display_data")
