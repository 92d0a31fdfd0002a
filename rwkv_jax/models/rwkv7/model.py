"""RWKV-7 "Goose" x070 in Flax NNX: BlinkDL's RWKV-v7 time-mix and channel-mix, one code
path for parallel mode (any T) and recurrent decoding (T = 1).

Parameter paths mirror BlinkDL's x070 names (``weights.py`` maps them): emb, ln0,
blocks[i].{ln1, ln2, att.{x_r..x_g, w0..w2, a0..a2, v0..v2, g1, g2, k_k, k_a, r_k,
receptance, key, value, output, ln_x}, ffn.{x_k, key, value}}, ln_out, head.
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from rwkv_jax.layers import Dense, LayerNorm, dropout, matmul, param, token_shift
from rwkv_jax.models.base import RecurrentLM, check_tokens, embed_tokens
from rwkv_jax.models.rwkv7 import init as x070_init
from rwkv_jax.models.rwkv7.config import RWKV7Config
from rwkv_jax.models.rwkv7.state import STATE_AXES, RWKV7State
from rwkv_jax.ops.wkv7 import wkv7

GROUP_NORM_EPS = 64e-5  # ln_x: BlinkDL's "notice eps value" (fixed in its fused kernels)
L2_NORM_EPS = 1e-12     # F.normalize's default, kept by train_temp's fused kk kernel
_MIXES = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")
_LORA = ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2")


class GroupNorm(nnx.Module):
  """ln_x: GroupNorm with one group per head (biased variance over the head's N channels),
  computed in float32, then a per-channel affine."""

  def __init__(self, weight, eps: float):
    self.weight = param(weight, ("norm",))
    self.bias = param(jnp.zeros_like(jnp.asarray(weight)), ("norm",))
    self.eps = eps

  def __call__(self, y):  # ... H N -> ... (H N) float32
    y = y.astype(jnp.float32)
    mean = y.mean(-1, keepdims=True)
    var = jnp.square(y - mean).mean(-1, keepdims=True)
    y = ((y - mean) * jax.lax.rsqrt(var + self.eps)).reshape(*y.shape[:-2], -1)
    return y * self.weight[...] + self.bias[...]


class TimeMix7(nnx.Module):
  """x070 time mix: six token-shift mixes -> r, k, v, the decay / ICLR / value-residual /
  gate LoRAs -> WKV-7 -> ln_x -> + the r_k bonus -> gate -> W_o."""

  def __init__(self, cfg: RWKV7Config, layer_id: int, *, rngs: nnx.Rngs):
    c, dt = cfg.n_embd, cfg.dtype
    # Only whether this is layer 0 (which sets v_first) is structure: layers 1..L-1 are
    # then alike and run as one scanned body (``RecurrentLM.run_layers``).
    self.sets_v_first = layer_id == 0
    self.n_head, self.head_size, self.dtype = cfg.n_head, cfg.head_size, dt
    vecs = x070_init.time_mix_init(layer_id, cfg.n_layer, c, cfg.head_size)
    for name in _MIXES:  # act on the block input x
      setattr(self, name, param(vecs[name], ("embed",)))
    for name in ("w0", "a0", "v0", "k_k", "k_a"):  # act on r/k/v-space channels
      setattr(self, name, param(vecs[name], ("att",)))
    self.r_k = param(vecs["r_k"], ("head", "head_k"))
    # LoRAs: first matrices zero, second orthogonal x 0.1. Layer 0 keeps v0/v1/v2 (unused
    # there) so x070 files round-trip.
    for first, second, d in (("w1", "w2", cfg.d_decay), ("a1", "a2", cfg.d_aaa),
                             ("v1", "v2", cfg.d_mv), ("g1", "g2", cfg.d_gate)):
      setattr(self, first, param(jnp.zeros((c, d)), ("embed", "lora")))
      setattr(self, second, param(x070_init.lora_up(rngs.params(), d, c), ("lora", "att")))
    bound = 0.5 / c ** 0.5
    self.receptance = Dense(x070_init.uniform(rngs.params(), (c, c), bound), ("embed", "att"), dt)
    self.key = Dense(x070_init.uniform(rngs.params(), (c, c), 0.1 * bound), ("embed", "att"), dt)
    self.value = Dense(x070_init.uniform(rngs.params(), (c, c), bound), ("embed", "att"), dt)
    self.output = Dense(jnp.zeros((c, c)), ("att", "embed"), dt)
    self.ln_x = GroupNorm(x070_init.ln_x_weight(layer_id, cfg.n_layer, c), GROUP_NORM_EPS)

  def _lora(self, x, first, second, inner=None):  # B T C -> B T C, in the compute dtype
    h = matmul(x, getattr(self, first)[...], self.dtype)
    return matmul(h if inner is None else inner(h), getattr(self, second)[...], self.dtype)

  def __call__(self, x, last_x, wkv_state, v_first, implementation):
    """x: (B, T, C) ln1 output; last_x (B, C); wkv_state (B, H, N, N); v_first (B, T, C),
    None in layer 0. Returns (out (B, T, C), x[:, -1], new wkv state, v_first)."""
    b, t, c = x.shape
    heads = lambda z: z.reshape(b, t, self.n_head, self.head_size)
    xx = token_shift(x, last_x) - x
    xr, xw, xk, xv, xa, xg = (x + xx * getattr(self, m)[...] for m in _MIXES)

    r = self.receptance(xr)
    k = self.key(xk)
    v = self.value(xv)
    # The clampw form: exp(-exp(w)) with w = -softplus(-w_raw) - 0.5 is this number.
    w_raw = self.w0[...] + self._lora(xw, "w1", "w2", jnp.tanh)
    decay = jnp.exp(-jnp.exp(-0.5) * jax.nn.sigmoid(w_raw))
    if self.sets_v_first:
      v_first = v
    else:
      v = v + (v_first - v) * jax.nn.sigmoid(self.v0[...] + self._lora(xv, "v1", "v2"))
    a = jax.nn.sigmoid(self.a0[...] + self._lora(xa, "a1", "a2"))  # in-context learning rate
    g = self._lora(xg, "g1", "g2", jax.nn.sigmoid)

    kk = heads(k * self.k_k[...])
    kk = kk / jnp.maximum(jnp.linalg.norm(kk, axis=-1, keepdims=True), L2_NORM_EPS)
    k = k * (1.0 + (a - 1.0) * self.k_a[...])

    r, k, v = heads(r), heads(k), heads(v)
    y, wkv_state = wkv7(r, heads(decay), k, v, -kk, kk * heads(a), wkv_state,
                        implementation=implementation)
    y = self.ln_x(y)  # B T C
    bonus = jnp.sum(r * k * self.r_k[...], axis=-1, keepdims=True) * v  # B T H N
    y = y + bonus.reshape(b, t, c)
    return self.output(y * g), x[:, -1], wkv_state, v_first


class ChannelMix7(nnx.Module):
  """x070 channel mix: token shift -> relu(x_k-mix @ W_k)^2 @ W_v (no receptance gate)."""

  def __init__(self, cfg: RWKV7Config, layer_id: int, *, rngs: nnx.Rngs):
    c, f, dt = cfg.n_embd, cfg.dim_ffn, cfg.dtype
    self.x_k = param(x070_init.channel_mix_init(layer_id, cfg.n_layer, c), ("embed",))
    self.key = Dense(x070_init.uniform(rngs.params(), (c, f), 0.5 / c ** 0.5), ("embed", "mlp"),
                     dt)
    self.value = Dense(jnp.zeros((f, c)), ("mlp", "embed"), dt)

  def __call__(self, x, last_x):
    """x: (B, T, C) ln2 output; last_x (B, C). Returns (out (B, T, C), x[:, -1])."""
    xx = token_shift(x, last_x) - x
    k = jnp.square(jax.nn.relu(self.key(x + xx * self.x_k[...])))  # B T F
    return self.value(k), x[:, -1]


class Block7(nnx.Module):
  """Pre-LN residual block: x + TimeMix7(ln1 x), then + ChannelMix7(ln2 x); with a dropout
  key each sub-block's output is dropped out before it joins the residual stream."""

  def __init__(self, cfg: RWKV7Config, layer_id: int, *, rngs: nnx.Rngs):
    self.dropout = cfg.dropout
    self.ln1 = LayerNorm(cfg.n_embd, cfg.layer_norm_eps)
    self.att = TimeMix7(cfg, layer_id, rngs=rngs)
    self.ln2 = LayerNorm(cfg.n_embd, cfg.layer_norm_eps)
    self.ffn = ChannelMix7(cfg, layer_id, rngs=rngs)

  def __call__(self, x, state: RWKV7State, v_first, implementation, dropout_key=None):
    """x (B, T, C) float32; state: this layer's (B, C), (B, H, N, N), (B, C)."""
    keys = (None, None) if dropout_key is None else jax.random.split(dropout_key)
    h, att_x, wkv_state, v_first = self.att(self.ln1(x), state.att_x, state.wkv, v_first,
                                            implementation)
    x = x + dropout(h, self.dropout, keys[0])
    h, ffn_x = self.ffn(self.ln2(x), state.ffn_x)
    x = x + dropout(h, self.dropout, keys[1])
    return x, RWKV7State(att_x, wkv_state, ffn_x), v_first


class RWKV7(RecurrentLM):
  """RWKV-7 x070 language model.

  ``model(tokens)`` -> logits (B, T, V); ``model.forward_with_state(tokens, state)`` ->
  (logits, new state) for any T >= 1 (T = 1 is a decode step, T > 1 a prefill).
  """

  # The LoRA matrices are read by matmuls too: decoding keeps them in the compute dtype.
  MATMUL_PARAMS: ClassVar[frozenset[str]] = frozenset({"kernel", "head", *_LORA})

  def __init__(self, cfg: RWKV7Config, *, rngs: nnx.Rngs):
    self.cfg = cfg
    c, v = cfg.n_embd, cfg.vocab_size
    self.emb = param(x070_init.embedding(rngs.params(), v, c), ("vocab", "embed"))
    self.ln0 = LayerNorm(c, cfg.layer_norm_eps)
    self.blocks = nnx.List([Block7(cfg, i, rngs=rngs) for i in range(cfg.n_layer)])
    self.ln_out = LayerNorm(c, cfg.layer_norm_eps)
    self.head = param(x070_init.head(rngs.params(), v, c), ("embed", "vocab"))

  def init_state(self, batch_size: int) -> RWKV7State:
    """The empty state: att_x, ffn_x (L, B, C) and wkv (L, B, H, N, N), float32 zeros."""
    cfg = self.cfg
    return RWKV7State.zeros(cfg.n_layer, batch_size, cfg.n_embd, cfg.head_size)

  def state_axes(self) -> RWKV7State:
    return STATE_AXES

  def embed(self, tokens):  # B T -> B T C float32 (after ln0)
    check_tokens(tokens, self.cfg.vocab_size)
    return self.ln0(embed_tokens(self.emb[...], tokens))

  def logits(self, x):  # B T C -> B T V float32
    return matmul(self.ln_out(x), self.head[...], self.cfg.dtype)

  def blocks_forward(self, x, state: RWKV7State, implementation, dropout_key=None):
    """x (B, T, C) after ln0 -> (x before ln_out, the new state). ``v_first`` (layer 0's
    value) is handed down the layers here; it is not part of the state."""
    # Layer 0 sets v_first, the others read it: layer 0 runs on its own, the rest as a scan.
    call = lambda block, x, s, v_first, key: block(x, s, v_first, implementation, key)
    return self.run_layers(x, state, call, first=1, dropout_key=dropout_key)

  @staticmethod
  def optimizer_rules(params):
    """train_temp's ``configure_optimizers``: weight decay only on the 2-D ``.weight``
    tensors (emb, head, receptance / key / value / output and the channel-mix key /
    value: our ``emb``, ``head`` and every Dense ``kernel``), never on the LoRAs, mixes,
    r_k or norms; att.w0 at 2x the learning rate, everything else 1x."""
    def name(path):  # the parameter's own name: the last mapping key (an nnx.State path
      # ends in the Variable's ``.value``; a pure dict's does not)
      keys = [p.key for p in path if isinstance(getattr(p, "key", None), str)]
      return keys[-1] if keys else ""

    def decays(path, x):
      return x.ndim == 2 and name(path) in ("kernel", "emb", "head")

    def lr_scale(path, x):
      return 2.0 if name(path) == "w0" else 1.0

    return (jax.tree_util.tree_map_with_path(decays, params),
            jax.tree_util.tree_map_with_path(lr_scale, params))
