"""RWKV-4 (arXiv 2305.13048) in Flax NNX: parallel mode and recurrent mode share one path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rwkv_jax.layers import Dense, LayerNorm, dropout, matmul, param, token_shift
from rwkv_jax.models.base import RecurrentLM, check_tokens, embed_tokens
from rwkv_jax.models.rwkv4 import init as appendix_e
from rwkv_jax.models.rwkv4 import decode
from rwkv_jax.models.rwkv4.config import RWKVConfig
from rwkv_jax.models.rwkv4.state import STATE_AXES, RWKVState
from rwkv_jax.ops import WKVState, wkv


def _normal(rngs: nnx.Rngs, shape, std):
  # The barrier (identity) stops XLA from folding std into normal()'s own sqrt(2) factor
  # when init runs inside jit (the trainer's init on a mesh): the bits then equal the
  # eager init's.
  return std * jax.lax.optimization_barrier(jax.random.normal(rngs.params(), shape, jnp.float32))


def _mix(x, xx, mu):
  """Token-shift interpolation mu x_t + (1 - mu) x_{t-1} (paper eqs. 11-15)."""
  return x * mu + xx * (1.0 - mu)


class TimeMix(nnx.Module):
  """Token shift -> r, k, v -> WKV -> sigmoid(r) gate -> W_o (paper eqs. 11-13, 16, 17)."""

  def __init__(self, cfg: RWKVConfig, layer_id: int, *, rngs: nnx.Rngs):
    c, dt = cfg.n_embd, cfg.dtype
    for name, mu in appendix_e.time_mix_init(layer_id, cfg.n_layer, c).items():
      setattr(self, name, param(mu, ("embed",)))
    self.time_decay = param(appendix_e.time_decay_init(layer_id, cfg.n_layer, c), ("att",))
    self.time_first = param(appendix_e.time_first_init(c), ("att",))
    zeros = jnp.zeros((c, c))
    self.key = Dense(zeros, ("embed", "att"), dt)
    self.value = Dense(zeros, ("embed", "att"), dt)
    self.receptance = Dense(zeros, ("embed", "att"), dt)
    std = appendix_e.output_std(c, cfg.dim_ffn, fan_in=c)
    self.output = Dense(_normal(rngs, (c, c), std), ("att", "embed"), dt)

  def __call__(self, x, last_x, wkv_state: WKVState, implementation):
    """x: (B, T, C) LN1 output; last_x: (B, C). Returns (out (B,T,C), x[:, -1], WKVState)."""
    xx = token_shift(x, last_x)
    k = self.key(_mix(x, xx, self.time_mix_k[...]))
    v = self.value(_mix(x, xx, self.time_mix_v[...]))
    r = self.receptance(_mix(x, xx, self.time_mix_r[...]))
    y, wkv_state = wkv(jnp.exp(self.time_decay[...]), self.time_first[...], k, v, wkv_state,
                       implementation=implementation)
    return self.output(jax.nn.sigmoid(r) * y), x[:, -1], wkv_state


class ChannelMix(nnx.Module):
  """Token shift -> sigmoid(r') * W'_v relu(k')^2 (paper eqs. 14, 15, 18)."""

  def __init__(self, cfg: RWKVConfig, layer_id: int, *, rngs: nnx.Rngs):
    c, f, dt = cfg.n_embd, cfg.dim_ffn, cfg.dtype
    for name, mu in appendix_e.channel_mix_init(layer_id, cfg.n_layer, c).items():
      setattr(self, name, param(mu, ("embed",)))
    self.key = Dense(_normal(rngs, (c, f), 1.0 / np.sqrt(c)), ("embed", "mlp"), dt)
    self.receptance = Dense(jnp.zeros((c, c)), ("embed", "embed_out"), dt)
    std = appendix_e.output_std(c, f, fan_in=f)
    self.value = Dense(_normal(rngs, (f, c), std), ("mlp", "embed"), dt)

  def __call__(self, x, last_x):
    """x: (B, T, C) LN2 output; last_x: (B, C). Returns (out (B,T,C), x[:, -1])."""
    xx = token_shift(x, last_x)
    k = jnp.square(jax.nn.relu(self.key(_mix(x, xx, self.time_mix_k[...]))))  # B T F
    r = self.receptance(_mix(x, xx, self.time_mix_r[...]))
    return jax.nn.sigmoid(r) * self.value(k), x[:, -1]


class Block(nnx.Module):
  """Pre-LN residual block: x + TimeMix(LN1 x), then + ChannelMix(LN2 x); with a dropout
  key each sub-block's output is dropped out before it joins the residual stream."""

  def __init__(self, cfg: RWKVConfig, layer_id: int, *, rngs: nnx.Rngs):
    self.dropout = cfg.dropout
    self.ln1 = LayerNorm(cfg.n_embd, cfg.layer_norm_eps)
    self.att = TimeMix(cfg, layer_id, rngs=rngs)
    self.ln2 = LayerNorm(cfg.n_embd, cfg.layer_norm_eps)
    self.ffn = ChannelMix(cfg, layer_id, rngs=rngs)

  def __call__(self, x, state: RWKVState, implementation, dropout_key=None):
    """x: (B, T, C) float32; state: this layer's five (B, C) vectors."""
    keys = (None, None) if dropout_key is None else jax.random.split(dropout_key)
    h, att_x, s = self.att(self.ln1(x), state.att_x, WKVState(*state[1:4]), implementation)
    x = x + dropout(h, self.dropout, keys[0])
    h, ffn_x = self.ffn(self.ln2(x), state.ffn_x)
    return x + dropout(h, self.dropout, keys[1]), RWKVState(att_x, s.num, s.den, s.max, ffn_x)


class RWKV(RecurrentLM):
  """RWKV-4 language model.

  ``model(tokens)`` -> logits (B, T, V) (parallel mode); ``model.forward_with_state(tokens,
  state)`` -> (logits, new_state) for any T >= 1 (T = 1 is a decode step, T > 1 a prefill).
  """

  def __init__(self, cfg: RWKVConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    c, v = cfg.n_embd, cfg.vocab_size
    emb = jax.random.uniform(rngs.params(), (v, c), jnp.float32, -1e-4, 1e-4)
    self.emb = param(emb, ("vocab", "embed"))
    self.ln0 = LayerNorm(c, cfg.layer_norm_eps)
    self.blocks = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.n_layer)])
    self.ln_out = LayerNorm(c, cfg.layer_norm_eps)
    self.head = param(_normal(rngs, (c, v), 0.5 / np.sqrt(c)), ("embed", "vocab"))

  def init_state(self, batch_size: int) -> RWKVState:
    """The empty recurrent state, each field (L, B, C) float32."""
    return RWKVState.zeros(self.cfg.n_layer, batch_size, self.cfg.n_embd)

  def state_axes(self) -> RWKVState:
    return STATE_AXES

  def tunable_state(self, batch_size: int = 1) -> RWKVState:
    """The empty state with the WKV exponent at 0 instead of -1e38: the same function
    (numerator and denominator are 0), but exp(att_max) no longer zeroes the gradients of
    att_num / att_den, so state tuning can learn them."""
    return self.init_state(batch_size)._replace(
        att_max=jnp.zeros((self.cfg.n_layer, batch_size, self.cfg.n_embd), jnp.float32))

  def embed(self, tokens):  # B T -> B T C float32
    check_tokens(tokens, self.cfg.vocab_size)
    return self.ln0(embed_tokens(self.emb[...], tokens))

  def logits(self, x):  # B T C -> B T V float32
    return matmul(self.ln_out(x), self.head[...], self.cfg.dtype)

  def blocks_forward(self, x, state: RWKVState, implementation, dropout_key=None):
    """x (B, T, C) after ln0 -> (x before ln_out, the new state); state fields (L, B, C)."""
    def call(block, x, s, carry, key):
      return (*block(x, s, implementation, key), carry)

    return self.run_layers(x, state, call, dropout_key=dropout_key)

  # Fused decode kernels (pallas_kernels/rwkv4_decode), see ``decode.py``.
  def decode_steps(self) -> tuple[str, ...]:
    return decode.DECODE_STEPS

  def default_decode_step(self, batch: int) -> str:
    return decode.default_step(self.cfg, batch)

  def check_decode_step(self, step: str, batch: int) -> None:
    decode.check_step(self.cfg, step, batch)

  def decode_step_function(self, step: str, **options):
    if step == "model":
      return super().decode_step_function(step)
    return decode.fused_step_function(self, **options)

  def decode_weights(self, dtype) -> list:
    """Every block's weights as the fused kernels read them (``decode.layer_weights``)."""
    return decode.layer_weights(self, dtype)
