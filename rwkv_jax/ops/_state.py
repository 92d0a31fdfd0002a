"""The WKV recurrent state and the shared input checks of every WKV path."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

# Max-exponent of an empty state: exp(NEG_INF_EXP - anything finite) == 0 in float32,
# without the NaNs that a true -inf gives in (-inf) - (-inf). Same value as HF transformers.
NEG_INF_EXP = -1e38


class WKVState(NamedTuple):
  """Log-space stabilised WKV state after some token t (paper Appendix D, eqs. 23-28).

  The represented sums are a_t = exp(max) * num and b_t = exp(max) * den, with
  a_t = sum_{i<=t} exp(-(t-i) w + k_i) v_i and b_t the same without v_i.

  Attributes:
    num: (B, C) float32, numerator a'_t.
    den: (B, C) float32, denominator b'_t.
    max: (B, C) float32, shared exponent p_t.
  """

  num: jax.Array
  den: jax.Array
  max: jax.Array

  @classmethod
  def zeros(cls, batch_size: int, channels: int) -> "WKVState":
    z = jnp.zeros((batch_size, channels), jnp.float32)
    return cls(z, z, jnp.full((batch_size, channels), NEG_INF_EXP, jnp.float32))


def check_wkv_inputs(w, u, k, v, state):
  """Validates shapes (static, so safe under jit) and returns float32 views."""
  if k.ndim != 3 or k.shape != v.shape:
    raise ValueError(f"wkv: k and v must both be (B, T, C); got k{k.shape} v{v.shape}")
  b, _, c = k.shape
  if w.shape != (c,) or u.shape != (c,):
    raise ValueError(f"wkv: w and u must be ({c},) to match k{k.shape}; got w{w.shape} u{u.shape}")
  if state is None:
    state = WKVState.zeros(b, c)
  else:
    state = WKVState(*state)
    for name, s in zip(WKVState._fields, state):
      if s.shape != (b, c):
        raise ValueError(f"wkv: state.{name} must be ({b}, {c}); got {s.shape}")
    state = WKVState(*(s.astype(jnp.float32) for s in state))
  f32 = lambda x: x.astype(jnp.float32)
  return f32(w), f32(u), f32(k), f32(v), state
