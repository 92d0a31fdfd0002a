"""Training throughput of ``rwkv_jax.training.step``: tokens/s and MFU per batch size.

Times the jitted, donated ``train_step`` (AdamW + clipping, as ``rwkv-jax train`` builds
it) on random token windows already on the device, so host data loading is excluded.
MFU = tokens/s x 6·N / peak, N = parameters without the embedding table (its lookup is a
gather); the peak is the spec-sheet dense figure of ``rwkv_jax.training.metrics``
(H100 bf16: 989 TFLOP/s), and MFU against a measured matmul peak is printed beside it
when ``--measured-tflops`` is given.

  python experiments/bench_train.py --preset 169m --ctx-len 1024 --dtype bfloat16 \
      --wkv-impl associative_scan --batch-sizes 8,16 --json out.json      # GPU
  python experiments/bench_train.py --preset tiny --n-layer 2 --n-embd 64 --ctx-len 256 \
      --dtype float32 --batch-sizes 16        # CPU: the model of the no-argument run
  python experiments/bench_train.py --preset rwkv7-0.1b --ctx-len 1024 --dtype bfloat16 \
      --wkv-impl chunked --batch-sizes 8,16    # RWKV-7 (any family's preset name)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from experiments._common import time_train_steps  # noqa: E402
from rwkv_jax.models import build_model, preset
from rwkv_jax.training import metrics as M
from rwkv_jax.training.optim import make_optimizer
from rwkv_jax.training.step import compile_train_step, init_state, make_train_step


def bench(cfg, batch_size: int, steps: int, warmup_steps: int, seed: int = 0):
  model = build_model(cfg, seed)
  tx, _ = make_optimizer(lr=1e-4, steps=1000, warmup=10, weight_decay=0.01, clip=1.0,
                         rules=model.optimizer_rules)
  graphdef, state = init_state(model, tx, seed)
  step_fn = compile_train_step(make_train_step(graphdef, tx))
  rng = np.random.default_rng(seed)
  batches = []
  for _ in range(2):  # alternate two device-resident batches: never time on one input
    tok = rng.integers(0, cfg.vocab_size, (batch_size, cfg.ctx_len + 1), dtype=np.int32)
    batches.append((jnp.asarray(tok[:, :-1]), jnp.asarray(tok[:, 1:]),
                    jnp.ones((batch_size, cfg.ctx_len), jnp.float32)))
  state, compile_s, times, loss = time_train_steps(step_fn, state, batches, warmup_steps, steps)
  mem = None
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    mem = stats["peak_bytes_in_use"] / 2**30
  return {"batch_size": batch_size, "compile_s": compile_s, "step_s": statistics.median(times),
          "step_s_min": min(times), "loss": loss, "peak_mem_gib": mem}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--preset", default="tiny")
  p.add_argument("--ctx-len", type=int, default=1024)
  p.add_argument("--vocab-size", type=int, help="default: the preset's")
  p.add_argument("--n-layer", type=int, help="default: the preset's")
  p.add_argument("--n-embd", type=int, help="default: the preset's")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--wkv-impl", default=None, help="default: the platform's")
  p.add_argument("--scan-layers", action="store_true",
                 help="the blocks as one lax.scan (default: a Python loop)")
  p.add_argument("--remat", default="none", help="none, full, dots, dots_no_batch")
  p.add_argument("--batch-sizes", default="8,16")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup-steps", type=int, default=2)
  p.add_argument("--measured-tflops", type=float, help="measured matmul peak, for a 2nd MFU")
  p.add_argument("--json", help="write the results here")
  args = p.parse_args(argv)
  over = dict(ctx_len=args.ctx_len, dtype=args.dtype, wkv_impl=args.wkv_impl,
              scan_layers=args.scan_layers, remat=args.remat)
  for name in ("vocab_size", "n_layer", "n_embd"):
    if getattr(args, name):
      over[name] = getattr(args, name)
  cfg = preset(args.preset, **over)
  kind = jax.devices()[0].device_kind
  peak = M.peak_flops(kind, cfg.dtype)
  fpt = M.train_flops_per_token(cfg)
  rows = []
  for b in [int(x) for x in args.batch_sizes.split(",")]:
    try:
      r = bench(cfg, b, args.steps, args.warmup_steps)
    except Exception as e:  # e.g. out of memory at a large batch: report, go on
      print(f"batch {b}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
      continue
    r["tokens_per_s"] = b * cfg.ctx_len / r["step_s"]
    r["tflops"] = r["tokens_per_s"] * fpt / 1e12
    r["mfu_spec"] = None if peak is None else r["tokens_per_s"] * fpt / peak
    r["mfu_measured"] = (None if args.measured_tflops is None
                         else r["tokens_per_s"] * fpt / (args.measured_tflops * 1e12))
    rows.append(r)
  result = {"device": kind, "backend": jax.default_backend(), "jax": jax.__version__,
            "preset": args.preset, "config": cfg.to_dict(), "params": cfg.param_count(),
            "matmul_params": cfg.matmul_params(), "flops_per_token": fpt,
            "peak_flops_spec": peak, "measured_tflops": args.measured_tflops,
            "steps_timed": args.steps, "rows": rows}
  print(f"{kind}: {args.preset} ({cfg.param_count():,} params, 6N = {fpt / 1e9:.2f} GFLOP/token)"
        f", T={cfg.ctx_len}, {cfg.dtype}, wkv={cfg.wkv_impl}, scan_layers={cfg.scan_layers}, "
        f"remat={cfg.remat}; peak {peak and peak / 1e12} TFLOP/s")
  print("| batch | tokens/step | step ms | tokens/s | TFLOP/s | MFU (spec) | MFU (measured) "
        "| peak GiB | compile s |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
    print(f"| {r['batch_size']} | {r['batch_size'] * cfg.ctx_len} | {r['step_s'] * 1e3:.1f} | "
          f"{r['tokens_per_s']:,.0f} | {r['tflops']:.1f} | {f(r['mfu_spec'], '.1%')} | "
          f"{f(r['mfu_measured'], '.1%')} | {f(r['peak_mem_gib'], '.1f')} | "
          f"{r['compile_s']:.1f} |")
  if args.json:
    with open(args.json, "w") as fh:
      json.dump(result, fh, indent=1)


if __name__ == "__main__":
  main()
