"""``rwkv-jax train``: argument parsing only; the work is ``trainer.run_training``."""

from __future__ import annotations

import argparse
import sys

_EPILOG = """\
With no arguments: trains a 2x64 RWKV-4 on the built-in synthetic task (vocab 64, noisy
repeating patterns, a held-out test set) for 400 steps on CPU and prints the test loss
and accuracy.

Outputs in --out: config.json (model + train config: the directory alone rebuilds the
model), checkpoints/<step>/ (orbax: params, optimizer, step, rng, data position),
metrics.jsonl (one line per step: loss, lr, grad_norm, tokens_per_s, mfu; eval lines with
eval_* keys), loss_curve.png, summary.json.

Resume: `rwkv-jax train --resume --out DIR` continues from the latest checkpoint and ends
bitwise equal to an uninterrupted run. Flags not given are the run's (DIR/config.json);
flags given that change the trajectory (data, batch size, lr schedule, seed, model, ...)
must equal the saved ones, others (--steps, --mesh, --max-minutes, --eval-every, ...)
apply from here on. DIR must hold a checkpoint. SIGINT/SIGTERM save a checkpoint before
exiting.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
  from rwkv_jax.training.config import DEFAULT_N_EMBD, DEFAULT_N_LAYER, TrainConfig

  d = TrainConfig()
  g = p.add_argument_group("run")
  g.add_argument("--out", help="output directory (default runs/train-<date>-<time>)")
  g.add_argument("--steps", type=int, default=d.steps, help="optimizer steps (%(default)s)")
  g.add_argument("--resume", action="store_true",
                 help="continue from the latest checkpoint in --out; flags not given "
                      "are the run's (see below)")
  g.add_argument("--init-from", metavar="PATH",
                 help="start from weights: an rwkv-jax run dir, an HF dir or a .pth file")
  g.add_argument("--seed", type=int, default=d.seed,
                 help="init, data order and test set seed (%(default)s)")
  g.add_argument("--eval-every", type=int, default=d.eval_every,
                 help="evaluate every N steps, 0 = only at the end (%(default)s)")
  g.add_argument("--eval-size", type=int, default=d.eval_size,
                 help="held-out sequences / validation windows per eval (%(default)s)")
  g.add_argument("--save-every", type=int, default=d.save_every,
                 help="checkpoint every N steps, 0 = only at the end (%(default)s)")
  g.add_argument("--max-to-keep", type=int, default=d.max_to_keep,
                 help="checkpoints kept (%(default)s)")
  g.add_argument("--tensorboard", action="store_true",
                 help="also write TensorBoard scalars to OUT/tensorboard (needs tensorboardX)")
  g.add_argument("--no-progress", dest="progress", action="store_false",
                 help="no progress bar")
  g.add_argument("--mesh", metavar="SPEC",
                 help="device mesh, e.g. data=2,fsdp=2,tensor=2 (an axis of -1 takes the "
                      "remaining devices; default: all devices on data); see README "
                      "'Scaling out'")
  g.add_argument("--max-minutes", type=float,
                 help="wall-time budget: then save and stop after the current step "
                      "(--resume continues)")
  g.add_argument("--peak-tflops", type=float,
                 help="peak TFLOP/s of one device for MFU (default: spec table; none on CPU)")
  g = p.add_argument_group("data")
  g.add_argument("--data", metavar="PATH",
                 help="a text file, a .jsonl file (one document per line) or a folder of "
                      "them, or a binidx dataset PREFIX (PREFIX.bin + PREFIX.idx; either "
                      "file's path also works) (default: the synthetic task)")
  g.add_argument("--tokenizer", metavar="JSON",
                 help="a HF tokenizer.json (default: bytes, vocab 256)")
  g.add_argument("--encoding", default=d.encoding,
                 help="text encoding of the --data files for a --tokenizer, decoded "
                      "strictly (%(default)s); the byte tokenizer reads raw bytes")
  g.add_argument("--jsonl-field", default=d.jsonl_field, metavar="NAME",
                 help="the text field of each object of .jsonl data (%(default)s)")
  g.add_argument("--cache-dir", metavar="DIR",
                 help="where token caches go (default: $RWKV_JAX_CACHE, else "
                      "$XDG_CACHE_HOME/rwkv-jax, else ~/.cache/rwkv-jax); nothing is "
                      "written beside the data")
  g.add_argument("--val-fraction", type=float, default=d.val_fraction,
                 help="tail of the token stream held out for validation (%(default)s)")
  g.add_argument("--batch-size", type=int, default=d.batch_size,
                 help="sequences per micro-batch (%(default)s)")
  g.add_argument("--ctx-len", type=int, default=d.ctx_len,
                 help="tokens per training window (%(default)s)")
  g = p.add_argument_group("model")
  g.add_argument("--family", choices=["rwkv4", "rwkv7"],
                 help="model family (default: the preset's, else rwkv4)")
  g.add_argument("--preset",
                 help="RWKV-4: tiny, 169m, 430m, 1.5b, 3b, 7b, 14b; RWKV-7: rwkv7-tiny, "
                      "rwkv7-0.1b, rwkv7-0.4b, rwkv7-1.5b, rwkv7-2.9b, rwkv7-7.2b (the "
                      "vocabulary always comes from the data)")
  g.add_argument("--n-layer", type=int,
                 help=f"layers (default {DEFAULT_N_LAYER}, or the preset's)")
  g.add_argument("--n-embd", type=int, help=f"width (default {DEFAULT_N_EMBD}, or the preset's)")
  g.add_argument("--vocab-size", type=int,
                 help="vocabulary of a new model (default: the tokenizer's; binidx data "
                      "without --tokenizer: its largest id + 1)")
  g.add_argument("--dtype", default=d.dtype, choices=["float32", "bfloat16", "float16"],
                 help="matmul compute dtype; weights stay float32 (%(default)s)")
  g.add_argument("--wkv-impl", choices=["scan", "associative_scan", "chunked", "pallas"],
                 help="WKV path (default: by platform); RWKV-4: scan, associative_scan, "
                      "pallas; RWKV-7: scan, chunked, pallas")
  g.add_argument("--dropout", type=float, default=d.dropout,
                 help="residual dropout on each sub-block output while training (%(default)s)")
  g.add_argument("--scan-layers", dest="scan_layers", action="store_true",
                 default=d.scan_layers,
                 help="run the blocks as one lax.scan over their stacked parameters instead "
                      "of a Python loop: compile time flat in depth; with --remat full the "
                      "least memory (RWKV-7 0.1b, B8 T1024 on an H200: 6.4 GiB vs 25.2, "
                      "20%% slower); see experiments/RESULTS.md")
  g.add_argument("--remat", default=d.remat, choices=["none", "full", "dots", "dots_no_batch"],
                 help="rematerialise each scanned layer in the backward pass: none, full "
                      "(keep only layer inputs: least memory, one more forward), dots / "
                      "dots_no_batch (keep matmul outputs) (%(default)s)")
  g = p.add_argument_group("optimizer")
  g.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (%(default)s)")
  g.add_argument("--final-lr-ratio", type=float, default=d.final_lr_ratio,
                 help="final lr / peak lr (%(default)s)")
  g.add_argument("--warmup", type=int, default=d.warmup,
                 help="linear warmup steps (default min(20, steps / 10))")
  g.add_argument("--schedule", default=d.schedule,
                 choices=["cosine", "exponential", "constant"],
                 help="after warmup; exponential is the paper's (%(default)s)")
  g.add_argument("--weight-decay", type=float, default=d.weight_decay,
                 help="AdamW decay, on 2-D matrices only (%(default)s)")
  g.add_argument("--b1", type=float, default=d.b1, help="Adam beta1 (%(default)s)")
  g.add_argument("--b2", type=float, default=d.b2, help="Adam beta2 (%(default)s)")
  g.add_argument("--clip", type=float, default=d.clip,
                 help="global-norm gradient clip, 0 = off (%(default)s)")
  g.add_argument("--grad-accum", type=int, default=d.grad_accum,
                 help="micro-batches per optimizer step (optax.MultiSteps) (%(default)s)")
  g.add_argument("--z-loss", type=float, default=d.z_loss,
                 help="weight of the auxiliary logsumexp^2 loss, e.g. 1e-4 (%(default)s)")
  g = p.add_argument_group("fine-tuning (with --init-from BASE; the base stays frozen)")
  g.add_argument("--tune", default=d.tune, choices=["full", "lora", "state"],
                 help="what is trained: every weight, LoRA adapters (implied by "
                      "--lora-rank) or a learned initial state, written to "
                      "OUT/state.safetensors (%(default)s)")
  g.add_argument("--lora-rank", type=int, metavar="R",
                 help="LoRA rank: train W + (alpha / R) A B on the --lora-parts matrices")
  g.add_argument("--lora-alpha", type=float, metavar="A",
                 help="LoRA alpha (default: R, a scale of 1)")
  g.add_argument("--lora-parts", default=d.lora_parts, metavar="PARTS",
                 help="comma-separated: att (time-mix matrices), ffn (channel-mix "
                      "matrices), head (%(default)s)")
  _only_given(p)


def _only_given(p: argparse.ArgumentParser) -> None:
  """Parsed arguments hold only the flags given: each TrainConfig flag's default (the
  dataclass's) moves into its help text and the parser default becomes SUPPRESS, so that
  ``--resume`` can tell a flag given from one left at its default."""
  from rwkv_jax.training.config import TrainConfig

  for action in p._actions:
    if action.dest in TrainConfig.__dataclass_fields__ and action.default is not \
        argparse.SUPPRESS:
      if action.help:
        action.help = action.help.replace("%(default)s",
                                          str(action.default).replace("%", "%%"))
      action.default = argparse.SUPPRESS


def config_from_args(args):
  """The TrainConfig of the parsed flags (only those given are in ``args``, see
  ``_only_given``): TrainConfig's defaults for the rest, or with ``--resume`` the saved
  run's values (``TrainConfig.for_resume``). ``--resume`` needs DIR to hold a checkpoint:
  FileNotFoundError naming DIR otherwise (a mistyped --out must not start a new run)."""
  from rwkv_jax.training.config import TrainConfig

  fields = TrainConfig.__dataclass_fields__
  given = {k: v for k, v in vars(args).items() if k in fields}
  if not given.get("resume") or given.get("out") is None:
    return TrainConfig(**given)  # (--resume without --out: validate() says so)
  from pathlib import Path

  from rwkv_jax.checkpoint import read_run_config
  from rwkv_jax.training.checkpointing import CHECKPOINT_DIR, checkpoint_steps

  out = Path(given["out"])
  if not checkpoint_steps(out):
    where = ("does not exist" if not out.exists() else
             f"holds no checkpoints (nothing saved in {out / CHECKPOINT_DIR})")
    raise FileNotFoundError(f"cannot --resume {out}: it {where}; check --out, or leave "
                            f"out --resume to start a new run")
  model_cfg, saved = read_run_config(out)
  if saved is None:
    return TrainConfig(**given)
  return TrainConfig.for_resume(saved, given, model_family=model_cfg.family)


def run(args) -> int:
  from rwkv_jax.training.checkpointing import CheckpointError
  from rwkv_jax.training.trainer import TrainingDiverged, run_training

  try:
    cfg = config_from_args(args)
    summary = run_training(cfg)
  except (ValueError, FileNotFoundError, FileExistsError, CheckpointError,
          TrainingDiverged) as e:
    print(f"rwkv-jax train: error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:  # a second Ctrl-C: stopped without saving
    print("\nrwkv-jax train: interrupted; nothing saved since the last checkpoint",
          file=sys.stderr)
    return 130
  if summary["interrupted"] == "max_minutes":  # a planned stop, announced by the trainer
    return 0
  if summary["interrupted"]:
    return 130 if summary["interrupted"] == "SIGINT" else 143
  final = summary["final_eval"]
  parts = [f"{k} {v:.4f}" for k, v in final.items()]
  if "accuracy" in final and cfg.data is None:
    parts.append("chance 1/64 = 0.0156")
  print(f"final held-out: {', '.join(parts)}")
  tps = summary["tokens_per_s"]
  if tps:
    mfu = "" if summary["mfu"] is None else f", MFU {summary['mfu']:.1%}"
    print(f"throughput: {tps:,.0f} tokens/s{mfu}; wall {summary['wall_s']:.0f} s; "
          f"outputs in {summary['out']}")
  return 0


def register(subparsers) -> None:
  p = subparsers.add_parser(
      "train", help="train an RWKV-4 or RWKV-7 model (default: the built-in synthetic task)",
      description="Train RWKV-4 or RWKV-7 with exact resume.", epilog=_EPILOG,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  add_arguments(p)
  p.set_defaults(func=run)
