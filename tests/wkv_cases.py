"""Random WKV problems shared by the WKV tests of every implementation."""

import jax.numpy as jnp
import numpy as np

from rwkv_jax.ops import WKVState


def random_wkv_inputs(rng, b, t, c, *, log_decay=(-6.0, 3.0), key_scale=2.0, with_state=True):
  """w = exp(U(log_decay)), u, k, v (B, T, C) and optionally a valid incoming state."""
  w = jnp.asarray(np.exp(rng.uniform(*log_decay, c)), jnp.float32)
  u = jnp.asarray(rng.normal(size=c), jnp.float32)
  k = jnp.asarray(key_scale * rng.normal(size=(b, t, c)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(b, t, c)), jnp.float32)
  state = None
  if with_state:
    state = WKVState(
        jnp.asarray(rng.normal(size=(b, c)), jnp.float32),
        jnp.asarray(rng.uniform(0.5, 2.0, size=(b, c)), jnp.float32),
        jnp.asarray(rng.normal(size=(b, c)), jnp.float32),
    )
  return w, u, k, v, state


def wkv_loss_fn(wkv_fn, cotangents):
  """A scalar of y and the new state with fixed random cotangents, for gradient checks."""
  gy, gnum, gden = cotangents

  def loss(w, u, k, v, state):
    y, s = wkv_fn(w, u, k, v, state)
    # The represented sums exp(max) * (num, den) are what the state means; weigh those.
    return (jnp.sum(y * gy) + jnp.sum(jnp.exp(s.max) * s.num * gnum)
            + jnp.sum(jnp.exp(s.max) * s.den * gden))

  return loss


def random_cotangents(rng, b, t, c):
  return (jnp.asarray(rng.normal(size=(b, t, c)), jnp.float32),
          jnp.asarray(rng.normal(size=(b, c)), jnp.float32) * 1e-2,
          jnp.asarray(rng.normal(size=(b, c)), jnp.float32) * 1e-2)


class WKVAgainstScan:
  """Tests any WKV path against the lax.scan reference. Subclass and set ``wkv_fn``.

  Tolerances (float32): forward and new state rel. err <= FWD_TOL; gradients <= GRAD_TOL;
  long sequences with extreme decays and large keys <= LONG_TOL (all ||a-b|| / ||b||).
  """

  FWD_TOL = 1e-5
  GRAD_TOL = 1e-4
  LONG_TOL = 1e-5
  SHAPES = [(1, 1, 3), (2, 17, 8), (3, 64, 16)]
  LONG_T = 65536

  @staticmethod
  def wkv_fn(w, u, k, v, state):
    raise NotImplementedError

  def _compare(self, out, ref, tol):
    from tests.conftest import rel_err
    (y, s), (y_ref, s_ref) = out, ref
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
    assert np.isfinite(np.asarray(y)).all()
    assert rel_err(y, y_ref) <= tol, rel_err(y, y_ref)
    # A state is a representation: exp(max) * (num, den) is what it means, and two exact
    # paths may round max differently. Align to the reference's exponent, then compare.
    f64 = lambda x: np.asarray(x, np.float64)
    scale = np.exp(f64(s.max) - f64(s_ref.max))
    num, den = f64(s.num) * scale, f64(s.den) * scale
    # num is a signed sum that can cancel to ~0; its error is measured against the scale
    # of the positive den it shares the exponent with (|v| ~ 1 in these cases).
    errors = {"num": np.linalg.norm(num - f64(s_ref.num)) / np.linalg.norm(f64(s_ref.den)),
              "den": rel_err(den, s_ref.den)}
    assert np.isfinite(f64(s.max)).all()
    for name, err in errors.items():
      assert err <= tol, (name, err)

  def test_forward_and_state_match_scan(self, rng):
    from rwkv_jax.ops import wkv_scan_reference
    for b, t, c in self.SHAPES:
      for with_state in (False, True):
        args = random_wkv_inputs(rng, b, t, c, with_state=with_state)
        self._compare(self.wkv_fn(*args), wkv_scan_reference(*args), self.FWD_TOL)

  def test_gradients_match_scan(self, rng):
    import jax
    from tests.conftest import rel_err
    from rwkv_jax.ops import wkv_scan_reference
    for b, t, c in self.SHAPES[1:]:
      args = random_wkv_inputs(rng, b, t, c)
      cot = random_cotangents(rng, b, t, c)
      argnums = (0, 1, 2, 3, 4)
      got = jax.grad(wkv_loss_fn(self.wkv_fn, cot), argnums)(*args)
      want = jax.grad(wkv_loss_fn(wkv_scan_reference, cot), argnums)(*args)
      for name, g, r in zip(["w", "u", "k", "v", "state"], got, want):
        for gl, rl in zip(jax.tree.leaves(g), jax.tree.leaves(r)):
          assert np.isfinite(np.asarray(gl)).all(), name
          assert rel_err(gl, rl) <= self.GRAD_TOL, (name, rel_err(gl, rl))

  def test_split_with_state_carry_equals_whole(self, rng):
    import jax.numpy as jnp
    w, u, k, v, state = random_wkv_inputs(rng, 2, 40, 8)
    y, s = self.wkv_fn(w, u, k, v, state)
    y1, s1 = self.wkv_fn(w, u, k[:, :13], v[:, :13], state)
    y2, s2 = self.wkv_fn(w, u, k[:, 13:], v[:, 13:], s1)
    self._compare((jnp.concatenate([y1, y2], 1), s2), (y, s), self.FWD_TOL)

  def test_long_sequence_extreme_decays_large_keys(self, rng):
    from rwkv_jax.ops import wkv_scan_reference
    # Decays from exp(-12) (remembers ~160k tokens) to exp(8) (forgets at once) and
    # keys up to +-80, where exp(k) alone is ~1e34: only the stabilisation keeps it finite.
    args = random_wkv_inputs(rng, 1, self.LONG_T, 8, log_decay=(-12.0, 8.0), key_scale=30.0)
    w, u, k, v, state = args
    k = k.clip(-80.0, 80.0)
    self._compare(self.wkv_fn(w, u, k, v, state), wkv_scan_reference(w, u, k, v, state),
                  self.LONG_TOL)

  def test_bfloat16_inputs_compute_in_float32(self, rng):
    import jax.numpy as jnp
    from rwkv_jax.ops import wkv_scan_reference
    w, u, k, v, state = random_wkv_inputs(rng, 2, 33, 8)
    kb, vb = k.astype(jnp.bfloat16), v.astype(jnp.bfloat16)
    y, s = self.wkv_fn(w, u, kb, vb, state)
    assert y.dtype == jnp.bfloat16 and s.num.dtype == jnp.float32
    y_ref, s_ref = wkv_scan_reference(w, u, kb.astype(jnp.float32), vb.astype(jnp.float32),
                                      state)
    self._compare((y.astype(jnp.float32), s), (y_ref, s_ref), 1e-2)
