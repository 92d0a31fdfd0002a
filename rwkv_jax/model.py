"""RWKV-4 (arXiv 2305.13048) in Flax NNX: parallel mode and recurrent mode share one path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rwkv_jax import init as appendix_e
from rwkv_jax.config import RWKVConfig
from rwkv_jax.layers import Dense, LayerNorm, matmul, param
from rwkv_jax.ops import WKVState, wkv
from rwkv_jax.state import RWKVState


def _normal(rngs: nnx.Rngs, shape, std):
  # The barrier (identity) stops XLA from folding std into normal()'s own sqrt(2) factor
  # when init runs inside jit (the trainer's init on a mesh): the bits then equal the
  # eager init's.
  return std * jax.lax.optimization_barrier(jax.random.normal(rngs.params(), shape, jnp.float32))


def _token_shift(x, last):
  """x (B, T, C), last (B, C) -> the previous token's x at every position (B, T, C)."""
  return jnp.concatenate([last[:, None].astype(x.dtype), x[:, :-1]], axis=1)


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
    xx = _token_shift(x, last_x)
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
    xx = _token_shift(x, last_x)
    k = jnp.square(jax.nn.relu(self.key(_mix(x, xx, self.time_mix_k[...]))))  # B T F
    r = self.receptance(_mix(x, xx, self.time_mix_r[...]))
    return jax.nn.sigmoid(r) * self.value(k), x[:, -1]


def _dropout(x, rate: float, key):
  """Inverted dropout of x (B, T, C); the identity without a key or at rate 0."""
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0)


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
    x = x + _dropout(h, self.dropout, keys[0])
    h, ffn_x = self.ffn(self.ln2(x), state.ffn_x)
    return x + _dropout(h, self.dropout, keys[1]), RWKVState(att_x, s.num, s.den, s.max, ffn_x)


def check_tokens(tokens, vocab_size: int):
  """Rejects token ids outside [0, vocab) when the ids are concrete (JAX would clamp them).

  Under a trace the ids cannot be inspected; the embedding lookup then returns NaN for
  out-of-range ids instead of clamping, so a bad id can never pass silently.
  """
  if tokens.ndim != 2:
    raise ValueError(f"tokens must be (batch, time) integers, got shape {tokens.shape}")
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"tokens must be integers, got dtype {tokens.dtype}")
  if tokens.shape[1] < 1:
    raise ValueError("tokens must hold at least one time step")
  if isinstance(tokens, jax.core.Tracer):
    return
  ids = np.asarray(tokens)
  bad = (ids < 0) | (ids >= vocab_size)
  if bad.any():
    pos = tuple(int(i) for i in np.argwhere(bad)[0])
    raise ValueError(
        f"token id {int(ids[pos])} at position {pos} is outside the vocabulary [0, {vocab_size})")


class RWKV(nnx.Module):
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

  def embed(self, tokens):  # B T -> B T C float32
    check_tokens(tokens, self.cfg.vocab_size)
    x = jnp.take(self.emb[...], tokens, axis=0, mode="fill", fill_value=jnp.nan)
    return self.ln0(x)

  def logits(self, x):  # B T C -> B T V float32
    return matmul(self.ln_out(x), self.head[...], self.cfg.dtype)

  def forward_with_state(self, tokens, state: RWKVState | None = None, *,
                         implementation: str | None = None, dropout_key=None):
    """tokens (B, T) int -> (logits (B, T, V) float32, the state after the last token).

    ``implementation`` overrides ``cfg.wkv_impl`` for T > 1; a single token always takes
    the recurrent step. ``dropout_key`` (training only) turns on ``cfg.dropout``.
    """
    x = self.embed(tokens)
    batch, steps = tokens.shape
    if state is None:
      state = self.init_state(batch)
    elif state.att_x.shape != (self.cfg.n_layer, batch, self.cfg.n_embd):
      raise ValueError(
          f"state shape {state.att_x.shape} does not match (n_layer, batch, n_embd) = "
          f"{(self.cfg.n_layer, batch, self.cfg.n_embd)}")
    impl = "scan" if steps == 1 else (implementation or self.cfg.wkv_impl)
    keys = [None] * len(self.blocks)
    if dropout_key is not None and self.cfg.dropout > 0:
      keys = list(jax.random.split(dropout_key, len(self.blocks)))
    new_layers = []
    for i, block in enumerate(self.blocks):
      x, s = block(x, state.layer(i), impl, keys[i])
      new_layers.append(s)
    return self.logits(x), RWKVState.stack(new_layers)

  def __call__(self, tokens, *, implementation: str | None = None, dropout_key=None):
    """tokens (B, T) int -> logits (B, T, V) float32, from an empty state."""
    return self.forward_with_state(tokens, None, implementation=implementation,
                                   dropout_key=dropout_key)[0]
