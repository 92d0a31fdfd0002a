"""WKV-7 step by step: the reference (``wkv7_scan``), the decode step (``wkv7_step``) and
the input contract both pure-JAX paths share (``check_wkv7_inputs``).

Per head, S (N x N, float32) with rows indexing the value and columns the key:
  S_t = S_{t-1} (diag(w_t) + a_t b_t^T) + v_t k_t^T ;   y_t = S_t r_t
i.e. ``S = S * w[None, :] + (S @ a) b^T + v k^T`` (BlinkDL's rwkv_v7_demo.py layout).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HI = jax.lax.Precision.HIGHEST
NAMES = ("r", "w", "k", "v", "a", "b")


def validate_wkv7_inputs(r, w, k, v, a, b, state) -> None:
  """Raises ValueError naming the offending argument unless r, w, k, v, a, b are float
  (B, T, H, N) arrays and state is None or (B, H, N, N). Static: safe under jit."""
  xs = dict(zip(NAMES, (r, w, k, v, a, b)))
  for name, x in xs.items():
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
      raise ValueError(f"wkv7: {name} must be a float array, got dtype {jnp.result_type(x)}")
  if jnp.ndim(r) != 4:
    raise ValueError(f"wkv7: r must be (B, T, H, N), got shape {jnp.shape(r)}")
  shape = jnp.shape(r)
  for name, x in xs.items():
    if jnp.shape(x) != shape:
      raise ValueError(f"wkv7: {name} has shape {jnp.shape(x)} but r has {shape}; "
                       "r, w, k, v, a, b must all be (B, T, H, N)")
  bsz, _, h, n = shape
  if state is not None and jnp.shape(state) != (bsz, h, n, n):
    raise ValueError(f"wkv7: state must be (B, H, N, N) = {(bsz, h, n, n)}, "
                     f"got shape {jnp.shape(state)}")


def check_wkv7_inputs(r, w, k, v, a, b, state):
  """``validate_wkv7_inputs``, then float32 copies of the six inputs and of the state
  (zeros when None)."""
  validate_wkv7_inputs(r, w, k, v, a, b, state)
  bsz, _, h, n = jnp.shape(r)
  if state is None:
    state = jnp.zeros((bsz, h, n, n), jnp.float32)
  return tuple(jnp.asarray(x, jnp.float32) for x in (r, w, k, v, a, b, state))


def _step(s, r, w, k, v, a, b):
  """One token in float32. s: (..., N, N); the vectors (..., N). Returns (y, new s)."""
  sa = jnp.einsum("...ij,...j->...i", s, a, precision=_HI)
  s = s * w[..., None, :] + sa[..., :, None] * b[..., None, :] + v[..., :, None] * k[..., None, :]
  return jnp.einsum("...ij,...j->...i", s, r, precision=_HI), s


def wkv7_step(r, w, k, v, a, b, state=None):
  """One token of WKV-7 (decode). r, w, k, v, a, b: (B, H, N); state (B, H, N, N) float32
  or None. Returns (y (B, H, N) in r's dtype, the new state (B, H, N, N) float32)."""
  xs = [x[:, None] for x in (r, w, k, v, a, b)]  # as a (B, 1, H, N) sequence: one check
  *xs, state = check_wkv7_inputs(*xs, state)
  y, state = _step(state, *(x[:, 0] for x in xs))
  return y.astype(r.dtype), state


def wkv7_scan(r, w, k, v, a, b, state=None, *, chunk_size=None):
  """WKV-7 by lax.scan over T: the reference. r, w, k, v, a, b: (B, T, H, N); state
  (B, H, N, N) float32 or None. Returns (y (B, T, H, N) in r's dtype, state float32).

  ``chunk_size`` is accepted and ignored, so every implementation shares one signature.
  """
  del chunk_size
  *xs, state = check_wkv7_inputs(r, w, k, v, a, b, state)

  def body(s, x):
    y, s = _step(s, *x)
    return s, y

  # T first for the scan: each step sees (B, H, N) slices.
  state, y = jax.lax.scan(body, state, tuple(x.swapaxes(0, 1) for x in xs))
  return y.swapaxes(0, 1).astype(r.dtype), state
