"""WKV-7 ("Goose", x070) behind one dispatch point.

``wkv7(r, w, k, v, a, b, state=None, *, implementation=None, chunk_size=None)
-> (y, new_state)``

  r, w, k, v, a, b: (B, T, H, N), any float dtype; all math in float32.
    w: the per-step decay in (0, 1] (already exp(-exp(...)), not its log);
    a, b: the rank-1 update vectors (RWKV-7 passes a = -kk, b = kk * iclr).
  state: (B, H, N, N) float32, or None for zeros. S[b, h, i, j]: i the value index, j the
    key index (BlinkDL's layout).
  Per head: S_t = S_{t-1} (diag(w_t) + a_t b_t^T) + v_t k_t^T, i.e.
    S = S * w[None, :] + (S @ a) b^T + v k^T ;   y_t = S_t r_t.
  Returns y (B, T, H, N) in r's dtype (accumulated in float32, rounded once at the end)
  and the state after the last token, (B, H, N, N) float32.

Implementations (``IMPLEMENTATIONS``):
  "scan"     lax.scan step by step: the reference (``wkv7_scan``); ``wkv7_step`` is its one
             token, for decode.
  "chunked"  matmuls inside chunks of ``chunk_size`` steps (a power of two, default
             ``DEFAULT_CHUNK_SIZE`` = 32), an associative scan across chunks
             (``wkv7_chunked``; see chunked.py for the algorithm).
  "pallas"   pallas_kernels/wkv7.py: a Pallas (Triton backend) forward kernel, the default
             on GPU (1.5-2.8x faster forward than "chunked" on an H200: see
             experiments/RESULTS.md); differentiated through the chunked form, so
             training costs what "chunked" does. Chunk sizes 16/32/64 and N in 16..128;
             other calls run "chunked". Off the GPU it runs interpreted (slow).
             ``register_implementation`` can replace it.
``implementation=None`` picks the first registered kernel for the platform, else
"chunked". ``chunk_size`` goes to implementations that have chunks (None: their default).
Shapes are checked statically (safe under jit); errors name the offending argument.
"""

from __future__ import annotations

from typing import Callable

import jax

from rwkv_jax.ops.wkv7.chunked import DEFAULT_CHUNK_SIZE, wkv7_chunked
from rwkv_jax.ops.wkv7.scan import validate_wkv7_inputs, wkv7_scan, wkv7_step

IMPLEMENTATIONS = ("scan", "chunked", "pallas")


def _wkv7_pallas(r, w, k, v, a, b, state=None, *, chunk_size=None):
  """pallas_kernels/wkv7.py (Triton backend; its chunk sizes 16/32/64, N 16..128, else the
  chunked form). Imported lazily: Pallas is only needed here."""
  from pallas_kernels.wkv7 import registered_wkv7
  return registered_wkv7(r, w, k, v, a, b, state, chunk_size=chunk_size)


# name -> fn(r, w, k, v, a, b, state, *, chunk_size).
_IMPLS: dict[str, Callable] = {"scan": wkv7_scan, "chunked": wkv7_chunked,
                               "pallas": _wkv7_pallas}
# Platforms ("gpu", "tpu", "cpu") on which a registered kernel becomes the default.
_DEFAULT_ON: dict[str, tuple[str, ...]] = {"pallas": ("gpu",)}


def register_implementation(name: str, fn: Callable, *, platforms: tuple[str, ...] = ()):
  """Makes ``fn(r, w, k, v, a, b, state, *, chunk_size=None) -> (y, state)`` selectable as
  ``name`` (one of IMPLEMENTATIONS), and the default on ``platforms``. It receives
  validated arrays of the caller's dtypes and must keep the module docstring's contract."""
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"wkv7: unknown implementation name {name!r}; slots: {IMPLEMENTATIONS}")
  _IMPLS[name] = fn
  _DEFAULT_ON[name] = tuple(platforms)


def available_implementations() -> tuple[str, ...]:
  return tuple(n for n in IMPLEMENTATIONS if n in _IMPLS)


def default_implementation(platform: str | None = None) -> str:
  """A registered kernel that names this platform (jax.default_backend() if None), else
  "chunked" (CPU, TPU, GPU without a kernel, and any platform under a multi-device mesh)."""
  platform = platform or jax.default_backend()
  from rwkv_jax.ops._per_shard import current_mesh

  if current_mesh() is not None:
    # Traced for a multi-device mesh: XLA partitions the chunked form; a Pallas call it
    # cannot split, and would gather every input onto each device.
    return "chunked"
  for name in IMPLEMENTATIONS:
    if name in _IMPLS and platform in _DEFAULT_ON.get(name, ()):
      return name
  return "chunked"


def resolve_implementation(implementation: str | None) -> str:
  if implementation is None:
    return default_implementation()
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"wkv7: unknown implementation {implementation!r}; choose from "
                     f"{IMPLEMENTATIONS} or None")
  if implementation not in _IMPLS:
    raise NotImplementedError(
        f"wkv7: the {implementation!r} implementation is not built yet (nothing registered "
        f"it); available: {available_implementations()}")
  return implementation


def wkv7(r, w, k, v, a, b, state=None, *, implementation: str | None = None,
         chunk_size: int | None = None):
  """WKV-7 over a sequence; see the module docstring for the contract."""
  fn = _IMPLS[resolve_implementation(implementation)]
  validate_wkv7_inputs(r, w, k, v, a, b, state)  # before any kernel: one set of errors
  return fn(r, w, k, v, a, b, state, chunk_size=chunk_size)


__all__ = [
    "DEFAULT_CHUNK_SIZE", "IMPLEMENTATIONS", "available_implementations",
    "default_implementation", "register_implementation", "resolve_implementation",
    "validate_wkv7_inputs", "wkv7", "wkv7_chunked", "wkv7_scan", "wkv7_step",
]
