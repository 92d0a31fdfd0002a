"""Saving and loading a recurrent state (.npz or .safetensors) tagged with the model shape.

The file holds the five RWKVState fields (each (L, B, C) float32) and metadata: a format
tag, ``RWKVConfig.shape_hash()`` and the config itself. Loading checks the hash, so a
state can never be fed to a model of another shape. Writes go to a temporary file that is
renamed into place, so a failed save never destroys an earlier file.
"""

from __future__ import annotations

import json
import os
import tempfile

import jax.numpy as jnp
import numpy as np

from rwkv_jax.config import RWKVConfig
from rwkv_jax.state import RWKVState

FORMAT = "rwkv-jax-state/1"
_META_KEY = "__metadata__"
_SUFFIXES = (".npz", ".safetensors")


def _config_of(model_or_cfg) -> RWKVConfig:
  cfg = getattr(model_or_cfg, "cfg", model_or_cfg)
  if not isinstance(cfg, RWKVConfig):
    raise ValueError(f"expected an RWKV model or an RWKVConfig, got {type(model_or_cfg).__name__}")
  return cfg


def _suffix(path) -> str:
  path = os.fspath(path)
  for suffix in _SUFFIXES:
    if path.endswith(suffix):
      return suffix
  raise ValueError(f"state file {path!r} must end in one of {_SUFFIXES}")


def _describe(cfg: dict) -> str:
  return ", ".join(f"{k}={cfg.get(k)}" for k in ("n_layer", "n_embd", "vocab_size", "dim_ffn"))


def save_state(path, state: RWKVState, model_or_cfg, *, metadata: dict | None = None) -> None:
  """Writes ``state`` for the model (or RWKVConfig) to ``path`` (*.npz or *.safetensors).

  ``metadata``: extra str -> str pairs stored alongside (e.g. a conversation id).
  """
  cfg = _config_of(model_or_cfg)
  suffix = _suffix(path)
  state = RWKVState(*state)
  want = (cfg.n_layer, cfg.n_embd)
  for name, x in zip(RWKVState._fields, state):
    if x.ndim != 3 or (x.shape[0], x.shape[2]) != want:
      raise ValueError(
          f"state.{name} has shape {x.shape}; the model needs (n_layer, batch, n_embd) with "
          f"n_layer={cfg.n_layer}, n_embd={cfg.n_embd}")
  meta = {str(k): str(v) for k, v in (metadata or {}).items()}
  meta.update(format=FORMAT, shape_hash=cfg.shape_hash(), config=json.dumps(cfg.to_dict()))
  arrays = {name: np.asarray(x, np.float32) for name, x in zip(RWKVState._fields, state)}
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


def load_state(path, model_or_cfg) -> RWKVState:
  """Reads a state saved by ``save_state`` for a model of the same shape.

  Raises ValueError naming both shapes if the file was saved for another model shape, and
  if the file is not an rwkv-jax state.
  """
  cfg = _config_of(model_or_cfg)
  arrays, meta = _read(path)
  if meta.get("format") != FORMAT:
    raise ValueError(f"{path} is not an rwkv-jax state file (format {meta.get('format')!r}, "
                     f"expected {FORMAT!r})")
  if meta.get("shape_hash") != cfg.shape_hash():
    saved = json.loads(meta.get("config", "{}"))
    raise ValueError(
        f"{path} holds a state for a model of another shape (shape hash "
        f"{meta.get('shape_hash')}: {_describe(saved)}); this model has shape hash "
        f"{cfg.shape_hash()}: {_describe(cfg.to_dict())}")
  missing = [f for f in RWKVState._fields if f not in arrays]
  if missing:
    raise ValueError(f"{path} lacks state fields {missing}")
  fields = [arrays[f] for f in RWKVState._fields]
  shapes = {x.shape for x in fields}
  if len(shapes) != 1 or fields[0].ndim != 3 or \
      (fields[0].shape[0], fields[0].shape[2]) != (cfg.n_layer, cfg.n_embd):
    raise ValueError(f"{path}: state fields have shapes {sorted(shapes)}, expected "
                     f"({cfg.n_layer}, batch, {cfg.n_embd}) each")
  return RWKVState(*(jnp.asarray(x, jnp.float32) for x in fields))
