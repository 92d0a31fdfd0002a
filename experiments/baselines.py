"""Baselines for the seed benchmark: a causal pre-LN Transformer and a stacked LSTM.

Both share RWKV's input and output ends exactly (embedding U(+-1e-4) -> LN0 ... LN_out ->
head with std 0.5/sqrt(C), no biases), so in a comparison only the sequence mixer differs.
Like ``rwkv_jax.RWKV`` each model offers

  model(tokens)                          tokens (B, T) int -> logits (B, T, V) float32
  model.init_state(batch_size, ...)      the empty decode state (KV cache / LSTM (h, c))
  model.forward_with_state(tokens, st)   -> (logits (B, T, V), state after the last token)

so one decode loop drives all three. ``param_count()`` on each config is the exact count of
the module's parameters (tests check it against the built model).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rwkv_jax.layers import Dense, LayerNorm, param
from rwkv_jax.model import RWKV


def _positive_ints(obj, names):
  for name in names:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{type(obj).__name__}.{name} must be a positive integer, got {value!r}")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Pre-LN decoder: x + Attn(LN1 x), then + FFN(LN2 x); RoPE positions (no parameters, so
  any decode length works and the embedding stays RWKV's); bias-free like RWKV."""

  n_layer: int = 4
  n_embd: int = 128
  n_head: int = 4
  dim_ffn: int = 512
  vocab_size: int = 64
  dtype: str = "float32"
  layer_norm_eps: float = 1e-5
  rope_base: float = 10000.0

  def __post_init__(self):
    _positive_ints(self, ("n_layer", "n_embd", "n_head", "dim_ffn", "vocab_size"))
    if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
      raise ValueError(f"n_embd {self.n_embd} must split into {self.n_head} heads of even size")

  def param_count(self) -> int:
    """2VC (embedding, head) + 4C (LN0, LN_out) + L (4C^2 attention + 2CF FFN + 4C LNs)."""
    c, f = self.n_embd, self.dim_ffn
    return 2 * self.vocab_size * c + 4 * c + self.n_layer * (4 * c * c + 2 * c * f + 4 * c)


@dataclasses.dataclass(frozen=True)
class LSTMConfig:
  """Stacked LSTM (no residuals, as torch.nn.LSTM), one bias per gate, between LN0 and LN_out."""

  n_layer: int = 4
  n_embd: int = 128
  hidden: int = 128
  vocab_size: int = 64
  dtype: str = "float32"
  layer_norm_eps: float = 1e-5

  def __post_init__(self):
    _positive_ints(self, ("n_layer", "n_embd", "hidden", "vocab_size"))

  def param_count(self) -> int:
    """VC + 2C (embedding, LN0) + sum_l 4H(I_l + H + 1) + 2H + HV (LN_out, head)."""
    c, h, v = self.n_embd, self.hidden, self.vocab_size
    layers = sum(4 * h * ((c if i == 0 else h) + h + 1) for i in range(self.n_layer))
    return v * c + 2 * c + layers + 2 * h + h * v


def _normal(rngs: nnx.Rngs, shape, std):
  return std * jax.random.normal(rngs.params(), shape, jnp.float32)


class _TokenIO(nnx.Module):
  """RWKV's two ends: emb (V, C) -> LN0 on the way in, LN_out -> head (C_out, V) on the way out."""

  def _init_io(self, vocab: int, c_in: int, c_out: int, eps: float, rngs: nnx.Rngs):
    emb = jax.random.uniform(rngs.params(), (vocab, c_in), jnp.float32, -1e-4, 1e-4)
    self.emb = param(emb, ("vocab", "embed"))
    self.ln0 = LayerNorm(c_in, eps)
    self.ln_out = LayerNorm(c_out, eps)
    self.head = param(_normal(rngs, (c_out, vocab), 0.5 / np.sqrt(c_out)), ("embed", "vocab"))

  # RWKV's own functions (they read only emb, ln0, ln_out, head and cfg): one code path.
  embed = RWKV.embed    # tokens B T -> B T C float32 (token ids checked)
  logits = RWKV.logits  # B T C -> B T V float32

  def __call__(self, tokens, *, implementation: str | None = None):
    """tokens (B, T) int -> logits (B, T, V) float32, from an empty state.

    ``implementation`` (RWKV's WKV path) is accepted so the trainer's steps, which pass
    it, drive these models unchanged; it has no meaning here."""
    del implementation
    return self.forward_with_state(tokens, None)[0]


# ---------------------------------------------------------------- Transformer


class KVCache(NamedTuple):
  k: jax.Array    # L B H S Dh  (S = capacity)
  v: jax.Array    # L B H S Dh
  pos: jax.Array  # int32 scalar: tokens already written


def _rope(x, positions, base):
  """Rotary position embedding on x (B, H, T, Dh) at integer positions (T,)."""
  half = x.shape[-1] // 2
  freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = positions.astype(jnp.float32)[:, None] * freq  # T half
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


class Attention(nnx.Module):
  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    c, dt = cfg.n_embd, cfg.dtype
    self.cfg = cfg
    std = 1.0 / math.sqrt(c)
    self.query = Dense(_normal(rngs, (c, c), std), ("embed", "att"), dt)
    self.key = Dense(_normal(rngs, (c, c), std), ("embed", "att"), dt)
    self.value = Dense(_normal(rngs, (c, c), std), ("embed", "att"), dt)
    # Residual-branch outputs scaled down with depth (GPT-2's 1/sqrt(2L)).
    self.output = Dense(_normal(rngs, (c, c), std / math.sqrt(2 * cfg.n_layer)),
                        ("att", "embed"), dt)

  def _heads(self, x):  # B T C -> B H T Dh
    b, t, _ = x.shape
    return x.reshape(b, t, self.cfg.n_head, -1).transpose(0, 2, 1, 3)

  def __call__(self, x, k_cache, v_cache, pos):
    """x (B, T, C) at positions pos..pos+T-1; caches (B, H, S, Dh) hold positions < pos.

    Returns (out (B, T, C), k_cache, v_cache) with this chunk written at [pos, pos + T).
    Attention reads the whole capacity S, masked to key index <= query position.
    """
    b, t, c = x.shape
    positions = pos + jnp.arange(t)
    q = _rope(self._heads(self.query(x)), positions, self.cfg.rope_base)
    k = _rope(self._heads(self.key(x)), positions, self.cfg.rope_base)
    v = self._heads(self.value(x))
    k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k, pos, axis=2)
    v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v, pos, axis=2)
    scores = jnp.einsum("bhtd,bhsd->bhts", q, k_cache) / math.sqrt(q.shape[-1])
    mask = jnp.arange(k_cache.shape[2])[None, :] <= positions[:, None]  # T S
    probs = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)
    y = jnp.einsum("bhts,bhsd->bhtd", probs, v_cache).transpose(0, 2, 1, 3).reshape(b, t, c)
    return self.output(y), k_cache, v_cache


class TransformerBlock(nnx.Module):
  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    c, f, dt = cfg.n_embd, cfg.dim_ffn, cfg.dtype
    self.ln1 = LayerNorm(c, cfg.layer_norm_eps)
    self.att = Attention(cfg, rngs=rngs)
    self.ln2 = LayerNorm(c, cfg.layer_norm_eps)
    self.ffn_in = Dense(_normal(rngs, (c, f), 1.0 / math.sqrt(c)), ("embed", "mlp"), dt)
    self.ffn_out = Dense(_normal(rngs, (f, c), 1.0 / math.sqrt(f * 2 * cfg.n_layer)),
                         ("mlp", "embed"), dt)

  def __call__(self, x, k_cache, v_cache, pos):
    h, k_cache, v_cache = self.att(self.ln1(x), k_cache, v_cache, pos)
    x = x + h
    return x + self.ffn_out(jax.nn.gelu(self.ffn_in(self.ln2(x)))), k_cache, v_cache


class TransformerLM(_TokenIO):
  """Causal Transformer LM; decode keeps a fixed-capacity KV cache (see ``init_state``)."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self._init_io(cfg.vocab_size, cfg.n_embd, cfg.n_embd, cfg.layer_norm_eps, rngs)
    self.blocks = nnx.List([TransformerBlock(cfg, rngs=rngs) for _ in range(cfg.n_layer)])

  def init_state(self, batch_size: int, capacity: int) -> KVCache:
    """An empty cache for up to ``capacity`` tokens: k, v (L, B, H, S, Dh) float32, pos 0."""
    cfg = self.cfg
    shape = (cfg.n_layer, batch_size, cfg.n_head, capacity, cfg.n_embd // cfg.n_head)
    z = jnp.zeros(shape, jnp.float32)
    return KVCache(z, z, jnp.zeros((), jnp.int32))

  def forward_with_state(self, tokens, state: KVCache | None = None):
    """tokens (B, T) -> (logits (B, T, V), cache). ``None`` means a fresh cache of capacity T.

    A concrete ``pos + T`` beyond the capacity raises; under a trace the caller sizes the
    cache (dynamic_update_slice would clamp silently).
    """
    x = self.embed(tokens)
    batch, steps = tokens.shape
    if state is None:
      state = self.init_state(batch, steps)
    capacity = state.k.shape[3]
    if state.k.shape[:3] != (self.cfg.n_layer, batch, self.cfg.n_head):
      raise ValueError(f"KV cache shape {state.k.shape} does not match (n_layer, batch, "
                       f"n_head) = {(self.cfg.n_layer, batch, self.cfg.n_head)}")
    if not isinstance(state.pos, jax.core.Tracer) and int(state.pos) + steps > capacity:
      raise ValueError(f"KV cache overflow: {int(state.pos)} + {steps} tokens > capacity "
                       f"{capacity}")
    ks, vs = [], []
    for i, block in enumerate(self.blocks):
      x, k, v = block(x, state.k[i], state.v[i], state.pos)
      ks.append(k)
      vs.append(v)
    return self.logits(x), KVCache(jnp.stack(ks), jnp.stack(vs), state.pos + steps)


# ---------------------------------------------------------------- LSTM


class LSTMState(NamedTuple):
  h: jax.Array  # L B H
  c: jax.Array  # L B H


class LSTMLayer(nnx.Module):
  """Gates i, f, g, o = split(x W_x + h W_h + b); PyTorch's U(+-1/sqrt(H)) init, forget
  bias 1 (a common choice that keeps early gradients flowing)."""

  def __init__(self, n_in: int, hidden: int, dtype: str, *, rngs: nnx.Rngs):
    bound = 1.0 / math.sqrt(hidden)
    uni = lambda shape: jax.random.uniform(rngs.params(), shape, jnp.float32, -bound, bound)
    self.w_x = Dense(uni((n_in, 4 * hidden)), ("embed", "mlp"), dtype)
    self.w_h = Dense(uni((hidden, 4 * hidden)), ("embed", "mlp"), dtype)
    self.bias = param(jnp.zeros(4 * hidden).at[hidden:2 * hidden].set(1.0), ("mlp",))

  def cell(self, gx, h, c):
    """gx (B, 4H) = x W_x + b for one step; h, c (B, H) -> (h, c)."""
    i, f, g, o = jnp.split(gx + self.w_h(h), 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    return jax.nn.sigmoid(o) * jnp.tanh(c), c

  def __call__(self, x, h, c):
    """x (B, T, I) -> (hs (B, T, H), h, c). T = 1 calls the cell directly (decode)."""
    gx = self.w_x(x) + self.bias[...]  # B T 4H: the input half for all steps in one matmul
    if x.shape[1] == 1:
      h, c = self.cell(gx[:, 0], h, c)
      return h[:, None], h, c

    def step(carry, g_t):
      h, c = self.cell(g_t, *carry)
      return (h, c), h

    (h, c), hs = jax.lax.scan(step, (h, c), gx.swapaxes(0, 1))
    return hs.swapaxes(0, 1), h, c


class LSTMLM(_TokenIO):
  """Stacked LSTM LM; the decode state is (h, c) per layer, fixed size."""

  def __init__(self, cfg: LSTMConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self._init_io(cfg.vocab_size, cfg.n_embd, cfg.hidden, cfg.layer_norm_eps, rngs)
    sizes = [cfg.n_embd] + [cfg.hidden] * (cfg.n_layer - 1)
    self.layers = nnx.List([LSTMLayer(n, cfg.hidden, cfg.dtype, rngs=rngs) for n in sizes])

  def init_state(self, batch_size: int, capacity: int | None = None) -> LSTMState:
    """Zeros h, c (L, B, H); ``capacity`` is accepted for a uniform decode API and unused."""
    z = jnp.zeros((self.cfg.n_layer, batch_size, self.cfg.hidden), jnp.float32)
    return LSTMState(z, z)

  def forward_with_state(self, tokens, state: LSTMState | None = None):
    x = self.embed(tokens)
    if state is None:
      state = self.init_state(tokens.shape[0])
    elif state.h.shape != (self.cfg.n_layer, tokens.shape[0], self.cfg.hidden):
      raise ValueError(f"LSTM state shape {state.h.shape} does not match (n_layer, batch, "
                       f"hidden) = {(self.cfg.n_layer, tokens.shape[0], self.cfg.hidden)}")
    hs, cs = [], []
    for i, layer in enumerate(self.layers):
      x, h, c = layer(x, state.h[i], state.c[i])
      hs.append(h)
      cs.append(c)
    return self.logits(x), LSTMState(jnp.stack(hs), jnp.stack(cs))


def count_params(model: nnx.Module) -> int:
  """The number of scalars in the model's nnx.Param leaves."""
  return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def state_nbytes(state) -> int:
  """Bytes of a decode state's arrays (RWKVState, KVCache or LSTMState)."""
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)))
