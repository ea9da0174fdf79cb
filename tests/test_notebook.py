"""The notebook walkthrough runs top to bottom (executed with nbclient and a real kernel)."""

from __future__ import annotations

import nbformat
from conftest import EXAMPLES
from nbclient import NotebookClient


def test_finetune_notebook_executes(tmp_path):
    notebook = nbformat.read(EXAMPLES / "finetune.ipynb", as_version=4)
    NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    html = [
        o["data"]["text/html"]
        for o in outputs
        if o.get("output_type") == "execute_result" and "text/html" in o.get("data", {})
    ]
    assert any("ModelConfig (" in page for page in html)  # the config renders as a compact table
    assert any("Resolved against" in page and "checkpoint" in page for page in html)
    printed = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "skipped 4 tensors by prefix 'lm_head.'" in printed
