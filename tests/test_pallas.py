"""The Pallas WKV-4 kernel against the lax.scan reference: on a GPU, and interpreted on CPU.

Tolerances (||a - b|| / ||b||, float32): forward and state 1e-5, gradients 1e-4, long
sequences with extreme decays 1e-5 (WKVAgainstScan); bfloat16 inputs 1e-2 forward and
3e-2 gradients against the reference on the same (rounded) inputs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.wkv4 import BlockSizes, wkv4
from rwkv_jax.ops import WKVState, wkv, wkv_scan_reference
from tests.conftest import rel_err
from tests.wkv_cases import WKVAgainstScan, random_cotangents, random_wkv_inputs, wkv_loss_fn

ARGNUMS = (0, 1, 2, 3, 4)


def _assert_grads_close(got, want, tol):
  for name, g, r in zip(["w", "u", "k", "v", "state"], got, want):
    for gl, rl in zip(jax.tree.leaves(g), jax.tree.leaves(r)):
      assert gl.dtype == rl.dtype, (name, gl.dtype, rl.dtype)
      assert np.isfinite(np.asarray(gl, np.float32)).all(), name
      assert rel_err(gl, rl) <= tol, (name, rel_err(gl, rl))


class _PallasCases(WKVAgainstScan):
  """The shared cases plus the kernel's own paths; subclasses choose where it runs."""

  INTERPRET = False
  BLOCKS = BlockSizes()
  # Tiny tiles and chunks: several chunks, partial tiles and the chunk fold at test sizes.
  SPLIT_BLOCKS = BlockSizes(block_t=8, block_t_bwd=4, chunk_t=16)

  def wkv_fn(self, w, u, k, v, state, block_sizes=None):
    return wkv4(w, u, k, v, state, block_sizes=block_sizes or self.BLOCKS,
                interpret=self.INTERPRET)

  def _split_fn(self, *args):
    return self.wkv_fn(*args, block_sizes=self.SPLIT_BLOCKS)

  def test_t_chunks_and_partial_tiles_forward_and_gradients(self, rng):
    # T = 45: 3 chunks of 16 (the last one 13 long), tiles of 8 and 4 with a partial one.
    args = random_wkv_inputs(rng, 2, 45, 8)
    assert self.SPLIT_BLOCKS.plan(2, 45, 8).n_chunks == 3
    self._compare(self._split_fn(*args), wkv_scan_reference(*args), self.FWD_TOL)
    cot = random_cotangents(rng, 2, 45, 8)
    got = jax.grad(wkv_loss_fn(self._split_fn, cot), ARGNUMS)(*args)
    want = jax.grad(wkv_loss_fn(wkv_scan_reference, cot), ARGNUMS)(*args)
    _assert_grads_close(got, want, self.GRAD_TOL)

  def test_state_gradient_across_calls(self, rng):
    """Truncated BPTT: the state of call 1 feeds call 2; gradients reach call 1's inputs
    and the first state exactly as through one call over the whole sequence."""
    b, t, c = self.SHAPES[1]  # the shape of test_gradients_match_scan: compiled once
    w, u, k, v, state = random_wkv_inputs(rng, b, 2 * t, c)
    gy = jnp.asarray(rng.normal(size=k.shape), jnp.float32)

    def two_calls(w, u, k, v, state):
      y1, s1 = self.wkv_fn(w, u, k[:, :t], v[:, :t], state)
      y2, _ = self.wkv_fn(w, u, k[:, t:], v[:, t:], s1)
      return jnp.sum(jnp.concatenate([y1, y2], 1) * gy)

    def one_call(w, u, k, v, state):
      return jnp.sum(wkv_scan_reference(w, u, k, v, state)[0] * gy)

    args = (w, u, k, v, state)
    got = jax.grad(two_calls, ARGNUMS)(*args)
    _assert_grads_close(got, jax.grad(one_call, ARGNUMS)(*args), self.GRAD_TOL)

  def test_extreme_decays_gradients_without_state_cotangent(self, rng):
    # Keys of +-80 and decays exp(-12) .. exp(8); only y is in the loss, so the adjoint
    # starts empty (a zero cotangent must not flush the terms added later).
    w, u, k, v, state = random_wkv_inputs(rng, 2, 45, 8, log_decay=(-12.0, 8.0),
                                          key_scale=30.0)
    k = k.clip(-80.0, 80.0)
    gy = jnp.asarray(rng.normal(size=k.shape), jnp.float32)
    loss = lambda fn: lambda *a: jnp.sum(fn(*a)[0] * gy)
    args = (w, u, k, v, state)
    got = jax.grad(loss(self._split_fn), ARGNUMS)(*args)
    want = jax.grad(loss(wkv_scan_reference), ARGNUMS)(*args)
    _assert_grads_close(got[:4], want[:4], self.GRAD_TOL)
    _assert_grads_close((got[4].num, got[4].den), (want[4].num, want[4].den), self.GRAD_TOL)
    # d/d(max) of the incoming state is sum(g_num * num + g_den * den): with keys of +-80
    # those terms cancel to ~1e-3 of their size, so its error is measured against the
    # size of the terms (float32 rounding of each term), not against the small result.
    terms = (np.abs(np.asarray(want[4].num) * np.asarray(state.num))
             + np.abs(np.asarray(want[4].den) * np.asarray(state.den)))
    err = np.asarray(got[4].max, np.float64) - np.asarray(want[4].max, np.float64)
    assert np.linalg.norm(err) <= self.GRAD_TOL * np.linalg.norm(terms), np.linalg.norm(err)

  def test_bfloat16_gradients(self, rng):
    w, u, k, v, state = random_wkv_inputs(rng, *self.SHAPES[1])
    kb, vb = k.astype(jnp.bfloat16), v.astype(jnp.bfloat16)
    gy = jnp.asarray(rng.normal(size=k.shape), jnp.float32)
    loss = lambda fn: lambda w, u, k, v: jnp.sum(fn(w, u, k, v, state)[0].astype(jnp.float32) * gy)
    gw, gu, gk, gv = jax.grad(loss(self.wkv_fn), (0, 1, 2, 3))(w, u, kb, vb)
    assert gk.dtype == jnp.bfloat16 and gv.dtype == jnp.bfloat16
    want = jax.grad(loss(wkv_scan_reference), (0, 1, 2, 3))(
        w, u, kb.astype(jnp.float32), vb.astype(jnp.float32))
    for g, r in zip((gw, gu, gk, gv), want):
      assert rel_err(g, r) <= 3e-2, rel_err(g, r)

  def test_empty_and_zero_length(self, rng):
    w, u, k, v, _ = random_wkv_inputs(rng, 1, 3, 4, with_state=False)
    y, s = self.wkv_fn(w, u, k[:, :0], v[:, :0], None)
    assert y.shape == (1, 0, 4) and (np.asarray(s.max) == np.float32(-1e38)).all()
    # An all-zero state with a finite max is as empty as the canonical one.
    zero = jnp.zeros((1, 4), jnp.float32)
    self._compare(self.wkv_fn(w, u, k, v, WKVState(zero, zero, zero + 50.0)),
                  wkv_scan_reference(w, u, k, v, None), self.FWD_TOL)


@pytest.mark.gpu
class TestPallasGPU(_PallasCases):
  """Compiled Triton kernels, default block sizes; the long test runs T = 65536."""

  def test_large_problem_against_associative_scan(self, rng):
    from rwkv_jax.ops import wkv_associative_scan
    # Whole sequences per program, then T cut into chunks (the default at B1).
    for (b, t, c), blocks in [((4, 2048, 512), BlockSizes(chunk_t=2048)), ((1, 4096, 256), None)]:
      args = random_wkv_inputs(rng, b, t, c)
      self._compare(self.wkv_fn(*args, block_sizes=blocks),
                    jax.jit(wkv_associative_scan)(*args), self.FWD_TOL)


class TestPallasInterpret(_PallasCases):
  """The same kernels through the Pallas interpreter on CPU, at small sizes."""

  INTERPRET = True
  # Short tiles keep the interpreter's compile time down; min_chunk_t cuts T into
  # chunks (at T = 17 and in the long test) as a small-batch GPU call would. Tests reuse
  # shapes, so each (shape, blocks, dtype) compiles once.
  BLOCKS = BlockSizes(block_t=4, block_t_bwd=2, min_chunk_t=8)
  SPLIT_BLOCKS = BlockSizes(block_t=8, block_t_bwd=4, chunk_t=16)
  SHAPES = [(1, 1, 3), (2, 17, 8)]
  LONG_T = 2048


def test_dispatch_runs_the_kernel(rng):
  args = random_wkv_inputs(rng, 2, 9, 8)
  y, s = wkv(*args, implementation="pallas")  # interpreted off-GPU
  y_ref, s_ref = wkv_scan_reference(*args)
  assert rel_err(y, y_ref) <= 1e-5 and rel_err(s.den * jnp.exp(s.max - s_ref.max), s_ref.den) <= 1e-5


def test_block_sizes_are_validated():
  with pytest.raises(ValueError, match="block_t must be a power of two"):
    BlockSizes(block_t=12)
  with pytest.raises(ValueError, match="must divide block_t"):
    BlockSizes(block_t=8, block_t_bwd=16)
  with pytest.raises(ValueError, match="chunk_t .* multiple of block_t"):
    BlockSizes(block_t=16, chunk_t=40)
  with pytest.raises(ValueError, match="k must be a float array"):
    wkv4(jnp.ones(4), jnp.ones(4), jnp.ones((1, 2, 4), jnp.int32), jnp.ones((1, 2, 4)))
  with pytest.raises(ValueError, match="k and v must both be"):
    wkv4(jnp.ones(4), jnp.ones(4), jnp.ones((2, 4)), jnp.ones((2, 4)))
