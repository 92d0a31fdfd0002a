"""WKV-4 as Pallas GPU (Triton) kernels, forward and backward, with T-chunk parallelism.

``wkv4(w, u, k, v, state=None, *, block_sizes=None, interpret=False) -> (y, WKVState)``
has the contract of ``rwkv_jax.ops.wkv`` (the reference is ``wkv_scan_reference``):

  k, v: (B, T, C) float32 or bfloat16; y (B, T, C) comes back in v's dtype.
  w: (C,) positive decay rate exp(time_decay); u: (C,) bonus.
  state: WKVState(num, den, max), each (B, C) float32, or None for an empty past.
  Returns y and the state after the last token. Accumulation is float32 throughout.

Gradients (jax.custom_vjp) reach w, u, k, v and the incoming state. A state stands for
its represented sums exp(max) * (num, den); the backward differentiates those, so the
cotangent of the returned ``max`` on its own is not used (a loss that reads only the
represented sums, or feeds the state to the next call, is differentiated exactly).

How it runs (see _wkv4_plan for the grid): each program walks one channel block of one
sequence over time in tiles of ``block_t`` steps, one channel per thread, with the next
tile's loads in flight. When B * C gives too few programs, T is cut into chunks: pass 1
computes each chunk's element of the WKV monoid (rwkv_jax/ops/_associative.py) on its
own, pass 2 folds the elements before a chunk into its exact carry-in and produces y.
The backward re-runs the forward per tile from checkpoints the forward wrote every
``block_t_bwd`` steps and runs the adjoint recurrence in reverse (see _wkv4_bwd).
Nothing is sized by T at compile time beyond the static shapes of the call.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels._wkv4_bwd import backward
from pallas_kernels._wkv4_fwd import forward
from pallas_kernels._wkv4_plan import Plan
from rwkv_jax.ops._state import NEG_INF_EXP, WKVState, check_wkv_inputs


def _pow2(x: int) -> bool:
  return x >= 1 and x & (x - 1) == 0


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of the WKV-4 kernels (defaults picked from H100 runs: experiments/RESULTS.md).

  Attributes:
    block_c: channels per forward program (one per thread: num_warps = block_c / 32).
    block_t: time steps per forward tile (the loads in flight per thread and array).
    block_c_bwd, block_t_bwd: the same for the backward; block_t_bwd is also the
      forward's checkpoint interval, so it must divide block_t.
    chunk_t: T-chunk length (a multiple of block_t), or None to pick from the grid:
    min_programs: with fewer programs than this over B and C, T is cut into chunks
      (a second pass over k, v: worth it only when B*C alone cannot fill the GPU) ...
    chunk_programs: ... until the grid has this many programs ...
    min_chunk_t: ... but into chunks of at least this many steps.
    num_warps, num_warps_bwd: Triton warps per program; None = block_c / 32.
  """

  block_c: int = 64
  block_t: int = 16
  block_c_bwd: int = 64
  block_t_bwd: int = 8
  chunk_t: int | None = None
  min_programs: int = 256
  chunk_programs: int = 1024
  min_chunk_t: int = 256
  num_warps: int | None = None
  num_warps_bwd: int | None = None

  def __post_init__(self):
    for name in ("block_c", "block_t", "block_c_bwd", "block_t_bwd"):
      if not _pow2(getattr(self, name)):
        raise ValueError(f"BlockSizes.{name} must be a power of two, got {getattr(self, name)}")
    if self.block_t % self.block_t_bwd:
      raise ValueError(f"BlockSizes.block_t_bwd ({self.block_t_bwd}) must divide block_t "
                       f"({self.block_t}): the forward writes a checkpoint every block_t_bwd steps")
    if self.chunk_t is not None and (self.chunk_t < 1 or self.chunk_t % self.block_t):
      raise ValueError(f"BlockSizes.chunk_t ({self.chunk_t}) must be a positive multiple of "
                       f"block_t ({self.block_t})")

  def plan(self, b: int, t: int, c: int) -> Plan:
    """The static launch plan for k, v of shape (b, t, c)."""
    bc, bcb = _fit_block(self.block_c, c), _fit_block(self.block_c_bwd, c)
    step = max(bc, bcb)
    c_pad = -(-c // step) * step
    chunk = self.chunk_t
    if chunk is None:
      programs = b * (c_pad // bc)
      n = 1
      if programs < self.min_programs:
        n = max(1, min(-(-self.chunk_programs // programs), t // self.min_chunk_t))
      chunk = -(-t // n)
    chunk = -(-min(chunk, t) // self.block_t) * self.block_t
    warps = lambda nw, block: nw if nw is not None else max(1, min(block // 32, 8))
    return Plan(t=t, c=c_pad, block_c=bc, block_c_bwd=bcb, rows=self.block_t,
                rows_bwd=self.block_t_bwd, chunk=chunk,
                num_warps=warps(self.num_warps, bc), num_warps_bwd=warps(self.num_warps_bwd, bcb))


def _fit_block(block: int, c: int) -> int:
  """The largest power of two <= block dividing c, but no smaller than 16 (or c's next
  power of two); C is padded when even that does not divide it."""
  bc = min(block, 1 << max(c - 1, 0).bit_length())
  while bc > 16 and c % bc:
    bc //= 2
  return bc


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _wkv4_core(plan, interpret, w, u, k, v, num, den, mx):
  y, final, _ = forward(plan, w, u, k, v, (num, den, mx), save=False, interpret=interpret)
  return y, final


def _core_fwd(plan, interpret, w, u, k, v, num, den, mx):
  y, final, checkpoints = forward(plan, w, u, k, v, (num, den, mx), save=True,
                                  interpret=interpret)
  return (y, final), (w, u, k, v, num, den, mx, checkpoints, final[2])


def _core_bwd(plan, interpret, res, cot):
  w, u, k, v, num, den, mx, checkpoints, final_max = res
  gy, (g_num, g_den, _) = cot  # the max's own cotangent: see the module docstring
  # The adjoint of the final sums is exp(-max) (g_num, g_den); a zero one is empty.
  g_exp = jnp.where((g_num == 0) & (g_den == 0), NEG_INF_EXP, -final_max)
  gk, gv, gw, gu, gnum, gden = backward(plan, w, u, k, v, gy.astype(v.dtype), checkpoints,
                                        (g_num, g_den, g_exp), mx, interpret=interpret)
  # num, den and max enter only through exp(max) * (num, den).
  return gw, gu, gk, gv, gnum, gden, num * gnum + den * gden


_wkv4_core.defvjp(_core_fwd, _core_bwd)


@functools.partial(jax.jit, static_argnames=("plan", "interpret"))
def _wkv4(w, u, k, v, state, *, plan: Plan, interpret: bool):
  w, u, _, _, state = check_wkv_inputs(w, u, k, v, state)  # the casts of k, v are dead code
  num, den, mx = state
  # An all-zero state is empty whatever its max: a zero term at a large exponent would
  # only flush what is added later.
  mx = jnp.where((num == 0) & (den == 0), NEG_INF_EXP, mx)
  c = k.shape[-1]
  pad = plan.c - c
  if pad:  # channels to a multiple of the block; padded channels are empty and decay
    pc = lambda x, value=0.0: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)],
                                      constant_values=value)
    w, u, k, v, num, den, mx = (pc(w, 1.0), pc(u), pc(k), pc(v), pc(num), pc(den),
                                pc(mx, NEG_INF_EXP))
  y, (num, den, mx) = _wkv4_core(plan, interpret, w, u, k, v, num, den, mx)
  if pad:
    y, num, den, mx = y[..., :c], num[:, :c], den[:, :c], mx[:, :c]
  return y, WKVState(num, den, mx)


def wkv4(w, u, k, v, state=None, *, block_sizes: BlockSizes | None = None,
         interpret: bool = False):
  """WKV-4 over a sequence on the GPU; see the module docstring for shapes and gradients.

  ``interpret=True`` runs the same kernels through the Pallas interpreter (any backend).
  """
  jax.eval_shape(check_wkv_inputs, w, u, k, v, state)  # shape errors before planning
  for name, x in (("k", k), ("v", v)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"wkv4: {name} must be a float array, got dtype {x.dtype}")
  b, t, c = k.shape
  if state is None:  # one jit signature with and without a state
    state = WKVState.zeros(b, c)
  if t == 0:
    return jnp.zeros(k.shape, v.dtype), WKVState(*(jnp.asarray(s, jnp.float32) for s in state))
  plan = (block_sizes or BlockSizes()).plan(b, t, c)
  return _wkv4(w, u, k, v, state, plan=plan, interpret=interpret)
