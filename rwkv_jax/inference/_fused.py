"""The decode step behind ``generate``: the model's own T = 1 forward, or the fused kernels.

``DECODE_STEPS``: "model" (``RWKV.forward_with_state`` on one token: the reference, any
batch, any device, any mesh) and "pallas" (pallas_kernels/rwkv4_decode: four kernels per
layer, for batch <= 8; interpreted off-GPU). None picks "pallas" on a GPU when the fused
step takes the batch and sizes, else "model".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rwkv_jax.state import RWKVState

DECODE_STEPS = ("model", "pallas")


def resolve_decode_step(step: str | None, cfg, batch: int, on_mesh: bool = False) -> str:
  """The step to use; ValueError for an unknown name or a fused step that cannot run."""
  from pallas_kernels import rwkv4_decode

  if step is None:
    fits = rwkv4_decode.supports(batch, cfg.n_embd, cfg.dim_ffn)
    return "pallas" if jax.default_backend() == "gpu" and fits and not on_mesh else "model"
  if step not in DECODE_STEPS:
    raise ValueError(f"unknown decode step {step!r}; choose from {DECODE_STEPS} or None")
  if step == "pallas":
    if on_mesh:
      raise ValueError("decode_step='pallas' runs on one device; use 'model' with a mesh")
    rwkv4_decode.DecodePlan.make(batch, cfg.n_embd, cfg.dim_ffn, cfg.layer_norm_eps)
  return step


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


def step_function(model, step: str, **plan_options):
  """``f(tokens (B,), state) -> (logits (B, V), state)`` for a resolved step name; the
  fused step prepares its weights here, once, outside the decode loop."""
  if step == "model":
    def run(tokens, state):
      logits, state = model.forward_with_state(tokens[:, None], state)
      return logits[:, 0], state
    return run
  layers = layer_weights(model, model.cfg.dtype)
  return lambda tokens, state: fused_forward(model, layers, tokens, state, **plan_options)
