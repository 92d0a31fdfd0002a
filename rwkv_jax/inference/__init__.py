"""Inference: ragged parallel prefill, on-device decode, sampling, streaming, state I/O, chat.

The names are imported on first use, so loading this package (``rwkv-jax generate --help``
registers its command from here) does not load JAX.
"""

import importlib

_LAZY = {
    "ChatSession": "rwkv_jax.inference.chat",
    "GenerateOutput": "rwkv_jax.inference.generation",
    "TokenStream": "rwkv_jax.inference.generation",
    "generate": "rwkv_jax.inference.generation",
    "prefill": "rwkv_jax.inference.generation",
    "stream": "rwkv_jax.inference.generation",
    "SamplingConfig": "rwkv_jax.inference.sampling",
    "apply_penalties": "rwkv_jax.inference.sampling",
    "filter_logits": "rwkv_jax.inference.sampling",
    "sample": "rwkv_jax.inference.sampling",
    "load_state": "rwkv_jax.inference.state_io",
    "read_state_metadata": "rwkv_jax.inference.state_io",
    "save_state": "rwkv_jax.inference.state_io",
}


def __getattr__(name):
  if name in _LAZY:
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # found directly from now on
    return value
  raise AttributeError(f"module 'rwkv_jax.inference' has no attribute {name!r}")


__all__ = sorted(_LAZY)
