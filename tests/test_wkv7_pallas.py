"""The Pallas WKV-7 kernel (pallas_kernels/wkv7) against the scan reference and float64.

``TestInterpret`` runs the kernel in the Pallas interpreter on CPU (CI) at N = 16;
``TestGPU`` (marker gpu) compiles it with Triton at N = 64. Both: model (clampw,
0.545..1), near-one, near-zero (down to 1e-30) and all-1e-30 decays, T not a multiple of
the chunk, T-segments, an incoming state, bf16 inputs, and gradients (under
differentiation the custom VJP runs the chunked form: checked for plumbing and dtypes).

Tolerances, ||a - b|| / ||b||. float32 inputs: 2e-6 in the interpreter (float32 matmuls;
measured ~1e-7); on the GPU 2e-5 (three-pass tf32 matmuls). bf16 inputs, against the
float32 reference on the same rounded inputs: y 1e-2, state 1e-2 (tf32 matmuls on the
GPU; y itself is rounded to bf16, 2^-9).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import wkv7 as kernel
from pallas_kernels.wkv7 import Config, registered_wkv7, supported, wkv7_pallas
from rwkv_jax.ops.wkv7 import wkv7_chunked, wkv7_scan
from tests.conftest import rel_err
from tests.test_wkv7 import NAMES, cotangents, numpy_wkv7, random_inputs

DECAYS = ("model", "near_one", "near_zero", "tiny")


@functools.partial(jax.jit, static_argnames=("fn",))
def _vjp(fn, xs, state, cy, cs):
  (y, s), vjp = jax.vjp(fn, xs, state)
  gxs, gs = vjp((cy, cs))
  return y, s, gxs, gs


def _close(out, ref, tol, label):
  names = ["y", "state", *(f"d{n}" for n in NAMES), "dstate"]
  for name, x, x_ref in zip(names, jax.tree.leaves(out), jax.tree.leaves(ref)):
    x = np.asarray(x, np.float32)
    assert np.isfinite(x).all(), (label, name, "not finite")
    err = rel_err(x, np.asarray(x_ref, np.float32))
    assert err <= tol, (label, name, err)


class _Cases:
  INTERPRET = True
  N = 16
  TOL = 2e-6
  BF16_TOL = 1e-2
  # B T H: T = 100 is 6 chunks of 16 and 4 (ragged); 200 = 3 segments of 4 chunks of 16
  # with the last padded.
  SHAPE = (2, 100, 2)
  SEG_SHAPE = (1, 200, 2)

  def fn(self, cfg=Config()):
    return functools.partial(wkv7_pallas, config=cfg, interpret=self.INTERPRET)

  def shape(self, bth):
    return (*bth, self.N)

  @pytest.mark.parametrize("decay", DECAYS)
  def test_forward_matches_float64(self, rng, decay):
    xs, s0 = random_inputs(rng, *self.shape(self.SHAPE), decay=decay)
    y, s = self.fn()(*xs, s0)
    _close((y, s), numpy_wkv7(xs, s0), self.TOL, decay)
    assert y.dtype == jnp.float32 and s.dtype == jnp.float32

  @pytest.mark.parametrize("chunk,segments", [(16, 3), (32, 2)])
  def test_segments_and_chunks(self, rng, chunk, segments):
    """T cut into segments joined by the exact segment maps; chunks of 32."""
    shape = self.shape(self.SEG_SHAPE)
    cfg = Config(chunk=chunk, segments=segments)
    assert cfg.n_segments(*shape[:3]) == segments
    for decay in ("model", "near_zero"):
      xs, s0 = random_inputs(rng, *shape, decay=decay)
      _close(self.fn(cfg)(*xs, s0), numpy_wkv7(xs, s0), self.TOL, (chunk, decay))

  def test_no_state_and_split_carry(self, rng):
    xs, s0 = random_inputs(rng, *self.shape(self.SHAPE))
    fn = self.fn()
    y, s = fn(*xs, None)
    _close((y, s), numpy_wkv7(xs, np.zeros_like(s0)), self.TOL, "no state")
    y1, s1 = fn(*(x[:, :37] for x in xs), s0)
    y2, s2 = fn(*(x[:, 37:] for x in xs), s1)
    _close((jnp.concatenate([y1, y2], 1), s2), numpy_wkv7(xs, s0), self.TOL, "split")

  def test_bf16_inputs(self, rng):
    xs, s0 = random_inputs(rng, *self.shape(self.SHAPE))
    xs16 = tuple(x.astype(jnp.bfloat16) for x in xs)
    y, s = self.fn()(*xs16, s0)
    assert y.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    y_ref, s_ref = numpy_wkv7(tuple(x.astype(jnp.float32) for x in xs16), s0)
    _close((y, s), (y_ref, s_ref), self.BF16_TOL, "bf16")

  def test_gradients(self, rng):
    """Through the custom VJP (the chunked form's forward and VJP): values and all seven
    gradients against scan."""
    shape = self.shape(self.SHAPE)
    xs, s0 = random_inputs(rng, *shape, decay="model")
    cy, cs = cotangents(rng, shape)
    f = lambda xs, st: self.fn()(*xs, st)
    ref = lambda xs, st: wkv7_scan(*xs, st)
    _close(_vjp(f, xs, s0, cy, cs), _vjp(ref, xs, s0, cy, cs), 10 * self.TOL, "grad f32")

  def test_gradients_bf16(self, rng):
    """bf16 inputs get bf16 gradients (the state's stays float32); on the GPU also their
    values against the chunked VJP (in the interpreter only the shapes: compile time)."""
    shape = self.shape(self.SHAPE)
    xs, s0 = random_inputs(rng, *shape, decay="model")
    cy, cs = cotangents(rng, shape)
    xs16, cy16 = tuple(x.astype(jnp.bfloat16) for x in xs), cy.astype(jnp.bfloat16)
    f = lambda xs, st: self.fn()(*xs, st)
    shapes = jax.eval_shape(_vjp, f, xs16, s0, cy16, cs)
    assert [g.dtype for g in shapes[2]] == [jnp.bfloat16] * 6
    assert shapes[3].dtype == jnp.float32 and shapes[3].shape == s0.shape
    if not self.INTERPRET:
      want = _vjp(lambda xs, st: wkv7_chunked(*xs, st), xs16, s0, cy16, cs)
      _close(_vjp(f, xs16, s0, cy16, cs), want, self.BF16_TOL, "grad bf16")


class TestInterpret(_Cases):
  """The kernel in the Pallas interpreter (CPU, CI)."""


@pytest.mark.gpu
class TestGPU(_Cases):
  """The compiled kernel (Triton) on a GPU at the model's head size."""

  INTERPRET = False
  N = 64
  TOL = 2e-5
  SHAPE = (2, 1000, 4)  # 62 chunks of 16 and 8
  SEG_SHAPE = (1, 1000, 4)

  @pytest.mark.parametrize("precision", ["ieee", "tf32x3", "tf32", "bf16"])
  def test_precisions(self, rng, precision):
    """Every matmul mode on float32 inputs: float32-exact modes tight, tf32 / bf16 loose."""
    xs, s0 = random_inputs(rng, *self.shape(self.SHAPE))
    cfg = Config(precision=precision)
    tol = self.TOL if precision in ("ieee", "tf32x3") else self.BF16_TOL
    _close(self.fn(cfg)(*xs, s0), numpy_wkv7(xs, s0), tol, precision)

  def test_long_default_segments(self, rng):
    """B * H small: the default plan cuts T into segments; 64 chunks each."""
    shape = (1, 8192, 2, self.N)
    assert Config().n_segments(*shape[:3]) > 1
    xs, s0 = random_inputs(rng, *shape, decay="model")
    _close(self.fn()(*xs, s0), jax.jit(wkv7_scan)(*xs, s0), self.TOL, "long")


# ------------------------------------------------------------------ the wrapper (CPU only)


def test_config_validation_and_plan():
  with pytest.raises(ValueError, match="chunk must be 16, 32 or 64"):
    Config(chunk=8)
  with pytest.raises(ValueError, match="precision must be one of"):
    Config(precision="fp8")
  with pytest.raises(ValueError, match="segments must be >= 1"):
    Config(segments=0)
  cfg = Config()
  assert cfg.n_segments(8, 4096, 32) == 1  # 256 programs: enough
  assert cfg.n_segments(1, 32768, 32) == 8
  assert cfg.n_segments(1, 8192, 2) == 128  # 4 chunks a segment
  assert cfg.n_segments(1, 100, 2) == 1  # too short to split
  assert Config(segments=5).n_segments(1, 40, 1) == 3  # never more segments than chunks
  assert supported((1, 1, 1, 64)) and not supported((1, 1, 1, 8))


def test_shape_errors_and_empty(rng):
  xs, s0 = random_inputs(rng, 1, 5, 2, 16)
  r, w, k, v, a, b = xs
  with pytest.raises(ValueError, match=r"k has shape"):
    wkv7_pallas(r, w, k[..., :8], v, a, b, interpret=True)
  with pytest.raises(ValueError, match="head size N must be 16, 32, 64 or 128, got 8"):
    wkv7_pallas(*(x[..., :8] for x in xs), interpret=True)
  y, s = wkv7_pallas(*(x[:, :0] for x in xs), s0, interpret=True)
  assert y.shape == (1, 0, 2, 16) and (s == s0).all()


def test_registered_entry_falls_back_to_chunked(rng, monkeypatch):
  """The registry's "pallas" entry runs the kernel where it applies, else chunked."""
  calls = []
  monkeypatch.setattr(kernel, "wkv7_pallas", lambda *a, **kw: calls.append(kw) or "kernel")
  monkeypatch.setattr(kernel, "wkv7_chunked", lambda *a, **kw: calls.append(kw) or "chunked")
  xs16, _ = random_inputs(rng, 1, 5, 1, 16)
  xs8, s8 = random_inputs(rng, 1, 5, 1, 8)
  assert registered_wkv7(*xs16) == "kernel"
  assert registered_wkv7(*xs16, chunk_size=32) == "kernel"
  assert registered_wkv7(*xs8, s8) == "chunked"  # N = 8: Triton's matmuls need >= 16
  assert registered_wkv7(*xs16, None, chunk_size=4) == "chunked"  # no chunks of 4
  interpret = jax.default_backend() != "gpu"
  assert calls == [dict(chunk_size=None, interpret=interpret),
                   dict(chunk_size=32, interpret=interpret), dict(chunk_size=None),
                   dict(chunk_size=4)]


def test_dispatch_selects_the_kernel(rng):
  """rwkv_jax.ops.wkv7(implementation="pallas") runs this kernel (interpreted off the GPU);
  the default stays "chunked" on CPU."""
  from rwkv_jax.ops.wkv7 import default_implementation, wkv7
  assert default_implementation("cpu") == "chunked"
  xs, s0 = random_inputs(rng, 1, 40, 2, 16)
  _close(wkv7(*xs, s0, implementation="pallas"), numpy_wkv7(xs, s0), 2e-6, "dispatch")
