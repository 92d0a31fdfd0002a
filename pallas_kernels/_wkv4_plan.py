"""Static launch plan of the WKV-4 kernels and the tile helpers they share.

Grid of every kernel: (C / block_c, B, n_chunks). A program owns ``block_c`` channels of
one sequence over one T-chunk; one thread runs the recurrence of one channel. T is cut
into chunks only when B * C alone gives too few programs to fill the GPU; the chunks are
then joined exactly through the associative WKV monoid (see wkv4.py).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


@dataclasses.dataclass(frozen=True)
class Plan:
  """Everything static about one call; hashable so it can key jit and custom_vjp."""

  t: int  # sequence length T
  c: int  # channels after padding to a multiple of block_c and block_c_bwd
  block_c: int
  block_c_bwd: int
  rows: int  # time rows per forward tile
  rows_bwd: int  # time rows per backward tile == the forward's checkpoint interval
  chunk: int  # T-chunk length, a multiple of rows
  num_warps: int
  num_warps_bwd: int

  @property
  def n_chunks(self) -> int:
    return -(-self.t // self.chunk)

  @property
  def n_checkpoints(self) -> int:
    return -(-self.t // self.rows_bwd)

  def has_tail(self, rows: int) -> bool:
    """Whether the last chunk ends in a partial tile of ``rows`` rows."""
    return self.t % rows != 0

  def params(self, backward: bool = False):
    return plgpu.CompilerParams(
        num_warps=self.num_warps_bwd if backward else self.num_warps, num_stages=1)


def chunk_bounds(plan: Plan, j):
  """First row and row count of chunk j (traced int32)."""
  start = j * plan.chunk
  return start, jnp.minimum(plan.chunk, plan.t - start)


def load_rows(ref, b, t0, n, cs, t_last):
  """Rows t0 .. t0 + n - 1 of ref[b] (B, T, C) as float32 (Cb,) vectors.

  Row indices are clamped to t_last, so a tile that runs past the end (or a prefetch of
  a tile that does not exist) reads valid memory; callers mask what they use.
  """
  return [ref[b, jnp.minimum(t0 + i, t_last), cs].astype(jnp.float32) for i in range(n)]


def tile_loop(n, load, body, carry, *, reverse=False):
  """carry = body(i, load(i), carry) for tiles i = 0 .. n-1 (n-1 .. 0 if reverse).

  The next tile's rows are loaded before this one is computed and travel in the loop
  carry: the loads of many time steps are in flight while the recurrence runs.
  """
  last = jnp.maximum(n - 1, 0)
  first = last if reverse else 0

  def step(s, state):
    rows, carry = state
    i = last - s if reverse else s
    nxt = jnp.clip(i - 1 if reverse else i + 1, 0, last)
    return load(nxt), body(i, rows, carry)

  _, carry = jax.lax.fori_loop(0, n, step, (load(first), carry))
  return carry


def channel_slice(block_c: int):
  return pl.ds(pl.multiple_of(pl.program_id(0) * block_c, block_c), block_c)
