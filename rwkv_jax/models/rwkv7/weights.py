"""RWKV-7 x070 parameter names and layouts: our NNX paths <-> BlinkDL ``.pth``.

Our path (dotted)                   BlinkDL name                     torch layout vs ours
  emb                                 emb.weight                       same (V, C)
  ln0.{weight,bias}                   blocks.0.ln0.{weight,bias}       same (C,)
  blocks.i.ln{1,2}.*                  blocks.i.ln{1,2}.*               same (C,)
  blocks.i.att.{x_r,x_w,x_k,x_v,x_a,x_g,w0,a0,v0,k_k,k_a}
                                      (same names)                     (1, 1, C) vs (C,)
  blocks.i.att.{w1,a1,v1,g1}          (same names)                     same (C, d)
  blocks.i.att.{w2,a2,v2,g2}          (same names)                     same (d, C)
  blocks.i.att.r_k                    blocks.i.att.r_k                 same (H, N)
  blocks.i.att.ln_x.{weight,bias}     (same names)                     same (C,)
  blocks.i.ffn.x_k                    blocks.i.ffn.x_k                 (1, 1, C) vs (C,)
  blocks.i.{att,ffn}.*.kernel         blocks.i.{att,ffn}.*.weight      transposed: (out, in) vs (in, out)
  ln_out.*                            ln_out.*                         same (C,)
  head                                head.weight                      transposed: (V, C) vs (C, V)

The LoRA matrices are raw ``nn.Parameter``s used as ``x @ w1 @ w2`` in BlinkDL's code, so
they keep their layout. Layer 0 stores v0/v1/v2 although it never uses them; so do we.
"""

from __future__ import annotations

import re
from typing import Iterable

import numpy as np

from rwkv_jax.models import _torch_layout
from rwkv_jax.models.rwkv7.config import LORA_FIELDS, RWKV7Config

# (C,) vectors that x070 files store as (1, 1, C).
_MIX = re.compile(r"\.(att\.(x_[rwkvag]|w0|a0|v0|k_k|k_a)|ffn\.x_k)$")
# Names only x070 files carry (RWKV-4 has time_mix_*, time_decay; x060 has time_maa_*).
_X070_MARKERS = (re.compile(r"^blocks\.\d+\.att\.r_k$"), re.compile(r"^blocks\.\d+\.att\.x_r$"))
# BlinkDL name of each LoRA field's first matrix: its second dim is the LoRA dim.
_LORA_TENSORS = dict(zip(LORA_FIELDS, ("w1", "a1", "v1", "g1")))


def layout(our_name: str) -> str:
  """How the torch tensor relates to ours: "same", "T" (transposed) or "mix" ((1,1,C))."""
  if our_name == "head" or our_name.endswith(".kernel"):
    return "T"
  if _MIX.search(our_name):
    return "mix"
  return "same"


to_blinkdl = _torch_layout.to_blinkdl


to_torch_layout, from_torch_layout, expected_torch_shape = _torch_layout.bind(layout)
layer_ids = _torch_layout.layer_ids


def is_family(tensor_names: Iterable[str]) -> bool:
  """True for an x070 state dict: some block carries both ``att.r_k`` and ``att.x_r``."""
  names = list(tensor_names)
  return all(any(p.match(n) for n in names) for p in _X070_MARKERS)


def _shape(tensors, name: str, source: str, ndim: int) -> tuple[int, ...]:
  if name not in tensors:
    raise ValueError(f"{source}: {name} is missing; an RWKV-7 x070 checkpoint needs it to "
                     "read the model's sizes")
  shape = tuple(np.shape(tensors[name]))
  if len(shape) != ndim:
    raise ValueError(f"{source}: {name} has shape {shape}, expected {ndim} dimensions")
  return shape


def infer_config(tensors: dict[str, np.ndarray], source: str, overrides: dict) -> RWKV7Config:
  """The config an x070 state dict describes: n_layer from the block indices; vocab and
  n_embd from emb.weight (V, C); head_size from r_k (H, N); dim_ffn from ffn.key.weight
  (F, C); the LoRA dims from w1/a1/v1/g1 (C, d). ``overrides`` may set only the non-shape
  fields (dtype, wkv_impl, ctx_len, dropout, layer_norm_eps); errors name ``source``."""
  from rwkv_jax.interop._build import check_overrides, make_config

  check_overrides(RWKV7Config, source, overrides)
  ids = layer_ids(tensors)
  if not ids:
    raise ValueError(f"{source}: no blocks.<i>.* tensors; not an RWKV-7 checkpoint")
  if ids != list(range(len(ids))):
    gaps = sorted(set(range(ids[-1] + 1)) - set(ids))
    raise ValueError(f"{source}: blocks {gaps} are missing (found blocks 0..{ids[-1]} "
                     f"except those)")
  vocab, n_embd = _shape(tensors, "emb.weight", source, 2)
  n_head, head_size = _shape(tensors, "blocks.0.att.r_k", source, 2)
  if n_head * head_size != n_embd:
    raise ValueError(
        f"{source}: blocks.0.att.r_k has shape {(n_head, head_size)} (heads H, head size N) "
        f"but H * N = {n_head * head_size} != n_embd {n_embd} from emb.weight")
  dim_ffn, c_in = _shape(tensors, "blocks.0.ffn.key.weight", source, 2)
  if c_in != n_embd:
    raise ValueError(f"{source}: blocks.0.ffn.key.weight has shape {(dim_ffn, c_in)}; "
                     f"its input size must be n_embd {n_embd}")
  lora = {}
  for field, leaf in _LORA_TENSORS.items():
    # v1 is read from layer 1 when a (pruned) file leaves out layer 0's unused one.
    layer = 1 if field == "d_mv" and f"blocks.0.att.{leaf}" not in tensors and len(ids) > 1 else 0
    c, d = _shape(tensors, f"blocks.{layer}.att.{leaf}", source, 2)
    if c != n_embd:
      raise ValueError(f"{source}: blocks.{layer}.att.{leaf} has shape {(c, d)}; its first "
                       f"dim must be n_embd {n_embd}")
    lora[field] = d
  return make_config(RWKV7Config, source, overrides, n_layer=len(ids), n_embd=n_embd,
                     vocab_size=vocab, head_size=head_size, dim_ffn=dim_ffn, **lora)
