"""One RWKV-4 token for a small batch as four Pallas (Triton) kernels per layer.

At batch 1 a decode step is a chain of matrix-vector products too small to fill the GPU;
its cost is the number of dependent kernels, not the bytes (169m bf16 on an H100: 220 XLA
kernels, 0.66 ms, while its weights take ~0.08 ms to read). Here each layer is four
kernels, one per point where a whole vector must be complete before the next can start
(169m: 0.25 ms; experiments/RESULTS.md):

  time_mix_kernel     LN1, token shift, k v r = W (mix), the WKV step, sigmoid(r) * wkv
  project_kernel      x + W_o (sigmoid(r) * wkv)
  channel_in_kernel   LN2, token shift, relu(W'_k mix)^2 and sigmoid(W'_r mix)
  project_kernel      x + sigmoid(r') * W'_v relu(k')^2

A program owns ``block_out`` output rows of every matrix it multiplies (the grid is
C / block_out programs) and walks the input in ``block_in``-wide tiles; LayerNorm
statistics of the (C,) input are recomputed by every program (C floats, from L2), which
is cheaper than a separate kernel. Weights come transposed, (out, in), so a tile's rows
are contiguous. The math is the model's (rwkv_jax/model.py) in the same order, the WKV
step is the reference ``wkv_step``, with one difference in bfloat16: weights are bf16
but the activations they multiply stay float32 (a matrix-vector product gains nothing
from rounding them). The reference is ``RWKV.forward_with_state`` on one token
(tests/test_decode_fused.py: float32 within 1e-5; in bf16 both are within 4e-3 of the
float32 model on an H100).

Refs are whole arrays. ``x`` (B, C) float32 is the residual stream; states come as the
model's (L, B, C) arrays and ``layer`` (static) picks the row, so nothing is sliced or
copied between kernels.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.wkv4 import _pow2
from rwkv_jax.ops import WKVState, wkv_step

F32 = jnp.float32


class LayerWeights(NamedTuple):
  """One block's parameters in the layout the kernels read (C = n_embd, F = dim_ffn).

  Matrices are (out, in) in the compute dtype; vectors are (C,) float32; ``decay`` is the
  positive rate exp(time_decay).
  """

  ln1_w: jax.Array
  ln1_b: jax.Array
  att_mix_k: jax.Array
  att_mix_v: jax.Array
  att_mix_r: jax.Array
  att_key: jax.Array         # C C
  att_value: jax.Array       # C C
  att_receptance: jax.Array  # C C
  att_output: jax.Array      # C C
  decay: jax.Array
  first: jax.Array
  ln2_w: jax.Array
  ln2_b: jax.Array
  ffn_mix_k: jax.Array
  ffn_mix_r: jax.Array
  ffn_key: jax.Array         # F C
  ffn_receptance: jax.Array  # C C
  ffn_value: jax.Array       # C F


def _largest_pow2_divisor(n: int, cap: int) -> int:
  b = 1
  while b * 2 <= cap and n % (b * 2) == 0:
    b *= 2
  return b


@dataclasses.dataclass(frozen=True)
class DecodePlan:
  """Static launch plan of one decode step (hashable: it keys the kernels).

  Attributes:
    batch, c, f: batch size, n_embd, dim_ffn.
    block_out: output rows of each C-sized product per program (grid = c / block_out).
    block_in, block_in_ffn: input width of a tile of a C-wide and an F-wide input.
    num_warps: Triton warps per program.
    eps: LayerNorm epsilon.
  """

  batch: int
  c: int
  f: int
  block_out: int
  block_in: int
  block_in_ffn: int
  num_warps: int
  eps: float

  @property
  def programs(self) -> int:
    return self.c // self.block_out

  @property
  def block_ffn(self) -> int:
    """Rows of the F-sized product per program."""
    return self.f // self.programs

  @classmethod
  def make(cls, batch: int, c: int, f: int, eps: float, *, block_out: int = 2,
           block_in: int = 1024, num_warps: int = 2, max_batch: int = 8) -> "DecodePlan":
    """The plan for these sizes, or ValueError when the fused step cannot take them.

    Defaults from H100 runs (169m bf16, batch 1, experiments/RESULTS.md): block_out 1, 2
    or 4 within 3% of each other (0.251-0.258 ms/token); 8 rows with 2 warps spill.
    """
    if not 1 <= batch <= max_batch:
      raise ValueError(f"the fused decode step takes batch 1..{max_batch}, got {batch}")
    if not (_pow2(block_out) and _pow2(block_in)):
      raise ValueError(f"block_out ({block_out}) and block_in ({block_in}) must be powers of two")
    bi, bf = _largest_pow2_divisor(c, block_in), _largest_pow2_divisor(f, block_in)
    if c % block_out or min(bi, bf) < 16:
      raise ValueError(f"the fused decode step needs n_embd ({c}) divisible by block_out "
                       f"({block_out}) and by 16, and dim_ffn ({f}) divisible by 16")
    plan = cls(batch, c, f, block_out, bi, bf, num_warps, eps)
    if f % plan.programs or not _pow2(plan.block_ffn):
      raise ValueError(f"dim_ffn ({f}) must split into {plan.programs} power-of-two blocks")
    return plan


def supports(batch: int, c: int, f: int, **kwargs) -> bool:
  try:
    DecodePlan.make(batch, c, f, 1e-5, **kwargs)
  except ValueError:
    return False
  return True


# ----------------------------------------------------------------------------- in-kernel
# Every loop below is over static tiles and unrolled: all loads of a program are issued
# before the first reduction, and each sum over the input is one reduction of the
# elementwise sum of its tiles (a program's latency is a handful of dependent steps).

def _tiles(width: int, block: int):
  """Static column slices covering [0, width) (block divides width)."""
  return [pl.ds(i * block, block) for i in range(width // block)]


def _rows(size: int):
  return pl.ds(pl.multiple_of(pl.program_id(0) * size, size), size)


def _tile_sum(tiles):
  total = tiles[0]
  for t in tiles[1:]:
    total = total + t
  return total


def _layer_norm(plan: DecodePlan, x_ref, w_ref, b_ref, b):
  """LayerNorm of row b of x (B, C) as (block_in,) column tiles: x is read once, two
  passes (mean, then the variance around it) as the model's LayerNorm."""
  tiles = _tiles(plan.c, plan.block_in)
  xs = [x_ref[b, cs].astype(F32) for cs in tiles]
  mean = jnp.sum(_tile_sum(xs)) / plan.c
  ds = [x - mean for x in xs]
  rstd = jax.lax.rsqrt(jnp.sum(_tile_sum([d * d for d in ds])) / plan.c + plan.eps)
  return [d * rstd * w_ref[cs] + b_ref[cs] for d, cs in zip(ds, tiles)]


def _mixed_products(plan, layer, x_ref, ln_w, ln_b, shift_ref, products, ln_out_ref):
  """LayerNorm(x), token shift against shift_ref[layer], and matrix-vector products.

  ``products``: (mix ref (C,), weight ref (O, C), rows slice) triples; each gives
  W[rows] @ (mu * ln + (1 - mu) * shift) for every batch row, accumulated in float32.
  Program 0 also writes LN(x) (the next token's shift) to ln_out_ref (B, C). Returns
  acc[p][b], each (rows,) float32.
  """
  tiles = _tiles(plan.c, plan.block_in)
  weights = [[w_ref[rows, cs].astype(F32) for cs in tiles] for _, w_ref, rows in products]
  mus = [[mu_ref[cs] for cs in tiles] for mu_ref, _, _ in products]
  out = [[] for _ in products]
  for b in range(plan.batch):
    lns = _layer_norm(plan, x_ref, ln_w, ln_b, b)
    shifts = [shift_ref[layer, b, cs] for cs in tiles]
    for cs, ln in zip(tiles, lns):
      @pl.when(pl.program_id(0) == 0)
      def _():
        ln_out_ref[b, cs] = ln

    for p, (ws, ms) in enumerate(zip(weights, mus)):
      mixed = [ln * mu + sh * (1.0 - mu) for ln, sh, mu in zip(lns, shifts, ms)]
      out[p].append(jnp.sum(_tile_sum([w * m[None, :] for w, m in zip(ws, mixed)]), axis=1))
  return out


def time_mix_kernel(x_ref, ln_w, ln_b, mix_k, mix_v, mix_r, w_k, w_v, w_r, decay, first,
                    s_x, s_num, s_den, s_max, out_ref, o_x, o_num, o_den, o_max, *,
                    plan: DecodePlan, layer: int):
  """out (B, C) = sigmoid(r) * wkv for this program's channels; the new WKV state and
  att_x (B, C) of this layer (paper eqs. 11-13, 16 with the state of eqs. 23-28)."""
  rows = _rows(plan.block_out)
  k, v, r = _mixed_products(
      plan, layer, x_ref, ln_w, ln_b, s_x,
      [(mix_k, w_k, rows), (mix_v, w_v, rows), (mix_r, w_r, rows)], o_x)
  w, u = decay[rows], first[rows]
  for b in range(plan.batch):
    state = WKVState(s_num[layer, b, rows], s_den[layer, b, rows], s_max[layer, b, rows])
    y, new = wkv_step(w, u, k[b], v[b], state)
    out_ref[b, rows] = jax.nn.sigmoid(r[b]) * y
    o_num[b, rows], o_den[b, rows], o_max[b, rows] = new


def channel_in_kernel(x_ref, ln_w, ln_b, mix_k, mix_r, w_k, w_r, s_x, k_ref, r_ref, o_x, *,
                      plan: DecodePlan, layer: int):
  """k_ref (B, F) = relu(W'_k mix)^2 and r_ref (B, C) = sigmoid(W'_r mix) for this
  program's rows; ffn_x (B, C) (paper eqs. 14, 15)."""
  rows_f, rows_c = _rows(plan.block_ffn), _rows(plan.block_out)
  k, r = _mixed_products(plan, layer, x_ref, ln_w, ln_b, s_x,
                         [(mix_k, w_k, rows_f), (mix_r, w_r, rows_c)], o_x)
  for b in range(plan.batch):
    k_ref[b, rows_f] = jnp.square(jnp.maximum(k[b], 0.0))
    r_ref[b, rows_c] = jax.nn.sigmoid(r[b])


def project_kernel(x_ref, h_ref, w_ref, *refs, plan: DecodePlan, gated: bool):
  """out (B, C) = x + [gate *] W h for this program's rows; h (B, I), W (C, I), I = C or F."""
  gate_ref, out_ref = refs if gated else (None, refs[0])
  rows = _rows(plan.block_out)
  width = h_ref.shape[1]
  tiles = _tiles(width, plan.block_in if width == plan.c else plan.block_in_ffn)
  ws = [w_ref[rows, cs].astype(F32) for cs in tiles]
  for b in range(plan.batch):
    hs = [h_ref[b, cs].astype(F32) for cs in tiles]
    acc = jnp.sum(_tile_sum([w * h[None, :] for w, h in zip(ws, hs)]), axis=1)
    out_ref[b, rows] = x_ref[b, rows] + (gate_ref[b, rows] * acc if gated else acc)


# ----------------------------------------------------------------------------- launches

def _call(kernel, out_shapes, plan: DecodePlan, interpret: bool, name: str):
  return pl.pallas_call(
      kernel, out_shape=out_shapes, grid=(plan.programs,), interpret=interpret, name=name,
      compiler_params=plgpu.CompilerParams(num_warps=plan.num_warps, num_stages=1))


def block_step(plan: DecodePlan, layer: int, lw: LayerWeights, x, state, *,
               interpret: bool = False):
  """One block for one token. x (B, C) float32; state: the model's RWKVState (L, B, C).

  Returns (x after the block (B, C), this layer's new (att_x, num, den, max, ffn_x)).
  """
  vec = jax.ShapeDtypeStruct((plan.batch, plan.c), F32)
  h, att_x, num, den, mx = _call(
      lambda *r: time_mix_kernel(*r, plan=plan, layer=layer), (vec,) * 5, plan, interpret,
      "rwkv4_decode_time_mix")(
          x, lw.ln1_w, lw.ln1_b, lw.att_mix_k, lw.att_mix_v, lw.att_mix_r, lw.att_key,
          lw.att_value, lw.att_receptance, lw.decay, lw.first, state.att_x, state.att_num,
          state.att_den, state.att_max)
  x = _call(lambda *r: project_kernel(*r, plan=plan, gated=False), vec, plan, interpret,
            "rwkv4_decode_att_out")(x, h, lw.att_output)
  k, r, ffn_x = _call(
      lambda *r: channel_in_kernel(*r, plan=plan, layer=layer),
      (jax.ShapeDtypeStruct((plan.batch, plan.f), F32), vec, vec), plan, interpret,
      "rwkv4_decode_channel_in")(
          x, lw.ln2_w, lw.ln2_b, lw.ffn_mix_k, lw.ffn_mix_r, lw.ffn_key, lw.ffn_receptance,
          state.ffn_x)
  x = _call(lambda *r: project_kernel(*r, plan=plan, gated=True), vec, plan, interpret,
            "rwkv4_decode_ffn_out")(x, k, lw.ffn_value, r)
  return x, (att_x, num, den, mx, ffn_x)
