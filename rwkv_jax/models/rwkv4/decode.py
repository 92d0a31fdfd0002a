"""RWKV-4's decode steps: the model's own T = 1 forward, or the fused kernels.

``DECODE_STEPS``: "model" (``RWKV.forward_with_state`` on one token: the reference, any
batch, any device, any mesh) and "pallas" (pallas_kernels/rwkv4_decode: four kernels per
layer, for batch <= 8; interpreted off-GPU). By default ``generate`` picks "pallas" on a
GPU when the fused step takes the batch and sizes, else "model".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rwkv_jax.models.rwkv4.state import RWKVState

DECODE_STEPS = ("model", "pallas")


def default_step(cfg, batch: int) -> str:
  """"pallas" on a GPU when the fused step takes the batch and sizes, else "model"."""
  from pallas_kernels import rwkv4_decode

  fits = rwkv4_decode.supports(batch, cfg.n_embd, cfg.dim_ffn)
  return "pallas" if jax.default_backend() == "gpu" and fits else "model"


def check_step(cfg, step: str, batch: int) -> None:
  """ValueError when the fused step cannot take this batch or these sizes."""
  if step == "pallas":
    from pallas_kernels import rwkv4_decode

    rwkv4_decode.DecodePlan.make(batch, cfg.n_embd, cfg.dim_ffn, cfg.layer_norm_eps)


def layer_weights(model, dtype) -> list:
  """Every block's parameters as ``rwkv4_decode.LayerWeights``: matrices transposed to
  (out, in) and cast to the compute dtype once per decode call, vectors float32."""
  from pallas_kernels.rwkv4_decode import LayerWeights

  mat = lambda dense: dense.kernel[...].T.astype(dtype)
  vec = lambda p: jnp.asarray(p[...], jnp.float32)
  out = []
  for blk in model.blocks:
    att, ffn = blk.att, blk.ffn
    out.append(LayerWeights(
        ln1_w=vec(blk.ln1.weight), ln1_b=vec(blk.ln1.bias),
        att_mix_k=vec(att.time_mix_k), att_mix_v=vec(att.time_mix_v),
        att_mix_r=vec(att.time_mix_r),
        att_key=mat(att.key), att_value=mat(att.value), att_receptance=mat(att.receptance),
        att_output=mat(att.output),
        decay=jnp.exp(vec(att.time_decay)), first=vec(att.time_first),
        ln2_w=vec(blk.ln2.weight), ln2_b=vec(blk.ln2.bias),
        ffn_mix_k=vec(ffn.time_mix_k), ffn_mix_r=vec(ffn.time_mix_r),
        ffn_key=mat(ffn.key), ffn_receptance=mat(ffn.receptance), ffn_value=mat(ffn.value)))
  return out


def fused_forward(model, layers, tokens, state: RWKVState, **plan_options):
  """One token per sequence through the fused kernels.

  tokens (B,) int; layers from ``layer_weights``; state fields (L, B, C).
  Returns (logits (B, V) float32, the new state), as ``model.forward_with_state``.
  """
  from pallas_kernels import rwkv4_decode

  cfg = model.cfg
  plan = rwkv4_decode.DecodePlan.make(tokens.shape[0], cfg.n_embd, cfg.dim_ffn,
                                      cfg.layer_norm_eps, **plan_options)
  interpret = jax.default_backend() != "gpu"
  x = model.embed(tokens[:, None])[:, 0]  # B C
  per_layer = []
  for i, lw in enumerate(layers):
    x, fields = rwkv4_decode.block_step(plan, i, lw, x, state, interpret=interpret)
    per_layer.append(fields)
  state = RWKVState(*(jnp.stack(f) for f in zip(*per_layer)))
  return model.logits(x[:, None])[:, 0], state


def fused_step_function(model, **plan_options):
  """``f(tokens (B,), state) -> (logits (B, V), state)`` through the fused kernels; the
  weights are prepared here, once, outside the decode loop."""
  layers = layer_weights(model, model.cfg.dtype)
  return lambda tokens, state: fused_forward(model, layers, tokens, state, **plan_options)
