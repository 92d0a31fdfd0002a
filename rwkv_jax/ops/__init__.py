"""WKV operators behind one dispatch point.

``wkv(w, u, k, v, state=None, *, implementation=None) -> (y, new_state)``

  k, v: (B, T, C) any float dtype (computed in float32; y comes back in v's dtype).
  w: (C,) the positive decay rate exp(time_decay); u: (C,) the bonus time_first.
  state: ``WKVState`` (num, den, max), each (B, C) float32, or None for an empty past.
  Returns y (B, T, C) and the state after the last token.
"""

from __future__ import annotations

import jax

from rwkv_jax.ops._associative import wkv_associative_scan
from rwkv_jax.ops._scan import wkv_scan_reference, wkv_step
from rwkv_jax.ops._state import NEG_INF_EXP, WKVState
from rwkv_jax.ops.wkv7 import wkv7, wkv7_step

IMPLEMENTATIONS = ("scan", "associative_scan", "pallas")


def _wkv_pallas(w, u, k, v, state=None):
  from pallas_kernels.wkv4 import wkv4  # imported lazily: Pallas is only needed here
  from rwkv_jax.ops._per_shard import per_shard_wkv

  # Under a mesh, per shard: XLA cannot partition the kernel's custom call.
  kernel = lambda *a: wkv4(*a, interpret=jax.default_backend() != "gpu")
  return per_shard_wkv(kernel, w, u, k, v, state)


_IMPLS = {
    "scan": wkv_scan_reference,
    "associative_scan": wkv_associative_scan,
    "pallas": _wkv_pallas,
}


def default_implementation() -> str:
  """The platform's default parallel-mode WKV path: the Pallas kernel on GPU,
  associative_scan elsewhere (the kernel only runs interpreted off-GPU, which is slow)."""
  return "pallas" if jax.default_backend() == "gpu" else "associative_scan"


def resolve_implementation(implementation: str | None) -> str:
  if implementation is None:
    return default_implementation()
  if implementation not in _IMPLS:
    raise ValueError(
        f"unknown WKV implementation {implementation!r}; choose from {IMPLEMENTATIONS} or None")
  return implementation


def wkv(w, u, k, v, state=None, *, implementation: str | None = None):
  """WKV-4 (paper eq. 16) over a sequence; see the module docstring for shapes."""
  return _IMPLS[resolve_implementation(implementation)](w, u, k, v, state)


__all__ = [
    "IMPLEMENTATIONS", "NEG_INF_EXP", "WKVState", "default_implementation",
    "resolve_implementation", "wkv", "wkv_associative_scan", "wkv_scan_reference", "wkv_step",
    "wkv7", "wkv7_step",
]
