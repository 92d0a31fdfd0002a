"""rwkv-jax: RWKV language models (RWKV-4, RWKV-7 "Goose") in JAX / Flax NNX.

Every public name is imported on first use, so ``import rwkv_jax`` (and ``rwkv-jax
--help``) does not load JAX.
"""

from __future__ import annotations

import importlib

__version__ = "0.2.0"

# Public name -> the module that defines it.
_LAZY = {
    # RWKV-4 (the names of rwkv-jax 0.1)
    "RWKV": "rwkv_jax.models.rwkv4",
    "RWKVConfig": "rwkv_jax.models.rwkv4",
    "RWKVState": "rwkv_jax.models.rwkv4",
    # RWKV-7
    "RWKV7": "rwkv_jax.models.rwkv7",
    "RWKV7Config": "rwkv_jax.models.rwkv7",
    "RWKV7State": "rwkv_jax.models.rwkv7",
    # Any family
    "build_model": "rwkv_jax.models",
    "config_from_dict": "rwkv_jax.models",
    "preset": "rwkv_jax.models",
    "generate": "rwkv_jax.inference",
    "SamplingConfig": "rwkv_jax.inference",
    "ChatSession": "rwkv_jax.inference",
    "stream": "rwkv_jax.inference",
    "save_state": "rwkv_jax.inference",
    "load_state": "rwkv_jax.inference",
    "from_pretrained": "rwkv_jax.interop",
    "save_pretrained": "rwkv_jax.interop",
    "load_model": "rwkv_jax.checkpoint",
    "TrainConfig": "rwkv_jax.training.config",
    "run_training": "rwkv_jax.training.trainer",
}


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'rwkv_jax' has no attribute {name!r}")


def __dir__():
  return sorted([*globals(), *_LAZY])


__all__ = list(_LAZY)
