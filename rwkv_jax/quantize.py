"""int8 weight-only quantization for inference, any model family.

Per-output-channel symmetric int8: a matrix W (in, out) is stored as ``values`` int8
(in, out) = round(W / scale) clipped to [-127, 127] and ``scale`` float32 (out,) =
max_i |W[i, o]| / 127 (1 for an all-zero column). ``QuantizedMatrix`` stands in for the
array of an ``nnx.Param``; ``layers.matmul`` reads it as ``(x @ values) * scale``: the int8
values are converted to the compute dtype inside the matmul (exact: |v| <= 127 fits bf16's
8-bit significand) and the scale is applied to the float32 result, so no dequantized
matrix is ever stored. The model's code does not change.

What is quantized: the 2-D leaves the model class names in ``INT8_PARAMS`` (both
families: every Dense ``kernel`` — time-mix and channel-mix matrices — and the ``head``).
The embedding (a gather: one row per token, never a bandwidth cost in decoding),
LayerNorms, mixes, decays and RWKV-7's small LoRAs stay float32.

  qmodel = quantize_model(model)                         # "int8"
  save_int8(qmodel, "model.int8.safetensors")            # or save_pretrained(..., quantize="int8")
  qmodel = load_int8("model.int8.safetensors")           # from_pretrained finds it too

The file is a safetensors file in rwkv-jax's own layout (parameter paths as names, our
(in, out) layout, ``<path>.int8`` + ``<path>.scale`` for quantized matrices, float32 for
the rest) with metadata ``format = rwkv-jax-int8/1`` and the model config: rwkv-jax reads it
back (``from_pretrained``, ``load_model``, ``rwkv-jax generate --checkpoint``); BlinkDL and
HF tools do not.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

MODES = ("int8",)
FORMAT = "rwkv-jax-int8/1"
_QMAX = 127.0
# How ``QuantizedMatrix.matmul`` multiplies when x has at most SMALL_ROWS rows (decoding
# a small batch): "dot" (one dot of x and the int8 values converted to the compute dtype;
# XLA fuses the convert into the GEMM where it can) or "reduce" (x[:, :, None] * values
# summed over the input axis in float32: one reduction fusion reading the int8 values
# once). Larger inputs always use "dot". Measured equal on an H200 (RWKV-4 1.5b, batch 1:
# 2.367 vs 2.362 ms/token, experiments/RESULTS.md), so "dot" stays the default.
SMALL_ROWS = 8
SMALL_ROWS_IMPL = "dot"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedMatrix:
  """values int8 (in, out), scale float32 (out,): W ~= values * scale."""

  values: jax.Array
  scale: jax.Array

  def __getitem__(self, index):  # ``param[...]`` reads the wrapped matrix as it is
    if index is not Ellipsis:
      raise TypeError("an int8 matrix is read whole (param[...])")
    return self

  @property
  def shape(self) -> tuple[int, int]:
    return tuple(self.values.shape)

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.values.shape)) + 4 * int(np.prod(self.scale.shape))

  def matmul(self, x, dtype):
    """x (..., in) -> (..., out) float32: (x @ values) in ``dtype`` (float32
    accumulation), times the per-column scale."""
    rows = int(np.prod(x.shape[:-1]))
    if SMALL_ROWS_IMPL == "reduce" and rows <= SMALL_ROWS:
      xs = x.astype(dtype).astype(jnp.float32)[..., :, None]
      y = jnp.sum(xs * self.values.astype(jnp.float32), axis=-2)
    else:
      y = jnp.einsum("...i,io->...o", x.astype(dtype), self.values.astype(dtype),
                     preferred_element_type=jnp.float32)
    return y * self.scale

  def dequantize(self):
    return self.values.astype(jnp.float32) * self.scale


def quantize_matrix(w) -> QuantizedMatrix:
  """Per-output-channel symmetric int8 of w (in, out)."""
  w = jnp.asarray(w, jnp.float32)
  if w.ndim != 2:
    raise ValueError(f"int8 quantization takes a matrix (in, out), got shape {w.shape}")
  amax = jnp.max(jnp.abs(w), axis=0)
  scale = jnp.where(amax > 0, amax / _QMAX, 1.0).astype(jnp.float32)
  values = jnp.clip(jnp.round(w / scale), -_QMAX, _QMAX).astype(jnp.int8)
  return QuantizedMatrix(values, scale)


def _path(path) -> tuple[str, ...]:
  from rwkv_jax.lora import param_path

  return param_path(path)


def quantizable(model) -> list[tuple[str, ...]]:
  """Paths of the matrices ``quantize_model`` stores as int8 (the model's INT8_PARAMS)."""
  names = type(model).INT8_PARAMS
  params = nnx.state(model, nnx.Param)
  from rwkv_jax.layers import is_wrapped_matrix

  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_wrapped_matrix)[0]:
    key = _path(path)
    if key[-1] in names and len(leaf.shape) == 2:
      out.append(key)
  return out


def quantize_model(model, mode: str = "int8", *, paths: Sequence[str] | None = None):
  """A new model whose large matrices are int8 ``QuantizedMatrix``es (``model`` is left
  as it is). ``paths``: dotted parameter paths to quantize instead of all of
  ``INT8_PARAMS`` (each must be one of them: a path read by a gather or a vector is a
  ValueError). A matrix already wrapped by a LoRA has its base quantized."""
  from rwkv_jax.lora import LoraKernel

  if mode not in MODES:
    raise ValueError(f"unknown quantization {mode!r}; supported: {MODES}")
  allowed = {".".join(p): p for p in quantizable(model)}
  if paths is None:
    chosen = set(allowed.values())
  else:
    bad = [p for p in paths if p not in allowed]
    if bad:
      raise ValueError(
          f"cannot quantize {bad} to int8: only matrices read through layers.matmul are "
          f"supported ({sorted(type(model).INT8_PARAMS)} leaves of this "
          f"{model.cfg.family} model, e.g. {sorted(allowed)[:3]}); the embedding is a "
          "gather and vectors stay float32")
    chosen = {allowed[p] for p in paths}
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  is_wrapped = lambda x: isinstance(x, (QuantizedMatrix, LoraKernel))

  def one(path, leaf):
    if _path(path) not in chosen:
      return leaf
    if isinstance(leaf, QuantizedMatrix):
      return leaf
    if isinstance(leaf, LoraKernel):
      w = leaf.w if isinstance(leaf.w, QuantizedMatrix) else quantize_matrix(leaf.w)
      return dataclasses.replace(leaf, w=w)
    return quantize_matrix(leaf)

  params = jax.tree_util.tree_map_with_path(one, params, is_leaf=is_wrapped)
  return nnx.merge(graphdef, params, rest)


def is_quantized(model) -> bool:
  is_q = lambda x: isinstance(x, QuantizedMatrix)
  return any(is_q(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param), is_leaf=is_q))


def weight_bytes(model) -> int:
  """Bytes of the model's parameters as stored (int8 values + float32 scales count as
  such)."""
  return int(sum(x.size * x.dtype.itemsize
                 for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


# ----------------------------------------------------------------------------- files

def is_int8_file(path) -> bool:
  """True for a safetensors file written by ``save_int8`` (reads only its header)."""
  path = os.fspath(path)
  if not (path.endswith(".safetensors") and os.path.isfile(path)):
    return False
  try:
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as f:
      return (f.metadata() or {}).get("format") == FORMAT
  except Exception:  # not a readable safetensors file: not ours
    return False


def save_int8(model, path, *, overwrite: bool = False) -> str:
  """Writes ``model`` (quantized now if it is not yet) as an int8 safetensors file."""
  from safetensors.numpy import save_file

  from rwkv_jax.interop._build import write_atomic
  from rwkv_jax.lora import LoraKernel

  path = os.fspath(path)
  if not path.endswith(".safetensors"):
    raise ValueError(f"an int8 model is written as a .safetensors file, got {path!r}")
  is_wrapped = lambda x: isinstance(x, (QuantizedMatrix, LoraKernel))
  leaves = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param),
                                                is_leaf=is_wrapped)[0]
  if any(isinstance(x, LoraKernel) for _, x in leaves):
    raise ValueError("merge the LoRA adapters first (rwkv_jax.lora.merge_lora) to save "
                     "an int8 model")
  if not is_quantized(model):
    model = quantize_model(model)
    leaves = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param),
                                                  is_leaf=is_wrapped)[0]
  tensors, quantized = {}, []
  for path_, leaf in leaves:
    name = ".".join(_path(path_))
    if isinstance(leaf, QuantizedMatrix):
      tensors[name + ".int8"] = np.ascontiguousarray(np.asarray(leaf.values, np.int8))
      tensors[name + ".scale"] = np.asarray(leaf.scale, np.float32)
      quantized.append(name)
    else:
      tensors[name] = np.ascontiguousarray(np.asarray(leaf, np.float32))
  meta = {"format": FORMAT, "config": json.dumps(model.cfg.to_dict()),
          "quantized": json.dumps(quantized)}
  write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=meta), overwrite)
  return path


def load_int8(path, **config_overrides):
  """The int8 model written by ``save_int8`` (``config_overrides``: non-shape fields such
  as dtype, wkv_impl, ctx_len)."""
  from safetensors import safe_open

  from rwkv_jax.models import abstract_model, config_from_dict

  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no int8 model at {path}")
  with safe_open(path, framework="numpy") as f:
    meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
      raise ValueError(f"{path} is not an rwkv-jax int8 file (format "
                       f"{meta.get('format')!r}, expected {FORMAT!r})")
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  cfg = config_from_dict(json.loads(meta["config"]))
  fixed = sorted(set(config_overrides) & set(cfg.SHAPE_FIELDS))
  if fixed:
    raise ValueError(f"{fixed} are read from {path} and cannot be overridden")
  cfg = cfg.replace(**config_overrides)
  quantized = set(json.loads(meta.get("quantized", "[]")))
  model = abstract_model(cfg)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(params))
  filled, problems = {}, []
  for key, leaf in flat.items():
    name = ".".join(str(k) for k in key)
    if name in quantized:
      values, scale = tensors.get(name + ".int8"), tensors.get(name + ".scale")
      if values is None or scale is None or values.shape != leaf.shape \
          or scale.shape != (leaf.shape[1],) or values.dtype != np.int8:
        problems.append(name)
        continue
      filled[key] = QuantizedMatrix(jnp.asarray(values), jnp.asarray(scale, jnp.float32))
    else:
      value = tensors.get(name)
      if value is None or value.shape != leaf.shape:
        problems.append(name)
        continue
      filled[key] = jnp.asarray(value, jnp.float32)
  if problems:
    raise ValueError(f"{path} does not match its own config ({cfg.describe_shape()}): "
                     f"missing or mis-shaped {problems[:8]}")
  nnx.replace_by_pure_dict(params, traverse_util.unflatten_dict(filled))
  return nnx.merge(graphdef, params, rest)


__all__ = ["FORMAT", "MODES", "QuantizedMatrix", "is_int8_file", "is_quantized", "load_int8",
           "quantizable", "quantize_matrix", "quantize_model", "save_int8", "weight_bytes"]
