"""train_temp's initialisation of RWKV-7 x070 (BlinkDL/RWKV-LM RWKV-v7/train_temp).

With C = n_embd, N = head_size, layer l of L, r01 = l / (L - 1) (0 when L = 1),
r10 = 1 - l / L and ddd_i = i / C, per channel i (``RWKV_Tmix_x070.__init__``):
  x_r = 1 - ddd^(0.2 r10)   x_w = 1 - ddd^(0.9 r10)   x_k = 1 - ddd^(0.7 r10)
  x_v = 1 - ddd^(0.7 r10)   x_a = 1 - ddd^(0.9 r10)   x_g = 1 - ddd^(0.2 r10)
  linear_i = i / (C - 1) - 0.5;  zigzag_i = z |z| with z = ((i mod N) - (N-1)/2) / ((N-1)/2)
  w0 = -6 + 6 (i / (C-1))^(1 + r01^0.3) + 0.5 + 2.5 zigzag
  a0 = -0.19 + 0.3 zigzag + 0.4 linear        v0 = 0.73 - 0.4 linear
  k_k = 0.71 - 0.1 linear     k_a = 1.02     r_k = -0.04 (H x N)
  w1, a1, v1, g1 = 0;  w2, a2, v2, g2 = orthogonal x 0.1 (x sqrt(d/C) if d > C)
  receptance, value ~ U(+-0.5/sqrt(C));  key ~ U(+-0.05/sqrt(C));  output = 0
  channel mix (``RWKV_CMix_x070``): x_k = 1 - ddd^(r10^4); key ~ U(+-0.5/sqrt(C)); value = 0
From ``RWKV.generate_init_weight``: emb ~ U(+-1e-4); head orthogonal with gain
0.5 sqrt(V/C) (0.5 when V <= C), i.e. entries of std ~0.5/sqrt(C);
ln_x.weight = ((l + 1) / L)^0.7, ln_x.bias = 0; every other LayerNorm 1 / 0.

One difference from running train_temp end to end, kept on purpose (RWKV7.md's rules):
``generate_init_weight`` (what ``train.py`` actually saves as rwkv-init.pth) re-draws the
2-D ``.weight`` matrices it does not zero as orthogonal ones: gain 1 for receptance, value
and ffn.key, 0.1 for att.key. The module ``__init__`` uniform ranges above are used here.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

_ORTHO_LORA_SCALE = 0.1


def _ratios(layer_id: int, n_layer: int) -> tuple[float, float]:
  """(r01, r10) = (l / (L-1), 1 - l / L); r01 is 0 for a one-layer model."""
  return layer_id / max(n_layer - 1, 1), 1.0 - layer_id / n_layer


def time_mix_init(layer_id: int, n_layer: int, n_embd: int, head_size: int
                  ) -> dict[str, np.ndarray]:
  """The time-mix vectors: the six mixes x_r..x_g, w0, a0, v0, k_k, k_a (each (C,)) and
  r_k (H, N)."""
  c, n = n_embd, head_size
  r01, r10 = _ratios(layer_id, n_layer)
  ddd = np.arange(c) / c
  i = np.arange(c)
  linear = i / (c - 1) - 0.5 if c > 1 else np.zeros(c)
  half = (n - 1) / 2
  z = ((i % n) - half) / half if n > 1 else np.zeros(c)
  zigzag = z * np.abs(z)
  www = -6.0 + 6.0 * (i / max(c - 1, 1)) ** (1.0 + r01 ** 0.3)
  return {
      "x_r": 1.0 - ddd ** (0.2 * r10),
      "x_w": 1.0 - ddd ** (0.9 * r10),
      "x_k": 1.0 - ddd ** (0.7 * r10),
      "x_v": 1.0 - ddd ** (0.7 * r10),
      "x_a": 1.0 - ddd ** (0.9 * r10),
      "x_g": 1.0 - ddd ** (0.2 * r10),
      "w0": www + 0.5 + 2.5 * zigzag,
      "a0": -0.19 + 0.3 * zigzag + 0.4 * linear,
      "v0": 0.73 - 0.4 * linear,
      "k_k": 0.71 - 0.1 * linear,
      "k_a": np.full(c, 1.02),
      "r_k": np.full((c // n, n), -0.04),
  }


def channel_mix_init(layer_id: int, n_layer: int, n_embd: int) -> np.ndarray:
  """The channel-mix token-shift mix x_k (C,)."""
  _, r10 = _ratios(layer_id, n_layer)
  return 1.0 - (np.arange(n_embd) / n_embd) ** (r10 ** 4)


def ln_x_weight(layer_id: int, n_layer: int, n_embd: int) -> np.ndarray:
  """ln_x (the per-head GroupNorm) weight: ((l + 1) / L)^0.7 on every channel."""
  return np.full(n_embd, ((layer_id + 1) / n_layer) ** 0.7)


def orthogonal(key, shape: tuple[int, int], gain: float) -> jax.Array:
  """torch.nn.init.orthogonal_: a (rows, cols) matrix with orthonormal rows (rows <= cols)
  or columns (rows > cols), times ``gain``."""
  rows, cols = shape
  q, r = jnp.linalg.qr(jax.random.normal(key, (max(rows, cols), min(rows, cols)), jnp.float32))
  q = q * jnp.sign(jnp.diagonal(r))[None, :]  # a unique, uniformly distributed Q
  return gain * (q.T if rows < cols else q)


def lora_up(key, d: int, n_embd: int) -> jax.Array:
  """The second LoRA matrix (d, C) (w2, a2, v2, g2): train_temp's ortho_init(x, 0.1)."""
  gain = math.sqrt(d / n_embd) if d > n_embd else 1.0
  return orthogonal(key, (d, n_embd), gain * _ORTHO_LORA_SCALE)


def uniform(key, shape, bound: float) -> jax.Array:
  return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def embedding(key, vocab_size: int, n_embd: int) -> jax.Array:
  """emb (V, C) ~ U(+-1e-4) (ln0 follows it)."""
  return uniform(key, (vocab_size, n_embd), 1e-4)


def head(key, vocab_size: int, n_embd: int) -> jax.Array:
  """The head in our (C, V) layout: the transpose of torch's orthogonal (V, C) weight with
  gain 0.5 sqrt(V/C) (0.5 when V <= C)."""
  gain = 0.5 * math.sqrt(vocab_size / n_embd) if vocab_size > n_embd else 0.5
  return orthogonal(key, (vocab_size, n_embd), gain).T
