"""WKV-7 benchmark: "scan" vs "chunked" vs "pallas", forward and forward+backward.

  PYTHONPATH=$PWD python3 experiments/bench_wkv7.py --out DIR            # GPU
  PYTHONPATH=$PWD python3 experiments/bench_wkv7.py --out DIR --quick    # CPU, tiny shapes

Shapes (B, T, H) = (8, 4096, 32), (1, 32768, 32) and (32, 1024, 12), N = 64 ("scan" only
where T <= --scan-max-t), bf16 inputs drawn like the
model (w = exp(-exp(-0.5) sigmoid(x)), kk l2-normalised, a = -kk, b = kk * sigmoid(x)),
an incoming float32 state. "fwd" computes y and the new state; "fwd+bwd" the gradients
of sum(y) + sum(new state) in all six inputs and the state. Each case is compiled once
(compile seconds and XLA's temp bytes reported), then timed as the median over batches
of back-to-back calls after a warm-up (``bench_wkv.timed``); a case whose single call
exceeds --case-cap-s / --repeats is reported from one call. "min GB/s" divides the bytes
every implementation must move (the six inputs and y in bf16, the state in and out in
float32) by the time. ``--check`` first compares every implementation with "scan" on the
first --check-t steps of each shape. "pallas" runs at --pallas-chunks (default: the
kernel's own); --pallas-variants "L:prec[:warps],..." also times (forward only: the backward is
the same) pallas_kernels.wkv7 configs with chunk L and bf16 matmul mode prec, labelled
"pallas:L:prec". Prints a Markdown table; writes DIR/bench_wkv7.json.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from experiments._common import machine, print_table, write_json  # noqa: E402
from experiments.bench_wkv import timed  # noqa: E402
from rwkv_jax.ops.wkv7 import DEFAULT_CHUNK_SIZE, available_implementations, wkv7  # noqa: E402

SHAPES = "8,4096,32;1,32768,32;32,1024,12"
QUICK_SHAPES = "2,256,2;1,1024,2"


@functools.partial(jax.jit, static_argnames=("shape", "dtype"))
def make_inputs(key, shape, dtype):
  """(r, w, k, v, a, b) (B, T, H, N) in dtype and a float32 state, on device."""
  b, _, h, n = shape
  keys = jax.random.split(key, 7)
  normal = lambda i: jax.random.normal(keys[i], shape, jnp.float32)
  w = jnp.exp(-jnp.exp(-0.5) * jax.nn.sigmoid(normal(0)))
  kk = normal(1)
  kk = kk / jnp.linalg.norm(kk, axis=-1, keepdims=True)
  xs = (normal(2), w, normal(3), normal(4), -kk, kk * jax.nn.sigmoid(normal(5)))
  state = 0.1 * jax.random.normal(keys[6], (b, h, n, n), jnp.float32)
  return tuple(x.astype(dtype) for x in xs), state


def _op(impl, chunk_size):
  """(xs, state) -> (y, state): a registry name, or "pallas:L:prec" (a kernel config)."""
  if impl.startswith("pallas:"):
    from pallas_kernels.wkv7 import Config, wkv7_pallas
    _, chunk, prec, *warps = impl.split(":")  # pallas:L:prec[:num_warps]
    cfg = Config(chunk=int(chunk), precision_bf16=prec, num_warps=int(warps[0]) if warps else 4)
    interpret = jax.default_backend() != "gpu"  # the interpreter off the GPU (--quick)
    return lambda xs, state: wkv7_pallas(*xs, state, config=cfg, interpret=interpret)
  return lambda xs, state: wkv7(*xs, state, implementation=impl, chunk_size=chunk_size)


def forward(impl, chunk_size):
  return _op(impl, chunk_size)


def forward_backward(impl, chunk_size):
  op = _op(impl, chunk_size)

  def loss(xs, state):
    y, s = op(xs, state)
    return jnp.sum(y.astype(jnp.float32)) + jnp.sum(s)
  return jax.grad(loss, argnums=(0, 1))


def min_bytes(shape, dtype) -> int:
  b, t, h, n = shape
  return 7 * b * t * h * n * jnp.dtype(dtype).itemsize + 2 * b * h * n * n * 4


def time_case(fn, args, repeats: int, cap_s: float) -> dict:
  """Compile, then the median seconds per call (one call where a call is over the cap)."""
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  temp = int(mem.temp_size_in_bytes) if mem is not None else None
  jax.block_until_ready(compiled(*args))  # warm-up
  t0 = time.perf_counter()
  jax.block_until_ready(compiled(*args))
  once = time.perf_counter() - t0
  if once * repeats > cap_s:
    return dict(s=once, repeats=1, compile_s=compile_s, temp_bytes=temp)
  return dict(s=timed(compiled, *args, batches=repeats), repeats=repeats,
              compile_s=compile_s, temp_bytes=temp)


def rel(a, b) -> float:
  a, b = (jnp.asarray(x, jnp.float32) for x in (a, b))
  return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))


def check(shape, impls, chunk_sizes, dtype, t_check: int) -> list[dict]:
  """y and state of every implementation against scan on the first t_check steps."""
  shape = (shape[0], min(shape[1], t_check), *shape[2:])
  xs, state = make_inputs(jax.random.key(1), shape, dtype)
  y_ref, s_ref = jax.jit(forward("scan", None))(xs, state)
  rows = []
  for impl, cs in ((i, c) for i in impls if i != "scan" for c in chunk_sizes(i)):
    try:
      y, s = jax.jit(forward(impl, cs))(xs, state)
    except Exception as e:  # e.g. a kernel config over the shared-memory limit
      rows.append(dict(shape=list(shape), impl=impl, chunk_size=cs,
                       error=f"{type(e).__name__}: {str(e)[:300]}"))
      print(f"  check {shape} {impl} chunk {cs}: failed: {rows[-1]['error']}", flush=True)
      continue
    rows.append(dict(shape=list(shape), impl=impl, chunk_size=cs, y_rel_err=rel(y, y_ref),
                     state_rel_err=rel(s, s_ref)))
    print(f"  check {shape} {impl} chunk {cs}: y {rows[-1]['y_rel_err']:.1e} "
          f"state {rows[-1]['state_rel_err']:.1e}", flush=True)
  return rows


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default=".", help="directory for bench_wkv7.json")
  p.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke run)")
  p.add_argument("--impls", default=None,
                 help="comma list (default: every registered one: %(default)s)")
  p.add_argument("--shapes", default=None, help=f"B,T,H;... (default {SHAPES})")
  p.add_argument("--head-size", type=int, default=None, help="N (default 64; 16 if --quick)")
  p.add_argument("--chunk-sizes", default=None,
                 help="chunk sizes for chunked (and pallas), comma list (default "
                      f"{DEFAULT_CHUNK_SIZE}; 16,64 if --quick)")
  p.add_argument("--pallas-chunks", default=None,
                 help="chunk sizes for pallas (default: the kernel's default)")
  p.add_argument("--pallas-variants", default="",
                 help="extra kernel configs to time forward, L:prec,... (e.g. 16:tf32,32:bf16)")
  p.add_argument("--scan-max-t", type=int, default=1024, help="time scan only up to this T")
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  p.add_argument("--repeats", type=int, default=None, help="timed batches (7; 3 if --quick)")
  p.add_argument("--case-cap-s", type=float, default=120.0,
                 help="time one call only where repeats x one call would exceed this")
  p.add_argument("--modes", default="fwd,fwd+bwd")
  p.add_argument("--check", action="store_true", help="compare with scan first")
  p.add_argument("--check-t", type=int, default=1024)
  args = p.parse_args(argv)
  quick = args.quick
  impls = (args.impls.split(",") if args.impls else list(available_implementations()))
  shapes = [tuple(int(x) for x in s.split(","))
            for s in (args.shapes or (QUICK_SHAPES if quick else SHAPES)).split(";") if s]
  n = args.head_size or (16 if quick else 64)
  chunked_sizes = [int(c) for c in
                   (args.chunk_sizes or ("16,64" if quick else str(DEFAULT_CHUNK_SIZE))).split(",")]
  pallas_sizes = ([int(c) for c in args.pallas_chunks.split(",")] if args.pallas_chunks
                  else [None])
  variants = [f"pallas:{v}" for v in args.pallas_variants.split(",") if v]
  chunk_sizes = lambda impl: (chunked_sizes if impl == "chunked" else
                              pallas_sizes if impl == "pallas" else [None])
  repeats = args.repeats or (3 if quick else 7)
  dtype = jnp.dtype(args.dtype)
  modes = {"fwd": forward, "fwd+bwd": forward_backward}
  out = Path(args.out) / "bench_wkv7.json"
  result = dict(machine=machine(), argv=sys.argv[1:] if argv is None else argv, n=n,
                dtype=dtype.name, checks=[], rows=[])
  print(result["machine"], flush=True)

  if args.check:
    for b, t, h in shapes:
      result["checks"] += check((b, t, h, n), impls + variants, chunk_sizes, dtype,
                                args.check_t)
    write_json(out, result)
  for b, t, h in shapes:
    shape = (b, t, h, n)
    xs, state = make_inputs(jax.random.key(0), shape, dtype)
    for impl in impls + variants:
      if impl == "scan" and t > args.scan_max_t:
        continue
      for cs in chunk_sizes(impl):
        for mode in args.modes.split(","):
          if impl in variants and mode != "fwd":
            continue
          row = dict(shape=[b, t, h, n], impl=impl, chunk_size=cs, mode=mode)
          try:
            row.update(time_case(modes[mode](impl, cs), (xs, state), repeats,
                                 args.case_cap_s))
            row["ms"] = 1e3 * row["s"]
            row["min_gb_s"] = min_bytes(shape, dtype) / row["s"] / 1e9
            row["tokens_s"] = b * t / row["s"]
            print(f"  {str((b, t, h)):16s} {impl:14s} {str(cs):5s} {mode:8s} "
                  f"{row['ms']:10.3f} ms  (compile {row['compile_s']:.1f} s)", flush=True)
          except Exception as e:  # e.g. out of memory: keep the other numbers
            row["error"] = f"{type(e).__name__}: {str(e)[:500]}"
            print(f"  {(b, t, h)} {impl} {cs} {mode}: failed: {row['error'][:200]}", flush=True)
          result["rows"].append(row)
          write_json(out, result)  # after every case: a run cut short keeps its numbers
    del xs, state

  table = [[f"({r['shape'][0]}, {r['shape'][1]}, {r['shape'][2]})", r["impl"],
            r["chunk_size"] or "-", r["mode"], r.get("ms", "error"),
            r.get("min_gb_s", "-"), r.get("compile_s", "-"), r.get("repeats", "-")]
           for r in result["rows"]]
  print_table(["(B, T, H)", "impl", "chunk", "mode", "ms", "min GB/s", "compile s",
               "repeats"], table)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
