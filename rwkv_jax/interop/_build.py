"""Filling an RWKV model from torch-layout tensors and reading them back out."""

from __future__ import annotations

import os
from typing import Callable

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx, traverse_util

from rwkv_jax.config import RWKVConfig
from rwkv_jax.interop import _names
from rwkv_jax.model import RWKV

SAVE_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
_SHOWN = 20  # names listed per kind of problem in an error


def _dotted(path) -> str:
  return ".".join(str(p) for p in path)


def _split_abstract(cfg: RWKVConfig):
  """The model's structure without computing its random init (shapes only)."""
  abstract = nnx.eval_shape(lambda: RWKV(cfg, rngs=nnx.Rngs(0)))
  return nnx.split(abstract, nnx.Param, ...)


def _listing(kind: str, items: list[str]) -> str:
  more = f" ... and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
  return f"{kind} ({len(items)}): " + ", ".join(items[:_SHOWN]) + more


def build_model(cfg: RWKVConfig, tensors: dict[str, np.ndarray], source: str,
                name_of: Callable[[str], str] = lambda n: n) -> RWKV:
  """tensors: file name -> float32 array in torch layout. ``name_of`` maps a BlinkDL name
  to the file's naming (identity for BlinkDL, ``blinkdl_to_hf`` for HF).

  Every expected tensor must be present with its shape, and nothing else: otherwise one
  ValueError lists all missing, mis-shaped and unexpected tensors.
  """
  graphdef, params, rest = _split_abstract(cfg)
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(params))
  missing, misshaped, filled, used = [], [], {}, set()
  for path, leaf in flat.items():
    ours = _dotted(path)
    name = name_of(_names.to_blinkdl(ours))
    used.add(name)
    if name not in tensors:
      missing.append(name)
      continue
    value = _names.from_torch_layout(ours, tensors[name], leaf.shape)
    if value is None:
      want = _names.expected_torch_shape(ours, leaf.shape)
      misshaped.append(f"{name} {tuple(tensors[name].shape)} (expected {want})")
      continue
    filled[path] = jnp.asarray(value, jnp.float32)
  unexpected = sorted(set(tensors) - used)
  problems = [_listing(kind, items) for kind, items in
              (("missing", missing), ("mis-shaped", misshaped), ("unexpected", unexpected))
              if items]
  if problems:
    raise ValueError(
        f"{source} does not match an RWKV-4 model with n_layer={cfg.n_layer}, "
        f"n_embd={cfg.n_embd}, vocab_size={cfg.vocab_size}, dim_ffn={cfg.dim_ffn}:\n  "
        + "\n  ".join(problems))
  nnx.replace_by_pure_dict(params, traverse_util.unflatten_dict(filled))
  return nnx.merge(graphdef, params, rest)


def export_tensors(model: RWKV, dtype: str = "float32",
                   name_of: Callable[[str], str] = lambda n: n) -> dict[str, np.ndarray]:
  """The model's parameters in torch layout, BlinkDL names mapped through ``name_of``."""
  if dtype not in SAVE_DTYPES:
    raise ValueError(f"unknown save dtype {dtype!r}; choose from {list(SAVE_DTYPES)}")
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  out = {}
  for path, value in flat.items():
    ours = _dotted(path)
    array = _names.to_torch_layout(ours, np.asarray(value, np.float32))
    out[name_of(_names.to_blinkdl(ours))] = np.ascontiguousarray(array.astype(SAVE_DTYPES[dtype]))
  return out


def layer_norms(model: RWKV) -> dict[str, object]:
  """Our LayerNorm modules by path: ln0, blocks.i.ln1, blocks.i.ln2, ln_out."""
  norms = {"ln0": model.ln0}
  for i, block in enumerate(model.blocks):
    norms[f"blocks.{i}.ln1"] = block.ln1
    norms[f"blocks.{i}.ln2"] = block.ln2
  norms["ln_out"] = model.ln_out
  return norms


_SHAPE_FIELDS = ("n_layer", "n_embd", "vocab_size", "dim_ffn")


def make_config(source: str, overrides: dict, **fields) -> RWKVConfig:
  """RWKVConfig from the checkpoint's fields plus user overrides of the non-shape fields
  (dtype, wkv_impl, ctx_len, ...): shapes always come from the checkpoint."""
  fixed = sorted(set(overrides) & set(_SHAPE_FIELDS))
  if fixed:
    raise ValueError(f"{fixed} are read from {source} and cannot be overridden")
  return RWKVConfig(**{**fields, **overrides})


def write_atomic(path: str, write: Callable[[str], None], overwrite: bool) -> None:
  """write(tmp_path) then rename over ``path``: a failed save never leaves half a file, and
  an existing file is replaced only when asked."""
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    write(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
