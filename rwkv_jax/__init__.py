"""rwkv-jax: RWKV-4 in JAX / Flax NNX."""

from __future__ import annotations

import importlib

from rwkv_jax.config import RWKVConfig
from rwkv_jax.model import RWKV
from rwkv_jax.state import RWKVState

__version__ = "0.1.0"

# Public names that live in heavier modules, imported on first use.
_LAZY = {
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


__all__ = ["RWKV", "RWKVConfig", "RWKVState", *_LAZY]
