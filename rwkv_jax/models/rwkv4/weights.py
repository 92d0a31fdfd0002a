"""RWKV-4 parameter names and layouts: our NNX paths <-> BlinkDL ``.pth`` <-> HF transformers.

Our path (dotted)               BlinkDL name                  torch layout vs ours
  emb                             emb.weight                    same (V, C)
  ln0.{weight,bias}               blocks.0.ln0.{weight,bias}    same (C,)
  blocks.i.ln{1,2}.*              blocks.i.ln{1,2}.*            same (C,)
  blocks.i.att.time_mix_{k,v,r}   blocks.i.att.time_mix_{k,v,r} (1, 1, C) vs (C,)
  blocks.i.att.time_{decay,first} blocks.i.att.time_{decay,first} same (C,)
  blocks.i.ffn.time_mix_{k,r}     blocks.i.ffn.time_mix_{k,r}   (1, 1, C) vs (C,)
  blocks.i.{att,ffn}.*.kernel     blocks.i.{att,ffn}.*.weight   transposed: (out, in) vs (in, out)
  ln_out.*                        ln_out.*                      same (C,)
  head                            head.weight                   transposed: (V, C) vs (C, V)

time_decay is the log-decay in all three (the decay rate is exp(time_decay), applied as
exp(-exp(time_decay)) per token), so it is copied unchanged. HF renames the BlinkDL names:
``rwkv.`` prefix, embeddings, pre_ln, attention, feed_forward, time_mix_key/value/receptance.
"""

from __future__ import annotations

import re

import numpy as np

from rwkv_jax.models import _torch_layout

_HF_RENAMES = [  # BlinkDL piece -> HF piece, applied in order
    (re.compile(r"^emb\."), "embeddings."),
    (re.compile(r"^blocks\.0\.ln0\."), "blocks.0.pre_ln."),
    (re.compile(r"\.att\."), ".attention."),
    (re.compile(r"\.ffn\."), ".feed_forward."),
    (re.compile(r"\.time_mix_k$"), ".time_mix_key"),
    (re.compile(r"\.time_mix_v$"), ".time_mix_value"),
    (re.compile(r"\.time_mix_r$"), ".time_mix_receptance"),
]


def layout(our_name: str) -> str:
  """How the torch tensor relates to ours: "same", "T" (transposed) or "mix" ((1,1,C))."""
  if our_name == "head" or our_name.endswith(".kernel"):
    return "T"
  if ".time_mix_" in our_name:
    return "mix"
  return "same"


to_blinkdl = _torch_layout.to_blinkdl


def blinkdl_to_hf(name: str) -> str:
  if name == "head.weight":
    return name
  for pattern, repl in _HF_RENAMES:
    name = pattern.sub(repl, name)
  return "rwkv." + name


to_torch_layout, from_torch_layout, expected_torch_shape = _torch_layout.bind(layout)
layer_ids = _torch_layout.layer_ids


def naming(tensors):
  """BlinkDL name -> this file's name: identity, or HF's renaming (``rwkv.`` prefix)."""
  if any(k.startswith("rwkv.") for k in tensors):
    return blinkdl_to_hf
  return lambda name: name


def is_family(names) -> bool:
  """RWKV-4 tensors (BlinkDL or HF naming): the time-mix decay ``att.time_decay``."""
  return any(n.endswith(("att.time_decay", "attention.time_decay")) for n in names)


def infer_config(tensors: dict[str, np.ndarray], source: str, overrides: dict):
  """The RWKVConfig the tensors' shapes describe (plus non-shape ``overrides``)."""
  from rwkv_jax.interop._build import make_config
  from rwkv_jax.models.rwkv4.config import RWKVConfig

  name_of = naming(tensors)
  emb, ffn_key = name_of("emb.weight"), name_of("blocks.0.ffn.key.weight")
  absent = [n for n in (emb, ffn_key) if n not in tensors]
  if absent:
    raise ValueError(f"{source} is not an RWKV-4 checkpoint: missing {absent} "
                     f"(found e.g. {sorted(tensors)[:8]})")
  if tensors[emb].ndim != 2 or tensors[ffn_key].ndim != 2:
    raise ValueError(f"{source}: {emb} {tensors[emb].shape} and {ffn_key} "
                     f"{tensors[ffn_key].shape} must be matrices")
  layers = layer_ids(tensors)
  vocab, n_embd = tensors[emb].shape
  return make_config(RWKVConfig, source, overrides, n_layer=max(layers) + 1,
                     n_embd=int(n_embd), vocab_size=int(vocab),
                     dim_ffn=int(tensors[ffn_key].shape[0]))
