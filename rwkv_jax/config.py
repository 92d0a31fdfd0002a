"""Compatibility: RWKV-4's config now lives in ``rwkv_jax.models.rwkv4.config``."""

from rwkv_jax.models.base import dataclass_from_dict
from rwkv_jax.models.rwkv4.config import PILE_VOCAB, WKV_IMPLEMENTATIONS, RWKVConfig

__all__ = ["PILE_VOCAB", "RWKVConfig", "WKV_IMPLEMENTATIONS", "dataclass_from_dict"]
