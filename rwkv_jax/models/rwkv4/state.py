"""The recurrent state of a whole RWKV-4 model.

Five float32 vectors per layer, stacked over layers: every field is (L, B, C).

  field     meaning                                       HF `state[j]` (B, C, L)   ChatRWKV v4
  att_x     LN1 output of the last token (time-mix shift)   j = 1                  state[5l+1]
  att_num   WKV numerator a'                                 j = 2                  state[5l+2]
  att_den   WKV denominator b'                               j = 3                  state[5l+3]
  att_max   WKV shared exponent p (-1e38 when empty)         j = 4                  state[5l+4]
  ffn_x     LN2 output of the last token (chan-mix shift)    j = 0                  state[5l+0]

HF (``RwkvFeedForward`` reads ``state[0]``, ``RwkvSelfAttention`` ``state[1..4]``) keeps
ChatRWKV's order with the layer axis last: see ``to_hf_state``/``from_hf_state``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from rwkv_jax.ops import NEG_INF_EXP, WKVState

_VECTOR = ("layer", "batch", "embed")


class RWKVState(NamedTuple):
  att_x: jax.Array    # L B C
  att_num: jax.Array  # L B C
  att_den: jax.Array  # L B C
  att_max: jax.Array  # L B C
  ffn_x: jax.Array    # L B C

  @classmethod
  def zeros(cls, n_layer: int, batch_size: int, n_embd: int) -> "RWKVState":
    z = jnp.zeros((n_layer, batch_size, n_embd), jnp.float32)
    return cls(z, z, z, jnp.full_like(z, NEG_INF_EXP), z)

  def layer(self, i: int) -> "RWKVState":
    """The (B, C) vectors of layer i."""
    return RWKVState(*(x[i] for x in self))

  def wkv(self) -> WKVState:
    return WKVState(self.att_num, self.att_den, self.att_max)

  @classmethod
  def stack(cls, layers: list["RWKVState"]) -> "RWKVState":
    return cls(*(jnp.stack(xs) for xs in zip(*layers)))

  def to_hf_state(self) -> list[jax.Array]:
    """HF transformers ``RwkvModel`` layout: [ffn_x, att_x, num, den, max], each (B, C, L)."""
    return [x.transpose(1, 2, 0) for x in (self.ffn_x, *self[:4])]

  @classmethod
  def from_hf_state(cls, hf_state) -> "RWKVState":
    if len(hf_state) != 5:
      raise ValueError(f"an HF RWKV state is a list of 5 arrays, got {len(hf_state)}")
    ffn_x, *att = (jnp.asarray(x, jnp.float32).transpose(2, 0, 1) for x in hf_state)
    return cls(*att, ffn_x)


# Logical axes of every field (see ``rwkv_jax.models.base``).
STATE_AXES = RWKVState(*(_VECTOR for _ in RWKVState._fields))
