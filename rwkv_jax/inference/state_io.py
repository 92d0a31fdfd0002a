"""Saving and loading a recurrent state (.npz or .safetensors) tagged with the model shape.

The file holds the state's fields by name (any family: RWKV-4's five (L, B, C) vectors,
RWKV-7's shift vectors and (L, B, H, N, N) matrices; float32) and metadata: a format tag,
the family, ``cfg.shape_hash()`` and the config itself. Loading checks family and hash, so
a state can never be fed to a model of another family or shape. Files written before
RWKV-7 (no family entry) are RWKV-4 states. Writes go to a temporary file that is renamed
into place, so a failed save never destroys an earlier file.
"""

from __future__ import annotations

import json
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from rwkv_jax.models.base import FamilyConfig
from rwkv_jax.state import check_state, expected_state

FORMAT = "rwkv-jax-state/1"
_META_KEY = "__metadata__"
_SUFFIXES = (".npz", ".safetensors")


def _model_of(model_or_cfg):
  """A model (or the shapes-only model of a family config)."""
  if isinstance(model_or_cfg, FamilyConfig):
    from rwkv_jax.models import abstract_model

    return abstract_model(model_or_cfg)
  if not (hasattr(model_or_cfg, "init_state")
          and isinstance(getattr(model_or_cfg, "cfg", None), FamilyConfig)):
    raise ValueError(f"expected a model of an rwkv_jax family or its config, got "
                     f"{type(model_or_cfg).__name__}")
  return model_or_cfg


def _suffix(path) -> str:
  path = os.fspath(path)
  for suffix in _SUFFIXES:
    if path.endswith(suffix):
      return suffix
  raise ValueError(f"state file {path!r} must end in one of {_SUFFIXES}")


def _describe(cfg: dict) -> str:
  cfg = dict(cfg)
  family = cfg.pop("family", "rwkv4")
  try:
    from rwkv_jax.models import config_from_dict

    return config_from_dict({"family": family, **cfg}).describe_shape()
  except (ValueError, TypeError):
    return f"family={family}, " + ", ".join(f"{k}={v}" for k, v in sorted(cfg.items()))


def save_state(path, state, model_or_cfg, *, metadata: dict | None = None) -> None:
  """Writes ``state`` (a state of the model, any batch) to ``path`` (*.npz or
  *.safetensors). ``metadata``: extra str -> str pairs stored alongside (e.g. a
  conversation id)."""
  model = _model_of(model_or_cfg)
  cfg = model.cfg
  suffix = _suffix(path)
  leaves = jax.tree.leaves(state)
  if not leaves or jnp.ndim(leaves[0]) < 2:
    raise ValueError(f"not a {cfg.family} state: {type(state).__name__}")
  state = check_state(model, state, int(jnp.shape(leaves[0])[1]))
  meta = {str(k): str(v) for k, v in (metadata or {}).items()}
  meta.update(format=FORMAT, family=cfg.family, shape_hash=cfg.shape_hash(),
              config=json.dumps(cfg.to_dict()))
  arrays = {name: np.asarray(x, np.float32) for name, x in zip(state._fields, state)}
  directory = os.path.dirname(os.path.abspath(os.fspath(path)))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".state-", suffix=suffix, dir=directory)
  try:
    with os.fdopen(fd, "wb") as f:
      if suffix == ".npz":
        np.savez(f, **arrays, **{_META_KEY: np.array(json.dumps(meta))})
      else:
        from safetensors.numpy import save

        f.write(save(arrays, metadata=meta))
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _read(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  suffix = _suffix(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"state file not found: {path}")
  if suffix == ".npz":
    with np.load(path, allow_pickle=False) as data:
      arrays = {k: data[k] for k in data.files}
    meta = json.loads(str(arrays.pop(_META_KEY))) if _META_KEY in arrays else {}
  else:
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="numpy") as f:
      meta = dict(f.metadata() or {})
      arrays = {k: f.get_tensor(k) for k in f.keys()}
  return arrays, meta


def read_state_metadata(path) -> dict[str, str]:
  """The metadata stored with a state file (format, shape_hash, config, user entries)."""
  return _read(path)[1]


def load_state(path, model_or_cfg):
  """Reads a state saved by ``save_state`` for a model of the same family and shape.

  Raises ValueError naming both families / shapes if the file was saved for another
  model, and if the file is not an rwkv-jax state.
  """
  model = _model_of(model_or_cfg)
  cfg = model.cfg
  arrays, meta = _read(path)
  if meta.get("format") != FORMAT:
    raise ValueError(f"{path} is not an rwkv-jax state file (format {meta.get('format')!r}, "
                     f"expected {FORMAT!r})")
  saved = json.loads(meta.get("config", "{}"))
  family = meta.get("family", saved.get("family", "rwkv4"))
  if family != cfg.family or meta.get("shape_hash") != cfg.shape_hash():
    what = "family" if family != cfg.family else "shape"
    raise ValueError(
        f"{path} holds a state for a model of another {what} ({_describe(saved)}; shape "
        f"hash {meta.get('shape_hash')}); this model is {cfg.describe_shape()} (shape hash "
        f"{cfg.shape_hash()})")
  state_type = type(expected_state(model, 1))
  fields = state_type._fields
  missing = [f for f in fields if f not in arrays]
  if missing:
    raise ValueError(f"{path} lacks state fields {missing}")
  first = arrays[fields[0]]
  if first.ndim < 2:
    raise ValueError(f"{path}: state field {fields[0]} has shape {first.shape}, expected "
                     "(n_layer, batch, ...)")
  state = state_type(*(arrays[f] for f in fields))
  try:
    return check_state(model, state, int(first.shape[1]))
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None
