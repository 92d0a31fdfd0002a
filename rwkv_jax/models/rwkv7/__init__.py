"""RWKV-7 "Goose" (x070; arXiv 2503.14456): config, model, state, init, weight names."""

from rwkv_jax.models.rwkv7 import weights
from rwkv_jax.models.rwkv7.config import RWKV7Config
from rwkv_jax.models.rwkv7.model import RWKV7
from rwkv_jax.models.rwkv7.state import RWKV7State

CONFIG = RWKV7Config
MODEL = RWKV7

__all__ = ["CONFIG", "MODEL", "RWKV7", "RWKV7Config", "RWKV7State", "weights"]
