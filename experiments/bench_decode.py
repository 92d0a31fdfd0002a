"""Decode cost versus context length, and parallel versus token-by-token prefill.

For each context length N a real state after N random tokens is made by the parallel
prefill (the engine's ``advance``: one parallel forward, or for N > 65,536 consecutive
65,536-token parallel forwards, each continuing from the state of the last). Decode is then timed from that state: the on-device
``decode_program`` (one ``lax.scan`` of --steps greedy steps, sampling included), the
median over --reps calls divided by --steps. Batch B > 1 decodes from B copies of the
batch-1 state after N tokens (a real state after N tokens; prefilling B different N-token
prompts would only cost benchmark time). RWKV's per-token cost should not depend on N.

Then 16K tokens (GPU; 1K on CPU) are prefilled in parallel and token by token (a jitted
``lax.scan`` of recurrent steps), and the two final states are compared, in the benchmark
dtype and in float32 at matmul precision "highest".

Usage:
  PYTHONPATH=$PWD python3 experiments/bench_decode.py --out DIR          # GPU: 169m, bf16
  PYTHONPATH=$PWD python3 experiments/bench_decode.py --out DIR --cpu-quick
Prints tables, writes DIR/bench_decode.json and DIR/bench_decode.png.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rwkv_jax import RWKV, RWKVConfig  # noqa: E402
from rwkv_jax.testing import perturb_params  # noqa: E402
from rwkv_jax.inference import SamplingConfig  # noqa: E402
from rwkv_jax.inference._engine import (  # noqa: E402
    DecodeCarry, advance, decode_program, stop_array)

CHUNK = 1 << 16  # tokens per parallel forward when building long states (batch 1)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", required=True)
  p.add_argument("--cpu-quick", action="store_true", help="tiny preset, short contexts")
  p.add_argument("--preset", default=None)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--contexts", default=None, help="comma-separated token counts")
  p.add_argument("--batches", default=None)
  p.add_argument("--steps", type=int, default=None, help="decode steps per timed call")
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--prefill-len", type=int, default=None)
  p.add_argument("--unroll", default="1", help="lax.scan unroll factors to try at batch 1")
  p.add_argument("--implementation", default=None, help="WKV path for the prefill")
  p.add_argument("--steps-impl", default="model,pallas",
                 help="decode steps to try at batch 1 (rwkv_jax.inference DECODE_STEPS)")
  p.add_argument("--block-out", default="8,16,32",
                 help="fused-step block_out values to try at batch 1")
  p.add_argument("--num-warps", default="4", help="fused-step num_warps values to try")
  p.add_argument("--decode-only", action="store_true",
                 help="skip the prefill comparison (e.g. to compare XLA_FLAGS settings)")
  args = p.parse_args(argv)
  quick = args.cpu_quick
  args.preset = args.preset or ("tiny" if quick else "169m")
  ints = lambda s: [int(x) for x in s.split(",")]
  args.contexts = ints(args.contexts or ("256,1024,4096" if quick else
                                         "1024,16384,131072,1048576"))
  args.batches = ints(args.batches or ("1,8" if quick else "1,256"))
  args.steps = args.steps or (64 if quick else 512)
  args.prefill_len = args.prefill_len or (1024 if quick else 16384)
  args.unroll = ints(args.unroll)
  args.steps_impl = args.steps_impl.split(",")
  args.block_out = ints(args.block_out)
  args.num_warps = ints(args.num_warps)
  return args


def make_model(cfg: RWKVConfig, seed: int = 0) -> RWKV:
  """A model with every parameter perturbed (the Appendix E init has zero matrices)."""
  return perturb_params(RWKV(cfg, rngs=nnx.Rngs(seed)), seed + 1, 0.02)


def timed(fn, reps: int) -> tuple[float, object]:
  """(median seconds over reps calls, the last result); fn must already be compiled."""
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    result = jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return statistics.median(times), result


def bytes_in_use() -> int | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("bytes_in_use")


def state_rel_err(a, b) -> float:
  """max over fields of ||a - b|| / ||b|` (float64)."""
  errs = []
  for x, y in zip(a, b):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    errs.append(float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30)))
  return max(errs)


class Bench:
  def __init__(self, cfg: RWKVConfig, implementation):
    self.cfg = cfg
    self.model = make_model(cfg)
    self.graphdef, self.params = nnx.split(self.model)
    self.implementation = implementation
    graphdef = self.graphdef

    @jax.jit
    def head(params, x):
      return nnx.merge(graphdef, params).logits(x[:, None])[:, 0]

    self._advance = jax.jit(
        lambda params, tokens, state, impl, chunk: advance(
            nnx.merge(graphdef, params), tokens, state, impl, chunk),
        static_argnums=(3, 4))
    self._head = head

  def consume(self, tokens, *, implementation, chunk):
    """(hidden of the last token, state) after tokens (B, N) from an empty state.

    N > CHUNK runs as N / CHUNK calls of one compiled CHUNK-token parallel forward (the
    calls queue on the device without waiting on the host)."""
    state = self.model.init_state(tokens.shape[0])
    piece = min(tokens.shape[1], CHUNK)
    for i in range(0, tokens.shape[1], piece):
      x, state = self._advance(self.params, tokens[:, i:i + piece], state, implementation,
                               min(chunk, piece))
    return x, state

  def _decode_call(self, carry, steps, unroll, step):
    """decode_program's arguments: greedy, no stop tokens, no limit; step: (DECODE_STEPS
    name, fused-plan options as (name, value) pairs)."""
    return ((self.graphdef, self.params, carry, jax.random.key(0), jnp.int32(1 << 30),
             stop_array(()), jnp.int32(-1)),
            dict(steps=steps, sampling=SamplingConfig.greedy(), unroll=unroll,
                 step_impl=step[0], step_options=step[1]))

  def decode(self, carry, steps, unroll, step=("model", ())):
    args, kwargs = self._decode_call(carry, steps, unroll, step)
    return decode_program(*args, **kwargs)

  def kernel_count(self, carry, steps, unroll, step) -> dict:
    """Kernels of one decode step: fusions and custom calls (Pallas kernels, GEMMs) in the
    body of the optimised decode loop (computations it calls counted in)."""
    args, kwargs = self._decode_call(carry, steps, unroll, step)
    return loop_body_kernels(decode_program.lower(*args, **kwargs).compile().as_text() or "")


def loop_body_kernels(hlo: str) -> dict:
  """{'fusion': n, 'custom-call': n} in the largest while body of an HLO module text."""
  comps, name = {}, None
  for line in hlo.splitlines():
    head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if head:
      name = head.group(1)
      comps[name] = []
    elif name is not None and " = " in line:
      comps[name].append(line)
  bodies = [m.group(1) for ls in comps.values() for ln in ls
            for m in [re.search(r"body=%?([\w.\-]+)", ln)] if m]
  if not bodies:
    return {}
  body = max(bodies, key=lambda b: len(comps.get(b, ())))
  ops = lambda op: sum(1 for ln in comps.get(body, ()) if re.search(rf"\s{op}\(", ln))
  return {"fusion": ops("fusion"), "custom-call": ops("custom-call")}


def step_candidates(args, batch: int, cfg) -> list[tuple[str, tuple]]:
  """(decode step, options) pairs to try: the model step, and the fused step for each
  block_out that fits the model."""
  from pallas_kernels.rwkv4_decode import supports

  out = []
  for name in args.steps_impl:
    if name == "model":
      out.append(("model", ()))
      continue
    for bo in args.block_out:
      for nw in args.num_warps:
        if supports(batch, cfg.n_embd, cfg.dim_ffn, block_out=bo):
          out.append((name, (("block_out", bo), ("num_warps", nw))))
  return out


def step_label(step) -> str:
  return step[0] + "".join(f" {k}={v}" for k, v in step[1])


def float32_bench(bench: Bench) -> Bench:
  """The same parameters in a float32 model."""
  b32 = Bench(bench.cfg.replace(dtype="float32"), None)
  nnx.update(b32.model, nnx.state(bench.model, nnx.Param))
  b32.graphdef, b32.params = nnx.split(b32.model)
  return b32


def pick_implementation(bench: Bench, requested, vocab: int):
  """The prefill WKV path: the requested / platform default, or associative_scan if it
  fails here (recorded in the results)."""
  from rwkv_jax.ops import resolve_implementation

  name = resolve_implementation(requested or bench.cfg.wkv_impl)
  if name == "associative_scan":
    return name, None
  probe = jnp.asarray(np.random.default_rng(1).integers(0, vocab, (1, 256)), jnp.int32)
  try:
    _, s = bench.consume(probe, implementation=name, chunk=256)
    _, ref = bench.consume(probe, implementation="associative_scan", chunk=256)
    err = state_rel_err(s, ref)
    if not err < 5e-2:
      raise ValueError(f"state differs from associative_scan by {err:.2e}")
    return name, None
  except Exception as e:  # a kernel that does not build or run here: say so, carry on
    return "associative_scan", f"{name} failed ({type(e).__name__}: {str(e)[:200]})"


def main(argv=None) -> int:
  args = parse_args(argv)
  out_dir = Path(args.out)
  out_dir.mkdir(parents=True, exist_ok=True)
  dev = jax.devices()[0]
  device = f"{dev.platform}:{getattr(dev, 'device_kind', '')} jax {jax.__version__}"
  cfg = RWKVConfig.preset(args.preset, dtype=args.dtype)
  print(f"# bench_decode: {args.preset} {args.dtype} on {device}; "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
  bench = Bench(cfg, args.implementation)
  impl, fallback = pick_implementation(bench, args.implementation, cfg.vocab_size)
  print(f"prefill WKV implementation: {impl}" + (f" ({fallback})" if fallback else ""),
        flush=True)
  rng = np.random.default_rng(0)
  results = dict(device=device, xla_flags=os.environ.get("XLA_FLAGS", ""), date="2026-11-23", preset=args.preset, dtype=args.dtype,
                 prefill_implementation=impl, prefill_fallback=fallback,
                 steps_per_call=args.steps, reps=args.reps, contexts={}, decode=[],
                 command="PYTHONPATH=$PWD python3 experiments/bench_decode.py " +
                         " ".join(argv if argv is not None else sys.argv[1:]))

  # 1. A real state after N tokens, for every context length.
  states = {}
  for n in args.contexts:
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, n)), jnp.int32)
    chunk = min(n, CHUNK)
    t = time.perf_counter()
    x, state = jax.block_until_ready(bench.consume(tokens, implementation=impl, chunk=chunk))
    secs = time.perf_counter() - t
    states[n] = (state, bench._head(bench.params, x))
    how = f"parallel prefill of {n} tokens ({impl}, {max(n // chunk, 1)} x {chunk}-token forwards)"
    results["contexts"][n] = dict(how=how, seconds_incl_compile=secs)
    print(f"state after {n:>8} tokens: {how}, {secs:.2f} s incl. compile", flush=True)
    del tokens

  # 2. Decode from each state.
  state_bytes = lambda b: 5 * cfg.n_layer * b * cfg.n_embd * 4
  unroll = args.unroll[0]
  if len(args.unroll) > 1:  # pick the scan unroll at batch 1, shortest context
    state, logits = states[args.contexts[0]]
    carry = DecodeCarry(state, logits, jnp.zeros((1,), bool), None, jnp.int32(0))
    per = {}
    for u in args.unroll:
      jax.block_until_ready(bench.decode(carry, args.steps, u))
      per[u] = timed(lambda: bench.decode(carry, args.steps, u), args.reps)[0]
    unroll = min(per, key=per.get)
    results["unroll_trial_ms_per_token"] = {u: 1e3 * s / args.steps for u, s in per.items()}
    print(f"unroll trial (ms/token at batch 1): {results['unroll_trial_ms_per_token']}")
  results["unroll"] = unroll

  # The decode step at batch 1: the model's T = 1 forward vs the fused kernels, side by
  # side from the same state; the fastest serves batch 1 below (batch > 8: the model step).
  state, logits = states[args.contexts[0]]
  carry = DecodeCarry(state, logits, jnp.zeros((1,), bool), None, jnp.int32(0))
  trial, ref_tokens = {}, None
  # The float32 model (matmul precision highest) one step from the same state: the
  # yardstick for the bfloat16 steps' rounding.
  b32 = float32_bench(bench)
  with jax.default_matmul_precision("highest"):
    exact = jax.block_until_ready(b32.decode(carry, 1, 1))[0]
  for step in step_candidates(args, 1, cfg):
    label = step_label(step)
    try:
      t = time.perf_counter()
      _, toks, _ = jax.block_until_ready(bench.decode(carry, args.steps, unroll, step))
      compile_s = time.perf_counter() - t
      med = timed(lambda: bench.decode(carry, args.steps, unroll, step), args.reps)[0]
      kernels = bench.kernel_count(carry, args.steps, unroll, step)
    except Exception as e:  # a step that does not build here: record it, go on
      trial[label] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
      print(f"decode step {label}: FAILED {trial[label]['error']}", flush=True)
      continue
    # Agreement with the first candidate (the model step): the next-token logits and state
    # after one step from the same state, and the greedy tokens (which part at the first
    # near-tie: a random model's logits are close together, so rounding-level
    # differences pick the other token there and the sequences go apart).
    one = jax.block_until_ready(bench.decode(carry, 1, 1, step))[0]
    toks = np.asarray(toks)
    if ref_tokens is None:
      ref_tokens, ref_one = toks, one
    same = int(np.cumprod(toks == ref_tokens).sum())
    diff = lambda a, b: max(state_rel_err([a.logits], [b.logits]), state_rel_err(a.state, b.state))
    err, err32 = diff(one, ref_one), diff(one, exact)
    trial[label] = dict(step=step[0], options=dict(step[1]), ms_per_token=1e3 * med / args.steps,
                        compile_s=compile_s, kernels=kernels, one_step_rel_err=err,
                        one_step_rel_err_vs_float32=err32,
                        greedy_tokens_equal_before_first_difference=same)
    print(f"decode step {label}: {trial[label]['ms_per_token']:.4f} ms/token, compile "
          f"{compile_s:.1f} s, {kernels}; one step: rel. err. vs the first {err:.1e}, vs "
          f"float32 {err32:.1e}; greedy tokens agree for {same}/{toks.size}", flush=True)
  ok = {k: v for k, v in trial.items() if "error" not in v}
  best = min(ok, key=lambda k: ok[k]["ms_per_token"])
  best_step = (ok[best]["step"], tuple(ok[best]["options"].items()))
  results["step_trial"] = trial
  results["batch1_step"] = best
  print(f"batch 1 decode step: {best}", flush=True)
  rows = []
  for b in args.batches:
    steps = args.steps if b == 1 else max(args.steps // 4, 32)
    for n in args.contexts:
      state, logits = states[n]
      tile = lambda x: jnp.repeat(x, b, axis=-2 if x.ndim == 3 else 0)
      carry = DecodeCarry(jax.tree.map(tile, state), tile(logits), jnp.zeros((b,), bool),
                          None, jnp.int32(0))
      step = best_step if b == 1 else ("model", ())
      jax.block_until_ready(bench.decode(carry, steps, unroll, step))  # compile (per batch)
      med = timed(lambda: bench.decode(carry, steps, unroll, step), args.reps)[0]
      live = bytes_in_use()
      row = dict(batch=b, context=n, steps=steps, step=step_label(step),
                 ms_per_step=1e3 * med / steps,
                 tokens_per_s=b * steps / med, state_mb=state_bytes(b) / 2**20,
                 live_mb=None if live is None else live / 2**20)
      results["decode"].append(row)
      rows.append(row)
      print(f"decode batch {b:>4} context {n:>8}: {row['ms_per_step']:.4f} ms/step, "
            f"{row['tokens_per_s']:,.0f} tokens/s", flush=True)
      del carry
  flat = {}
  for b in args.batches:
    ms = [r["ms_per_step"] for r in rows if r["batch"] == b]
    flat[b] = dict(min=min(ms), max=max(ms), spread_pct=100 * (max(ms) - min(ms)) / min(ms))
  results["flatness"] = flat

  if args.decode_only:
    print_tables(results, args)
    (out_dir / "bench_decode.json").write_text(json.dumps(results, indent=1, default=str))
    return 0

  # 3. Prefill: parallel vs token by token, same tokens, same final state.
  n = args.prefill_len
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, n)), jnp.int32)
  sequential = lambda: bench.consume(tokens, implementation="scan", chunk=1)
  jax.block_until_ready(sequential())  # compile (and one untimed run)
  seq, (_, s_seq) = timed(sequential, 1)
  prefill = dict(tokens=n, token_by_token_ms=1e3 * seq, parallel={})
  for name in dict.fromkeys([impl, "associative_scan"]):
    parallel = lambda: bench.consume(tokens, implementation=name, chunk=min(n, CHUNK))
    jax.block_until_ready(parallel())  # compile
    par, (_, s_par) = timed(parallel, args.reps)
    prefill["parallel"][name] = dict(ms=1e3 * par, speedup=seq / par,
                                     state_rel_err=state_rel_err(s_par, s_seq))
  # The same check in float32 at full matmul precision, where only WKV rounding differs.
  b32 = float32_bench(bench)
  with jax.default_matmul_precision("highest"):
    _, p32 = b32.consume(tokens, implementation=impl, chunk=min(n, CHUNK))
    _, q32 = b32.consume(tokens, implementation="scan", chunk=1)
    prefill["state_rel_err_fp32"] = state_rel_err(p32, q32)
  results["prefill"] = prefill
  results["targets"] = check_targets(results)
  print_tables(results, args)
  (out_dir / "bench_decode.json").write_text(json.dumps(results, indent=1, default=str))
  plot(results, out_dir / "bench_decode.png")
  return 0


def check_targets(r) -> dict:
  """The issue's H100 targets (meaningful only for 169m bf16 on a GPU)."""
  one = [d["ms_per_step"] for d in r["decode"] if d["batch"] == 1]
  big = [d["tokens_per_s"] for d in r["decode"] if d["batch"] == 256]
  mean = sum(one) / len(one) if one else None
  out = {}
  if one:
    out["batch1_max_ms_per_token<=0.30"] = (max(one), max(one) <= 0.30)
    dev = max(abs(x - mean) / mean for x in one)
    out["batch1_flat_within_5pct_of_mean"] = (100 * dev, dev <= 0.05)
  if big:
    out["batch256_min_tokens_per_s>=150k"] = (min(big), min(big) >= 150e3)
  best = max(q["speedup"] for q in r["prefill"]["parallel"].values())
  out["prefill_speedup>=50x"] = (best, best >= 50)
  return out


def print_tables(r, args) -> None:
  print(f"\n## Decode: {r['preset']} {r['dtype']}, {r['device']}, "
        f"{r['steps_per_call']} steps per timed call (batch 1), median of {r['reps']}, "
        f"scan unroll {r['unroll']}")
  print("| batch | context | ms / step | tokens / s | state MB | live device MB |")
  print("|---|---|---|---|---|---|")
  for d in r["decode"]:
    live = "n/a" if d["live_mb"] is None else f"{d['live_mb']:.0f}"
    print(f"| {d['batch']} | {d['context']:,} | {d['ms_per_step']:.4f} | "
          f"{d['tokens_per_s']:,.0f} | {d['state_mb']:.2f} | {live} |")
  for b, f in r["flatness"].items():
    print(f"batch {b}: ms/step from {f['min']:.4f} to {f['max']:.4f} "
          f"(spread {f['spread_pct']:.1f}% over contexts {args.contexts})")
  if "prefill" not in r:
    return
  p = r["prefill"]
  print(f"\n## Prefill of {p['tokens']:,} tokens (batch 1), {r['dtype']}")
  print("| mode | ms | tokens / s | speedup | final-state rel. error vs token by token |")
  print("|---|---|---|---|---|")
  for name, q in p["parallel"].items():
    print(f"| parallel ({name}) | {q['ms']:.2f} | {p['tokens'] / q['ms'] * 1e3:,.0f} | "
          f"{q['speedup']:.1f}x | {q['state_rel_err']:.2e} |")
  print(f"| token by token (lax.scan of recurrent steps) | {p['token_by_token_ms']:.1f} | "
        f"{p['tokens'] / p['token_by_token_ms'] * 1e3:,.0f} | 1x | |")
  print(f"float32 (precision highest), {r['prefill_implementation']} vs token by token: "
        f"final-state rel. error {p['state_rel_err_fp32']:.2e}")
  for n, c in r["contexts"].items():
    print(f"state at {n:,}: {c['how']}: {c['seconds_incl_compile']:.2f} s incl. compile")
  print("\ntargets (H100, 169m bf16):")
  for name, (value, ok) in r["targets"].items():
    print(f"  {name}: {value:,.4g} -> {'met' if ok else 'MISSED'}")


def plot(r, path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for b in sorted({d["batch"] for d in r["decode"]}):
    rows = [d for d in r["decode"] if d["batch"] == b]
    ctx = [d["context"] for d in rows]
    axes[0].plot(ctx, [d["ms_per_step"] for d in rows], "o-", label=f"batch {b}")
    if rows[0]["live_mb"] is not None:
      axes[1].plot(ctx, [d["live_mb"] for d in rows], "o-", label=f"live, batch {b}")
    axes[1].plot(ctx, [d["state_mb"] for d in rows], "x--", label=f"state, batch {b}")
  contexts = sorted({d["context"] for d in r["decode"]})
  names = [f"{c // 1024}K" if c % 1024 == 0 else str(c) for c in contexts]
  for ax, label in zip(axes, ("ms per decode step", "device MB")):
    ax.set_xscale("log", base=2)
    ax.set_xticks(contexts, names)
    ax.minorticks_off()
    ax.set_xlabel("context length (tokens already in the state)")
    ax.set_ylabel(label)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend()
  fig.suptitle(f"RWKV-4 {r['preset']} {r['dtype']} decode, {r['device']}")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


if __name__ == "__main__":
  sys.exit(main())
