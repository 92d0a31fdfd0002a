"""Forward kernels: T-chunk summaries (pass 1) and outputs from the exact carry (pass 2).

Refs are whole arrays: k, v, y (B, T, C); w, u (C,); states and summaries (B, C) or
(B, n, C). A program (channel block, b, chunk) walks its chunk in tiles of ``rows`` time
steps; see _wkv4_plan for the grid and _wkv4_math for the lazy state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _wkv4_math as m
from pallas_kernels._wkv4_plan import Plan, channel_slice, chunk_bounds, load_rows, tile_loop


def store_row(ref, idx, value, valid):
  """ref[idx] = value, skipped where the scalar ``valid`` is False (None: always)."""
  value = value.astype(ref.dtype)
  if valid is None:
    ref[idx] = value
  else:
    plgpu.store(ref.at[idx], value, mask=valid)


def walk_chunk(plan: Plan, rows: int, j, load, body, carry, *, reverse=False):
  """Runs ``body(t0, tile, carry, end)`` over the tiles of chunk j.

  Full tiles get end=None; the partial last tile (only when T % rows != 0) gets the
  chunk's end row, and ``body`` must mask rows t >= end. In reverse the partial tile
  comes first.
  """
  start, length = chunk_bounds(plan, j)
  n_full = length // rows
  t0 = lambda i: start + i * rows
  full = lambda c: tile_loop(n_full, lambda i: load(t0(i)),
                             lambda i, tile, c: body(t0(i), tile, c, None), c, reverse=reverse)
  tail = lambda c: body(t0(n_full), load(t0(n_full)), c, start + length)
  if not plan.has_tail(rows):
    return full(carry)
  return full(tail(carry)) if reverse else tail(full(carry))


def _kv_loader(plan, rows, b, cs, *refs):
  return lambda t0: tuple(load_rows(r, b, t0, rows, cs, plan.t - 1) for r in refs)


def summary_kernel(w_ref, k_ref, v_ref, a_ref, b_ref, m_ref, *, plan: Plan):
  """Pass 1: chunk j's own contribution exp(max) (num, den), as if it started empty.

  With the chunk length as its count this is the chunk's element of the WKV monoid.
  The last chunk is not needed (nothing follows it), so program z covers chunk z.
  """
  cs, b, j = channel_slice(plan.block_c), pl.program_id(1), pl.program_id(2)
  w = w_ref[cs]

  def body(t0, tile, s, end):
    for r, (k, v) in enumerate(zip(*tile)):
      new = m.absorb(w, s, k, v, 1.0, 1.0)
      s = new if end is None else m.select(t0 + r < end, new, s)
    return s

  load = _kv_loader(plan, plan.rows, b, cs, k_ref, v_ref)
  s = walk_chunk(plan, plan.rows, j, load, body, m.empty_like(w))
  a_ref[b, j, cs], b_ref[b, j, cs], m_ref[b, j, cs] = m.normalize(w, s)


def forward_kernel(w_ref, u_ref, k_ref, v_ref, num_ref, den_ref, max_ref, *refs,
                   plan: Plan, chunked: bool, save: bool):
  """Pass 2: y for chunk j from its exact carry-in, and the state after the last token.

  The carry-in is the incoming state with the summaries of chunks 0 .. j-1 appended.
  Chunks run last-first: pass 1 read the last chunks last, so they are still in L2.
  With ``save`` the state before every ``rows_bwd``-th token is written for the backward.
  """
  refs = list(refs)
  sums = refs[:3] if chunked else None
  y_ref, out_num, out_den, out_max, *checkpoints = refs[3:] if chunked else refs
  cs, b = channel_slice(plan.block_c), pl.program_id(1)
  j = plan.n_chunks - 1 - pl.program_id(2)
  w, u = w_ref[cs], u_ref[cs]
  s = m.lazy(num_ref[b, cs], den_ref[b, cs], max_ref[b, cs])
  if chunked:
    sa, sb, sm = sums
    s = jax.lax.fori_loop(
        0, j, lambda i, s: m.absorb(w, s, sm[b, i, cs], sa[b, i, cs], sb[b, i, cs],
                                    float(plan.chunk)), s)

  def body(t0, tile, s, end):
    for r, (k, v) in enumerate(zip(*tile)):
      t = t0 + r
      valid = None if end is None else t < end
      if save and r % plan.rows_bwd == 0:
        idx = t0 // plan.rows_bwd + r // plan.rows_bwd
        for ref, x in zip(checkpoints, m.normalize(w, s)):
          store_row(ref, (b, idx, cs), x, valid)
      store_row(y_ref, (b, t, cs), m.output(w, u, s, k, v)[0], valid)
      new = m.absorb(w, s, k, v, 1.0, 1.0)
      s = new if valid is None else m.select(valid, new, s)
    return s

  load = _kv_loader(plan, plan.rows, b, cs, k_ref, v_ref)
  s = walk_chunk(plan, plan.rows, j, load, body, s)

  @pl.when(j == plan.n_chunks - 1)
  def _():
    out_num[b, cs], out_den[b, cs], out_max[b, cs] = m.normalize(w, s)


def forward(plan: Plan, w, u, k, v, state, *, save: bool, interpret: bool):
  """k, v (B, T, C) padded to plan.c. Returns y, the final state, and checkpoints."""
  bsz = k.shape[0]
  f32 = jnp.float32
  chunked = plan.n_chunks > 1
  grid = lambda n: (plan.c // plan.block_c, bsz, n)
  sums = ()
  if chunked:
    sum_shape = jax.ShapeDtypeStruct((bsz, plan.n_chunks - 1, plan.c), f32)
    sums = pl.pallas_call(
        lambda *r: summary_kernel(*r, plan=plan), out_shape=(sum_shape,) * 3,
        grid=grid(plan.n_chunks - 1), compiler_params=plan.params(),
        interpret=interpret, name="wkv4_chunk_summary")(w, k, v)
  state_shape = jax.ShapeDtypeStruct((bsz, plan.c), f32)
  out_shape = [jax.ShapeDtypeStruct(k.shape, v.dtype), *(state_shape,) * 3]
  if save:
    out_shape += [jax.ShapeDtypeStruct((bsz, plan.n_checkpoints, plan.c), f32)] * 3
  y, num, den, mx, *checkpoints = pl.pallas_call(
      lambda *r: forward_kernel(*r, plan=plan, chunked=chunked, save=save),
      out_shape=out_shape, grid=grid(plan.n_chunks), compiler_params=plan.params(),
      interpret=interpret, name="wkv4_forward")(w, u, k, v, *state, *sums)
  return y, (num, den, mx), tuple(checkpoints)
