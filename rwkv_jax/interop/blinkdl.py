"""BlinkDL RWKV-4 checkpoints: one ``.pth`` (or ``.safetensors``) state dict.

Names as written by RWKV-LM's trainer: ``emb.weight``, ``blocks.0.ln0.*``,
``blocks.N.{ln1,ln2}.*``, ``blocks.N.att.{time_decay,time_first,time_mix_k/v/r}``,
``blocks.N.att.{key,value,receptance,output}.weight``, ``blocks.N.ffn.{time_mix_k/r,
key,receptance,value}.weight``, ``ln_out.*``, ``head.weight``. The sizes come from the
shapes. A state dict in HF naming (``rwkv.`` prefix, e.g. a lone ``pytorch_model.bin``)
is read too.
"""

from __future__ import annotations

import os

import numpy as np

from rwkv_jax.interop import _build, _names, safe_load
from rwkv_jax.model import RWKV

# Keys ChatRWKV's convert_model.py adds after rewriting the tensors for inference
# (time_decay replaced by -exp(time_decay), layers pre-divided): not the trained weights.
_CONVERTED_MARKERS = ("_strategy", "_rescale_layer", "_version")


def _naming(tensors: dict[str, np.ndarray]):
  """BlinkDL name -> this file's name: identity, or HF's renaming."""
  if any(k.startswith("rwkv.") for k in tensors):
    return _names.blinkdl_to_hf
  return lambda name: name


def infer_config(tensors: dict[str, np.ndarray], source: str, overrides: dict):
  name_of = _naming(tensors)
  emb, ffn_key = name_of("emb.weight"), name_of("blocks.0.ffn.key.weight")
  absent = [n for n in (emb, ffn_key) if n not in tensors]
  if absent:
    raise ValueError(f"{source} is not an RWKV-4 checkpoint: missing {absent} "
                     f"(found e.g. {sorted(tensors)[:8]})")
  if tensors[emb].ndim != 2 or tensors[ffn_key].ndim != 2:
    raise ValueError(f"{source}: {emb} {tensors[emb].shape} and {ffn_key} "
                     f"{tensors[ffn_key].shape} must be matrices")
  layers = _names.layer_ids(tensors)
  vocab, n_embd = tensors[emb].shape
  return _build.make_config(source, overrides, n_layer=max(layers) + 1, n_embd=int(n_embd),
                            vocab_size=int(vocab), dim_ffn=int(tensors[ffn_key].shape[0]))


def load_blinkdl(path: str | os.PathLike, **config_overrides) -> RWKV:
  """A BlinkDL RWKV-4 ``.pth``/``.safetensors`` file -> RWKV (float32 parameters).

  ``config_overrides``: non-shape RWKVConfig fields (dtype, wkv_impl, ctx_len, ...).
  """
  path = os.fspath(path)
  tensors = safe_load.load_tensors(path)
  markers = [k for k in tensors if k in _CONVERTED_MARKERS]
  if markers:
    raise ValueError(f"{path} was rewritten by ChatRWKV's convert_model.py ({markers}); "
                     "load the original training checkpoint instead")
  cfg = infer_config(tensors, path, config_overrides)
  return _build.build_model(cfg, tensors, path, _naming(tensors))


def save_blinkdl(model: RWKV, path: str | os.PathLike, *, dtype: str = "float32",
                 overwrite: bool = False) -> str:
  """Writes the BlinkDL state dict: ``.pth`` via torch.save (needs torch), or
  ``.safetensors`` (no torch). dtype: float32, float16 or bfloat16."""
  path = os.fspath(path)
  if path.endswith(".safetensors"):
    from safetensors.numpy import save_file

    tensors = _build.export_tensors(model, dtype)
    _build.write_atomic(path, lambda tmp: save_file(tensors, tmp), overwrite)
    return path
  if not path.endswith(safe_load.TORCH_SUFFIXES):
    raise ValueError(f"a BlinkDL checkpoint path ends in .pth/.pt or .safetensors, got {path!r}")
  if dtype not in _build.SAVE_DTYPES:
    raise ValueError(f"unknown save dtype {dtype!r}; choose from {list(_build.SAVE_DTYPES)}")
  torch = safe_load.import_torch()
  torch_dtype = getattr(torch, dtype)
  state = {k: torch.from_numpy(v).to(torch_dtype)
           for k, v in _build.export_tensors(model, "float32").items()}
  # _use_new_zipfile_serialization is the default; protocol 2 is what weights_only reads.
  _build.write_atomic(path, lambda tmp: torch.save(state, tmp), overwrite)
  return path
