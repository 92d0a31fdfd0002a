"""BlinkDL checkpoints of any family: one ``.pth`` (or ``.safetensors``) state dict.

The family is detected from the tensor names (each family's ``weights.is_family``: RWKV-4's
``blocks.N.att.time_decay``, RWKV-7's ``blocks.N.att.r_k``); the sizes come from the
shapes (``weights.infer_config``). An RWKV-4 state dict in HF naming (``rwkv.`` prefix,
e.g. a lone ``pytorch_model.bin``) is read too.
"""

from __future__ import annotations

import os

import numpy as np

from rwkv_jax.interop import _build, safe_load
from rwkv_jax.models import FAMILIES, family_module

# Keys ChatRWKV's convert_model.py adds after rewriting the tensors for inference
# (time_decay replaced by -exp(time_decay), layers pre-divided): not the trained weights.
_CONVERTED_MARKERS = ("_strategy", "_rescale_layer", "_version")


def detect_family(tensors: dict[str, np.ndarray], source: str) -> str:
  """The family whose names the tensors carry; ValueError naming what was found."""
  found = [f for f in FAMILIES if family_module(f).weights.is_family(tensors)]
  if len(found) != 1:
    what = "no" if not found else f"several ({found})"
    raise ValueError(f"{source}: {what} model family recognised from the tensor names "
                     f"(found e.g. {sorted(tensors)[:8]}); rwkv-jax reads {sorted(FAMILIES)}")
  return found[0]


def _naming(weights, tensors):
  return weights.naming(tensors) if hasattr(weights, "naming") else (lambda name: name)


def load_blinkdl(path: str | os.PathLike, **config_overrides):
  """A BlinkDL ``.pth``/``.safetensors`` file (RWKV-4 or RWKV-7 x070) -> the family's
  model (float32 parameters).

  ``config_overrides``: non-shape config fields (dtype, wkv_impl, ctx_len, ...).
  """
  path = os.fspath(path)
  tensors = safe_load.load_tensors(path)
  markers = [k for k in tensors if k in _CONVERTED_MARKERS]
  if markers:
    raise ValueError(f"{path} was rewritten by ChatRWKV's convert_model.py ({markers}); "
                     "load the original training checkpoint instead")
  weights = family_module(detect_family(tensors, path)).weights
  cfg = weights.infer_config(tensors, path, config_overrides)
  return _build.build_model(cfg, tensors, path, _naming(weights, tensors))


def save_blinkdl(model, path: str | os.PathLike, *, dtype: str = "float32",
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
