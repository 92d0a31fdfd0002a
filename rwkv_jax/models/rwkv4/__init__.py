"""RWKV-4 (arXiv 2305.13048): config, model, state, weight names, fused decode."""

from rwkv_jax.models.rwkv4.config import RWKVConfig
from rwkv_jax.models.rwkv4.model import RWKV
from rwkv_jax.models.rwkv4.state import RWKVState

CONFIG = RWKVConfig
MODEL = RWKV

__all__ = ["CONFIG", "MODEL", "RWKV", "RWKVConfig", "RWKVState"]
