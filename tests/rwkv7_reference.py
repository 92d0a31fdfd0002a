"""An independent float64 NumPy RNN of RWKV-7 x070, token by token, written from the formulas
in RWKV7.md (no rwkv_jax code). Weights: a dict of NumPy arrays under BlinkDL's x070
``.pth`` names and layouts (mixes (1, 1, C), torch Linear weights (out, in), LoRA matrices
(C, d) / (d, C), r_k (H, N)).

    logits, state = forward(weights, tokens, state=None)

tokens: a 1-D sequence of ids; logits (T, V). The state is a list per layer of
[x_att (C,), S (H, N, N) with S[h, value, key], x_ffn (C,)], BlinkDL's RNN layout.
"""

from __future__ import annotations

import numpy as np


def _vec(x):
  return np.asarray(x, np.float64).reshape(-1)


def _layer_norm(x, w, b, eps=1e-5):
  mu = x.mean()
  return (x - mu) / np.sqrt(((x - mu) ** 2).mean() + eps) * _vec(w) + _vec(b)


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def sizes(weights) -> tuple[int, int, int]:
  """(n_layer, H, N) from the names and r_k's shape."""
  n_layer = 1 + max(int(k.split(".")[1]) for k in weights if k.startswith("blocks."))
  h, n = np.shape(weights["blocks.0.att.r_k"])
  return n_layer, h, n


def empty_state(weights):
  n_layer, h, n = sizes(weights)
  c = h * n
  return [[np.zeros(c), np.zeros((h, n, n)), np.zeros(c)] for _ in range(n_layer)]


def _time_mix(p, layer, x, x_prev, S, v_first, h, n):
  f = lambda name: np.asarray(p[f"blocks.{layer}.att.{name}"], np.float64)
  xx = x_prev - x
  xr, xw, xk, xv, xa, xg = (x + xx * _vec(f(m)) for m in ("x_r", "x_w", "x_k", "x_v", "x_a",
                                                            "x_g"))
  r = f("receptance.weight") @ xr
  k = f("key.weight") @ xk
  v = f("value.weight") @ xv
  w_raw = _vec(f("w0")) + np.tanh(xw @ f("w1")) @ f("w2")
  decay = np.exp(-np.exp(-0.5) * _sigmoid(w_raw))
  if layer == 0:
    v_first = v
  else:
    v = v + (v_first - v) * _sigmoid(_vec(f("v0")) + (xv @ f("v1")) @ f("v2"))
  a = _sigmoid(_vec(f("a0")) + (xa @ f("a1")) @ f("a2"))
  g = _sigmoid(xg @ f("g1")) @ f("g2")
  kk = (k * _vec(f("k_k"))).reshape(h, n)
  kk = kk / np.maximum(np.linalg.norm(kk, axis=1, keepdims=True), 1e-12)
  k = k * (1 + (a - 1) * _vec(f("k_a")))

  rh, kh, vh, wh, ah = (z.reshape(h, n) for z in (r, k, v, decay, a))
  S = S.copy()
  y = np.zeros((h, n))
  for j in range(h):  # S_t = S (diag(w) - kk^T (a * kk)) + v^T k ;  y = S r
    transition = np.diag(wh[j]) - np.outer(kk[j], ah[j] * kk[j])
    S[j] = S[j] @ transition + np.outer(vh[j], kh[j])
    y[j] = S[j] @ rh[j]
  mu = y.mean(axis=1, keepdims=True)
  var = ((y - mu) ** 2).mean(axis=1, keepdims=True)
  y = ((y - mu) / np.sqrt(var + 64e-5)).reshape(-1) * f("ln_x.weight") + f("ln_x.bias")
  y = y + ((rh * kh * f("r_k")).sum(axis=1, keepdims=True) * vh).reshape(-1)
  return f("output.weight") @ (y * g), x, S, v_first


def _channel_mix(p, layer, x, x_prev):
  f = lambda name: np.asarray(p[f"blocks.{layer}.ffn.{name}"], np.float64)
  xk = x + (x_prev - x) * _vec(f("x_k"))
  k = np.maximum(f("key.weight") @ xk, 0.0) ** 2
  return f("value.weight") @ k, x


def forward(weights, tokens, state=None):
  """One sequence, token by token: (logits (T, V) float64, the state after the last)."""
  n_layer, h, n = sizes(weights)
  state = empty_state(weights) if state is None else [[np.array(s, np.float64) for s in layer]
                                                      for layer in state]
  emb = np.asarray(weights["emb.weight"], np.float64)
  head = np.asarray(weights["head.weight"], np.float64)
  ln = lambda name, x: _layer_norm(x, weights[f"{name}.weight"], weights[f"{name}.bias"])
  out = []
  for token in tokens:
    x = ln("blocks.0.ln0", emb[int(token)])
    v_first = None
    for i in range(n_layer):
      x_att, S, x_ffn = state[i]
      dx, x_att, S, v_first = _time_mix(weights, i, ln(f"blocks.{i}.ln1", x), x_att, S,
                                        v_first, h, n)
      x = x + dx
      dx, x_ffn = _channel_mix(weights, i, ln(f"blocks.{i}.ln2", x), x_ffn)
      x = x + dx
      state[i] = [x_att, S, x_ffn]
    out.append(head @ ln("ln_out", x))
  return np.stack(out), state
