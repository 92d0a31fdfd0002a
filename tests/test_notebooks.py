"""The notebooks run top to bottom (quick settings, CPU) and are committed without outputs."""

import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["01_quickstart.ipynb", "02_scaling_laws.ipynb"]


@pytest.fixture
def python3_kernel(tmp_path, monkeypatch):
  """The default ``python3`` kernel name, bound to this interpreter: a kernelspec first on
  JUPYTER_PATH, so a stale user-level spec cannot send the notebook to another Python."""
  spec = tmp_path / "jupyter" / "kernels" / "python3"
  spec.mkdir(parents=True)
  (spec / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "Python 3", "language": "python"}))
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  return "python3"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_committed_without_outputs(name):
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and all(not c.outputs and c.execution_count is None for c in code)
  assert nb.metadata["kernelspec"]["name"] == "python3"
  assert "google.colab" in code[0].source  # the first code cell installs in Colab only


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, tmp_path, monkeypatch, python3_kernel):
  monkeypatch.setenv("RWKV_NB_QUICK", "1")
  monkeypatch.setenv("RWKV_NB_OUT", str(tmp_path / "out"))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  NotebookClient(nb, kernel_name=python3_kernel, timeout=300,
                 resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.output_type == "error"]
  assert not errors
  if name == "02_scaling_laws.ipynb":
    assert (tmp_path / "out" / "scaling-quick" / "scaling.png").is_file()
  else:
    runs = list((tmp_path / "out").glob("quickstart-*/state.npz"))
    assert len(runs) == 1
