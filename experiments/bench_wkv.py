"""WKV benchmark: lax.scan, associative_scan and the Pallas kernel side by side, plus a
full 169m training step with pallas vs associative_scan.

  PYTHONPATH=$PWD python3 experiments/bench_wkv.py --out $OUT/bench_wkv.json

Times are medians over batches of back-to-back calls (after a warm-up call), on random
inputs. Bandwidth is reported against a device copy (x + 1 on 1 GiB, bytes read plus
written) measured in the same run. Bytes counted: forward reads k, v and writes y (3
arrays of B*T*C); forward+backward is held to the floor of 9 such arrays (forward 3;
backward reads k, v, y, gy and writes dk, dv), although the kernel itself needs only 8
(it re-runs the forward instead of reading y). ``--sweep`` times the kernel over a few
BlockSizes; ``--check`` compares it with associative_scan at the benchmark shapes.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.wkv4 import BlockSizes, wkv4
from rwkv_jax.ops import WKVState, wkv_associative_scan, wkv_scan_reference

SHAPES = [(8, 4096, 2048), (1, 16384, 1024), (16, 1024, 768), (4, 65536, 512)]
# lax.scan costs ~18 us per step on an H100 whatever B*C: keep it where T is short.
SCAN_MAX_T = 4096
H100_BF16_PEAK = 989.4e12  # dense bf16 tensor-core FLOP/s (datasheet, SXM)


def timed(fn, *args, batches: int = 7, batch_s: float = 0.03) -> float:
  """Median seconds per call over ``batches`` batches of back-to-back calls."""
  jax.block_until_ready(fn(*args))  # compile and warm up
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  inner = max(1, min(200, int(batch_s / max(time.perf_counter() - t0, 1e-6))))
  times = []
  for _ in range(batches):
    t0 = time.perf_counter()
    for _ in range(inner):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / inner)
  return statistics.median(times)


def copy_bandwidth() -> float:
  """Bytes per second of x + 1 over 1 GiB of float32 (read + write)."""
  x = jax.random.normal(jax.random.key(0), (1 << 28,), jnp.float32)
  return 2 * x.nbytes / timed(jax.jit(lambda x: x + 1.0), x)


def matmul_flops() -> float:
  """FLOP/s of one 8192^3 bf16 matmul on random data."""
  a, b = (jax.random.normal(jax.random.key(i), (8192, 8192), jnp.bfloat16) for i in (1, 2))
  return 2 * 8192 ** 3 / timed(jax.jit(jnp.matmul), a, b)


def _inputs(b, t, c, dtype, seed=0):
  rng = np.random.default_rng(seed)
  w = jnp.asarray(np.exp(rng.uniform(-6.0, 1.0, c)), jnp.float32)
  u = jnp.asarray(rng.normal(size=c), jnp.float32)
  k, v, gy = (jax.random.normal(jax.random.key(seed + i), (b, t, c), dtype) for i in range(3))
  return w, u, k, v, WKVState.zeros(b, c), gy


def _impl(name, blocks=None):
  if name == "pallas":
    return functools.partial(wkv4, block_sizes=blocks)
  return {"scan": wkv_scan_reference, "associative_scan": wkv_associative_scan}[name]


def _fwd(impl):
  return jax.jit(lambda w, u, k, v, s, gy: impl(w, u, k, v, s))


def _fwd_bwd(impl):
  def f(w, u, k, v, s, gy):
    (y, st), vjp = jax.vjp(impl, w, u, k, v, s)
    return vjp((gy, jax.tree.map(jnp.zeros_like, st)))
  return jax.jit(f)


def bench_shape(shape, impls, dtype, copy_bw, blocks=None):
  b, t, c = shape
  args = _inputs(b, t, c, dtype)
  array = b * t * c * jnp.dtype(dtype).itemsize
  rows = []
  for name in impls:
    if name == "scan" and t > SCAN_MAX_T:
      continue
    for mode, make, n_arrays in (("fwd", _fwd, 3), ("fwd+bwd", _fwd_bwd, 9)):
      sec = timed(make(_impl(name, blocks)), *args, batches=3 if name == "scan" else 7)
      gbs = n_arrays * array / sec / 1e9
      rows.append(dict(shape=list(shape), dtype=jnp.dtype(dtype).name, impl=name, mode=mode,
                       ms=sec * 1e3, gb_s=gbs, pct_copy=100 * gbs * 1e9 / copy_bw))
      print(f"  {str(shape):18s} {name:16s} {mode:8s} {sec * 1e3:9.3f} ms {gbs:7.0f} GB/s "
            f"{rows[-1]['pct_copy']:5.1f}%", flush=True)
  return rows


def check_shape(shape, dtype=jnp.float32):
  """Relative errors of the kernel against associative_scan: y, final den, dk, dv, dw."""
  b, t, c = shape
  w, u, k, v, s, gy = _inputs(b, t, c, dtype, seed=7)
  rel = lambda a, r: float(jnp.linalg.norm((a - r).astype(jnp.float32))
                           / jnp.linalg.norm(r.astype(jnp.float32)))
  out = {}
  for name in ("pallas", "associative_scan"):
    y, st = _fwd(_impl(name))(w, u, k, v, s, gy)
    gw, gu, gk, gv, _ = _fwd_bwd(_impl(name))(w, u, k, v, s, gy)
    out[name] = (y, st.den * jnp.exp(st.max), gk, gv, gw, gu)
  errs = {n: rel(a, r) for n, a, r in zip(("y", "den", "dk", "dv", "dw", "du"), *out.values())}
  print(f"  check {shape}: " + " ".join(f"{n}={e:.1e}" for n, e in errs.items()), flush=True)
  return dict(shape=list(shape), **errs)


SWEEP = [
    # T-chunks already below 1024 programs (B*C < 65536): 5 arrays moved instead of 3.
    BlockSizes(min_programs=1024),
    BlockSizes(block_c=32, block_c_bwd=32, min_programs=512),
]


def train_step_bench(impl: str, batch: int, seq: int, steps: int, peak: float):
  """Tokens/s and MFU of one AdamW step of the 169m preset in bfloat16."""
  import optax
  from flax import nnx
  from rwkv_jax import RWKV, RWKVConfig

  cfg = RWKVConfig.preset("169m", dtype="bfloat16", wkv_impl=impl, ctx_len=seq)
  graphdef, params = nnx.split(RWKV(cfg, rngs=nnx.Rngs(0)), nnx.Param)
  opt = optax.adamw(1e-4)
  # Own buffers for every leaf (init shares zero arrays), so all of them can be donated.
  params = jax.tree.map(jnp.copy, params)
  opt_state = jax.tree.map(jnp.copy, opt.init(params))

  def loss_fn(params, tokens):
    logits = nnx.merge(graphdef, params)(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, tokens):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  tokens = jax.random.randint(jax.random.key(0), (batch, seq + 1), 0, cfg.vocab_size)
  for _ in range(2):  # compile, warm up
    params, opt_state, loss = step(params, opt_state, tokens)
  jax.block_until_ready(loss)
  t0 = time.perf_counter()
  for _ in range(steps):
    params, opt_state, loss = step(params, opt_state, tokens)
  jax.block_until_ready(loss)
  sec = (time.perf_counter() - t0) / steps
  # The input embedding is a lookup, not a matmul: it is left out of N.
  n = cfg.param_count() - cfg.vocab_size * cfg.n_embd
  tok_s = batch * seq / sec
  row = dict(impl=impl, batch=batch, seq=seq, step_ms=sec * 1e3, tokens_s=tok_s,
             n_params_matmul=n, mfu=6 * n * tok_s / peak, loss=float(loss))
  print(f"  169m train step {impl:16s} B{batch} T{seq}: {sec * 1e3:8.1f} ms "
        f"{tok_s:10.0f} tok/s MFU {100 * row['mfu']:.1f}%", flush=True)
  return row


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default="bench_wkv.json")
  p.add_argument("--impls", default="scan,associative_scan,pallas")
  p.add_argument("--shapes", default=";".join(",".join(map(str, s)) for s in SHAPES))
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--sweep", type=int, default=0, metavar="N",
                 help="time the kernel over BlockSizes variants at the first N shapes")
  p.add_argument("--check", action="store_true", help="compare with associative_scan first")
  p.add_argument("--train-batch", type=int, default=32, help="0 skips the training step")
  p.add_argument("--train-steps", type=int, default=10)
  args = p.parse_args(argv)
  shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";") if s]
  dtype = jnp.dtype(args.dtype)
  dev = jax.devices()[0]
  result = dict(device=dev.device_kind, jax=jax.__version__, argv=sys.argv[1:], rows=[],
                sweep=[], checks=[], train=[])

  def save():  # after every section, so a run cut short still leaves its numbers
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)

  print(f"device {dev.device_kind}, jax {jax.__version__}", flush=True)
  result["copy_gb_s"] = copy_bw = copy_bandwidth()
  print(f"copy bandwidth {copy_bw / 1e9:.0f} GB/s", flush=True)
  if args.check:
    result["checks"] = [check_shape(s) for s in shapes]
    save()
  for shape in shapes:
    result["rows"] += bench_shape(shape, args.impls.split(","), dtype, copy_bw)
    save()
  for blocks in SWEEP if args.sweep else ():
    print(f" {blocks}", flush=True)
    for shape in shapes[:args.sweep]:
      for row in bench_shape(shape, ["pallas"], dtype, copy_bw, blocks):
        result["sweep"].append(dict(row, blocks=dataclasses.asdict(blocks)))
    save()
  if args.train_batch:
    result["matmul_flops"] = peak_meas = matmul_flops()
    print(f"bf16 matmul {peak_meas / 1e12:.0f} TFLOP/s (MFU below is against the "
          f"{H100_BF16_PEAK / 1e12:.0f} TFLOP/s datasheet peak)", flush=True)
    for impl in ("associative_scan", "pallas"):
      try:
        result["train"].append(
            train_step_bench(impl, args.train_batch, 1024, args.train_steps, H100_BF16_PEAK))
      except Exception as e:  # e.g. out of memory: keep the other numbers
        print(f"  169m train step {impl}: failed: {str(e)[:300]}", flush=True)
        result["train"].append(dict(impl=impl, error=str(e)[:1000]))
      save()
  print("\n| shape | dtype | impl | mode | ms | GB/s | % of copy bw |\n|---|---|---|---|---|---|---|")
  for r in result["rows"]:
    print(f"| {tuple(r['shape'])} | {r['dtype']} | {r['impl']} | {r['mode']} | {r['ms']:.3f} | "
          f"{r['gb_s']:.0f} | {r['pct_copy']:.1f} |")
  for r in result["train"]:
    if "error" not in r:
      print(f"| 169m train B{r['batch']} T{r['seq']} | bf16 | {r['impl']} | step | "
            f"{r['step_ms']:.1f} | {r['tokens_s']:.0f} tok/s | MFU {100 * r['mfu']:.1f}% |")


if __name__ == "__main__":
  main()
