"""``rwkv-jax lora merge RUN OUT``: a LoRA run's adapters merged into its base, written as
an rwkv-jax run dir, an HF directory (RWKV-4) or a BlinkDL .pth / .safetensors file."""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
  p = subparsers.add_parser(
      "lora", help="LoRA runs: merge adapters into their base",
      description="Work with LoRA runs (rwkv-jax train --init-from BASE --lora-rank R).")
  sub = p.add_subparsers(dest="lora_command", metavar="COMMAND")
  m = sub.add_parser(
      "merge", help="write the base with the adapters merged (W + alpha/r A B)",
      description="RUN: a LoRA training run (its latest checkpoint, or --step). OUT: a "
                  "path ending in .pth/.pt/.safetensors gets a BlinkDL state dict (any "
                  "family); another path a directory: an rwkv-jax run dir (--format run, "
                  "the default; `rwkv-jax generate --checkpoint OUT` and --init-from read "
                  "it) or an HF transformers directory (--format hf, RWKV-4). The base is "
                  "the run's --init-from (or --base) and must have the run's fingerprint.")
  m.add_argument("run")
  m.add_argument("out")
  m.add_argument("--base", metavar="PATH",
                 help="the base model, if it moved since training (default: the run's "
                      "--init-from); checked against the run's base fingerprint")
  m.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
  m.add_argument("--format", choices=("run", "hf"), default="run",
                 help="for a directory OUT: rwkv-jax run dir or HF directory (%(default)s)")
  m.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                 help="dtype of written .pth/.safetensors/HF tensors (%(default)s)")
  m.add_argument("--quantize", choices=("int8",),
                 help="write an int8 .safetensors file (rwkv-jax's int8 layout)")
  m.add_argument("--overwrite", action="store_true", help="replace an existing OUT file")
  m.set_defaults(func=run_merge)
  p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def write_run_dir(model, out, train_cfg=None, step: int = 0) -> str:
  """``model`` as an rwkv-jax run directory (config.json + checkpoints/<step>/ holding the
  parameters), written into a temporary folder that is renamed into place; OUT must not
  exist. Its checkpoint has no optimizer state: it loads (``load_model``, ``generate``,
  ``--init-from``) but cannot be resumed."""
  import os
  import shutil
  from pathlib import Path

  import jax
  import jax.numpy as jnp
  from flax import nnx

  from rwkv_jax.checkpoint import write_run_config
  from rwkv_jax.training.checkpointing import Checkpointer
  from rwkv_jax.training.step import TrainState

  out = Path(out)
  if out.exists():
    raise FileExistsError(f"{out} exists; choose another OUT (a run dir is never replaced)")
  tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
  tmp.mkdir(parents=True)
  try:
    params = jax.tree.map(jnp.asarray, nnx.state(model, nnx.Param))
    # orbax saves no empty item: a scalar stands for "no optimizer state".
    state = TrainState(params, {"none": jnp.zeros((), jnp.int32)}, jnp.asarray(step, jnp.int32),
                       jax.random.key_data(jax.random.key(0)))
    ckpt = Checkpointer(tmp, max_to_keep=1)
    try:
      ckpt.save(step, state, {"step": step, "merged_lora": True})
    finally:
      ckpt.close()
    write_run_config(tmp, model.cfg, train_cfg)
    os.replace(tmp, out)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp)
  return str(out)


def merge(run, out, *, base=None, step=None, fmt="run", dtype="float32", quantize=None,
          overwrite=False) -> str:
  """Merges the LoRA run ``run`` into its base and writes ``out`` (see the command)."""
  import dataclasses
  import os

  from rwkv_jax import interop, lora, tuning

  info = tuning.read_tuned_run(run, step)
  if info.kind != "lora":
    raise ValueError(f"{run} is a {info.kind} run, not a LoRA run")
  base_model = tuning.load_base(info, base)  # checks the fingerprint before any write
  adapters, spec = lora.load_adapters(run, base_model, step=info.step, check_base=False)
  merged = lora.merge_lora(base_model, adapters, spec)
  target = os.fspath(out)
  if target.endswith((".pth", ".pt", ".safetensors")) or quantize is not None:
    return interop.save_pretrained(merged, target, dtype=dtype, overwrite=overwrite,
                                   quantize=quantize)
  if fmt == "hf":
    return interop.save_pretrained(merged, target, dtype=dtype, overwrite=overwrite)
  if dtype != "float32":
    raise ValueError("a run dir holds float32 weights; --dtype applies to files and HF dirs")
  train = dataclasses.replace(info.train_cfg, tune="full", lora_rank=None, lora_alpha=None)
  return write_run_dir(merged, target, train, info.step)


def run_merge(args) -> int:
  try:
    out = merge(args.run, args.out, base=args.base, step=args.step, fmt=args.format,
                dtype=args.dtype, quantize=args.quantize, overwrite=args.overwrite)
  except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
    print(f"rwkv-jax lora merge: error: {e}", file=sys.stderr)
    return 1
  print(f"{args.run} merged into its base -> {out}")
  return 0
