"""The reference WKV: a lax.scan over time of the paper's stabilised recurrence."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rwkv_jax.ops._state import WKVState, check_wkv_inputs


def _two_sum(a, b):
  """a + b as (sum, rounding error), exactly (Knuth's TwoSum)."""
  s = a + b
  bb = s - a
  return s, (a - (s - bb)) + (b - bb)


def _decay_add(s, comp, x, new):
  """exp(x) (s + comp) + new as (sum, error), for x <= 0.

  Near x = 0 (slow decay, the past dominates) exp(x) rounds to one of a few floats next
  to 1 and that same rounding repeats every step, a bias that grows with T; there we add
  expm1(x) s to s instead, whose only rounding is the random one of the final sum, and
  carry that rounding in ``comp`` (compensated summation).
  """
  near_one = x > -0.5
  base = jnp.where(near_one, s, jnp.exp(x) * s)
  delta = jnp.where(near_one, jnp.expm1(x) * s, 0.0) + jnp.exp(x) * comp + new
  return _two_sum(base, delta)


def _step(w, u, k_t, v_t, state: WKVState, comp):
  """One token of WKV (paper eqs. 23-28) with compensation terms comp = (c_num, c_den)."""
  num, den, p = state
  c_num, c_den = comp
  # Output: the past (undecayed) plus the current token with bonus u.
  uk = u + k_t
  q = jnp.maximum(p, uk)
  e1, e2 = jnp.exp(p - q), jnp.exp(uk - q)
  y = (e1 * (num + c_num) + e2 * v_t) / (e1 * (den + c_den) + e2)
  # State: decay the past by exp(-w) and add the current token without bonus. The
  # exponent is (p - q) - w, not (p - w) - q: p - q is exact when q is near p, so the
  # rounding of p - w (which for w << ulp(p) would swallow the decay) is not lost.
  q = jnp.maximum(p - w, k_t)
  x = (p - q) - w
  e2 = jnp.exp(k_t - q)
  num, c_num = _decay_add(num, c_num, x, e2 * v_t)
  den, c_den = _decay_add(den, c_den, x, e2)
  return y, WKVState(num, den, q), (c_num, c_den)


def wkv_step(w, u, k_t, v_t, state: WKVState):
  """One token of WKV. w: (C,) decay rate; u: (C,) bonus; k_t, v_t: (B, C) float32.

  Returns (y_t (B, C), the state after this token).
  """
  zero = jnp.zeros_like(state.num)
  y, (num, den, p), (c_num, c_den) = _step(w, u, k_t, v_t, state, (zero, zero))
  return y, WKVState(num + c_num, den + c_den, p)


def wkv_scan_reference(w, u, k, v, state=None):
  """WKV by lax.scan over T. k, v: (B, T, C); w, u: (C,). Returns (y (B,T,C), WKVState).

  Sums are compensated across steps, so a slow decay over a long T stays at float32
  accuracy instead of drifting with sqrt(T) roundings.
  """
  out_dtype = v.dtype
  w, u, k, v, state = check_wkv_inputs(w, u, k, v, state)
  zero = jnp.zeros_like(state.num)
  # Broadcast w, u to (B, C) outside the loop: their gradients then sum over the batch
  # once after the backward scan, not on every step (an all-reduce per step when the
  # batch is sharded).
  w, u = jnp.broadcast_to(w, zero.shape), jnp.broadcast_to(u, zero.shape)

  def body(carry, kv):
    y, s, comp = _step(w, u, kv[0], kv[1], *carry)
    return (s, comp), y

  # T B C layout for the scan.
  (state, (c_num, c_den)), y = jax.lax.scan(
      body, (state, (zero, zero)), (k.swapaxes(0, 1), v.swapaxes(0, 1)))
  state = WKVState(state.num + c_num, state.den + c_den, state.max)
  return y.swapaxes(0, 1).astype(out_dtype), state
