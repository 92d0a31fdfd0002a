"""int8 weight-only inference against bf16 on one GPU, side by side in one run.

1. Quality: a small model (4 x 256, byte-level) is trained for a few seconds on
   tinyshakespeare with ``run_training`` (bf16), then the held-out loss (every validation
   window of the trainer's 5% split) is computed in float32, bf16, int8 with float32
   compute and int8 with bf16 compute; perplexity = exp(loss) per byte.
2. Speed: a random model of a released shape (default RWKV-4 1.5b, vocabulary 50277) is
   decoded greedily with ``decode_program`` (the engine's on-device ``lax.scan``, from an
   empty state): ms/token at batch 1 and tokens/s at batch 256, bf16 matrices against int8
   matrices + float32 per-channel scales (the model's own one-token step for both; at
   batch 1 also the fused Pallas bf16 step RWKV-4 uses by default, and int8 with the
   "reduce" small-batch matmul). Median of --reps calls after a compile call.
3. The same for RWKV-7 if time is left (--budget-s bounds the whole script; what does not
   fit is skipped and said so).

Usage (GPU; data copied into the git-ignored .carry/ that the device run carries):
  mkdir -p .carry && cp ../shared/data/tinyshakespeare.txt .carry/
  PYTHONPATH=$PWD python3 experiments/bench_int8.py --data .carry/tinyshakespeare.txt --out DIR
  PYTHONPATH=$PWD python3 experiments/bench_int8.py --cpu-quick --out DIR   # smoke run
Writes DIR/bench_int8.json (after every measurement) and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rwkv_jax import models, quantize  # noqa: E402
from rwkv_jax.checkpoint import load_model  # noqa: E402
from rwkv_jax.inference import SamplingConfig  # noqa: E402
from rwkv_jax.inference._engine import (DecodeCarry, cast_matmul_weights,  # noqa: E402
                                        decode_program, stop_array)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", required=True)
  p.add_argument("--data", default=None, help="text file (default: the packaged sample)")
  p.add_argument("--cpu-quick", action="store_true")
  p.add_argument("--budget-s", type=float, default=170.0,
                 help="wall-time budget of the whole script; later parts are skipped")
  p.add_argument("--train-steps", type=int, default=400, help="training steps per model")
  p.add_argument("--train-s", type=float, default=45.0,
                 help="training wall-time cap per model (compile included)")
  p.add_argument("--speed-presets", default=None,
                 help="comma-separated presets to time (default 1.5b,rwkv7-1.5b)")
  p.add_argument("--families", default="rwkv4,rwkv7")
  p.add_argument("--reps", type=int, default=3)
  args = p.parse_args(argv)
  if args.data is None:
    from rwkv_jax.data import sample_text_path

    args.data = str(sample_text_path())
  if args.speed_presets is None:
    args.speed_presets = "tiny,rwkv7-tiny" if args.cpu_quick else "1.5b,rwkv7-1.5b"
  return args


class Run:
  def __init__(self, args):
    self.args, self.t0 = args, time.perf_counter()
    self.out = Path(args.out)
    self.out.mkdir(parents=True, exist_ok=True)
    self.results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
                    "date": time.strftime("%Y-%m-%d"), "quality": [], "speed": [],
                    "skipped": []}

  def left(self) -> float:
    return self.args.budget_s - (time.perf_counter() - self.t0)

  def save(self):
    (self.out / "bench_int8.json").write_text(json.dumps(self.results, indent=1) + "\n")

  def log(self, *a):
    print(f"[{time.perf_counter() - self.t0:6.1f}s]", *a, flush=True)


# ----------------------------------------------------------------------------- quality

def _eval_loss(model, data, batch_size=64):
  from rwkv_jax.training.step import make_eval_step

  graphdef, params = nnx.split(model)
  step = jax.jit(make_eval_step(graphdef))
  sums = np.zeros(3)
  for batch in data.eval_batches(batch_size, 1 << 20):
    out = jax.device_get(step(params, tuple(jnp.asarray(b) for b in batch)))
    sums += [float(out["loss_sum"]), float(out["correct"]), float(out["count"])]
  return sums[0] / sums[2], int(sums[2])


def quality(run: Run, family: str):
  from rwkv_jax.data.text import TextData
  from rwkv_jax.tokenizers import load_tokenizer
  from rwkv_jax.training.config import TrainConfig
  from rwkv_jax.training.trainer import run_training

  a = run.args
  quick = a.cpu_quick
  folder = Path(tempfile.mkdtemp(prefix=f"int8-{family}-"))
  cfg = TrainConfig(out=str(folder / "run"), data=a.data, family=family,
                    n_layer=2 if quick else 4, n_embd=64 if quick else 256,
                    ctx_len=64 if quick else 256, batch_size=8 if quick else 32,
                    steps=10 if quick else a.train_steps, lr=1.5e-3,
                    warmup=2 if quick else 40,
                    dtype="bfloat16", eval_every=0, save_every=0, progress=False,
                    max_minutes=a.train_s / 60, seed=0)
  run.log(f"quality {family}: training {cfg.n_layer}x{cfg.n_embd}, {cfg.steps} steps "
          f"(<= {a.train_s:.0f} s)")
  summary = run_training(cfg)
  # Explicit dtypes: the run's own config says bfloat16 (it trained in bf16).
  f32, _ = load_model(cfg.out, dtype="float32")
  bf16, _ = load_model(cfg.out, dtype="bfloat16")
  data = TextData(a.data, load_tokenizer(None), cfg.ctx_len, val_fraction=cfg.val_fraction,
                  seed=cfg.seed, vocab_size=256)
  row = {"family": family, "model": f"{cfg.n_layer}x{cfg.n_embd}",
         "params": f32.cfg.param_count(), "trained_steps": summary["steps"],
         "train_tokens": summary["steps"] * cfg.batch_size * cfg.ctx_len,
         "train_wall_s": summary["wall_s"]}
  for name, model in (("float32", f32), ("bfloat16", bf16),
                      ("int8 (float32 compute)", quantize.quantize_model(f32)),
                      ("int8 (bf16 compute)", quantize.quantize_model(bf16))):
    loss, count = _eval_loss(model, data)
    row[name] = {"loss": loss, "ppl": math.exp(loss), "bits_per_byte": loss / math.log(2)}
    row["eval_tokens"] = count
  row["ppl_increase_int8_vs_bf16"] = row["int8 (bf16 compute)"]["ppl"] / row["bfloat16"]["ppl"] - 1
  row["ppl_increase_int8_vs_f32"] = (row["int8 (float32 compute)"]["ppl"]
                                     / row["float32"]["ppl"] - 1)
  run.results["quality"].append(row)
  run.save()
  run.log(f"quality {family}: bf16 ppl {row['bfloat16']['ppl']:.4f}, int8 ppl "
          f"{row['int8 (bf16 compute)']['ppl']:.4f} ({100 * row['ppl_increase_int8_vs_bf16']:+.3f}%)")


# ----------------------------------------------------------------------------- speed

def _param_bytes(params) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)))


def _time_decode(run: Run, model, params_override, batch: int, steps: int, step_impl: str):
  graphdef, params = nnx.split(model)
  if params_override is not None:
    params = params_override
  carry = DecodeCarry(model.init_state(batch), jnp.zeros((batch, model.cfg.vocab_size)),
                      jnp.zeros((batch,), bool), None, jnp.int32(0))
  args = (graphdef, params, carry, jax.random.key(0), jnp.int32(1 << 30), stop_array(()),
          jnp.int32(-1))
  kwargs = dict(steps=steps, sampling=SamplingConfig.greedy(), step_impl=step_impl)
  t = time.perf_counter()
  jax.block_until_ready(decode_program(*args, **kwargs))
  compile_s = time.perf_counter() - t
  times = []
  for _ in range(run.args.reps):
    t = time.perf_counter()
    jax.block_until_ready(decode_program(*args, **kwargs))
    times.append(time.perf_counter() - t)
  sec = statistics.median(times)
  return {"ms_per_token": 1e3 * sec / steps, "tokens_per_s": batch * steps / sec,
          "first_call_s": compile_s, "steps": steps, "times_s": times}


def speed(run: Run, preset: str):
  quick = run.args.cpu_quick
  cfg = models.preset(preset).replace(dtype="bfloat16")
  run.log(f"speed {preset}: building {cfg.describe()}")
  # Random init as it is (speed does not depend on the values; perturbing 1.5b numbers
  # on the host would cost more time than the measurements).
  model = models.build_model(cfg, seed=0)
  graphdef, params = nnx.split(model)
  bf16_params = jax.block_until_ready(cast_matmul_weights(params, "bfloat16",
                                                          model.MATMUL_PARAMS))
  qmodel = quantize.quantize_model(model)
  q_params = nnx.split(qmodel)[1]
  row = {"preset": preset, "family": cfg.family, "params": cfg.param_count(),
         "weight_bytes": {"float32 (stored)": _param_bytes(params),
                          "bfloat16 (decode reads)": _param_bytes(bf16_params),
                          "int8": _param_bytes(q_params)},
         "runs": []}
  del params
  batches = (1, 8) if quick else (1, 256)
  plan = []
  for batch in batches:
    steps = (16 if quick else 256) if batch == 1 else (8 if quick else 64)
    plan.append(("bfloat16", model, bf16_params, batch, steps, "model", "dot"))
    plan.append(("int8", qmodel, None, batch, steps, "model", "dot"))
    if batch == 1:
      plan.append(("int8", qmodel, None, batch, steps, "model", "reduce"))
      if cfg.family == "rwkv4":
        plan.append(("bfloat16", model, bf16_params, batch, steps, "pallas", "dot"))
  for weights, m, p, batch, steps, step_impl, small in plan:
    if run.left() < 25:
      run.results["skipped"].append(f"speed {preset} {weights} batch {batch} {step_impl} "
                                    f"{small}: out of time")
      continue
    quantize.SMALL_ROWS_IMPL = small
    decode_program.clear_cache()
    try:
      r = _time_decode(run, m, p, batch, steps, step_impl)
    except Exception as e:  # record and go on: one failure must not cost the run
      r = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    r.update(weights=weights, batch=batch, decode_step=step_impl,
             int8_small_batch_matmul=small if weights == "int8" else None)
    row["runs"].append(r)
    run.save()
    run.log(f"speed {preset} {weights} b{batch} {step_impl} {small}: "
            + (f"{r['ms_per_token']:.3f} ms/token, {r['tokens_per_s']:,.0f} tok/s "
               f"(first call {r['first_call_s']:.1f} s)" if "error" not in r else r["error"]))
  quantize.SMALL_ROWS_IMPL = "dot"
  run.results["speed"].append(row)
  run.save()


def tables(results) -> str:
  lines = [f"device: {results['device']}, jax {results['jax']}, {results['date']}", ""]
  if results["quality"]:
    lines += ["| family | model | trained tokens | float32 ppl | bf16 ppl | int8 (f32) ppl "
              "| int8 (bf16) ppl | int8 vs bf16 |", "|---|---|---|---|---|---|---|---|"]
    for q in results["quality"]:
      lines.append(
          f"| {q['family']} | {q['model']} | {q['train_tokens']:,} | {q['float32']['ppl']:.4f} "
          f"| {q['bfloat16']['ppl']:.4f} | {q['int8 (float32 compute)']['ppl']:.4f} | "
          f"{q['int8 (bf16 compute)']['ppl']:.4f} | {100 * q['ppl_increase_int8_vs_bf16']:+.3f}% |")
    lines.append("")
  for s in results["speed"]:
    wb = s["weight_bytes"]
    lines += [f"{s['preset']} ({s['params']:,} parameters): weights bf16 "
              f"{wb['bfloat16 (decode reads)'] / 2**30:.2f} GiB, int8 {wb['int8'] / 2**30:.2f} GiB "
              f"(float32 stored {wb['float32 (stored)'] / 2**30:.2f} GiB)", "",
              "| weights | batch | decode step | ms / token | tokens / s |", "|---|---|---|---|---|"]
    for r in s["runs"]:
      step = r["decode_step"] + (f" ({r['int8_small_batch_matmul']})"
                                 if r.get("int8_small_batch_matmul") else "")
      if "error" in r:
        lines.append(f"| {r['weights']} | {r['batch']} | {step} | error | {r['error'][:60]} |")
      else:
        lines.append(f"| {r['weights']} | {r['batch']} | {step} | {r['ms_per_token']:.3f} | "
                     f"{r['tokens_per_s']:,.0f} |")
    lines.append("")
  if results["skipped"]:
    lines += ["skipped (budget): " + "; ".join(results["skipped"])]
  return "\n".join(lines)


def main(argv=None):
  args = parse_args(argv)
  run = Run(args)
  run.log(f"{run.results['device']}, jax {jax.__version__}")
  families = args.families.split(",")
  presets = args.speed_presets.split(",")
  todo = []
  if "rwkv4" in families:
    todo += [("quality", "rwkv4")]
  todo += [("speed", p) for p in presets if models.split_preset(p)[0] == "rwkv4"]
  if "rwkv7" in families:
    todo += [("quality", "rwkv7")]
  todo += [("speed", p) for p in presets if models.split_preset(p)[0] == "rwkv7"]
  for kind, what in todo:
    need = 40 if kind == "quality" else 40
    if run.left() < need:
      run.results["skipped"].append(f"{kind} {what}: out of time")
      continue
    try:
      (quality if kind == "quality" else speed)(run, what)
    except Exception as e:  # keep what was measured
      import traceback

      traceback.print_exc()
      run.results["skipped"].append(f"{kind} {what}: {type(e).__name__}: {str(e)[:300]}")
    run.save()
  text = tables(run.results)
  print(text)
  (run.out / "bench_int8.md").write_text(text + "\n")
  run.save()


if __name__ == "__main__":
  main()
