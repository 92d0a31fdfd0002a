"""Filling a model of any family from torch-layout tensors and reading them back out.

A family's ``weights`` module (``rwkv_jax/models/<family>/weights.py``) maps our parameter
paths to the file's names and layouts: ``to_blinkdl``, ``to_torch_layout``,
``from_torch_layout``, ``expected_torch_shape``. Nothing here names a parameter.
"""

from __future__ import annotations

import os
from typing import Callable

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx, traverse_util

from rwkv_jax.models import abstract_model, family_module

SAVE_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
_SHOWN = 20  # names listed per kind of problem in an error


def _dotted(path) -> str:
  return ".".join(str(p) for p in path)


def _split_abstract(cfg):
  """The model's structure without computing its random init (shapes only)."""
  return nnx.split(abstract_model(cfg), nnx.Param, ...)


def _listing(kind: str, items: list[str]) -> str:
  more = f" ... and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
  return f"{kind} ({len(items)}): " + ", ".join(items[:_SHOWN]) + more


def build_model(cfg, tensors: dict[str, np.ndarray], source: str,
                name_of: Callable[[str], str] = lambda n: n):
  """tensors: file name -> float32 array in torch layout. ``name_of`` maps a BlinkDL name
  to the file's naming (identity for BlinkDL, RWKV-4's ``blinkdl_to_hf`` for HF).

  Every expected tensor must be present with its shape, and nothing else: otherwise one
  ValueError lists all missing, mis-shaped and unexpected tensors.
  """
  names = family_module(cfg.family).weights
  graphdef, params, rest = _split_abstract(cfg)
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(params))
  missing, misshaped, filled, used = [], [], {}, set()
  for path, leaf in flat.items():
    ours = _dotted(path)
    name = name_of(names.to_blinkdl(ours))
    used.add(name)
    if name not in tensors:
      missing.append(name)
      continue
    value = names.from_torch_layout(ours, tensors[name], leaf.shape)
    if value is None:
      want = names.expected_torch_shape(ours, leaf.shape)
      misshaped.append(f"{name} {tuple(tensors[name].shape)} (expected {want})")
      continue
    filled[path] = jnp.asarray(value, jnp.float32)
  unexpected = sorted(set(tensors) - used)
  problems = [_listing(kind, items) for kind, items in
              (("missing", missing), ("mis-shaped", misshaped), ("unexpected", unexpected))
              if items]
  if problems:
    raise ValueError(
        f"{source} does not match an {cfg.family} model with {cfg.describe_shape()}:\n  "
        + "\n  ".join(problems))
  nnx.replace_by_pure_dict(params, traverse_util.unflatten_dict(filled))
  return nnx.merge(graphdef, params, rest)


def export_tensors(model, dtype: str = "float32",
                   name_of: Callable[[str], str] = lambda n: n) -> dict[str, np.ndarray]:
  """The model's parameters in torch layout, BlinkDL names mapped through ``name_of``."""
  names = family_module(model.cfg.family).weights
  if dtype not in SAVE_DTYPES:
    raise ValueError(f"unknown save dtype {dtype!r}; choose from {list(SAVE_DTYPES)}")
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  out = {}
  for path, value in flat.items():
    ours = _dotted(path)
    array = names.to_torch_layout(ours, np.asarray(value, np.float32))
    out[name_of(names.to_blinkdl(ours))] = np.ascontiguousarray(array.astype(SAVE_DTYPES[dtype]))
  return out


def check_overrides(config_class, source: str, overrides: dict) -> None:
  """User overrides may set only non-shape fields: shapes come from the checkpoint."""
  fixed = sorted(set(overrides) & set(config_class.SHAPE_FIELDS))
  if fixed:
    raise ValueError(f"{fixed} are read from {source} and cannot be overridden")


def make_config(config_class, source: str, overrides: dict, **fields):
  """A family config from the checkpoint's fields plus user overrides of the non-shape
  fields (dtype, wkv_impl, ctx_len, ...)."""
  check_overrides(config_class, source, overrides)
  return config_class(**{**fields, **overrides})


def _file_mode() -> int:
  """What ``open()`` would give a new file: 0o666 less the process umask."""
  umask = os.umask(0)
  os.umask(umask)
  return 0o666 & ~umask


def write_atomic(path: str, write: Callable[[str], None], overwrite: bool) -> None:
  """write(tmp_path) then rename over ``path``: a failed save never leaves half a file, and
  an existing file is replaced only when asked."""
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    write(tmp)
    if os.path.isfile(tmp):
      os.chmod(tmp, _file_mode())  # some writers create 0600 files; a model is shared
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
