"""Load a model from anything ``rwkv-jax`` can read: a training output directory (any
family), an HF ``RwkvForCausalLM`` directory, or a BlinkDL ``.pth`` file.

A training output directory holds ``config.json`` ({"format": "rwkv-jax", "model": ...,
"train": ...}) and orbax checkpoints under ``checkpoints/<step>``; the directory alone
rebuilds the model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

RUN_CONFIG = "config.json"
FORMAT = "rwkv-jax"


def write_run_config(out_dir, model_cfg, train_cfg) -> None:
  """Writes ``out/config.json`` atomically (model config + train config)."""
  path = Path(out_dir) / RUN_CONFIG
  data = {"format": FORMAT, "model": model_cfg.to_dict(),
          "train": None if train_cfg is None else train_cfg.to_dict()}
  tmp = path.with_name(f".{RUN_CONFIG}.tmp{os.getpid()}")
  tmp.write_text(json.dumps(data, indent=1) + "\n")
  os.replace(tmp, path)


def is_run_dir(path) -> bool:
  """True for a directory whose config.json is an rwkv-jax run config."""
  cfg = Path(path) / RUN_CONFIG
  if not cfg.is_file():
    return False
  try:
    return json.loads(cfg.read_text()).get("format") == FORMAT
  except (json.JSONDecodeError, AttributeError, OSError):
    return False


def read_run_config(out_dir) -> tuple[Any, Any]:
  """(model config of the run's family, TrainConfig or None) from ``out/config.json``;
  a model entry without "family" (runs written before RWKV-7) is RWKV-4."""
  from rwkv_jax.models import config_from_dict

  path = Path(out_dir) / RUN_CONFIG
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: not an rwkv-jax training directory")
  try:
    data = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from e
  if data.get("format") != FORMAT or "model" not in data:
    raise ValueError(f"{path} is not an rwkv-jax run config (no format={FORMAT!r})")
  train = None
  if data.get("train") is not None:
    from rwkv_jax.training.config import TrainConfig

    train = TrainConfig.from_dict(data["train"])
  return config_from_dict(data["model"]), train


def load_model(path, *, step: int | None = None, **config_overrides):
  """Returns ``(model, cfg)`` for a model of any family.

  ``path``: a training output dir (``step`` picks a checkpoint, default the latest), an HF
  directory (config.json with model_type "rwkv") or a ``.pth`` / ``.safetensors`` file;
  the last two go through ``rwkv_jax.interop.from_pretrained``. ``config_overrides``:
  non-shape config fields (dtype, wkv_impl, ctx_len, ...).
  """
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"model path not found: {path}")
  if not (path.is_dir() and is_run_dir(path)):
    if step is not None:
      raise ValueError("step= applies only to rwkv-jax training directories")
    from rwkv_jax.interop import from_pretrained  # optional part, imported on use

    loaded = from_pretrained(str(path), **config_overrides)
    return loaded, loaded.cfg
  return _load_training_dir(path, step, config_overrides)


def _load_training_dir(path: Path, step: int | None, overrides: dict):
  import jax
  from flax import nnx

  from rwkv_jax.models import abstract_model
  from rwkv_jax.training.checkpointing import Checkpointer

  cfg, train = read_run_config(path)
  if train is not None and train.tune != "full":  # LoRA / state tuning: base + adapters
    from rwkv_jax.tuning import load_tuned_model

    return load_tuned_model(path, step, **overrides)
  from rwkv_jax.interop._build import check_overrides

  check_overrides(type(cfg), str(path), overrides)
  cfg = cfg.replace(**overrides)
  abstract = abstract_model(cfg)
  graphdef, abstract_params = nnx.split(abstract, nnx.Param)
  ckpt = Checkpointer(path, create=False)
  try:
    step = ckpt.pick_step(step, path)
    # Onto one device, whatever mesh the run was trained on (orbax reshards).
    from rwkv_jax.sharding import abstract_on_device

    restored, _ = ckpt.restore(step, {"params": abstract_on_device(abstract_params)})
  finally:
    ckpt.close()
  params = jax.tree.map(jax.numpy.asarray, restored["params"])
  return nnx.merge(graphdef, params), cfg
