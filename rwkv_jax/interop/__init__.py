"""Released RWKV-4 weights in and out: HF transformers directories and BlinkDL files.

  from_pretrained(path)         HF dir (config.json + model.safetensors / pytorch_model.bin,
                                sharded or not) or a BlinkDL .pth / .safetensors -> RWKV
  save_pretrained(model, path)  a directory -> HF dir; a *.pth / *.safetensors -> BlinkDL file

All parameters load as float32 whatever the file's dtype (float32/float16/bfloat16).
PyTorch pickles are read only through ``safe_load`` (torch imported only then).
"""

from __future__ import annotations

import os

from rwkv_jax.interop.blinkdl import load_blinkdl, save_blinkdl
from rwkv_jax.interop.hf import is_hf_dir, load_hf, save_hf
from rwkv_jax.interop.safe_load import UnsafeCheckpointError, load_tensors
from rwkv_jax.model import RWKV

_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")


def detect_format(path: str | os.PathLike) -> str | None:
  """"hf" for an HF directory, "blinkdl" for a tensor file, None for anything else."""
  path = os.fspath(path)
  if os.path.isdir(path):
    return "hf" if is_hf_dir(path) else None
  if os.path.isfile(path) and path.endswith(_FILE_SUFFIXES):
    return "blinkdl"
  return None


def from_pretrained(path: str | os.PathLike, *, hf_eval_rescale: bool = True,
                    **config_overrides) -> RWKV:
  """A released RWKV-4 checkpoint -> ``RWKV`` (its config is ``model.cfg``).

  Args:
    path: an HF ``RwkvForCausalLM`` directory or a BlinkDL ``.pth``/``.safetensors`` file.
    hf_eval_rescale: for HF directories, reproduce HF's eval-mode ``rescale_every``
      numerics exactly (see ``rwkv_jax.interop.hf``); False gives the un-rescaled model.
    config_overrides: non-shape RWKVConfig fields, e.g. ``dtype="bfloat16"``,
      ``wkv_impl="scan"``, ``ctx_len=4096``.
  """
  fmt = detect_format(path)
  if fmt == "hf":
    return load_hf(path, hf_eval_rescale=hf_eval_rescale, **config_overrides)
  if fmt == "blinkdl":
    return load_blinkdl(path, **config_overrides)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no checkpoint at {path}")
  raise ValueError(f"{path} is neither an HF RWKV directory (with config.json) nor a "
                   f"tensor file ({', '.join(_FILE_SUFFIXES)})")


def save_pretrained(model: RWKV, path: str | os.PathLike, *, dtype: str = "float32",
                    rescale_every: int | None = None, overwrite: bool = False) -> str:
  """Writes ``model``: a ``*.pth``/``*.pt``/``*.safetensors`` path gets a BlinkDL state
  dict, any other path an HF directory (config.json + model.safetensors). dtype: float32,
  float16 or bfloat16. ``rescale_every`` (HF only, None = what the model encodes)."""
  target = os.fspath(path)
  if target.endswith((".pth", ".pt", ".safetensors")):
    if rescale_every is not None:
      raise ValueError("rescale_every is an HF config field; BlinkDL files have none")
    return save_blinkdl(model, target, dtype=dtype, overwrite=overwrite)
  return save_hf(model, target, dtype=dtype, rescale_every=rescale_every, overwrite=overwrite)


__all__ = [
    "UnsafeCheckpointError", "detect_format", "from_pretrained", "load_blinkdl", "load_hf",
    "load_tensors", "save_blinkdl", "save_hf", "save_pretrained",
]
