"""The CLI turns JAX's persistent compilation cache on (in the rwkv-jax cache directory)
unless --no-compile-cache or RWKV_JAX_COMPILE_CACHE=0 says otherwise."""

import jax
import pytest

from rwkv_jax import compile_cache
from rwkv_jax.cli import main as cli_main


@pytest.fixture
def restore_cache_dir():
  before = jax.config.jax_compilation_cache_dir
  yield
  jax.config.update("jax_compilation_cache_dir", before)


def _run_failing_command(tmp_path, *extra):
  # convert of a missing file fails at once, after the CLI has set the cache up.
  return cli_main(["convert", str(tmp_path / "missing.pth"), str(tmp_path / "o.pth"), *extra])


def test_cli_turns_the_cache_on_in_the_cache_directory(tmp_path, monkeypatch, restore_cache_dir):
  monkeypatch.setenv("RWKV_JAX_CACHE", str(tmp_path / "cache"))
  jax.config.update("jax_compilation_cache_dir", None)
  assert _run_failing_command(tmp_path) == 1
  want = tmp_path / "cache" / "jax-compilation"
  assert jax.config.jax_compilation_cache_dir == str(want) and want.is_dir()


@pytest.mark.parametrize("how", ["flag", "env"])
def test_the_cache_can_be_turned_off(tmp_path, monkeypatch, restore_cache_dir, how):
  monkeypatch.setenv("RWKV_JAX_CACHE", str(tmp_path / "cache"))
  jax.config.update("jax_compilation_cache_dir", None)
  if how == "env":
    monkeypatch.setenv(compile_cache.ENV, "0")
  assert _run_failing_command(tmp_path, *(["--no-compile-cache"] if how == "flag" else [])) == 1
  assert jax.config.jax_compilation_cache_dir is None
  assert not (tmp_path / "cache" / "jax-compilation").exists()


def test_an_unwritable_cache_directory_is_a_warning(tmp_path, capsys, restore_cache_dir):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  assert compile_cache.enable(blocker / "sub") is None
  assert "no compilation cache" in capsys.readouterr().err
