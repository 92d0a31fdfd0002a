"""The paths a new user takes: the README's install and test commands (and .ci/run, which
must follow them), the suite without torch, the packaged sample text, the declared
dependencies, and the replayable test seed."""

import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CPU_TORCH = "pip install torch --index-url https://download.pytorch.org/whl/cpu"


def _section(markdown: str, title: str) -> str:
  match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", markdown, re.M | re.S)
  assert match, f"README has no '## {title}' section"
  return match.group(1)


def _code_blocks(text: str) -> list[list[str]]:
  """The commands of each ```bash block (comments and blank lines dropped)."""
  blocks = re.findall(r"^```bash\n(.*?)^```", text, re.M | re.S)
  return [[_command(line) for line in b.splitlines() if line.split("#")[0].strip()]
          for b in blocks]


def _command(line: str) -> str:
  """A shell line without its comment, `python -m ` before pip and pip's -q."""
  line = line.split(" #")[0].strip()
  line = re.sub(r"^python3? -m pip ", "pip ", line)
  return re.sub(r" -q\b", "", line)


def test_ci_runs_the_readme_test_commands():
  readme = (ROOT / "README.md").read_text()
  blocks = _code_blocks(_section(readme, "Tests"))
  assert len(blocks) >= 2, "Tests: a torch-free block and a full-suite block"
  plain, full = blocks[0], blocks[1]
  # The torch-free path: the test extra alone, then the test command.
  assert plain == ['pip install -e ".[test]"', 'python -m pytest -m "not gpu"']
  # The full suite: CPU torch first, then the extras, then the same test command.
  assert full == [CPU_TORCH, 'pip install -e ".[test,torch]"', plain[1]]
  ci = [_command(line) for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if re.match(r"\s*python3? -m (pip install|pytest)", line)]
  ci = [c for c in ci if c != "pip install --upgrade pip"]
  # CI takes torch from the machine's local CPU wheel in place of the README's index.
  assert re.fullmatch(r'pip install "torch==[\d.]+"', ci[0]), ci
  assert ci[1:] == full[1:], "the .ci/run commands differ from README.md's Tests section"
  # Install also tells how to get CPU torch before the torch extra.
  install = _section(readme, "Install")
  assert CPU_TORCH in install and install.index(CPU_TORCH) < install.rindex('".[torch]"')


_WITHOUT_TORCH = ("import sys; sys.modules['torch'] = sys.modules['transformers'] = None; "
                  "import pytest; sys.exit(pytest.main(sys.argv[1:]))")


def test_the_suite_without_torch_collects_and_skips_only_torch_tests():
  """The README's torch-free path: every test file imports, torch tests skip with the
  reason, torch-free tests of the same file (pickle refusal) pass."""
  res = subprocess.run(
      [sys.executable, "-c", _WITHOUT_TORCH, "tests", "-m", "not gpu", "-p", "no:cacheprovider",
       "-rs", "-k", "test_interop and (hf_logits or pickle_with_code or torch_saved)"],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  out = res.stdout + res.stderr
  assert res.returncode == 0, out[-3000:]
  assert re.search(r"\b3 passed, 5 skipped\b", out), out[-3000:]
  assert "needs torch and transformers" in out


def test_sample_text_is_package_data_and_its_validation_split_is_unseen():
  tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
  from rwkv_jax.data import sample_text_path
  from rwkv_jax.training.config import TrainConfig

  path = sample_text_path()
  config = tomllib.loads((ROOT / "pyproject.toml").read_text())
  globs = config["tool"]["setuptools"]["package-data"]["rwkv_jax.data"]
  relative = path.relative_to(ROOT / "rwkv_jax" / "data").as_posix()
  assert any(fnmatch.fnmatch(relative, g) for g in globs), "not installed by pip install"
  raw = path.read_bytes()
  assert 100_000 <= len(raw) <= 250_000 and raw.isascii()
  # Training holds out the last val_fraction (0.05 by default, 0.1 in the scaling sweep):
  # none of the last 10% occurs in the rest (a repeated passage, as in a repeated fallback
  # text, would be measured as "held out" while it was trained on).
  assert TrainConfig().val_fraction <= 0.1
  n_val = int(len(raw) * 0.1)
  train, val = raw[:-n_val], raw[-n_val:]
  width = 64
  seen = {train[i:i + width] for i in range(len(train) - width + 1)}
  assert not any(val[i:i + width] in seen for i in range(len(val) - width + 1))


# Distribution name -> import name, for the ones that differ.
_IMPORT_NAMES = {"orbax-checkpoint": "orbax"}


def test_every_declared_dependency_is_imported():
  tomllib = pytest.importorskip("tomllib")
  deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
  source = "\n".join(p.read_text() for folder in ("rwkv_jax", "pallas_kernels", "tests")
                     for p in (ROOT / folder).rglob("*.py"))
  for dep in deps:
    dist = re.match(r"[A-Za-z0-9_.-]+", dep).group(0)
    module = _IMPORT_NAMES.get(dist, dist.replace("-", "_"))
    assert re.search(rf"^\s*(import|from) {module}\b", source, re.M), (
        f"{dist} is a declared dependency that nothing imports")


# ---------------------------------------------------------------- the replayable seed

_FAILING = """
def test_draws(rng):
  print("drew", rng.integers(0, 2**62))
  assert False
"""


def _pytest(cwd, *args, env=None):
  res = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
                       cwd=cwd, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})
  return res.stdout + res.stderr


def test_a_failure_reports_its_seed_and_the_seed_replays_it(tmp_path):
  shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
  (tmp_path / "test_seeded.py").write_text(_FAILING)
  first = _pytest(tmp_path, "test_seeded.py", env={"RWKV_JAX_TEST_SEED": ""})
  replay = re.search(r"replay with: (python -m pytest --seed (\d+) '(.+?)')", first)
  assert replay, first[-3000:]
  drawn = re.search(r"drew (\d+)", first).group(1)
  assert f"rwkv-jax test seed: {replay.group(2)}" in first  # in the header too
  # The printed command, as printed, draws the same numbers; so does the variable.
  again = _pytest(tmp_path, *shlex.split(replay.group(1))[3:])
  assert f"drew {drawn}" in again and "1 failed" in again
  by_env = _pytest(tmp_path, replay.group(3), env={"RWKV_JAX_TEST_SEED": replay.group(2)})
  assert f"drew {drawn}" in by_env
