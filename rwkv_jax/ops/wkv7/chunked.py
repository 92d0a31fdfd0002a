"""WKV-7 in chunks: matmuls inside a chunk, an associative scan across chunks.

Per head the recurrence is S_t = S_{t-1} A_t + v_t k_t^T with A_t = diag(w_t) + a_t b_t^T
(S: N_v x N_k, rows the value). Within a chunk starting from S_0, write u_t = S_{t-1} a_t
and P(τ, t) = prod_{τ<u<=t} diag(w_u), the pure decay from after step τ up to step t:

  S_t = S_0 P(-1, t) + sum_{τ<=t} (u_τ b_τ^T + v_τ k_τ^T) P(τ, t)
  u_t = S_0 P(-1, t-1) a_t + sum_{τ<t} u_τ b_τ^T P(τ, t-1) a_t + v_τ k_τ^T P(τ, t-1) a_t

so the rows u_t solve one unit lower-triangular L x L system (the WY / UT form of the
product of the chunk's A_t; Yang et al. 2024, arXiv 2406.06484): U = W S_0^T + Z. That
gives the chunk's transition S_end = S_0 M_c + U_c; the pairs are joined by
``lax.associative_scan`` (depth O(log T)), and each chunk's outputs come from its start
state: Y = (R_0 + M_rb W) S_0^T + M_rb Z + M_rk V.

Decays without division. Every decay is a product of w over a run of steps, built by
multiplying products of shorter runs: never a ratio of cumulative products, nor exp of a
difference of cumulative log-decays. A product of numbers <= 1 only underflows when its
true value is below float32's range, so w -> 0 is sound; and its derivative in w_t is the product of
the other factors, so gradients stay accurate. (A log-space form loses them: transposed,
its cumulative sum of log w makes d/d log w_t = w_t x O(1) a difference of O(1) terms,
which rounding destroys, and d log w_t / d w_t = 1 / w_t magnifies the noise; at
w_t = 1e-30 the gradient in w_t comes out 0 or noise x 1e30 instead of O(1).)

The pairwise scores M[t, τ] (the L x L matrices above) need P(τ, t) per key channel,
an (L, L, N) table if built directly. Instead the chunk is halved recursively: for τ in
the left half of a block and t in its right half, P(τ, t) = P(τ, mid) P(mid, t) splits
at the block's midpoint into a factor of τ and a factor of t (both products <= 1), so
those pairs are one matmul; pairs inside a half recurse. log2(L) levels: O(N log L)
elementwise work per token, the L^2 N multiply-adds of a dense score matrix as matmuls.

Layout: inputs (B, T, H, N) are padded with identity steps (w = 1, everything else 0)
to whole chunks and viewed as (G, L, N), G = B H C, C the number of chunks. (One batch
axis, arrays of rank <= 6: an earlier layout keeping B, H, C apart, rank 8, made jaxlib
0.10's CPU YNNPACK transpose fusion segfault in the backward pass.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rwkv_jax.ops.wkv7.scan import check_wkv7_inputs

_HI = jax.lax.Precision.HIGHEST
# The associative scan costs O(N^3 / L) flops per token, the in-chunk matmuls O(L N). On an
# H200 (bf16 inputs, N = 64, experiments/bench_wkv7.py) 32 was fastest and smallest: at
# (B, T, H) = (8, 4096, 32) fwd / fwd+bwd 17.2 / 48.2 ms, 14 GB temp (16: 19.4 / 50.3 ms,
# 64: 17.8 / 48.7 ms), and it compiles in 2/3 of 64's time.
DEFAULT_CHUNK_SIZE = 32


def _mm(eq, x, y):
  return jnp.einsum(eq, x, y, precision=_HI)


def _decay_levels(w):
  """Products of w within aligned runs of 1, 2, 4, ..., L steps. w: (G, L, N).

  Returns a list over the levels h = 1, 2, ..., L of (incl, excl, rev), each (G, L, N):
  the product of w from t's run start to t inclusive, to t exclusive, and from after t to
  the run's end. Built bottom-up, one multiply per level: a run of 2h joins two runs of h,
  the right one's products from its start gaining the left run's total, the left one's
  products to its end gaining the right run's total.
  """
  g, size, n = w.shape
  fwd, rev = jnp.stack([w, jnp.ones_like(w)]), jnp.ones_like(w)  # fwd: incl, excl
  levels, h = [(w, fwd[1], rev)], 1
  while h < size:
    fwd = fwd.reshape(2, g, size // (2 * h), 2, h, n)
    rev = rev.reshape(g, size // (2 * h), 2, h, n)
    left_total, right_total = fwd[0, :, :, 0, -1:], fwd[0, :, :, 1, -1:]
    fwd = jnp.stack([fwd[:, :, :, 0], left_total * fwd[:, :, :, 1]], 3)
    rev = jnp.stack([rev[:, :, 0] * right_total, rev[:, :, 1]], 2)
    fwd, rev = fwd.reshape(2, g, size, n), rev.reshape(g, size, n)
    levels.append((fwd[0], fwd[1], rev))
    h *= 2
  return levels


def _score_blocks(a, r, keys, levels):
  """The decayed scores of the queries (a, strict; r, inclusive) against the keys,
  M[t, τ] = sum_j q[t, j] key[τ, j] P(τ, t - strict)[j] for τ <= t (τ < t if strict), in
  the blocks of the recursive halving. a, r, keys: (G, L, N).

  Returns (diag (2 K G, L, 1, 1): τ = t; crosses: per level h = 1, 2, ..., L / 2,
  (2 K G, L / 2h, h, h), a block's right half (t) against its left half (τ)), the first
  axis flattened from (query (a, r), key, G).
  """
  g, size, n = a.shape
  keys = jnp.stack(keys)
  diag = jnp.stack([jnp.zeros((len(keys), g, size)),  # strict: no τ = t term
                    jnp.sum(r * keys, -1)])
  crosses = []
  for level, (incl, excl, rev) in enumerate(levels[:-1]):
    half = 1 << level
    halves = lambda x: x.reshape(-1, g, size // (2 * half), 2, half, n)
    # t in a right half decays from the midpoint up to t; τ in a left half from after τ
    # up to the midpoint: P(τ, t) = P(τ, mid) P(mid, t), a factor of each side.
    q = halves(jnp.stack([a * excl, r * incl]))[..., 1, :, :]
    k = halves(keys * rev)[..., 0, :, :]
    crosses.append(_mm("xgptj,ygpsj->xygpts", q, k).reshape(-1, size // (2 * half), half, half))
  return diag.reshape(-1, size, 1, 1), crosses


def _from_blocks(diag, crosses, *, invert=False):
  """The (X, L, L) lower-triangular matrix M with the blocks of ``_score_blocks``
  (diag (X, L, 1, 1), crosses per level (X, L / 2h, h, h)), or with invert=True
  (I - M)^-1 for a strictly lower M (diag zero), built the same way from 1 x 1 blocks up:
  [[T11, 0], [-C, T22]]^-1 = [[X11, 0], [X22 C X11, X22]]. Exact algebra (no series that
  cancels), log2(L) levels of batched matmuls, plain autodiff; XLA's batched triangular
  solve is ~20x slower for many small matrices on CPU."""
  m = jnp.ones_like(diag) if invert else diag
  for cross in crosses:  # X, pairs, h, h
    m = m.reshape(*cross.shape[:2], 2, *m.shape[-2:])
    left, right = m[:, :, 0], m[:, :, 1]
    if invert:
      cross = jnp.matmul(right, jnp.matmul(cross, left, precision=_HI), precision=_HI)
    m = jnp.concatenate([jnp.concatenate([left, jnp.zeros_like(left)], -1),
                         jnp.concatenate([cross, right], -1)], -2)
  return m.reshape(m.shape[0], m.shape[-1], m.shape[-1])


def _combine(first, second):
  """(M1, U1) then (M2, U2): S -> (S M1 + U1) M2 + U2."""
  (m1, u1), (m2, u2) = first, second
  return jnp.matmul(m1, m2, precision=_HI), jnp.matmul(u1, m2, precision=_HI) + u2


def wkv7_chunked(r, w, k, v, a, b, state=None, *, chunk_size=None):
  """WKV-7 by chunks. r, w, k, v, a, b: (B, T, H, N); state (B, H, N, N) float32 or None.
  Returns (y (B, T, H, N) in r's dtype, the new state (B, H, N, N) float32).

  chunk_size: steps per chunk, a power of two (default DEFAULT_CHUNK_SIZE); any T works
  (the last chunk is padded with identity steps).
  """
  chunk = DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
  if not isinstance(chunk, int) or chunk < 1 or chunk & (chunk - 1):
    raise ValueError(f"wkv7: chunk_size must be a power of two, got {chunk_size!r}")
  out_dtype = jnp.result_type(r)
  r, w, k, v, a, b, state = check_wkv7_inputs(r, w, k, v, a, b, state)
  bsz, t, h, n = r.shape
  n_chunks = -(-t // chunk)
  pad = n_chunks * chunk - t

  def chunks(x, fill=0.0):  # B T H N -> (B H C) L N
    x = jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)), constant_values=fill)
    return x.reshape(bsz, n_chunks, chunk, h, n).transpose(0, 3, 1, 2, 4).reshape(-1, chunk, n)

  r, w, k, v, a, b = chunks(r), chunks(w, 1.0), *map(chunks, (k, v, a, b))
  levels = _decay_levels(w)
  diag, crosses = _score_blocks(a, r, [b, k], levels)
  m = _from_blocks(diag, crosses).reshape(2, 2, -1, chunk, chunk)  # (a, r) x (b, k)
  m_ak, m_rb, m_rk = m[0, 1], m[1, 0], m[1, 1]
  g = r.shape[0]  # the (a, b) blocks lead: (I - M_ab)^-1
  inv = _from_blocks(diag[:g], [c[:g] for c in crosses], invert=True)
  incl, excl, rev = levels[-1]  # over the whole chunk
  a_0, r_0 = a * excl, r * incl  # decayed from the chunk start: S_0 a_0[t] enters u_t
  b_end, k_end = b * rev, k * rev  # decayed to the chunk end

  # U = (I - M_ab)^-1 (A_0 S_0^T + M_ak V) = W S_0^T + Z.
  wz = _mm("gts,gsn->gtn", inv,
           jnp.concatenate([a_0, _mm("gts,gsn->gtn", m_ak, v)], -1))
  w_, z_ = wz[..., :n], wz[..., n:]
  total = incl[:, -1]  # the whole chunk's decay
  trans = total[:, :, None] * jnp.eye(n) + _mm("gtj,gtk->gjk", w_, b_end)  # G Nk Nk
  add = _mm("gti,gtk->gik", z_, b_end) + _mm("gti,gtk->gik", v, k_end)  # G Nv Nk
  # Y = (R_0 + M_rb W) S_0^T + M_rb Z + M_rk V
  rb_wz = _mm("gts,gsn->gtn", m_rb, wz)
  q = r_0 + rb_wz[..., :n]
  p = rb_wz[..., n:] + _mm("gts,gsi->gti", m_rk, v)

  # Fold the incoming state into chunk 0's addend: the scan's prefix addends are then the
  # chunk end states.
  trans, add = (x.reshape(bsz, h, n_chunks, n, n) for x in (trans, add))
  add = add.at[:, :, 0].add(jnp.matmul(state, trans[:, :, 0], precision=_HI))
  _, ends = jax.lax.associative_scan(_combine, (trans, add), axis=2)
  starts = jnp.concatenate([state[:, :, None], ends[:, :, :-1]], axis=2)  # B H C Nv Nk
  y = _mm("gtj,gij->gti", q, starts.reshape(-1, n, n)) + p  # (B H C) L N
  y = y.reshape(bsz, h, n_chunks * chunk, n)[:, :, :t].transpose(0, 2, 1, 3)  # B T H N
  return y.astype(out_dtype), ends[:, :, -1]
