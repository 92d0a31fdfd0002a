"""WKV-7 as a Pallas GPU kernel (Triton backend), forward; gradients by the chunked form.

``wkv7_pallas(r, w, k, v, a, b, state=None, *, chunk_size=None, config=None,
interpret=False) -> (y, new_state)`` has the contract of ``rwkv_jax.ops.wkv7`` (its
reference is ``wkv7_chunked`` / ``wkv7_scan``):

  r, w, k, v, a, b: (B, T, H, N) float32 or bfloat16, N a power of two in [16, 128];
  state (B, H, N, N) float32 or None. Per head S = S diag(w) + (S a) b^T + v k^T,
  y = S r. Returns y (B, T, H, N) in r's dtype and the state after the last token.

Forward: one Pallas program per (batch, head[, T-segment]); it carries the head's N x N
float32 state through the chunks of L = ``chunk_size`` steps in sequence, each chunk in
the WY / UT form as a few small matmuls (see _wkv7_fwd for the algebra and the
division-free decays). T is padded with identity steps (w = 1, the rest 0) to whole
chunks. When B * H alone gives fewer than ``config.min_programs`` programs, T is also cut
into segments: a first launch computes each segment's affine map S -> S M + U, a short
scan over segments (plain JAX) gives every segment its exact start state, and a second
launch produces y: about 2.5x the arithmetic, spread over more of the GPU.

Backward: NOT a Pallas kernel yet. Under differentiation (jax.grad, value_and_grad, vjp)
the custom VJP's forward rule runs the pure-JAX ``wkv7_chunked`` and keeps its VJP: values
and gradients are the chunked reference's (exact), and a training step costs what
"chunked" costs, no more and no less. The Pallas kernel serves every call that is not
differentiated (inference, prefill, evaluation).

Backend: Pallas's Triton backend (``jax.experimental.pallas.triton``), deprecated in jax
0.11 (it warns) in favour of Mosaic GPU, which STYLE.md asks for. Chosen for the time the
work had (minutes of GPU time): the kernel is a chain of ~35 small (16 x 64) matmuls with
masks, row/column reductions and a register-resident triangular solve per chunk, which
Triton lays out by itself and which lowers to Triton IR on a CPU-only jax 0.10 (checked
before the first GPU call); in Mosaic GPU each wgmma operand must be staged in swizzled
shared memory by a warpgroup with explicit layouts, untestable here without a GPU. Both
backends interpret on CPU. A Mosaic GPU port is issue 13's remaining work.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._wkv7_fwd import wkv7_chunk_kernel
from rwkv_jax.ops.wkv7.chunked import wkv7_chunked
from rwkv_jax.ops.wkv7.scan import validate_wkv7_inputs

PRECISIONS = ("ieee", "tf32x3", "tf32", "bf16")


@dataclasses.dataclass(frozen=True)
class Config:
  """Static settings of the kernel (hashable: it keys jit and the custom VJP).

  Attributes:
    chunk: steps per chunk L (power of two, 16..64).
    precision: the matmuls' mode (see _wkv7_fwd.dot) for float32 inputs ...
    precision_bf16: ... and for bfloat16 (or other 16-bit) inputs. Decay sums always use
      three-pass tf32 (float32 accuracy).
    segments: T-segments per sequence; None: 1 unless B * H < min_programs, then the
      power of two that reaches min_programs programs (at least 4 chunks a segment).
    min_programs: see segments (the H200 has 132 SMs).
    num_warps, num_stages: Triton launch settings.
    bwd_chunk: chunk_size of the chunked form used under differentiation (None: its
      default).
  """

  # Defaults from an H200 (experiments/RESULTS.md, "WKV-7 Pallas kernel"): chunks of 16
  # ran 3.3x faster than 32 (64 at 8 warps asked for 480 KB of shared memory); bf16
  # matmuls are 1.5x faster than tf32 but triple y's error (3e-3 vs 1e-3 relative).
  chunk: int = 16
  precision: str = "tf32x3"
  precision_bf16: str = "tf32"
  segments: int | None = None
  min_programs: int = 256
  num_warps: int = 4
  num_stages: int = 1
  bwd_chunk: int | None = None

  def __post_init__(self):
    if self.chunk not in (16, 32, 64):
      raise ValueError(f"wkv7 pallas: chunk must be 16, 32 or 64, got {self.chunk}")
    for name in ("precision", "precision_bf16"):
      if getattr(self, name) not in PRECISIONS:
        raise ValueError(f"wkv7 pallas: {name} must be one of {PRECISIONS}, "
                         f"got {getattr(self, name)!r}")
    if self.segments is not None and self.segments < 1:
      raise ValueError(f"wkv7 pallas: segments must be >= 1, got {self.segments}")

  def n_segments(self, b: int, t: int, h: int) -> int:
    if self.segments is not None:
      return max(1, min(self.segments, -(-t // self.chunk)))
    n = 1  # a power of two: T = 2^k chunks then needs no padding
    while n * b * h < self.min_programs and 2 * n * 4 * self.chunk <= t:
      n *= 2
    return n


def supported(shape) -> bool:
  """Whether the kernel takes inputs of this (B, T, H, N) shape (N a power of two, 16..128:
  Triton's matmuls need every side >= 16)."""
  n = shape[-1]
  return n in (16, 32, 64, 128)


def _launch(cfg: Config, mode: str, xs, starts, seg_chunks: int, n_seg: int,
            precision: str, interpret: bool):
  bsz, t, h, n = xs[0].shape
  state_shape = jax.ShapeDtypeStruct((bsz, h, n_seg, n, n), jnp.float32)
  if mode == "forward":
    out_shape = (jax.ShapeDtypeStruct((bsz, t, h, n), xs[0].dtype), state_shape)
  else:
    out_shape = (state_shape, state_shape)
  kernel = functools.partial(wkv7_chunk_kernel, chunk=cfg.chunk, seg_chunks=seg_chunks,
                             mode=mode, precision=precision, interpret=interpret)
  return pl.pallas_call(
      kernel, out_shape=out_shape, grid=(bsz, h, n_seg),
      compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps,
                                           num_stages=cfg.num_stages),
      interpret=interpret, name=f"wkv7_{mode}")(*xs, starts)


def _forward(cfg: Config, interpret: bool, r, w, k, v, a, b, state):
  """The Pallas forward on validated arrays; state float32 (B, H, N, N)."""
  bsz, t, h, n = r.shape
  precision = cfg.precision if r.dtype == jnp.float32 else cfg.precision_bf16
  n_seg = cfg.n_segments(bsz, t, h)
  seg_chunks = -(-t // (cfg.chunk * n_seg))
  pad = n_seg * seg_chunks * cfg.chunk - t

  def padded(x, fill=0.0):  # identity steps: w = 1, the rest 0
    return jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)), constant_values=fill) if pad else x

  xs = (padded(r), padded(w, 1.0), *(padded(x) for x in (k, v, a, b)))
  if n_seg == 1:
    starts = state[:, :, None]
  else:  # segment maps, then each segment's exact start state
    maps_m, maps_u = _launch(cfg, "transition", xs, state[:, :, None], seg_chunks, n_seg,
                             precision, interpret)
    hi = jax.lax.Precision.HIGHEST

    def step(s, mu):
      m, u = mu
      return jnp.matmul(s, m, precision=hi) + u, s

    _, starts = jax.lax.scan(step, state, (jnp.moveaxis(maps_m, 2, 0),
                                           jnp.moveaxis(maps_u, 2, 0)))
    starts = jnp.moveaxis(starts, 0, 2)  # B H S N N
  y, ends = _launch(cfg, "forward", xs, starts, seg_chunks, n_seg, precision, interpret)
  return (y[:, :t] if pad else y), ends[:, :, -1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _wkv7_core(cfg, interpret, r, w, k, v, a, b, state):
  return _forward(cfg, interpret, r, w, k, v, a, b, state)


def _core_fwd(cfg, interpret, r, w, k, v, a, b, state):
  # Under differentiation the forward is the chunked form's, its VJP kept as the residual
  # (a pytree of arrays): the gradient costs exactly what "chunked" costs, with no second
  # forward. (Recomputing in the backward after a Pallas forward was measured equal under
  # jax.grad only because XLA dropped the unused Pallas y; value_and_grad would pay both.)
  out, vjp = jax.vjp(lambda *xs: wkv7_chunked(*xs, chunk_size=cfg.bwd_chunk),
                     r, w, k, v, a, b, state)
  return out, vjp


def _core_bwd(cfg, interpret, vjp, cot):
  del cfg, interpret
  return vjp(cot)


_wkv7_core.defvjp(_core_fwd, _core_bwd)


@functools.partial(jax.jit, static_argnames=("cfg", "interpret"))
def _wkv7(r, w, k, v, a, b, state, *, cfg: Config, interpret: bool):
  return _wkv7_core(cfg, interpret, r, w, k, v, a, b, state)


def wkv7_pallas(r, w, k, v, a, b, state=None, *, chunk_size: int | None = None,
                config: Config | None = None, interpret: bool = False):
  """WKV-7 on the GPU; see the module docstring. ``chunk_size`` overrides config.chunk.

  ``interpret=True`` runs the same kernel in the Pallas interpreter (any backend).
  """
  validate_wkv7_inputs(r, w, k, v, a, b, state)
  cfg = config or Config()
  if chunk_size is not None and chunk_size != cfg.chunk:
    cfg = dataclasses.replace(cfg, chunk=chunk_size)
  if not supported(jnp.shape(r)):
    raise ValueError(f"wkv7 pallas: head size N must be 16, 32, 64 or 128, got "
                     f"{jnp.shape(r)[-1]}")
  bsz, t, h, n = jnp.shape(r)
  if state is None:  # one jit signature with and without a state
    state = jnp.zeros((bsz, h, n, n), jnp.float32)
  state = jnp.asarray(state, jnp.float32)
  if t == 0:
    return jnp.zeros(jnp.shape(r), jnp.result_type(r)), state
  out_dtype = jnp.result_type(r)
  dtypes = {jnp.result_type(x) for x in (r, w, k, v, a, b)}
  dtype = out_dtype if len(dtypes) == 1 else jnp.float32  # mixed: all in float32
  xs = tuple(jnp.asarray(x, dtype) for x in (r, w, k, v, a, b))
  y, state = _wkv7(*xs, state, cfg=cfg, interpret=interpret)
  return y.astype(out_dtype), state


def registered_wkv7(r, w, k, v, a, b, state=None, *, chunk_size=None):
  """The "pallas" entry of rwkv_jax.ops.wkv7's registry: the kernel where it applies
  (chunk_size None or 16/32/64, N supported), else the chunked form (e.g. N = 8 in tests,
  or chunk_size 4). Off the GPU the kernel runs in the Pallas interpreter (slow)."""
  if supported(jnp.shape(r)) and chunk_size in (None, 16, 32, 64):
    return wkv7_pallas(r, w, k, v, a, b, state, chunk_size=chunk_size,
                       interpret=jax.default_backend() != "gpu")
  return wkv7_chunked(r, w, k, v, a, b, state, chunk_size=chunk_size)
