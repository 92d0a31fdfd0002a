"""Compatibility: the RWKV-4 model now lives in ``rwkv_jax.models.rwkv4.model``."""

from rwkv_jax.models.base import check_tokens
from rwkv_jax.models.rwkv4.model import RWKV

__all__ = ["RWKV", "check_tokens"]
