"""Orbax checkpoints of a ``TrainState``, verified on restore.

Layout of ``OUT/checkpoints/<step>/`` (one orbax ``CheckpointManager`` step per optimizer
step): ``params`` (the model's nnx.State), ``opt_state``, ``train`` (step counter and rng)
and ``meta`` (JSON: data position, loss, and a CRC32 of every saved array). Orbax writes
each step into a temporary directory and renames it when complete, so a run killed while
saving leaves the previous steps untouched; the CRCs catch a file truncated or altered
afterwards. Nothing here ever deletes a checkpoint except orbax's ``max_to_keep`` pruning
of old, complete ones after a newer one is saved.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"


class CheckpointError(ValueError):
  """A checkpoint that cannot be restored (corrupt, truncated, or of another model)."""


def _crc_tree(tree) -> dict[str, int | None]:
  """keypath -> CRC32 of the array bytes (None where the array is not fully on this host)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    key = jax.tree_util.keystr(path)
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      out[key] = None
      continue
    out[key] = zlib.crc32(np.ascontiguousarray(np.asarray(leaf)).view(np.uint8))
  return out


def _abstract(tree):
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def checkpoint_steps(out_dir: str | os.PathLike) -> list[int]:
  """The steps saved under ``out_dir/checkpoints`` ([] if it has none or does not exist);
  creates nothing."""
  if not (Path(out_dir) / CHECKPOINT_DIR).is_dir():
    return []
  ckpt = Checkpointer(out_dir, create=False)
  try:
    return ckpt.all_steps()
  finally:
    ckpt.close()


class Checkpointer:
  """Saves and restores ``TrainState`` items under ``out_dir/checkpoints``."""

  def __init__(self, out_dir: str | os.PathLike, max_to_keep: int = 3, *, create=True):
    self.directory = Path(out_dir).absolute() / CHECKPOINT_DIR
    if not create and not self.directory.is_dir():
      raise FileNotFoundError(f"{Path(out_dir)} holds no checkpoints (no {self.directory})")
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create,
                                           enable_async_checkpointing=False)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def pick_step(self, step: int | None, source) -> int:
    """``step`` if it was saved (None: the latest); FileNotFoundError / ValueError naming
    ``source`` otherwise."""
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(f"{source} holds no checkpoints (under {self.directory})")
    if step is None:
      return steps[-1]
    if step not in steps:
      raise ValueError(f"{source} has no checkpoint of step {step}; it has {steps}")
    return step

  def save(self, step: int, state, meta: dict[str, Any]) -> None:
    """Saves the state (a TrainState) as optimizer step ``step``; blocks until written."""
    items = self.items_of(state)
    meta = dict(meta, checksums={name: _crc_tree(tree) for name, tree in items.items()})
    args = {name: ocp.args.StandardSave(tree) for name, tree in items.items()}
    self._manager.save(step, args=ocp.args.Composite(meta=ocp.args.JsonSave(meta), **args),
                       force=True)
    self._manager.wait_until_finished()

  def restore_train_state(self, step: int, template, data_fingerprint: str, out):
    """The ``TrainState`` saved at ``step``, restored onto ``template``'s shardings, and its
    meta; ValueError (naming ``out``) when the data changed since that checkpoint."""
    from rwkv_jax.training.step import TrainState

    restored, meta = self.restore(step, self.items_of(template))
    if meta.get("data_fingerprint") != data_fingerprint:
      raise ValueError(f"cannot resume {out}: the data changed since the checkpoint "
                       f"(fingerprint {meta.get('data_fingerprint')} -> {data_fingerprint})")
    state = TrainState(restored["params"], restored["opt_state"],
                       restored["train"]["step"], restored["train"]["rng"])
    return state, meta

  def restore(self, step: int, trees: dict[str, Any]) -> tuple[dict[str, Any], dict]:
    """Restores the items named in ``trees`` (item -> a tree of arrays or
    ShapeDtypeStructs giving the shapes; any of "params", "opt_state", "train") of step
    ``step``; returns ({item: tree}, meta). Raises CheckpointError naming the step
    directory when a file is missing, truncated or altered."""
    where = self.directory / str(step)
    try:
      meta = self._manager.restore(
          step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      args = {name: ocp.args.StandardRestore(_abstract(tree)) for name, tree in trees.items()}
      restored = self._manager.restore(step, args=ocp.args.Composite(**args))
      restored = {name: restored[name] for name in trees}
    except Exception as e:  # orbax/tensorstore raise many types; name the checkpoint
      raise CheckpointError(
          f"cannot restore checkpoint {where}: it is corrupt, truncated or not a checkpoint "
          f"of this model ({type(e).__name__}: {str(e)[:300]}). Nothing was deleted; move "
          f"this step directory away to resume from an earlier one.") from e
    if not isinstance(meta, dict) or "checksums" not in meta:
      raise CheckpointError(f"checkpoint {where} has no checksums in its meta item")
    for name in trees:
      got, want = _crc_tree(restored[name]), meta["checksums"].get(name, {})
      bad = [k for k, v in got.items() if v is not None and want.get(k) != v]
      if bad:
        raise CheckpointError(
            f"checkpoint {where} is corrupt: item {name!r} fails its checksum at {bad[:3]}. "
            f"Nothing was deleted; move this step directory away to resume from an earlier "
            f"one.")
    return restored, meta

  def read_meta(self, step: int) -> dict:
    """The meta item (JSON) of step ``step`` alone."""
    try:
      return self._manager.restore(
          step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:
      raise CheckpointError(f"cannot read the meta item of checkpoint "
                            f"{self.directory / str(step)} ({type(e).__name__}: "
                            f"{str(e)[:300]})") from e

  @staticmethod
  def items_of(state) -> dict[str, Any]:
    """The saved items of a TrainState (or of its abstract shapes)."""
    return {"params": state.params, "opt_state": state.opt_state,
            "train": {"step": state.step, "rng": state.rng}}

  def close(self) -> None:
    self._manager.close()
