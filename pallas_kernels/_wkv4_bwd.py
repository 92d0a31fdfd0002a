"""Backward kernels: the adjoint recurrence, run in reverse time from forward checkpoints.

Per channel, with lambda = exp(-w), K_t = exp(k_t), E_t = exp(u + k_t), the forward is
    a_t = lambda a_{t-1} + K_t v_t,   b_t = lambda b_{t-1} + K_t,
    y_t = (a_{t-1} + E_t v_t) / D_t,  D_t = b_{t-1} + E_t.
The adjoints alpha_t = dL/da_t, beta_t = dL/db_t obey the same recurrence in reverse:
    alpha_{t-1} = lambda alpha_t + gy_t / D_t,   beta_{t-1} = lambda beta_t - gy_t y_t / D_t,
starting from the cotangent of the final state, and
    dv_t = gy_t E_t / D_t + alpha_t K_t,
    dk_t = gy_t (v_t - y_t) E_t / D_t + K_t (alpha_t v_t + beta_t),
    du   = sum_t gy_t (v_t - y_t) E_t / D_t,
    dw   = -lambda sum_t (alpha_t a_{t-1} + beta_t b_{t-1}),
and alpha_{-1}, beta_{-1} are the gradients of the incoming represented sums.
(alpha, beta) are held as a lazy state (see _wkv4_math) of terms exp(-q_t) (g1, g2).

A tile of ``rows_bwd`` steps re-runs the forward from its checkpoint (written by the
forward pass), keeps the per-step values in registers, then walks them backwards. With
T-chunks, pass 1 sums each chunk's own adjoint terms (the adjoint's monoid element) and
pass 2 starts each chunk from the exact adjoint carried in from the chunks after it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _wkv4_math as m
from pallas_kernels._wkv4_fwd import _kv_loader, store_row, walk_chunk
from pallas_kernels._wkv4_plan import Plan, channel_slice, chunk_bounds

NEG = m.NEG_INF_EXP


def _adjoint_term(gy, y, z, q):
  """exponent and (g1, g2) of the adjoint's new term gy_t / D_t * (1, -y_t).

  A zero cotangent gets the empty exponent: a zero term at a large exponent would
  otherwise rescale (and flush) the adjoint already held.
  """
  g = gy * z
  return jnp.where(gy == 0, NEG, -q), g, -g * y


def _recompute(w, u, f, tile):
  """Re-runs the forward over a tile from lazy state f; per step what the backward needs."""
  steps = []
  for k, v, _ in zip(*tile):
    y, z, zc, q = m.output(w, u, f, k, v)
    a, b, ca, cb, mx, n = f
    steps.append((a + ca, b + cb, mx, n, y, z, zc, q))
    f = m.absorb(w, f, k, v, 1.0, 1.0)
  return steps, f


def _checkpoint(refs, b, t0, cs, plan):
  return m.lazy(*(r[b, t0 // plan.rows_bwd, cs] for r in refs))


def adjoint_summary_kernel(w_ref, u_ref, k_ref, v_ref, gy_ref, *refs, plan: Plan):
  """Pass 1: sum_t lambda^(t - start) gy_t / D_t (1, -y_t) over chunk j alone.

  Chunk 0's sum is not needed (nothing precedes it), so program z covers chunk z + 1.
  """
  ck, (a_ref, b_ref, m_ref) = refs[:3], refs[3:]
  cs, b = channel_slice(plan.block_c_bwd), pl.program_id(1)
  j = pl.program_id(2) + 1
  w, u = w_ref[cs], u_ref[cs]
  start, _ = chunk_bounds(plan, j)

  def body(t0, tile, carry, end):
    f, acc = carry
    steps, f = _recompute(w, u, f, tile)
    for r, ((*_, y, z, _, q), gy) in enumerate(zip(steps, tile[2])):
      x, g1, g2 = _adjoint_term(gy, y, z, q)
      # Term t of the sum decays by (t - start) steps: put that into its exponent.
      x = x - (t0 - start + r).astype(jnp.float32) * w
      new = m.absorb(w, acc, x, g1, g2, 0.0)
      acc = new if end is None else m.select(t0 + r < end, new, acc)
    return f, acc

  load = _kv_loader(plan, plan.rows_bwd, b, cs, k_ref, v_ref, gy_ref)
  carry = (_checkpoint(ck, b, start, cs, plan), m.empty_like(w))
  _, acc = walk_chunk(plan, plan.rows_bwd, j, load, body, carry)
  a_ref[b, j - 1, cs], b_ref[b, j - 1, cs], m_ref[b, j - 1, cs] = m.normalize(w, acc)


def backward_kernel(w_ref, u_ref, k_ref, v_ref, gy_ref, ck_num, ck_den, ck_max,
                    g_num, g_den, g_exp, max0_ref, *refs, plan: Plan, chunked: bool):
  """Pass 2: dk, dv for chunk j, its partial dw, du, and (chunk 0) the state gradient.

  The adjoint of the final represented sums is exp(g_exp) (g_num, g_den), where g_num,
  g_den are the cotangents of the final num, den and g_exp = -max (see wkv4._bwd).
  """
  refs = list(refs)
  sums = refs[:3] if chunked else None
  gk_ref, gv_ref, gw_ref, gu_ref, out_gnum, out_gden = refs[3:] if chunked else refs
  cs, b = channel_slice(plan.block_c_bwd), pl.program_id(1)
  j = plan.n_chunks - 1 - pl.program_id(2)  # pass 1 read the last chunks last
  w, u = w_ref[cs], u_ref[cs]
  adj = m.lazy(g_num[b, cs], g_den[b, cs], g_exp[b, cs])
  if chunked:
    sa, sb, sm = sums

    def fold(i, adj):  # append chunk jj's adjoint sum, jj = n_chunks-1 .. j+1
      jj = plan.n_chunks - 1 - i
      count = jnp.minimum(plan.chunk, plan.t - jj * plan.chunk).astype(jnp.float32)
      return m.absorb(w, adj, sm[b, jj - 1, cs], sa[b, jj - 1, cs], sb[b, jj - 1, cs], count)

    adj = jax.lax.fori_loop(0, plan.n_chunks - 1 - j, fold, adj)

  def body(t0, tile, carry, end):
    adj, gw, gu = carry
    steps, _ = _recompute(w, u, _checkpoint((ck_num, ck_den, ck_max), b, t0, cs, plan), tile)
    for r in reversed(range(plan.rows_bwd)):
      a, bb, mx, n, y, z, zc, q = steps[r]
      k, v, gy = (x[r] for x in tile)
      al, be, cal, cbe, rr, na = adj
      al, be = al + cal, be + cbe
      ge = gy * zc  # gy E_t / D_t
      h = jnp.exp((rr + k) - na * w)  # alpha_t K_t / al
      gv = ge + h * al
      gk = ge * (v - y) + h * (al * v + be)
      dgu = ge * (v - y)
      # (na + n + 1): the decays pending on alpha_t and on a_{t-1}, and lambda itself.
      dgw = jnp.exp((rr + mx) - (na + n + 1.0) * w) * (al * a + be * bb)
      x, g1, g2 = _adjoint_term(gy, y, z, q)
      new = m.absorb(w, adj, x, g1, g2, 1.0)
      t = t0 + r
      valid = None if end is None else t < end
      if valid is None:
        adj, gw, gu = new, gw + dgw, gu + dgu
      else:
        adj = m.select(valid, new, adj)
        gw, gu = gw + jnp.where(valid, dgw, 0.0), gu + jnp.where(valid, dgu, 0.0)
      store_row(gk_ref, (b, t, cs), gk, valid)
      store_row(gv_ref, (b, t, cs), gv, valid)
    return adj, gw, gu

  load = _kv_loader(plan, plan.rows_bwd, b, cs, k_ref, v_ref, gy_ref)
  zero = jnp.zeros_like(w)
  adj, gw, gu = walk_chunk(plan, plan.rows_bwd, j, load, body, (adj, zero, zero), reverse=True)
  gw_ref[b, j, cs] = -gw
  gu_ref[b, j, cs] = gu

  @pl.when(j == 0)
  def _():
    al, be, cal, cbe, rr, na = adj
    h = jnp.exp((rr + max0_ref[b, cs]) - na * w)
    out_gnum[b, cs] = h * (al + cal)
    out_gden[b, cs] = h * (be + cbe)


def backward(plan: Plan, w, u, k, v, gy, checkpoints, g_final, max0, *, interpret: bool):
  """Returns dk, dv (dtypes of k, v), dw, du (C,) and the gradients of the incoming
  num, den (B, C). g_final = (g_num, g_den, g_exp) as in backward_kernel."""
  bsz = k.shape[0]
  f32 = jnp.float32
  chunked = plan.n_chunks > 1
  grid = lambda n: (plan.c // plan.block_c_bwd, bsz, n)
  params = plan.params(backward=True)
  sums = ()
  if chunked:
    sum_shape = jax.ShapeDtypeStruct((bsz, plan.n_chunks - 1, plan.c), f32)
    sums = pl.pallas_call(
        lambda *r: adjoint_summary_kernel(*r, plan=plan), out_shape=(sum_shape,) * 3,
        grid=grid(plan.n_chunks - 1), compiler_params=params, interpret=interpret,
        name="wkv4_adjoint_summary")(w, u, k, v, gy, *checkpoints)
  part = jax.ShapeDtypeStruct((bsz, plan.n_chunks, plan.c), f32)
  state = jax.ShapeDtypeStruct((bsz, plan.c), f32)
  out_shape = (jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype),
               part, part, state, state)
  gk, gv, gw, gu, gnum, gden = pl.pallas_call(
      lambda *r: backward_kernel(*r, plan=plan, chunked=chunked), out_shape=out_shape,
      grid=grid(plan.n_chunks), compiler_params=params, interpret=interpret,
      name="wkv4_backward")(w, u, k, v, gy, *checkpoints, *g_final, max0, *sums)
  return gk, gv, gw.sum((0, 1)), gu.sum((0, 1)), gnum, gden
