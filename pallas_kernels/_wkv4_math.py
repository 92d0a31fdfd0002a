"""Per-row WKV-4 arithmetic shared by every kernel; a row is a float32 (Cb,) vector.

A *lazy state* is the tuple ``(a, b, ca, cb, m, n)`` and stands for the sums

    exp(m - n w) * (a + ca, b + cb),

a reference exponent m with n decays by exp(-w) not yet applied. Absorbing a term whose
exponent lies below the decayed reference only adds to (a, b) and counts the decay in n:
no factor exp(-w) ~ 1 multiplies the sums at every step, so a slow decay over a long
sequence leaves no rounding bias (the lax.scan reference gets the same with expm1 and
compensation). (ca, cb) carry the rounding error of (a, b) (TwoSum), as the reference does.

The same state serves the forward recurrence (terms exp(k_t) (v_t, 1)), the T-chunk
summaries (terms exp(m_j) (a_j, b_j) after n_j steps) and the backward adjoint, which is
the same linear recurrence run in reverse time (terms exp(-q_t) (g1_t, g2_t)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rwkv_jax.ops._state import NEG_INF_EXP


def lazy(num, den, mx):
  """A stored (num, den, max) state as a lazy state with no pending decay."""
  zero = jnp.zeros_like(num)
  return (num, den, zero, zero, mx, zero)


def empty_like(x):
  zero = jnp.zeros_like(x)
  return (zero, zero, zero, zero, jnp.full_like(x, NEG_INF_EXP), zero)


def _two_sum(x, y):
  """x + y as (sum, rounding error), exactly (Knuth's TwoSum)."""
  s = x + y
  bb = s - x
  return s, (x - (s - bb)) + (y - bb)


def absorb(w, s, x, ta, tb, count):
  """Decays lazy state ``s`` by ``count`` steps, then adds exp(x) * (ta, tb).

  The exponent difference is (m - x) - n w, not m - (x + n w) or (m - n w) - x: m - x is
  exact when the two are close, so a decay n w far below ulp(m) is not rounded away.
  """
  a, b, ca, cb, m, n = s
  n = n + count
  d = (m - x) - n * w
  e = jnp.exp(-jnp.abs(d))
  keep = d >= 0  # the decayed past still holds the larger exponent: keep m, count the decay
  s_old = jnp.where(keep, 1.0, e)
  s_new = jnp.where(keep, e, 1.0)
  a, ca = _two_sum(s_old * a, s_new * ta + s_old * ca)
  b, cb = _two_sum(s_old * b, s_new * tb + s_old * cb)
  return (a, b, ca, cb, jnp.where(keep, m, x), jnp.where(keep, n, 0.0))


def output(w, u, s, k, v):
  """The output for a token (k, v) read against the state before it (paper eq. 16).

  Returns (y, z, zc, q): y; z = exp(q) / D with D = past + exp(u + k) the denominator;
  zc = z exp(u + k - q); q the exponent D was scaled by. The backward needs all four.
  """
  a, b, ca, cb, m, n = s
  uk = u + k
  nw = n * w
  d = (m - uk) - nw
  e = jnp.exp(-jnp.abs(d))
  past = d >= 0
  e_past = jnp.where(past, 1.0, e)
  e_cur = jnp.where(past, e, 1.0)
  z = 1.0 / (e_past * (b + cb) + e_cur)
  y = (e_past * (a + ca) + e_cur * v) * z
  return y, z, e_cur * z, jnp.where(past, m - nw, uk)


def normalize(w, s):
  """A lazy state as the stored (num, den, max), folding the decay into max.

  max = m - n w rounds; the residual (m - max) - n w goes into (num, den).
  """
  a, b, ca, cb, m, n = s
  nw = n * w
  p = m - nw
  f = jnp.exp((m - p) - nw)
  return (a + ca) * f, (b + cb) * f, p


def select(pred, new, old):
  """Per-row masking: ``new`` where the (scalar) predicate holds, else ``old``."""
  return jax.tree.map(lambda x, y: jnp.where(pred, x, y), new, old)
