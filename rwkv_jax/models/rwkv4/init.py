"""Initialisation of arXiv 2305.13048, Appendix E.

With s = n_embd, d = dim_ffn (= 4s), L layers and layer index l in [0, L):
  time-mix   mu_k = (i/s)^(1 - l/L),  mu_v = mu_k + 0.3 l/(L-1),  mu_r = 0.5 mu_k
  channel-mix mu_k = mu_r = (i/s)^(1 - l/L)
  time_decay_i = -5 + 8 (i/(s-1))^(0.7 + 1.3 l/(L-1))      (w = exp(time_decay))
  time_first_i = 0.5 (((i + 1) mod 3) - 1) + log 0.3        (the bonus u)
  W_r, W_k, W_v of the time-mix and W'_r of the channel-mix: zero.
  W_o (time-mix) and W'_v (channel-mix): normal with gain sqrt(d/s) = 2 over the
    fan-in scale, i.e. std = sqrt(d/s) / sqrt(fan_in). The paper writes N(0, sqrt(d/s));
    we read sqrt(d/s) as the gain of the reference code's scaled init, because a raw
    std of 2 would make the first channel-mix output ~50x the embedding scale.
  Embedding U(+-1e-4) followed by LN0 (small-init embedding); LayerNorm weight 1, bias 0.
Not fixed by the paper, taken from the reference implementation's scales:
  W'_k (channel-mix key): std 1/sqrt(s). It cannot start at zero: ReLU^2 has zero
    gradient at 0, so a zero W'_k would never train.
  head: std 0.5/sqrt(s).
For L = 1 the ratio l/(L-1) is taken as 0.
"""

from __future__ import annotations

import math

import numpy as np


def _ratios(layer_id: int, n_layer: int) -> tuple[float, float]:
  """(1 - l/L, l/(L-1)) with the L = 1 case defined as (1, 0)."""
  return 1.0 - layer_id / n_layer, layer_id / max(n_layer - 1, 1)


def time_mix_init(layer_id: int, n_layer: int, n_embd: int) -> dict[str, np.ndarray]:
  """Token-shift mixes of the time-mix block: time_mix_k/v/r, each (C,)."""
  one_to_zero, zero_to_one = _ratios(layer_id, n_layer)
  base = (np.arange(n_embd) / n_embd) ** one_to_zero
  return {"time_mix_k": base, "time_mix_v": base + 0.3 * zero_to_one, "time_mix_r": 0.5 * base}


def channel_mix_init(layer_id: int, n_layer: int, n_embd: int) -> dict[str, np.ndarray]:
  """Token-shift mixes of the channel-mix block: time_mix_k/r, each (C,)."""
  one_to_zero, _ = _ratios(layer_id, n_layer)
  base = (np.arange(n_embd) / n_embd) ** one_to_zero
  return {"time_mix_k": base, "time_mix_r": base.copy()}


def time_decay_init(layer_id: int, n_layer: int, n_embd: int) -> np.ndarray:
  """The log-decay parameter (C,); the WKV decay rate is w = exp(time_decay)."""
  _, zero_to_one = _ratios(layer_id, n_layer)
  i = np.arange(n_embd) / max(n_embd - 1, 1)
  return -5.0 + 8.0 * i ** (0.7 + 1.3 * zero_to_one)


def time_first_init(n_embd: int) -> np.ndarray:
  """The bonus u (C,): a zigzag around log 0.3."""
  zigzag = 0.5 * (((np.arange(n_embd) + 1) % 3) - 1)
  return zigzag + math.log(0.3)


def output_std(n_embd: int, dim_ffn: int, fan_in: int) -> float:
  """Std of W_o and W'_v: gain sqrt(d/s) over the fan-in scale."""
  return math.sqrt(dim_ffn / n_embd) / math.sqrt(fan_in)
