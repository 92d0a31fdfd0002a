"""WKV-7: the scan reference against a float64 NumPy loop; chunked against scan (values
and the gradients of all six inputs and the incoming state) for model-like, near-one and
near-zero decays, long and ragged sequences, split runs, bf16 inputs; dispatch and errors.

Shapes are few and reused (jit caches per shape): compiling the chunked gradient is the
cost of this file.
"""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rwkv_jax.ops import wkv7 as wkv7_fn
from rwkv_jax.ops.wkv7 import (DEFAULT_CHUNK_SIZE, IMPLEMENTATIONS, default_implementation,
                               register_implementation, wkv7, wkv7_chunked, wkv7_scan,
                               wkv7_step)
from tests.conftest import rel_err

# float32, ||a - b|| / ||b|| over all elements. Measured worst cases on CPU, chunked vs
# scan at T = 4000 / 4010 in chunks of 64 / 32 (14 seeds), y / state / the gradients:
# model decays 1.2e-7 / 1.0e-7 / 2.6e-7, near one 3.6e-7 / 3.6e-7 / 6.4e-7, near zero and
# tiny 9.4e-8 / 7.4e-8 / 1.5e-7; against float64 NumPy <= 3.4e-7 (chunked), 7e-8 (scan,
# T = 100). The same tests pass on an H200.
TOL = 2e-6
NAMES = ("r", "w", "k", "v", "a", "b")
SHAPE = (2, 100, 2, 8)  # B T H N: 100 = 6 chunks of 16 and 4
LONG = (2, 4010, 2, 8)  # 125 chunks of 32 and 10


def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


def random_inputs(rng, b, t, h, n, *, decay="model"):
  """(r, w, k, v, a, b) drawn like RWKV-7 draws them, and an incoming state."""
  shape = (b, t, h, n)
  if decay == "model":  # clampw: exp(-exp(-0.5) sigmoid(x)), in (0.545, 1)
    w = np.exp(-np.exp(-0.5) * _sigmoid(rng.normal(size=shape)))
  elif decay == "near_one":
    w = 1 - 1e-4 * rng.uniform(0.5, 1.0, shape)
  elif decay == "near_zero":  # mixed down to 1e-30: in-chunk decay products underflow
    w = np.exp(-rng.uniform(0, 69, shape))
  elif decay == "tiny":
    w = np.full(shape, 1e-30)
  kk = rng.normal(size=shape)
  kk /= np.linalg.norm(kk, axis=-1, keepdims=True)
  iclr = _sigmoid(rng.normal(size=shape))
  r, k, v = (rng.normal(size=shape) for _ in range(3))
  xs = tuple(jnp.asarray(x, jnp.float32) for x in (r, w, k, v, -kk, kk * iclr))
  return xs, jnp.asarray(rng.normal(size=(b, h, n, n)), jnp.float32)


@functools.partial(jax.jit, static_argnames=("impl", "chunk_size"))
def run_vjp(xs, state, cy, cs, *, impl, chunk_size=None):
  """y, the new state, and the gradients of sum(y cy) + sum(state cs) in xs and state."""
  f = lambda xs, st: wkv7(*xs, st, implementation=impl, chunk_size=chunk_size)
  (y, s), vjp = jax.vjp(f, xs, state)
  gxs, gs = vjp((cy, cs))
  return y, s, gxs, gs


@functools.partial(jax.jit, static_argnames=("impl", "chunk_size"))
def run(xs, state, *, impl, chunk_size=None):
  return wkv7(*xs, state, implementation=impl, chunk_size=chunk_size)


def assert_close(out, ref, tol, label=""):
  for name, x, x_ref in zip(["y", "state", *(f"d{n}" for n in NAMES), "dstate"],
                            jax.tree.leaves(out), jax.tree.leaves(ref)):
    assert np.isfinite(np.asarray(x)).all(), (label, name, "not finite")
    err = rel_err(x, x_ref)
    assert err <= tol, (label, name, err)


def cotangents(rng, shape):
  b, t, h, n = shape
  return (jnp.asarray(rng.normal(size=shape), jnp.float32),
          jnp.asarray(rng.normal(size=(b, h, n, n)), jnp.float32))


def numpy_wkv7(xs, state):
  """The recurrence token by token in float64, BlinkDL's demo order."""
  r, w, k, v, a, b = (np.asarray(x, np.float64) for x in xs)
  s = np.asarray(state, np.float64).copy()
  ys = []
  for t in range(r.shape[1]):
    sa = np.einsum("bhij,bhj->bhi", s, a[:, t])
    s = s * w[:, t, :, None, :] + sa[..., None] * b[:, t, :, None, :] \
        + v[:, t, :, :, None] * k[:, t, :, None, :]
    ys.append(np.einsum("bhij,bhj->bhi", s, r[:, t]))
  return np.stack(ys, 1), s


# ------------------------------------------------------------------ the reference


def test_scan_matches_float64_numpy(rng):
  xs, s0 = random_inputs(rng, *SHAPE)
  y_ref, s_ref = numpy_wkv7(xs, s0)
  for impl in ("scan", "chunked"):
    y, s = run(xs, s0, impl=impl, chunk_size=16)
    assert rel_err(y, y_ref) <= TOL and rel_err(s, s_ref) <= TOL, impl


def test_decode_step_is_the_scan(rng):
  xs, s = random_inputs(rng, 1, 6, 2, 8)
  y_ref, s_ref = run(xs, s, impl="scan")
  step = jax.jit(wkv7_step)
  ys = []
  for t in range(6):
    y, s = step(*(x[:, t] for x in xs), s)
    ys.append(y)
  assert rel_err(jnp.stack(ys, 1), y_ref) <= 1e-6 and rel_err(s, s_ref) <= 1e-6


# ------------------------------------------------------------------ chunked == scan


@pytest.mark.parametrize("decay", ["model", "near_one", "near_zero", "tiny"])
def test_chunked_matches_scan_values_and_gradients(rng, decay):
  """A long, ragged sequence in the default chunks: y, the state and all seven gradients."""
  xs, s0 = random_inputs(rng, *LONG, decay=decay)
  cy, cs = cotangents(rng, LONG)
  out = run_vjp(xs, s0, cy, cs, impl="chunked")
  assert_close(out, run_vjp(xs, s0, cy, cs, impl="scan"), TOL, decay)
  assert_close(out[:2], numpy_wkv7(xs, s0), TOL, (decay, "vs float64"))


@pytest.mark.parametrize("chunk_size", [1, 4])
def test_chunk_sizes(rng, chunk_size):
  xs, s0 = random_inputs(rng, *SHAPE, decay="near_zero")
  assert_close(run(xs, s0, impl="chunked", chunk_size=chunk_size),
               run(xs, s0, impl="scan"), TOL, chunk_size)


def test_single_token_and_no_state(rng):
  xs, s0 = random_inputs(rng, 2, 1, 2, 8)
  assert_close(run(xs, s0, impl="chunked", chunk_size=16), numpy_wkv7(xs, s0), TOL)
  y, s = run(xs, None, impl="chunked", chunk_size=16)
  assert_close((y, s), numpy_wkv7(xs, np.zeros_like(s0)), TOL)


def test_split_with_state_carry_equals_whole(rng):
  xs, s0 = random_inputs(rng, *SHAPE)
  y, s = run(xs, s0, impl="chunked", chunk_size=16)
  y1, s1 = run(tuple(x[:, :37] for x in xs), s0, impl="chunked", chunk_size=16)
  y2, s2 = run(tuple(x[:, 37:] for x in xs), s1, impl="chunked", chunk_size=16)
  assert rel_err(jnp.concatenate([y1, y2], 1), y) <= TOL and rel_err(s2, s) <= TOL
  assert_close((y, s), run(xs, s0, impl="scan"), TOL)


def test_bf16_inputs_accumulate_in_float32(rng):
  xs, s0 = random_inputs(rng, *SHAPE)
  xs16 = tuple(x.astype(jnp.bfloat16) for x in xs)
  xs32 = tuple(x.astype(jnp.float32) for x in xs16)  # the same values
  for impl in ("chunked", "scan"):
    y16, s16 = run(xs16, s0, impl=impl, chunk_size=16)
    y32, s32 = run(xs32, s0, impl=impl, chunk_size=16)
    assert y16.dtype == jnp.bfloat16 and s16.dtype == jnp.float32
    assert rel_err(s16, s32) <= 1e-6, impl
    # y is the float32 result rounded once: within bf16's half ulp (2^-9) of it.
    assert rel_err(y16, y32) <= 2 ** -8, impl
    assert rel_err(y16, y32.astype(jnp.bfloat16)) <= 1e-3, impl


# ------------------------------------------------------------------ dispatch and errors


def test_package_exports_the_operator():
  assert wkv7_fn is wkv7


def test_default_and_registry(rng, monkeypatch):
  # The package: rwkv_jax.ops.wkv7 as an attribute is the function, re-exported.
  mod = importlib.import_module("rwkv_jax.ops.wkv7")
  assert IMPLEMENTATIONS == ("scan", "chunked", "pallas")
  assert DEFAULT_CHUNK_SIZE == 32
  for platform in ("cpu", "tpu"):
    assert default_implementation(platform) == "chunked"
  assert default_implementation("gpu") == "pallas"  # pallas_kernels/wkv7.py
  xs, s0 = random_inputs(rng, 1, 5, 1, 4)
  assert default_implementation() == ("pallas" if jax.default_backend() == "gpu" else "chunked")
  # "pallas" is registered (pallas_kernels/wkv7.py, tests/test_wkv7_pallas.py); an empty
  # slot refuses to run, and a later registration fills it and becomes the default where
  # it says.
  monkeypatch.setattr(mod, "_IMPLS", dict(mod._IMPLS))
  monkeypatch.setattr(mod, "_DEFAULT_ON", dict(mod._DEFAULT_ON))
  del mod._IMPLS["pallas"]
  with pytest.raises(NotImplementedError, match="'pallas' implementation is not built yet"):
    wkv7(*xs, s0, implementation="pallas")
  calls = []
  fake = lambda *args, chunk_size=None: calls.append(chunk_size) or wkv7_scan(*args)
  register_implementation("pallas", fake, platforms=("gpu",))
  assert default_implementation("gpu") == "pallas"
  assert default_implementation("cpu") == "chunked"
  wkv7(*xs, s0, implementation="pallas", chunk_size=32)
  assert calls == [32]
  with pytest.raises(ValueError, match="unknown implementation name 'cuda'"):
    register_implementation("cuda", fake)
  default = jax.jit(lambda *x: wkv7(*x, chunk_size=2))(*xs, s0)  # None: chunked on CPU
  assert_close(default, jax.jit(lambda *x: wkv7_chunked(*x, chunk_size=2))(*xs, s0), TOL)


def test_bad_inputs_raise_clear_errors(rng):
  xs, s0 = random_inputs(rng, 1, 5, 2, 4)
  r, w, k, v, a, b = xs
  with pytest.raises(ValueError, match=r"unknown implementation 'cuda'; choose from "
                     r"\('scan', 'chunked', 'pallas'\)"):
    wkv7(*xs, implementation="cuda")
  for impl in ("scan", "chunked"):
    with pytest.raises(ValueError, match=r"k has shape \(1, 5, 2, 3\) but r has"):
      wkv7(r, w, k[..., :3], v, a, b, implementation=impl)
    with pytest.raises(ValueError, match=r"b has shape \(1, 4, 2, 4\)"):
      wkv7(r, w, k, v, a, b[:, :4], implementation=impl)
    with pytest.raises(ValueError, match=r"r must be \(B, T, H, N\)"):
      wkv7(r[0], w[0], k[0], v[0], a[0], b[0], implementation=impl)
    with pytest.raises(ValueError, match=r"state must be \(B, H, N, N\) = \(1, 2, 4, 4\)"):
      wkv7(*xs, s0[:, :1], implementation=impl)
    with pytest.raises(ValueError, match="w must be a float array"):
      wkv7(r, w.astype(jnp.int32), k, v, a, b, implementation=impl)
  with pytest.raises(ValueError, match="chunk_size must be a power of two, got 24"):
    wkv7(*xs, implementation="chunked", chunk_size=24)
  with pytest.raises(ValueError, match="state must be"):  # static: raised while tracing
    jax.jit(wkv7)(*xs, s0[..., :3])
  with pytest.raises(ValueError, match="a has shape"):
    wkv7_step(r[:, 0], w[:, 0], k[:, 0], v[:, 0], a[:, 0, :1], b[:, 0], s0)


def test_default_under_a_multi_device_mesh_is_chunked():
  """A Pallas kernel cannot be partitioned by XLA: under a multi-device mesh the GPU
  default is chunked; without one it is the registered kernel."""
  from jax.sharding import AbstractMesh, AxisType

  from rwkv_jax.ops.wkv7 import default_implementation

  alone = default_implementation("gpu")
  assert alone in ("pallas", "chunked")
  mesh = AbstractMesh((2,), ("data",), axis_types=(AxisType.Auto,))
  with jax.sharding.use_abstract_mesh(mesh):
    assert default_implementation("gpu") == "chunked"
