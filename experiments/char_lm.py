"""Character-level language modelling in bits per character (= per byte), RWKV-4 only.

The paper's enwik8 setting (arXiv 2305.13048, Table 5 / Appendix J.3): 12 layers, d = 512,
T = 1024, AdamW, weight decay 0.1, dropout 0.1 -> 1.010 train / 1.178 test bpc. The
"paper" setting uses the model's residual dropout of 0.1 (``RWKVConfig.dropout``); the
"tiny" CPU setting runs without dropout.

  --enwik8 PATH   the 100,000,000-byte enwik8 file, standard split: bytes [0, 90M) train,
                  [90M, 95M) validation (the trainer's held-out tail), [95M, 100M) test,
                  scored here on the raw bytes of the final checkpoint.
  default         tinyshakespeare (../shared/data/tinyshakespeare.txt), last 10% held out
                  (validation = test: there is no third split).

Training is ``rwkv_jax.training.trainer.run_training`` with the byte tokenizer (vocab 256);
bpc = mean cross-entropy / ln 2 over the predicted bytes.

  python experiments/char_lm.py                         # tiny CPU run on tinyshakespeare
  python experiments/char_lm.py --setting paper --enwik8 enwik8   # the paper's (GPU)
  python experiments/char_lm.py --setting paper-short --max-minutes 4   # its shape, ~3 GPU min

``--max-minutes`` is the trainer's wall-time budget (``TrainConfig.max_minutes``): when it
runs out the trainer saves and stops after its current step (the run is then scored as
it stands, flagged, and the same command resumes it). ``--run-dir`` puts the training run (checkpoints)
elsewhere than OUT/run; OUT itself receives results.json and loss_curve.png.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from experiments import _common
from experiments.scaling import default_data

PAPER = {"n_layer": 12, "n_embd": 512, "ctx_len": 1024, "weight_decay": 0.1, "dropout": 0.1,
         "train_bpc": 1.010, "test_bpc": 1.178, "transformer_12l_test_bpc": 1.137}
ENWIK8_SPLIT = (90_000_000, 5_000_000, 5_000_000)

# Training knobs the paper does not give (lr, batch, steps, warmup) are our choices.
SETTINGS = {
    "paper": dict(n_layer=12, n_embd=512, ctx_len=1024, batch_size=16, steps=20_000, lr=6e-4,
                  warmup=500, weight_decay=0.1, dropout=0.1, eval_every=1000, eval_size=512),
    "tiny": dict(n_layer=2, n_embd=128, ctx_len=128, batch_size=16, steps=400, lr=2e-3,
                 warmup=40, weight_decay=0.1, eval_every=100, eval_size=256, wkv_impl="scan"),
    # The paper's shape for a few GPU minutes on tinyshakespeare: 1000 x 16 x 1024 = 16.4M
    # tokens (~16 epochs of its 1.0M training bytes; more would mostly overfit a 41M-
    # parameter model), bf16 matmuls, one checkpoint (the last: a 41M model's AdamW state
    # is ~0.5 GB a save).
    "paper-short": dict(n_layer=12, n_embd=512, ctx_len=1024, batch_size=16, steps=1000,
                        lr=8e-4, warmup=100, weight_decay=0.1, dropout=0.1, eval_every=100,
                        eval_size=512, save_every=0, dtype="bfloat16"),
}


def prepare_enwik8(path, workdir, split=ENWIK8_SPLIT) -> tuple[Path, float, np.ndarray]:
  """Writes the train + validation bytes as one file for the trainer; returns (that file,
  val_fraction selecting exactly the validation part, test bytes (uint8)).

  The trainer reads text files as UTF-8 (invalid sequences replaced), so each part is
  decoded and re-encoded on its own and the validation fraction is computed from the
  re-encoded lengths; the number of bytes this changes is printed (0 for valid UTF-8).
  """
  raw = Path(path).read_bytes()
  if len(raw) != sum(split):
    raise ValueError(f"{path}: {len(raw):,} bytes; the standard enwik8 split needs exactly "
                     f"{sum(split):,} ({' + '.join(f'{s:,}' for s in split)})")
  n_train, n_val, _ = split
  train = raw[:n_train].decode("utf-8", errors="replace").encode("utf-8")
  val = raw[n_train:n_train + n_val].decode("utf-8", errors="replace").encode("utf-8")
  changed = abs(len(train) - n_train) + abs(len(val) - n_val)
  if changed:
    print(f"note: {changed} bytes of train/validation changed length in the UTF-8 round trip")
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  target = workdir / "enwik8.train+valid.txt"
  if not target.is_file() or target.stat().st_size != len(train) + len(val):
    tmp = target.with_suffix(".tmp")
    tmp.write_bytes(train + val)
    tmp.replace(target)
  # int(n * f) must give exactly len(val): aim at the middle of the integer.
  val_fraction = (len(val) + 0.5) / (len(train) + len(val))
  return target, val_fraction, np.frombuffer(raw[n_train + n_val:], np.uint8)


def bits_per_byte(model, data: np.ndarray, ctx_len: int, batch_size: int = 8) -> dict:
  """bpc of ``model`` on a byte stream: consecutive windows of ctx_len inputs, each from an
  empty state, so every byte but the first is predicted exactly once."""
  import jax
  from flax import nnx

  from rwkv_jax.training.step import make_eval_step

  data = np.asarray(data, np.int32)
  n_pred = data.size - 1
  n_win = math.ceil(n_pred / ctx_len)
  inputs = np.zeros((n_win, ctx_len), np.int32)
  targets = np.zeros((n_win, ctx_len), np.int32)
  mask = np.zeros((n_win, ctx_len), np.float32)
  for w in range(n_win):
    s = w * ctx_len
    m = min(ctx_len, n_pred - s)
    inputs[w, :m], targets[w, :m], mask[w, :m] = data[s:s + m], data[s + 1:s + 1 + m], 1.0
  graphdef, params = nnx.split(model, nnx.Param)
  step = jax.jit(make_eval_step(graphdef))
  tot = np.zeros(2)
  for i in range(0, n_win, batch_size):
    sl = slice(i, i + batch_size)
    if inputs[sl].shape[0] < batch_size:  # pad the last batch: one compiled shape
      pad = batch_size - inputs[sl].shape[0]
      batch = tuple(np.concatenate([x[sl], np.zeros((pad, ctx_len), x.dtype)])
                    for x in (inputs, targets, mask))
    else:
      batch = (inputs[sl], targets[sl], mask[sl])
    out = jax.device_get(step(params, batch))
    tot += [float(out["loss_sum"]), float(out["count"])]
  loss = tot[0] / tot[1]
  return {"loss": float(loss), "bpc": float(loss / math.log(2)), "bytes": int(tot[1])}


def heldout_bytes(data: Path, ctx_len: int, val_fraction: float) -> np.ndarray:
  """The trainer's validation part of a text file (byte tokenizer), as token ids."""
  from rwkv_jax.data.text import TextData
  from rwkv_jax.tokenizers import load_tokenizer

  return np.asarray(TextData(data, load_tokenizer(None), ctx_len,
                             val_fraction=val_fraction).val_tokens)


def run(setting: str, out: Path, *, data: Path | None = None, enwik8: Path | None = None,
        overrides: dict | None = None, run_dir: Path | None = None,
        max_minutes: float | None = None) -> dict:
  from rwkv_jax.checkpoint import load_model
  from rwkv_jax.training import metrics as M
  from rwkv_jax.training.config import TrainConfig
  from rwkv_jax.training.trainer import run_training

  knobs = {**SETTINGS[setting], **(overrides or {})}
  save_every = knobs.pop("save_every", knobs["eval_every"])
  run_dir = Path(run_dir) if run_dir is not None else out / "run"
  t0 = time.perf_counter()
  test_bytes, val_fraction = None, 0.1
  if enwik8 is not None:
    data, val_fraction, test_bytes = prepare_enwik8(enwik8, out / "data")
    corpus = "enwik8 (90M/5M/5M)"
  else:
    data = data or default_data()
    if data is None:
      raise SystemExit("no corpus: ../shared/data/tinyshakespeare.txt is absent; pass --data")
    corpus = f"{Path(data).name} (last 10% held out)"
  cfg = TrainConfig(out=str(run_dir), data=str(data), val_fraction=val_fraction,
                    resume=True, progress=False, save_every=save_every,
                    schedule="cosine", final_lr_ratio=0.1, b1=0.9, b2=0.99,
                    max_minutes=max_minutes, **knobs)
  summary = run_training(cfg)
  stopped = summary["interrupted"] == "max_minutes"
  if summary["interrupted"] and not stopped:
    raise KeyboardInterrupt("training was interrupted; rerun the same command to resume")
  evals = [(r["step"], r["eval_loss"] / math.log(2)) for r in M.read_metrics(run_dir)
           if "eval_loss" in r]
  result = {"setting": setting, "corpus": corpus, "train_config": cfg.to_dict(),
            "params": summary["params"], "dropout": cfg.dropout, "paper": PAPER,
            "steps_done": summary["steps"], "stopped_by_time_budget": stopped,
            "max_minutes": max_minutes,
            "train_loss_last_step": summary["train_loss"],
            "train_bpc_last_step": summary["train_loss"] / math.log(2),
            "val_bpc": (None if summary["final_eval"] is None
                        else summary["final_eval"]["loss"] / math.log(2)),
            "val_curve": evals, "best_val_bpc": min((b for _, b in evals), default=None),
            "tokens_per_s": summary["tokens_per_s"], "machine": _common.machine(),
            "date": _common.RUN_DATE}
  model, _ = load_model(run_dir)  # the saved (last) weights
  if test_bytes is not None:
    result["test"] = bits_per_byte(model, test_bytes, knobs["ctx_len"])
  else:  # validation = test here: score every held-out byte once
    result["heldout"] = bits_per_byte(model, heldout_bytes(data, knobs["ctx_len"],
                                                           val_fraction), knobs["ctx_len"])
  curve = run_dir / "loss_curve.png"
  if curve.is_file() and run_dir.resolve() != out.resolve():
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(curve, out / "loss_curve.png")
  result["wall_s"] = time.perf_counter() - t0
  _common.write_json(out / "results.json", result)
  return result


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--setting", choices=sorted(SETTINGS), default="tiny")
  p.add_argument("--enwik8", help="the enwik8 file (standard 90M/5M/5M split)")
  p.add_argument("--data", help="a text file (default ../shared/data/tinyshakespeare.txt)")
  p.add_argument("--out", default=None, help="default experiments/out/char_lm-<setting>")
  p.add_argument("--run-dir", help="the training run's folder (default OUT/run)")
  p.add_argument("--max-minutes", type=float,
                 help="wall-time budget of the training (it then saves and stops)")
  ints = ("steps", "batch_size", "ctx_len", "n_layer", "n_embd", "warmup", "eval_every",
          "eval_size")
  for name in ints:
    p.add_argument("--" + name.replace("_", "-"), type=int)
  p.add_argument("--lr", type=float)
  p.add_argument("--dropout", type=float)
  p.add_argument("--wkv-impl", choices=["scan", "associative_scan", "pallas"])
  args = p.parse_args(argv)
  if args.enwik8 and args.data:
    raise SystemExit("pass --enwik8 or --data, not both")
  overrides = {k: getattr(args, k) for k in (*ints, "lr", "dropout", "wkv_impl")
               if getattr(args, k) is not None}
  out = Path(args.out or _common.REPO / f"experiments/out/char_lm-{args.setting}").absolute()
  result = run(args.setting, out, data=Path(args.data).absolute() if args.data else None,
               enwik8=Path(args.enwik8) if args.enwik8 else None, overrides=overrides,
               run_dir=Path(args.run_dir).absolute() if args.run_dir else None,
               max_minutes=args.max_minutes)
  c = result["train_config"]
  stop = (f"; STOPPED by the {args.max_minutes:g}-minute budget at step "
          f"{result['steps_done']} of {c['steps']} (rerun to resume)"
          if result["stopped_by_time_budget"] else "")
  print(f"\n{result['machine']}; wall {result['wall_s']:.0f} s{stop}\n")
  fmt = lambda v: "-" if v is None else v
  held = result.get("heldout", {}).get("bpc")
  rows = [[f"ours ({args.setting})", result["corpus"], f"{c['n_layer']}x{c['n_embd']}",
           c["ctx_len"], f"{result['params']:,}",
           f"{result['steps_done']} x {c['batch_size']}", result["dropout"],
           result["train_bpc_last_step"], fmt(result["val_bpc"]),
           fmt(result["best_val_bpc"]), fmt(held),
           result["test"]["bpc"] if "test" in result else "-"],
          ["paper RWKV (reg.)", "enwik8", "12x512", 1024, "-", "-", "0.1",
           PAPER["train_bpc"], "-", "-", "-", PAPER["test_bpc"]]]
  _common.print_table(["run", "corpus", "L x d", "T", "params", "steps x batch", "dropout",
                       "train bpc (last step)", "val bpc (end)", "best val bpc (every "
                       f"{c['eval_every']})", "held-out bpc (all bytes)", "test bpc"], rows)
  return 0


if __name__ == "__main__":
  sys.exit(main())
