"""The WKV-7 forward kernel body: one program per (b, h, T-segment), chunks in sequence.

Refs are whole arrays: r, w, k, v, a, b, y (B, T, H, N) with T a whole number of
segments of whole chunks; states (B, H, S, N, N) float32, S the number of T-segments.
A program carries its head's N x N float32 state across the chunks of its segment; each
chunk of L steps is a handful of small matmuls (the WY / UT form of chunked.py).

Per chunk, from the start state S0 (rows: value, columns: key), with P(τ, t) the product
of w over the steps τ < u <= t (chunked.py's notation):
  A0 = a * P(-1, t-1), R0 = r * P(-1, t), B~ = b * P(τ, L-1), K~ = k * P(τ, L-1)
  M_ab, M_ak (τ < t, decayed to t-1) and M_rb, M_rk (τ <= t, to t): decayed scores
  U = (I - M_ab)^-1 (A0 S0^T + M_ak V)            (the rows u_t = S_{t-1} a_t)
  Y = R0 S0^T + M_rb U + M_rk V ;  S_L = S0 diag(P(-1, L-1)) + U^T B~ + V^T K~

Decays. Every factor that multiplies an input is exp of a sum of log w over a run of steps
(<= 0: never above 1, so nothing overflows however small w gets), and each run's sum is
taken directly as a masked matmul of the log-decays, not as a difference of cumulative
sums (which cancels: after one w = 1e-30 step a later difference of two sums near -69
would carry an absolute error ~1e-5). The pairwise scores need P(τ, t) per key channel;
as in chunked.py, the chunk is halved recursively: a pair (τ, t) first separated at level
l (the highest bit of t XOR τ, half size h = 2^l) splits at the end m of τ's half,
P(τ, t) = P(τ, m) P(m, t), a factor of each side, both <= 1. Per level that is one
masked (L, N) x (N, L) matmul per score kind.

Modes: "forward" writes y and each segment's end state from the given start states;
"transition" writes, per segment, the affine map S_end = S_start M + U of the segment
(M N_k x N_k from the identity with no v term, U N_v x N_k from zeros), no y.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

# Sums of log w below this are exp-ed to 0 anyway; the floor keeps w = 0 finite (log 0 =
# -inf would make 0 * inf = NaN in the masked matmuls).
LOG_FLOOR = -1e4


def dot(x, y, contract, precision: str, interpret: bool):
  """x . y contracting dims ``contract`` = (x's, y's), float32 result.

  precision: "ieee" (float32 FMAs), "tf32x3" (three tf32 tensor-core passes, ~float32),
  "tf32" (one pass, 10-bit mantissas), "bf16" (operands rounded to bfloat16, float32
  accumulation). The Pallas interpreter (CPU) has no tf32: there every mode but "bf16"
  is float32.
  """
  dims = ((contract[0],), (contract[1],)), ((), ())
  if precision == "bf16":
    x, y = x.astype(jnp.bfloat16), y.astype(jnp.bfloat16)
    prec = None
  elif interpret or precision == "ieee":
    prec = jax.lax.Precision.HIGHEST
  elif precision == "tf32x3":
    prec = jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3
  elif precision == "tf32":
    prec = jax.lax.Precision.DEFAULT
  else:
    raise ValueError(f"wkv7 pallas: unknown precision {precision!r}")
  return jax.lax.dot_general(x, y, dims, precision=prec, preferred_element_type=jnp.float32)


def _iota(n, dim):
  return jax.lax.broadcasted_iota(jnp.int32, (n, n), dim)


def _col(x, j):
  """Column j of the square x as an (n,) vector (a masked sum: registers have no slices)."""
  return jnp.sum(jnp.where(_iota(x.shape[0], 1) == j, x, 0.0), axis=1)


def _row(x, j):
  return jnp.sum(jnp.where(_iota(x.shape[0], 0) == j, x, 0.0), axis=0)


def unit_lower_inverse(m):
  """(I - m)^-1 for a strictly lower-triangular (L, L) m, by forward substitution.

  Column j of m, once row j of the result is final (all τ < j folded in), adds
  m[:, j] x row_j to the rows below: L rank-1 updates of an L x L tile.
  """
  size = m.shape[0]
  inv = jnp.where(_iota(size, 0) == _iota(size, 1), 1.0, 0.0).astype(jnp.float32)
  for j in range(size - 1):
    inv = inv + _col(m, j)[:, None] * _row(inv, j)[None, :]
  return inv


class Chunk:
  """The state-independent quantities of one chunk; ``advance`` applies them to a state."""

  def __init__(self, r, w, k, v, a, b, *, precision: str, interpret: bool):
    size = r.shape[0]
    f32 = jnp.float32
    exact = lambda mask, x: dot(mask.astype(f32), x, (1, 0), "tf32x3", interpret)
    mm = lambda x, y, c: dot(x, y, c, precision, interpret)
    lw = jnp.maximum(jnp.log(w), LOG_FLOOR)  # L N
    t_i, u_i = _iota(size, 0), _iota(size, 1)  # row t, column u (or τ)

    self.r0 = r * jnp.exp(exact(u_i <= t_i, lw))  # r_t P(-1, t)
    self.a0 = a * jnp.exp(exact(u_i < t_i, lw))  # a_t P(-1, t - 1)
    to_end = jnp.exp(exact(u_i > t_i, lw))  # P(t, L-1)
    self.b_end, self.k_end = b * to_end, k * to_end
    self.total = jnp.exp(jnp.sum(lw, axis=0))  # P(-1, L-1), (N,)

    same = t_i == u_i
    diag = lambda x, y: jnp.where(same, jnp.sum(x * y, axis=1)[:, None], 0.0)
    m_ab = m_ak = jnp.zeros((size, size), f32)
    m_rb, m_rk = diag(r, b), diag(r, k)  # P(t, t) = 1
    level = 0
    while (1 << level) < size:
      t_half, u_half = t_i >> level, u_i >> level
      right = (t_half & 1) == 1  # row t in the right half of its block at this level
      own_half = t_half == u_half
      # Right-half rows: log P(m, t) (u from the half's start to t); left-half rows:
      # log P(τ, m) (u after τ to the half's end).
      g = exact(own_half & jnp.where(right, u_i <= t_i, u_i > t_i), lw)
      g_strict = exact(own_half & right & (u_i < t_i), lw)  # log P(m, t - 1)
      fac = jnp.exp(g)
      q_a, q_r = a * jnp.exp(g_strict), r * fac
      k_b, k_k = b * fac, k * fac
      pair = ((t_i >> (level + 1)) == (u_i >> (level + 1))) & right & ((u_half & 1) == 0)
      nt = (1, 1)  # x y^T
      m_ab += jnp.where(pair, mm(q_a, k_b, nt), 0.0)
      m_ak += jnp.where(pair, mm(q_a, k_k, nt), 0.0)
      m_rb += jnp.where(pair, mm(q_r, k_b, nt), 0.0)
      m_rk += jnp.where(pair, mm(q_r, k_k, nt), 0.0)
      level += 1
    self.m_rb, self.m_rk = m_rb, m_rk
    self.inv = unit_lower_inverse(m_ab)
    self.v = v
    self.ak_v = mm(m_ak, v, (1, 0))  # M_ak V, L Nv
    self.rk_v = mm(m_rk, v, (1, 0))
    self.vk_end = mm(v, self.k_end, (0, 0))  # V^T K~, Nv Nk
    self._mm = mm

  def advance(self, s, *, with_v=True, want_y=True):
    """(y or None, the state after the chunk) from the state s (rows Nv, cols Nk).
    with_v=False drops the v k^T terms (the transition map's M part)."""
    mm = self._mm
    x = mm(self.a0, s, (1, 1))  # A0 S^T, L Nv
    if with_v:
      x = x + self.ak_v
    u = mm(self.inv, x, (1, 0))
    y = None
    if want_y:
      y = mm(self.r0, s, (1, 1)) + mm(self.m_rb, u, (1, 0)) + self.rk_v
    s = s * self.total[None, :] + mm(u, self.b_end, (0, 0))
    if with_v:
      s = s + self.vk_end
    return y, s


def wkv7_chunk_kernel(r_ref, w_ref, k_ref, v_ref, a_ref, b_ref, s_ref, *out_refs,
                      chunk: int, seg_chunks: int, mode: str, precision: str,
                      interpret: bool):
  """Grid (B, H, S). Program (b, h, j) runs chunks j * seg_chunks ... of head h of
  sequence b. forward: s_ref holds the start states (B, H, S, N, N); outputs y and the end
  states. transition: outputs the segment maps M, U (B, H, S, N, N), s_ref unused."""
  bi, hi, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  n = r_ref.shape[-1]
  f32 = jnp.float32

  def load(ref, t0):
    return ref[bi, pl.ds(t0, chunk), hi, :].astype(f32)

  def chunk_at(c):
    t0 = pl.multiple_of((j * seg_chunks + c) * chunk, chunk)
    xs = [load(ref, t0) for ref in (r_ref, w_ref, k_ref, v_ref, a_ref, b_ref)]
    return t0, Chunk(*xs, precision=precision, interpret=interpret)

  if mode == "forward":
    y_ref, end_ref = out_refs

    def body(c, s):
      t0, ch = chunk_at(c)
      y, s = ch.advance(s)
      y_ref[bi, pl.ds(t0, chunk), hi, :] = y.astype(y_ref.dtype)
      return s

    s = jax.lax.fori_loop(0, seg_chunks, body, s_ref[bi, hi, j].astype(f32))
    end_ref[bi, hi, j] = s
  else:
    m_ref, u_ref = out_refs
    eye = jnp.where(_iota(n, 0) == _iota(n, 1), 1.0, 0.0).astype(f32)

    def body(c, carry):
      m, u = carry
      _, ch = chunk_at(c)
      _, m = ch.advance(m, with_v=False, want_y=False)
      _, u = ch.advance(u, want_y=False)
      return m, u

    m, u = jax.lax.fori_loop(0, seg_chunks, body, (eye, jnp.zeros((n, n), f32)))
    m_ref[bi, hi, j], u_ref[bi, hi, j] = m, u
