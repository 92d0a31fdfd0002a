"""The recurrent state of a whole RWKV-7 model, stacked over layers.

  field   shape              meaning                                  BlinkDL (per layer i)
  att_x   (L, B, C)          ln1 output of the last token (time-mix    state[3i + 0]
                             token shift)
  wkv     (L, B, H, N, N)    the WKV-7 matrices S[h, i, j], i the      state[3i + 1]
                             value index, j the key index (float32)
  ffn_x   (L, B, C)          ln2 output of the last token (channel-    state[3i + 2]
                             mix token shift)

BlinkDL's RNN code (``rwkv_v7_demo_rnn.py``, the ``rwkv`` pip package) keeps a flat list
[x_att, wkv, x_ffn] per layer, without a batch axis, and the same S orientation
(``state @ r``, ``v k^T`` updates): ``to_blinkdl_state`` / ``from_blinkdl_state`` convert,
keeping our batch axis first on every entry. ``v_first`` (layer 0's value, mixed into later
layers) lives inside one forward only and is not state.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

_VECTOR = ("layer", "batch", "embed")
_MATRIX = ("layer", "batch", "head", "head_v", "head_k")


class RWKV7State(NamedTuple):
  att_x: jax.Array  # L B C
  wkv: jax.Array    # L B H N N  (float32)
  ffn_x: jax.Array  # L B C

  @classmethod
  def zeros(cls, n_layer: int, batch_size: int, n_embd: int, head_size: int) -> "RWKV7State":
    if n_embd % head_size:
      raise ValueError(f"n_embd ({n_embd}) must be a multiple of head_size ({head_size})")
    h = n_embd // head_size
    vec = jnp.zeros((n_layer, batch_size, n_embd), jnp.float32)
    return cls(vec, jnp.zeros((n_layer, batch_size, h, head_size, head_size), jnp.float32),
               vec)

  def layer(self, i: int) -> "RWKV7State":
    """Layer i's (B, C), (B, H, N, N), (B, C)."""
    return RWKV7State(*(x[i] for x in self))

  @classmethod
  def stack(cls, layers: list["RWKV7State"]) -> "RWKV7State":
    return cls(*(jnp.stack(xs) for xs in zip(*layers)))

  def to_blinkdl_state(self) -> list[jax.Array]:
    """BlinkDL's flat list: [att_x (B, C), wkv (B, H, N, N), ffn_x (B, C)] per layer."""
    return [x for i in range(self.att_x.shape[0]) for x in self.layer(i)]

  @classmethod
  def from_blinkdl_state(cls, flat) -> "RWKV7State":
    if len(flat) % 3:
      raise ValueError(f"a BlinkDL RWKV-7 state has 3 arrays per layer, got {len(flat)}")
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    return cls(*(jnp.stack([f32(x) for x in flat[j::3]]) for j in range(3)))


# Logical axes of every field (see ``rwkv_jax.models.base``).
STATE_AXES = RWKV7State(att_x=_VECTOR, wkv=_MATRIX, ffn_x=_VECTOR)
