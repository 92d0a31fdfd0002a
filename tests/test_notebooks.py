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
  # No noise for a reader: tqdm's "IProgress not found" warning, numpy scalar reprs.
  printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                    for o in c.outputs)
  assert "TqdmWarning" not in printed and "np.float" not in printed
  if name == "02_scaling_laws.ipynb":
    assert (tmp_path / "out" / "scaling-quick" / "scaling.png").is_file()
  else:
    runs = list((tmp_path / "out").glob("quickstart-*/state.npz"))
    assert len(runs) == 1


# ---------------------------------------------------------------- the setup (install) cell


class _FakeIPython:
  """Records the line magics the setup cell runs (``%pip install ...``) instead of running."""

  def __init__(self):
    self.magics = []

  def run_line_magic(self, name, line):
    self.magics.append((name, line))


def _run_setup_cell(name, cwd, monkeypatch, *, colab: bool, installed: bool,
                    repo_url: str | None = None):
  """Executes the notebook's first code cell in ``cwd`` with Colab / an installed rwkv-jax /
  RWKV_JAX_REPO faked; returns (its namespace, the magics it ran)."""
  import importlib.metadata
  import types

  cell = next(c for c in nbformat.read(NOTEBOOKS / name, as_version=4).cells
              if c.cell_type == "code")
  real_version = importlib.metadata.version

  def version(dist):
    if dist == "rwkv-jax":
      if installed:
        return "0.1.0"
      raise importlib.metadata.PackageNotFoundError(dist)
    return real_version(dist)

  monkeypatch.setattr(importlib.metadata, "version", version)
  if colab:
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
  else:
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
  if repo_url is None:
    monkeypatch.delenv("RWKV_JAX_REPO", raising=False)
  else:
    monkeypatch.setenv("RWKV_JAX_REPO", repo_url)
  monkeypatch.setattr(sys, "path", list(sys.path))
  monkeypatch.chdir(cwd)
  ipython = _FakeIPython()
  namespace = {"get_ipython": lambda: ipython}
  exec(compile(cell.source, f"{name}[setup]", "exec"), namespace)
  return namespace, ipython.magics


@pytest.mark.parametrize("name", NAMES)
def test_setup_cell_in_a_checkout_installs_only_in_colab(name, monkeypatch):
  repo = NOTEBOOKS.parent
  ns, magics = _run_setup_cell(name, NOTEBOOKS, monkeypatch, colab=False, installed=False)
  assert ns["REPO"] == repo and magics == [] and sys.path[0] == str(repo)
  ns, magics = _run_setup_cell(name, NOTEBOOKS, monkeypatch, colab=True, installed=False)
  assert ns["REPO"] == repo and magics == [("pip", f'install -q -e "{repo}"')]
  _, magics = _run_setup_cell(name, NOTEBOOKS, monkeypatch, colab=True, installed=True)
  assert magics == []  # a second run of the cell: already installed


@pytest.mark.parametrize("name", NAMES)
def test_setup_cell_without_a_checkout_needs_rwkv_jax_repo(name, tmp_path, monkeypatch):
  with pytest.raises(RuntimeError, match="RWKV_JAX_REPO"):
    _run_setup_cell(name, tmp_path, monkeypatch, colab=True, installed=False)
  assert not (tmp_path / "rwkv-jax").exists()
  # An installed package suffices for the quickstart; the scaling notebook needs
  # experiments/ from a checkout.
  if name == "01_quickstart.ipynb":
    ns, magics = _run_setup_cell(name, tmp_path, monkeypatch, colab=True, installed=True)
    assert ns["REPO"] is None and magics == []
  else:
    with pytest.raises(RuntimeError, match="RWKV_JAX_REPO"):
      _run_setup_cell(name, tmp_path, monkeypatch, colab=True, installed=True)


# ---------------------------------------------------------------- the data cell


def _run_data_cell(name, cwd, monkeypatch, *, colab: bool):
  """Executes the notebook's data cell as outside a checkout (no shared/data) in ``cwd``;
  returns its namespace."""
  cell = next(c for c in nbformat.read(NOTEBOOKS / name, as_version=4).cells
              if c.cell_type == "code" and c.source.startswith("# Data:"))
  monkeypatch.chdir(cwd)
  namespace = {"REPO": None, "OUT": cwd / "out", "IN_COLAB": colab, "Path": Path}
  exec(compile(cell.source, f"{name}[data]", "exec"), namespace)
  return namespace


@pytest.mark.parametrize("name", NAMES)
def test_data_cell_outside_a_checkout_uses_the_packaged_text(name, tmp_path, monkeypatch,
                                                             capsys):
  """Not a repeated passage (whose "held-out" numbers would be on trained text): the
  packaged tinyshakespeare excerpt (tests/test_packaging.py checks its split), named."""
  import urllib.request

  from rwkv_jax.data import SAMPLE_TEXT_SOURCE, sample_text_path

  def offline(url, filename):
    raise OSError("no network")

  monkeypatch.setattr(urllib.request, "urlretrieve", offline)
  for colab in (False, True):
    ns = _run_data_cell(name, tmp_path, monkeypatch, colab=colab)
    assert ns["DATA_PATH"] == sample_text_path() and ns["DATA_SOURCE"] == SAMPLE_TEXT_SOURCE
    printed = capsys.readouterr().out
    assert SAMPLE_TEXT_SOURCE in printed and str(sample_text_path()) in printed
    assert ("could not download" in printed) == colab  # a failed download is said
  # In Colab the full text is downloaded, and that is said too.
  monkeypatch.setattr(urllib.request, "urlretrieve",
                      lambda url, filename: Path(filename).write_text("downloaded\n"))
  ns = _run_data_cell(name, tmp_path, monkeypatch, colab=True)
  assert ns["DATA_PATH"] == tmp_path / "out" / "tinyshakespeare.txt"
  assert "downloaded from https://" in capsys.readouterr().out


def test_setup_cell_clones_rwkv_jax_repo_and_installs_it(tmp_path, monkeypatch):
  import subprocess

  src = tmp_path / "src"
  (src / "rwkv_jax").mkdir(parents=True)
  (src / "rwkv_jax" / "__init__.py").write_text("")
  (src / "pyproject.toml").write_text("[project]\nname = 'rwkv-jax'\n")
  git = ["git", "-C", str(src), "-c", "user.name=t", "-c", "user.email=t@t"]
  for args in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "x"]):
    subprocess.run(git + args, check=True, capture_output=True)
  work = tmp_path / "content"
  work.mkdir()
  ns, magics = _run_setup_cell("02_scaling_laws.ipynb", work, monkeypatch, colab=True,
                               installed=False, repo_url=f"file://{src}")
  clone = work / "rwkv-jax"
  assert (clone / "rwkv_jax" / "__init__.py").is_file() and ns["REPO"] == clone
  assert magics == [("pip", f'install -q -e "{clone}"')] and sys.path[0] == str(clone)
  # Run again (as after a runtime restart): the clone is found, nothing is cloned twice.
  ns, magics = _run_setup_cell("02_scaling_laws.ipynb", work, monkeypatch, colab=True,
                               installed=True, repo_url=f"file://{src}")
  assert ns["REPO"] == clone and magics == []
