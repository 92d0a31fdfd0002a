"""Released weights in and out: BlinkDL files (RWKV-4 and RWKV-7 x070), HF transformers
directories (RWKV-4), rwkv-jax training directories (any family).

  from_pretrained(path)         a training run dir, an HF dir (config.json +
                                model.safetensors / pytorch_model.bin, sharded or not) or a
                                BlinkDL .pth / .safetensors -> the family's model (the family
                                is detected from config.json or the tensor names)
  save_pretrained(model, path)  a directory -> HF dir (RWKV-4); a *.pth / *.safetensors ->
                                BlinkDL file (any family)

All parameters load as float32 whatever the file's dtype (float32/float16/bfloat16).
PyTorch pickles are read only through ``safe_load`` (torch imported only then).
"""

from __future__ import annotations

import importlib
import os

# Loaders import JAX and the model code: on first use (``rwkv-jax convert --help`` loads
# this package to register its command).
_LAZY = {
    "detect_family": "rwkv_jax.interop.blinkdl", "load_blinkdl": "rwkv_jax.interop.blinkdl",
    "save_blinkdl": "rwkv_jax.interop.blinkdl",
    "UnsafeCheckpointError": "rwkv_jax.interop.safe_load",
    "load_tensors": "rwkv_jax.interop.safe_load",
    "is_hf_dir": "rwkv_jax.models.rwkv4.hf", "load_hf": "rwkv_jax.models.rwkv4.hf",
    "save_hf": "rwkv_jax.models.rwkv4.hf",
}


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'rwkv_jax.interop' has no attribute {name!r}")

_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")


def detect_format(path: str | os.PathLike) -> str | None:
  """"run" for an rwkv-jax training directory, "hf" for an HF directory, "blinkdl" for a
  tensor file, None for anything else."""
  from rwkv_jax.checkpoint import is_run_dir
  from rwkv_jax.models.rwkv4.hf import is_hf_dir

  path = os.fspath(path)
  if os.path.isdir(path):
    if is_run_dir(path):
      return "run"
    return "hf" if is_hf_dir(path) else None
  if os.path.isfile(path) and path.endswith(_FILE_SUFFIXES):
    return "blinkdl"
  return None


def from_pretrained(path: str | os.PathLike, *, hf_eval_rescale: bool = True,
                    **config_overrides):
  """A checkpoint -> the family's model (``RWKV`` or ``RWKV7``; its config is ``model.cfg``).

  Args:
    path: an rwkv-jax training directory (its latest checkpoint), an HF
      ``RwkvForCausalLM`` directory (RWKV-4) or a BlinkDL ``.pth``/``.safetensors`` file
      (RWKV-4 or RWKV-7 x070, told apart by the tensor names).
    hf_eval_rescale: for HF directories, reproduce HF's eval-mode ``rescale_every``
      numerics exactly (see ``rwkv_jax.models.rwkv4.hf``); False gives the un-rescaled
      model.
    config_overrides: non-shape config fields, e.g. ``dtype="bfloat16"``,
      ``wkv_impl="scan"``, ``ctx_len=4096``.
  """
  from rwkv_jax.interop.blinkdl import load_blinkdl
  from rwkv_jax.models.rwkv4.hf import load_hf

  fmt = detect_format(path)
  if fmt == "run":
    from rwkv_jax.checkpoint import load_model

    return load_model(path, **config_overrides)[0]
  if fmt == "hf":
    return load_hf(path, hf_eval_rescale=hf_eval_rescale, **config_overrides)
  if fmt == "blinkdl":
    from rwkv_jax import quantize

    if quantize.is_int8_file(path):  # rwkv-jax's int8 file (save_pretrained quantize=)
      return quantize.load_int8(path, **config_overrides)
    return load_blinkdl(path, **config_overrides)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no checkpoint at {path}")
  raise ValueError(f"{path} is neither an HF RWKV directory (with config.json) nor a "
                   f"tensor file ({', '.join(_FILE_SUFFIXES)})")


def save_pretrained(model, path: str | os.PathLike, *, dtype: str = "float32",
                    rescale_every: int | None = None, overwrite: bool = False,
                    quantize: str | None = None) -> str:
  """Writes ``model``: a ``*.pth``/``*.pt``/``*.safetensors`` path gets a BlinkDL state
  dict (any family), any other path an HF directory (config.json + model.safetensors;
  RWKV-4 only: transformers has no RWKV-7). dtype: float32, float16 or bfloat16.
  ``rescale_every`` (HF only, None = what the model encodes). ``quantize="int8"``: a
  ``*.safetensors`` file in rwkv-jax's int8 layout (``rwkv_jax.quantize``: int8 matrices +
  float32 scales; read back by ``from_pretrained``, not by BlinkDL or HF tools)."""
  from rwkv_jax import quantize as q
  from rwkv_jax.interop.blinkdl import save_blinkdl
  from rwkv_jax.models.rwkv4.hf import save_hf

  target = os.fspath(path)
  if quantize is not None or q.is_quantized(model):
    if quantize not in (None, *q.MODES):
      raise ValueError(f"unknown quantize={quantize!r}; supported: {q.MODES}")
    if not target.endswith(".safetensors"):
      raise ValueError(f"an int8 model is saved as a .safetensors file (rwkv-jax's int8 "
                       f"layout), got {target!r}")
    if dtype != "float32" or rescale_every is not None:
      raise ValueError("dtype / rescale_every do not apply to an int8 file")
    return q.save_int8(model, target, overwrite=overwrite)
  if target.endswith((".pth", ".pt", ".safetensors")):
    if rescale_every is not None:
      raise ValueError("rescale_every is an HF config field; BlinkDL files have none")
    return save_blinkdl(model, target, dtype=dtype, overwrite=overwrite)
  if model.cfg.family != "rwkv4":
    raise ValueError(f"HF transformers directories hold RWKV-4 models only; save this "
                     f"{model.cfg.family} model as a BlinkDL .pth or .safetensors file")
  return save_hf(model, target, dtype=dtype, rescale_every=rescale_every, overwrite=overwrite)


__all__ = ["detect_format", "from_pretrained", "save_pretrained", *_LAZY]
