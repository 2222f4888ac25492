"""Both Colab demos run headlessly (nbclient) against the shipped `shapes-tiny` model."""
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"


@pytest.mark.parametrize("name", ["demo_sample.ipynb", "demo_zero_shot_edit.ipynb"])
def test_notebook_runs(name, monkeypatch, tmp_path):
  monkeypatch.setenv("VAR_JAX_DEMO_MODEL", "shapes-tiny")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
  notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
  client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
  client.execute()
  outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
  assert not [o for o in outputs if o.output_type == "error"]
  assert any("image/png" in o.get("data", {}) for o in outputs), "no picture was shown"
