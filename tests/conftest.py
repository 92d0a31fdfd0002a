"""Shared fixtures. Tests run on CPU in float32; GPU-only tests carry the `gpu` marker,
tests that need torch + transformers the `torch` marker (skipped when either is missing).

Random test data is replayable: one session seed (random, or ``--seed N`` /
``RWKV_JAX_TEST_SEED=N``) is shown in the header and in every failure report, and each
test's ``rng`` is derived from it and the test's id, so ``pytest --seed N <test id>``
replays a failure of the full run."""

import importlib.util
import os
import zlib

import jax
import numpy as np
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

SEED_ENV = "RWKV_JAX_TEST_SEED"


def pytest_addoption(parser):
  parser.addoption("--seed", type=int, default=None, dest="rwkv_jax_seed",
                   help=f"session seed of the random test data (default: ${SEED_ENV}, else "
                        "random); printed in the header and in every failure report")


def pytest_configure(config):
  seed = config.option.rwkv_jax_seed
  if seed is None and os.environ.get(SEED_ENV, "").strip():
    seed = int(os.environ[SEED_ENV])
  if seed is None:
    seed = int.from_bytes(os.urandom(4), "little")
  config.option.rwkv_jax_seed = seed  # resolved once; read back by session_seed()


def session_seed(config) -> int:
  return config.option.rwkv_jax_seed


def pytest_report_header(config):
  seed = session_seed(config)
  return f"rwkv-jax test seed: {seed} (replay with --seed {seed} or {SEED_ENV}={seed})"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
  report = yield
  if report.failed:
    seed = session_seed(item.config)
    report.sections.append(("test seed", f"session seed {seed}; replay with: python -m "
                                         f"pytest --seed {seed} '{item.nodeid}'"))
  return report


def seed_for(config, *keys) -> int:
  """A 32-bit seed from the session seed and ``keys`` (e.g. a test id): the same for the
  same test in a full run and in a replay of that test alone."""
  name = "\0".join(map(str, keys)).encode()
  return int(np.random.SeedSequence([session_seed(config), zlib.crc32(name)])
             .generate_state(1)[0])


def pytest_collection_modifyitems(config, items):
  on_gpu = jax.default_backend() == "gpu"
  skip = pytest.mark.skip(reason="needs a CUDA GPU")
  has_torch = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))
  skip_torch = pytest.mark.skip(reason='needs torch and transformers: pip install -e '
                                       '".[torch]" (CPU torch first: see README, Tests)')
  for item in items:
    if "gpu" in item.keywords and not on_gpu:
      item.add_marker(skip)
    if item.get_closest_marker("torch") and not has_torch:
      item.add_marker(skip_torch)


@pytest.fixture(scope="session", autouse=True)
def _token_cache_in_tmp(tmp_path_factory):
  """Token caches (rwkv_jax.data.text) go to a session tmp dir, never ~/.cache; the
  variable reaches subprocesses (workers, notebooks) through os.environ."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("RWKV_JAX_CACHE", str(tmp_path_factory.mktemp("rwkv-jax-cache")))
    yield


@pytest.fixture
def rng(request):
  """A NumPy generator per test, seeded from the session seed and the test id (replayable
  with ``--seed``; the session seed is printed in every failure report)."""
  seed = seed_for(request.config, request.node.nodeid)
  print(f"rng seed={seed} (session seed {session_seed(request.config)})")
  return np.random.default_rng(seed)


def rel_err(a, b) -> float:
  """||a - b|| / ||b|| over all elements, in float64."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
