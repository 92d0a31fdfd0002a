"""Data-parallel training throughput: tokens/s of the 169m preset on 1 GPU vs all GPUs.

Each device count n runs the ``rwkv-jax train --mesh data=n`` step (``train_step`` of
``rwkv_jax.training.step`` with the ``rwkv_jax.sharding`` in/out shardings, traced on the
mesh so the Pallas WKV runs per shard) at a fixed batch per device, so the global batch
grows with n (weak scaling) and the ideal speed-up is n. Batches are placed with
``jax.make_array_from_process_local_data``; two random batches alternate (never one input
timed twice in a row); the median step of ``--steps`` timed steps counts.

  python experiments/bench_multigpu.py --json $OUT/bench_multigpu.json   # 1 and all GPUs
  python experiments/bench_multigpu.py --counts 1 --steps 5             # a quick check
  python experiments/bench_multigpu.py --preset tiny --ctx-len 64 --batch-per-device 2 \
      --dtype float32 --counts 1,8      # CPU smoke test (with 8 fake devices)
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from experiments._common import machine, print_table, time_train_steps, write_json  # noqa: E402
from rwkv_jax import RWKV, RWKVConfig, sharding  # noqa: E402
from rwkv_jax.training import metrics as M  # noqa: E402
from rwkv_jax.training.optim import make_optimizer  # noqa: E402
from rwkv_jax.training.step import compile_train_step, init_state, make_train_step  # noqa: E402


def bench(cfg: RWKVConfig, n: int, batch_per_device: int, steps: int, warmup: int,
          seed: int = 0) -> dict:
  mesh = sharding.make_mesh(f"data={n}", devices=jax.devices()[:n])
  tx, _ = make_optimizer(lr=1e-4, steps=1000, warmup=10, weight_decay=0.01, clip=1.0)
  graphdef, state = init_state(RWKV(cfg, rngs=nnx.Rngs(seed)), tx, seed)
  state_sh = sharding.state_shardings(state, mesh, state.params)
  state = jax.device_put(state, state_sh)
  step = compile_train_step(
      sharding.traced_on_mesh(
          make_train_step(graphdef, tx, gather=sharding.compute_gather(mesh, state.params)),
          mesh),
      state_shardings=state_sh, batch_shardings=sharding.batch_sharding(mesh))
  batch = batch_per_device * n
  rng = np.random.default_rng(seed)
  batches = []
  for _ in range(2):
    tok = rng.integers(0, cfg.vocab_size, (batch, cfg.ctx_len + 1), dtype=np.int32)
    mask = np.ones((batch, cfg.ctx_len), np.float32)
    batches.append(sharding.place_batch((tok[:, :-1], tok[:, 1:], mask), mesh))
  state, compile_s, times, loss = time_train_steps(step, state, batches, warmup, steps)
  peak = [d.memory_stats() or {} for d in mesh.devices.flat]
  peak_gib = max((s.get("peak_bytes_in_use", 0) for s in peak), default=0) / 2**30 or None
  del state, batches
  gc.collect()
  step_s = statistics.median(times)
  return {"devices": n, "mesh": sharding.mesh_description(mesh), "global_batch": batch,
          "compile_s": compile_s, "step_s": step_s, "step_s_min": min(times),
          "tokens_per_s": batch * cfg.ctx_len / step_s, "loss": loss, "peak_gib": peak_gib}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--preset", default="169m")
  p.add_argument("--ctx-len", type=int, default=1024)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--wkv-impl", default=None, help="default: by platform (pallas on GPU)")
  p.add_argument("--batch-per-device", type=int, default=8)
  p.add_argument("--counts", help="device counts to run, e.g. 1,2 (default: 1 and all)")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--json", default="experiments/out/bench_multigpu.json")
  args = p.parse_args(argv)
  total = jax.device_count()
  counts = ([int(c) for c in args.counts.split(",")] if args.counts
            else sorted({1, total}))
  bad = [c for c in counts if not 1 <= c <= total]
  if bad:
    raise SystemExit(f"--counts {bad}: this machine has {total} devices")
  cfg = RWKVConfig.preset(args.preset, ctx_len=args.ctx_len, dtype=args.dtype,
                          wkv_impl=args.wkv_impl)
  kind = jax.devices()[0].device_kind
  peak = M.peak_flops(kind, cfg.dtype)
  fpt = M.train_flops_per_token(cfg)
  results = [bench(cfg, n, args.batch_per_device, args.steps, args.warmup) for n in counts]
  base = next((r for r in results if r["devices"] == 1), None)
  rows = []
  for r in results:
    r["speedup"] = None if base is None else r["tokens_per_s"] / base["tokens_per_s"]
    r["efficiency"] = None if r["speedup"] is None else r["speedup"] / r["devices"]
    r["mfu"] = None if peak is None else r["tokens_per_s"] * fpt / (peak * r["devices"])
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    rows.append([r["devices"], r["global_batch"], f"{r['step_s'] * 1e3:.1f}",
                 f"{r['tokens_per_s']:,.0f}", f"{r['tokens_per_s'] / r['devices']:,.0f}",
                 fmt(r["speedup"], ".2f"), fmt(r["efficiency"], ".0%"), fmt(r["mfu"], ".1%"),
                 fmt(r["peak_gib"], ".1f"), f"{r['loss']:.3f}", f"{r['compile_s']:.0f}"])
  print(f"# {machine()}; {kind}")
  print(f"# {args.preset} ({cfg.param_count():,} params), T={cfg.ctx_len}, {cfg.dtype}, "
        f"wkv={cfg.wkv_impl or 'default'}, {args.batch_per_device} sequences per device, "
        f"median of {args.steps} steps")
  print_table(["GPUs", "global batch", "step ms", "tokens/s", "tokens/s/GPU", "speed-up",
               "efficiency", "MFU", "peak GiB/dev", "loss", "compile s"], rows)
  write_json(args.json, {"machine": machine(), "device": kind, "command": " ".join(sys.argv),
                         "config": cfg.to_dict(), "batch_per_device": args.batch_per_device,
                         "flops_per_token": fpt, "peak_flops": peak, "results": results})
  print(f"wrote {args.json}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
