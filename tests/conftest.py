"""Shared fixtures. Tests run on CPU in float32; GPU-only tests carry the `gpu` marker."""

import os

import jax
import numpy as np
import pytest

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
  on_gpu = jax.default_backend() == "gpu"
  skip = pytest.mark.skip(reason="needs a CUDA GPU")
  for item in items:
    if "gpu" in item.keywords and not on_gpu:
      item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _token_cache_in_tmp(tmp_path_factory):
  """Token caches (rwkv_jax.data.text) go to a session tmp dir, never ~/.cache; the
  variable reaches subprocesses (workers, notebooks) through os.environ."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("RWKV_JAX_CACHE", str(tmp_path_factory.mktemp("rwkv-jax-cache")))
    yield


@pytest.fixture
def rng():
  """A fresh NumPy generator per test; the seed is printed on failure via the test id."""
  seed = int.from_bytes(os.urandom(4), "little")
  print(f"seed={seed}")
  return np.random.default_rng(seed)


def rel_err(a, b) -> float:
  """||a - b|| / ||b|| over all elements, in float64."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
