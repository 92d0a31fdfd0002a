"""WKV by lax.associative_scan over a log-space stabilised monoid: O(log T) depth.

An element summarises a run of n consecutive tokens as the pair of sums it adds to
the state at the run's end, stored as exp(m) * (a, b):
    a = sum_i exp(-(end - i) w + k_i) v_i,   b = the same without v_i.
Appending run 2 after run 1 decays run 1 by exp(-n_2 w):
    (n1, m1, a1, b1) . (n2, m2, a2, b2) = (n1 + n2, m, e1 a1 + e2 a2, e1 b1 + e2 b2)
    with m = max(m1 - n2 w, m2), e1 = exp(m1 - n2 w - m), e2 = exp(m2 - m).
The operation is associative (it is the composition of affine maps), so the inclusive
prefix at t is exactly the recurrent state after token t.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rwkv_jax.ops._state import WKVState, check_wkv_inputs


def _merge(w, left, right):
  """Appends summary ``right`` after ``left``; the counts n broadcast against (…, C)."""
  n1, m1, a1, b1 = left
  n2, m2, a2, b2 = right
  decay = n2 * w
  m = jnp.maximum(m1 - decay, m2)
  # (m1 - m) - decay keeps a decay far below ulp(m1), see _scan.wkv_step.
  e1, e2 = jnp.exp((m1 - m) - decay), jnp.exp(m2 - m)
  return n1 + n2, m, e1 * a1 + e2 * a2, e1 * b1 + e2 * b2


def wkv_associative_scan(w, u, k, v, state=None):
  """WKV with O(log T) depth. k, v: (B, T, C); w, u: (C,). Returns (y (B,T,C), WKVState)."""
  out_dtype = v.dtype
  w, u, k, v, state = check_wkv_inputs(w, u, k, v, state)
  _, t, _ = k.shape
  # Token t alone: n = 1, exponent k_t, sums (v_t, 1). Counts are (1, T, 1) and broadcast.
  ones_t = jnp.ones((1, t, 1), jnp.float32)
  elems = (ones_t, k, v, jnp.ones_like(k))
  _, m, a, b = jax.lax.associative_scan(lambda l, r: _merge(w, l, r), elems, axis=1)
  # Fold in the incoming state, which is older than every token: decay by (t + 1) w.
  steps = jnp.arange(1, t + 1, dtype=jnp.float32)[None, :, None]  # 1 T 1
  init = (None, state.max[:, None], state.num[:, None], state.den[:, None])
  _, m, a, b = _merge(w, (0.0, *init[1:]), (steps, m, a, b))
  # The output at t reads the state after t - 1 (the incoming state for t = 0).
  prev = lambda first, x: jnp.concatenate([first[:, None], x[:, :-1]], axis=1)
  p, num, den = prev(state.max, m), prev(state.num, a), prev(state.den, b)
  uk = u + k
  q = jnp.maximum(p, uk)
  e1, e2 = jnp.exp(p - q), jnp.exp(uk - q)
  y = (e1 * num + e2 * v) / (e1 * den + e2)
  return y.astype(out_dtype), WKVState(a[:, -1], b[:, -1], m[:, -1])
