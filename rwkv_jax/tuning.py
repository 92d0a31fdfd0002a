"""Tuned runs: what LoRA and state tuning leave behind, and how it is read back.

A tuned run (``rwkv-jax train --init-from BASE --lora-rank R`` or ``--tune state``) is an
ordinary run folder whose checkpoints hold only the trained part (the adapters, or the
initial state as a dict of its fields) and its optimizer state, never the base weights.
Its ``config.json`` names the base (``train.init_from``) and the tuning; every checkpoint's
meta item carries ``tuning``: the kind, the LoRA spec and the **base fingerprint**, a hash
of the base's parameter paths, shapes and a strided sample of its float32 values (exact,
so it is the same on any device). An adapter or state is only ever used with a base of the
same fingerprint (ValueError otherwise, naming both).

State tuning also writes ``OUT/state.safetensors`` at every checkpoint: a
``rwkv_jax.inference.save_state`` file (batch 1) with ``base_fingerprint`` in its metadata,
for ``rwkv-jax generate --state FILE`` and ``ChatSession(initial_state=...)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

KINDS = ("full", "lora", "state")
STATE_FILE = "state.safetensors"
FINGERPRINT_SAMPLES = 256  # values sampled per parameter


# ----------------------------------------------------------------------------- fingerprint

def base_fingerprint(model_or_params) -> str:
  """A 16-hex-digit hash of a model's parameters: every path and shape, and
  ``FINGERPRINT_SAMPLES`` values per parameter taken at a fixed stride (first included).
  Exact (no reductions), so the same on CPU, GPU or a mesh. The float32 weights must be
  plain arrays (fingerprint a base before applying adapters or quantizing it)."""
  from rwkv_jax.layers import is_wrapped_matrix
  from rwkv_jax.lora import param_path

  params = model_or_params
  if isinstance(params, nnx.Module):
    params = nnx.state(params, nnx.Param)
  leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_wrapped_matrix)[0]
  h = hashlib.sha256()
  for path, leaf in sorted(leaves, key=lambda kv: param_path(kv[0])):
    name = ".".join(param_path(path))
    if is_wrapped_matrix(leaf):
      raise ValueError(f"base_fingerprint needs the plain float weights; {name} is a "
                       f"{type(leaf).__name__}")
    size = int(np.prod(leaf.shape))
    stride = max(1, size // FINGERPRINT_SAMPLES)
    sample = np.asarray(jax.device_get(jnp.ravel(leaf)[::stride][:FINGERPRINT_SAMPLES]),
                        np.float32)
    h.update(json.dumps([name, list(leaf.shape)]).encode())
    h.update(sample.tobytes())
  return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- runs

@dataclasses.dataclass
class TunedRun:
  """A tuned run folder, read from its config.json and a checkpoint's meta."""

  path: Path
  kind: str                    # "lora" or "state"
  step: int
  lora: Any                    # a LoraSpec for LoRA runs, else None
  base_fingerprint: str
  base_path: str | None        # the run's --init-from
  model_cfg: Any
  train_cfg: Any

  def describe(self) -> str:
    what = (f"LoRA rank {self.lora.rank}, alpha {self.lora.alpha:g}, parts "
            f"{','.join(self.lora.parts)}" if self.kind == "lora" else "a tuned state")
    return f"{self.path} ({what}, step {self.step}, base fingerprint {self.base_fingerprint})"


def run_kind(run_dir) -> str:
  """"full", "lora" or "state" for an rwkv-jax run folder (config.json's train.tune)."""
  from rwkv_jax.checkpoint import read_run_config

  _, train = read_run_config(run_dir)
  return "full" if train is None else getattr(train, "tune", "full")


def is_tuned_run(path) -> bool:
  from rwkv_jax.checkpoint import is_run_dir

  return Path(path).is_dir() and is_run_dir(path) and run_kind(path) != "full"


def tuning_meta(kind: str, fingerprint: str, lora_spec=None) -> dict:
  """The ``tuning`` entry of a tuned run's checkpoint meta."""
  return {"kind": kind, "base_fingerprint": fingerprint,
          "lora": None if lora_spec is None else lora_spec.to_dict()}


def read_tuned_run(run_dir, step: int | None = None) -> TunedRun:
  """The tuned run in ``run_dir`` at ``step`` (default: its latest checkpoint).
  ValueError for a full-training run or a checkpoint without tuning meta."""
  from rwkv_jax.checkpoint import read_run_config
  from rwkv_jax.lora import LoraSpec
  from rwkv_jax.training.checkpointing import Checkpointer

  run_dir = Path(run_dir)
  model_cfg, train = read_run_config(run_dir)
  kind = "full" if train is None else train.tune
  if kind == "full":
    raise ValueError(f"{run_dir} is a full-training run, not a LoRA or state-tuning run")
  ckpt = Checkpointer(run_dir, create=False)
  try:
    step = ckpt.pick_step(step, run_dir)
    meta = ckpt.read_meta(step)
  finally:
    ckpt.close()
  tuning = meta.get("tuning") if isinstance(meta, dict) else None
  if not tuning or tuning.get("kind") != kind:
    raise ValueError(f"checkpoint {step} of {run_dir} has no {kind} tuning record")
  spec = LoraSpec.from_dict(tuning["lora"]) if kind == "lora" else None
  return TunedRun(run_dir, kind, step, spec, tuning["base_fingerprint"], train.init_from,
                  model_cfg, train)


def check_base(model, info: TunedRun, fingerprint: str | None = None) -> None:
  """ValueError unless ``model`` is the base ``info``'s run was trained on."""
  have = fingerprint or base_fingerprint(model)
  if have != info.base_fingerprint:
    raise ValueError(
        f"{info.path} was trained on another base model (base fingerprint "
        f"{info.base_fingerprint}, from {info.base_path}); this model's fingerprint is "
        f"{have} ({model.cfg.describe_shape()}). Use the run's own base.")


def load_base(info: TunedRun, base=None, **config_overrides):
  """The base model of a tuned run: ``base`` (a path; default the run's --init-from),
  checked against the run's fingerprint."""
  from rwkv_jax.checkpoint import load_model

  path = base if base is not None else info.base_path
  if path is None:
    raise ValueError(f"{info.path} records no base model (train.init_from); pass one")
  if not Path(path).exists():
    raise FileNotFoundError(f"the base model of {info.path} is not at {path} any more; "
                            f"pass its new location")
  model, _ = load_model(path, **config_overrides)
  check_base(model, info)
  return model


def restore_trainable(info: TunedRun, abstract):
  """The trained part (adapters / state fields) of ``info``'s checkpoint, on one device."""
  from rwkv_jax.sharding import abstract_on_device
  from rwkv_jax.training.checkpointing import Checkpointer

  ckpt = Checkpointer(info.path, create=False)
  try:
    restored, _ = ckpt.restore(info.step, {"params": abstract_on_device(abstract)})
  finally:
    ckpt.close()
  return jax.tree.map(jnp.asarray, restored["params"])


def load_tuned_model(run_dir, step: int | None = None, **config_overrides):
  """``(model, cfg)`` of a tuned run, for ``rwkv_jax.checkpoint.load_model``: the base
  with the adapters merged (LoRA), or the base itself (state tuning: the state is the
  run's ``state.safetensors``, see ``run_state_file``)."""
  from rwkv_jax import lora

  info = read_tuned_run(run_dir, step)
  base = load_base(info, **config_overrides)
  if info.kind == "lora":
    adapters, spec = lora.load_adapters(run_dir, base, step=info.step, check_base=False)
    base = lora.merge_lora(base, adapters, spec)
  return base, base.cfg


# ----------------------------------------------------------------------------- states

def state_to_dict(state) -> dict:
  return {name: x for name, x in zip(state._fields, state)}


def state_from_dict(model, fields: dict):
  from rwkv_jax.state import expected_state

  return type(expected_state(model, 1))(**fields)


def broadcast_state(model, state, batch: int):
  """A batch-1 state repeated over ``batch`` sequences (on each leaf's batch axis)."""
  from rwkv_jax.state import batch_axis, tree_with_axes

  def one(axes, x):
    shape = list(x.shape)
    shape[batch_axis(axes)] = batch
    return jnp.broadcast_to(x, shape)

  return tree_with_axes(one, model.state_axes(), state)


def run_state_file(run_dir) -> Path | None:
  """A state-tuning run's ``state.safetensors`` (None for other runs or before a save)."""
  path = Path(run_dir) / STATE_FILE
  return path if path.is_file() and is_tuned_run(run_dir) else None


def save_tuned_state(path, state, model, fingerprint: str, step: int) -> None:
  from rwkv_jax.inference.state_io import save_state

  save_state(path, state, model, metadata={"base_fingerprint": fingerprint,
                                           "tuned_step": str(step)})


def load_tuned_state(path, model, fingerprint: str | None = None):
  """A state file for ``model``: ``load_state`` (family and shape checked), and when the
  file records a ``base_fingerprint`` (a tuned state), that it is this model's. Returns
  the state (batch as saved)."""
  from rwkv_jax.inference.state_io import load_state, read_state_metadata

  state = load_state(path, model)
  want = read_state_metadata(path).get("base_fingerprint")
  if want is not None:
    have = fingerprint or base_fingerprint(model)
    if have != want:
      raise ValueError(f"{path} is a state tuned on another base model (base fingerprint "
                       f"{want}); this model's fingerprint is {have}")
  return state


def adapt_for_inference(model, *, checkpoint=None, lora=None, state=None, quantize=None):
  """(model, initial state or None) for generation, in this order: ``lora`` (a LoRA run
  dir: its adapters applied unmerged; ``model`` must be its base), ``quantize`` ("int8"),
  and the state: ``state`` (a file; a tuned state must match ``model``'s fingerprint), else
  the tuned state of ``checkpoint`` when that is a state-tuning run. Fingerprints are of
  ``model``'s float weights, taken before anything is applied."""
  from rwkv_jax import lora as lora_mod

  fingerprint = None
  if lora is not None or state is not None:
    fingerprint = base_fingerprint(model)
  base = model
  if lora is not None:
    info = read_tuned_run(lora)
    if info.kind != "lora":
      raise ValueError(f"--lora {lora} is a {info.kind} run, not a LoRA run")
    check_base(model, info, fingerprint)
    adapters, spec = lora_mod.load_adapters(lora, model, check_base=False)
    model = lora_mod.apply_lora(model, adapters, spec)
  if quantize is not None:
    from rwkv_jax.quantize import quantize_model

    model = quantize_model(model, quantize)
  if state is None and checkpoint is not None:
    state = run_state_file(checkpoint)
  initial = None
  if state is not None:
    initial = load_tuned_state(state, base, fingerprint)
  return model, initial


__all__ = ["KINDS", "adapt_for_inference", "STATE_FILE", "TunedRun", "base_fingerprint", "broadcast_state",
           "check_base", "is_tuned_run", "load_base", "load_tuned_model", "load_tuned_state",
           "read_tuned_run", "restore_trainable", "run_kind", "run_state_file",
           "save_tuned_state", "state_from_dict", "state_to_dict", "tuning_meta"]
