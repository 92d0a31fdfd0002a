"""Fine-tuning memory by model size: LoRA r = 8, r = 64 and full fine-tuning, both families.

Every number is read from a compiled train step (``jax.jit(step).lower(...).compile()
.memory_analysis()``) with abstract inputs (``jax.eval_shape``; nothing is allocated):
the step ``rwkv-jax train`` runs, one sequence of T = 2048 tokens, bf16 compute.

  full   ``training.step.make_train_step``: float32 master weights + AdamW (mu, nu),
         all parameters differentiated.
  LoRA   ``training.tuning.Tuner``: the frozen base (matrices bf16, vectors and the
         embedding float32) as a non-differentiated argument, adapters on att,ffn (every
         block's Dense matrices) + their AdamW state.

Peak = arguments + outputs - aliased (the donated state) + temporaries, i.e. what the
step needs on the device at once. The WKV path is the lax.scan reference for RWKV-4 and
the chunked WKV-7 for RWKV-7 (what compiles on a CPU; the GPU Pallas RWKV-4 kernel keeps
the same O(T·C) residuals). The layers are unrolled (not a scan), so memory is affine in
the layer count: by default each configuration is compiled at 2 and 4 layers (full width,
vocabulary, T) and extrapolated to its full depth, ``m(L) = m(2) + (L - 2) (m(4) - m(2)) / 2``;
``--validate`` also compiles the smallest size at full depth and prints the
extrapolation's error. ``--full-depth`` compiles every configuration at its real depth
(7b: ~10 min per compile on a CPU).

``--remat full`` (the model's per-layer rematerialisation, ``rwkv-jax train --remat``)
keeps only each layer's input for the backward pass.

Usage:
  python experiments/finetune_memory.py --out DIR [--validate] [--sizes 0.4b,1.5b,7b]
  python experiments/finetune_memory.py --out DIR --remat full
Writes DIR/finetune_memory.json and prints the Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rwkv_jax import models  # noqa: E402

PRESETS = {"rwkv4": {"0.4b": "430m", "1.5b": "1.5b", "7b": "7b"},
           "rwkv7": {"0.4b": "rwkv7-0.4b", "1.5b": "rwkv7-1.5b", "7b": "rwkv7-7.2b"}}
IMPL = {"rwkv4": "scan", "rwkv7": "chunked"}
MODES = (("LoRA r=8", 8), ("LoRA r=64", 64), ("full", None))
GIB = 2 ** 30


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default="experiments/out/finetune_memory")
  p.add_argument("--ctx", type=int, default=2048)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--families", default="rwkv4,rwkv7")
  p.add_argument("--sizes", default="0.4b,1.5b,7b")
  p.add_argument("--layers", default="2,4", help="the two depths compiled per config")
  p.add_argument("--full-depth", action="store_true", help="compile at the real depth")
  p.add_argument("--validate", action="store_true",
                 help="also compile the first size at full depth (extrapolation check)")
  p.add_argument("--remat", default="none",
                 choices=["none", "full", "dots", "dots_no_batch"],
                 help="the model's per-layer rematerialisation policy (rwkv-jax train "
                      "--remat; layers stay a loop) (%(default)s)")
  return p.parse_args(argv)


def train_config(mode_rank, ctx, batch):
  from rwkv_jax.training.config import TrainConfig

  kw = dict(tune="lora", lora_rank=mode_rank, lora_parts="att,ffn") if mode_rank else {}
  return TrainConfig(init_from="(abstract)" if mode_rank else None, ctx_len=ctx,
                     batch_size=batch, dtype="bfloat16", steps=1000, **kw)


def compile_step(cfg, mode_rank, ctx, batch) -> dict:
  """memory_analysis of one train step of ``cfg`` (a family config), abstract inputs."""
  from flax import nnx

  from rwkv_jax.training.optim import make_optimizer
  from rwkv_jax.training.step import TrainState, make_train_step

  train = train_config(mode_rank, ctx, batch)
  model = models.abstract_model(cfg)
  tokens = jax.ShapeDtypeStruct((batch, ctx), jnp.int32)
  batch_abs = (tokens, tokens, jax.ShapeDtypeStruct((batch, ctx), jnp.float32))
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
  step0 = jax.ShapeDtypeStruct((), jnp.int32)
  t0 = time.perf_counter()
  if mode_rank is None:
    graphdef, params = nnx.split(model, nnx.Param)
    tx, _ = make_optimizer(lr=1e-4, steps=1000, weight_decay=0.01, rules=model.optimizer_rules)
    state = TrainState(params, jax.eval_shape(tx.init, params), step0, rng)
    jitted = jax.jit(make_train_step(graphdef, tx), donate_argnums=0)
    lowered = jitted.lower(state, batch_abs)
    trainable = sum(x.size for x in jax.tree.leaves(params))
  else:
    from rwkv_jax.training.tuning import Tuner

    tuner = Tuner(train, model)
    tx, _ = make_optimizer(lr=1e-4, steps=1000, weight_decay=0.01, rules=tuner.rules)
    adapters = tuner.abstract_trainable()
    state = TrainState(adapters, jax.eval_shape(tx.init, adapters), step0, rng)
    train_step, _ = tuner.steps(tx, train)
    lowered = train_step.lower(state, batch_abs)
    trainable = sum(x.size for x in jax.tree.leaves(adapters))
  compiled = lowered.compile()
  m = compiled.memory_analysis()
  out = {k: int(getattr(m, k + "_size_in_bytes")) for k in
         ("argument", "output", "alias", "temp", "generated_code")}
  out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  out["trainable"] = int(trainable)
  out["compile_s"] = time.perf_counter() - t0
  return out


def _extrapolate(a: dict, b: dict, la: int, lb: int, target: int) -> dict:
  out = {}
  for k in ("argument", "output", "alias", "temp", "peak"):
    per_layer = (b[k] - a[k]) / (lb - la)
    out[k] = int(round(a[k] + (target - la) * per_layer))
  return out


def main(argv=None):
  args = parse_args(argv)
  out_dir = Path(args.out)
  out_dir.mkdir(parents=True, exist_ok=True)
  la, lb = (int(x) for x in args.layers.split(","))
  rows, checks = [], []
  results = {"jax": jax.__version__, "device": jax.devices()[0].device_kind,
             "date": time.strftime("%Y-%m-%d"), "ctx": args.ctx, "batch": args.batch,
             "remat": args.remat,
             "layers_compiled": None if args.full_depth else [la, lb], "rows": rows,
             "checks": checks}

  def save():
    (out_dir / "finetune_memory.json").write_text(json.dumps(results, indent=1) + "\n")

  for family in args.families.split(","):
    for i, size in enumerate(args.sizes.split(",")):
      base = models.preset(PRESETS[family][size]).replace(
          dtype="bfloat16", wkv_impl=IMPL[family], ctx_len=args.ctx, remat=args.remat)
      for mode, rank in MODES:
        t = time.perf_counter()
        if args.full_depth:
          full = compile_step(base, rank, args.ctx, args.batch)
          mem, how = full, "compiled"
          trainable = full["trainable"]
        else:
          a = compile_step(base.replace(n_layer=la), rank, args.ctx, args.batch)
          b = compile_step(base.replace(n_layer=lb), rank, args.ctx, args.batch)
          mem = _extrapolate(a, b, la, lb, base.n_layer)
          how = f"from {la} and {lb} layers"
          per_layer_trainable = (b["trainable"] - a["trainable"]) / (lb - la)
          trainable = int(round(a["trainable"] + (base.n_layer - la) * per_layer_trainable))
          if args.validate and i == 0:
            full = compile_step(base, rank, args.ctx, args.batch)
            checks.append({"family": family, "size": size, "mode": mode,
                           "extrapolated_peak": mem["peak"], "compiled_peak": full["peak"],
                           "rel_err": mem["peak"] / full["peak"] - 1})
            print(f"  check {family} {size} {mode}: extrapolated {mem['peak'] / GIB:.2f} GiB, "
                  f"compiled {full['peak'] / GIB:.2f} GiB ({100 * checks[-1]['rel_err']:+.1f}%)",
                  flush=True)
        row = {"family": family, "size": size, "preset": PRESETS[family][size],
               "params": base.param_count(), "n_layer": base.n_layer, "mode": mode,
               "trainable": trainable, "how": how, "wall_s": time.perf_counter() - t,
               **{k: mem[k] for k in ("argument", "output", "alias", "temp", "peak")}}
        rows.append(row)
        save()
        print(f"{family} {size} {mode}: peak {row['peak'] / GIB:.2f} GiB "
              f"(args {row['argument'] / GIB:.2f}, temp {row['temp'] / GIB:.2f}) "
              f"[{row['wall_s']:.0f} s]", flush=True)
  print()
  print(table(results))
  save()


def table(results) -> str:
  lines = [f"T = {results['ctx']}, batch {results['batch']}, bf16 compute, remat "
           f"{results.get('remat', 'none')}; GiB per device "
           f"(peak = step arguments + outputs - donated + temporaries)", "",
           "| family | size | parameters | LoRA r=8 | LoRA r=64 | full fine-tuning | "
           "trainable (r=8 / r=64) |", "|---|---|---|---|---|---|---|"]
  by = {}
  for r in results["rows"]:
    by.setdefault((r["family"], r["size"]), {})[r["mode"]] = r
  for (family, size), modes in by.items():
    any_row = next(iter(modes.values()))
    cell = lambda m: f"{modes[m]['peak'] / GIB:.1f}" if m in modes else "-"
    tr = lambda m: f"{modes[m]['trainable'] / 1e6:.1f}M" if m in modes else "-"
    lines.append(f"| {family} | {size} ({any_row['preset']}) | {any_row['params'] / 1e9:.2f}B "
                 f"| {cell('LoRA r=8')} | {cell('LoRA r=64')} | {cell('full')} | "
                 f"{tr('LoRA r=8')} / {tr('LoRA r=64')} |")
  if results.get("layers_compiled"):
    la, lb = results["layers_compiled"]
    lines += ["", f"Extrapolated per layer from compiles at {la} and {lb} layers."]
  for c in results.get("checks", []):
    lines.append(f"check: {c['family']} {c['size']} {c['mode']} extrapolated "
                 f"{c['extrapolated_peak'] / GIB:.2f} GiB vs compiled "
                 f"{c['compiled_peak'] / GIB:.2f} GiB ({100 * c['rel_err']:+.1f}%)")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
