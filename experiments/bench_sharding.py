"""Per-device memory of parameters + AdamW state under a mesh, without allocating them.

For each preset, the init of (params, optimizer state) -- the model built with the
paper's initialisation and ``tx.init`` of the optimizer ``rwkv-jax train`` uses (AdamW
with a decay mask, global-norm clipping) -- is jitted with the ``rwkv_jax.sharding``
shardings as ``out_shardings``, lowered on abstract inputs and compiled for a mesh of
fake CPU devices; ``compiled.memory_analysis()`` then gives the bytes one device holds.
Nothing is run. The analytic figure sums each leaf's shard shape x itemsize.

  python experiments/bench_sharding.py                      # 1.5b and 7b, fsdp=8
  python experiments/bench_sharding.py --presets 169m,14b --mesh fsdp=4,tensor=2
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402  (the flags above must be set first)
from flax import nnx  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from experiments._common import machine, print_table, write_json  # noqa: E402
from rwkv_jax import RWKV, RWKVConfig, sharding  # noqa: E402
from rwkv_jax.training.optim import make_optimizer  # noqa: E402

GIB = 2 ** 30


def shard_bytes(tree, shardings) -> int:
  """Bytes one device holds: the largest device's share of every leaf."""
  total = 0
  for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    total += math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
  return total


def measure(preset: str, mesh) -> dict:
  cfg = RWKVConfig.preset(preset)
  tx, _ = make_optimizer(lr=1e-4, steps=1000, warmup=10, weight_decay=0.01, clip=1.0)

  def init():
    params = nnx.state(RWKV(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    return params, tx.init(params)

  abstract = jax.eval_shape(init)
  shardings = sharding.state_shardings(abstract, mesh, abstract[0])
  t0 = time.perf_counter()
  compiled = jax.jit(init, out_shardings=shardings).lower().compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  whole = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
  return {
      "preset": preset, "mesh": sharding.mesh_description(mesh), "devices": mesh.size,
      "params": cfg.param_count(),
      "replicated_bytes": whole,
      "analytic_bytes": shard_bytes(abstract, shardings),
      "params_bytes": shard_bytes(abstract[0], shardings[0]),
      "opt_state_bytes": shard_bytes(abstract[1], shardings[1]),
      "compiled_output_bytes": mem.output_size_in_bytes,
      "compiled_temp_bytes": mem.temp_size_in_bytes,
      "compiled_argument_bytes": mem.argument_size_in_bytes,
      "compile_s": compile_s,
  }


def measure_step(preset: str, mesh, batch: int, ctx_len: int) -> dict:
  """Memory analysis of one compiled ``rwkv-jax train`` step on ``mesh`` (abstract
  inputs): arguments (state + batch), temporaries (activations, gathered weights) and
  outputs per device."""
  from rwkv_jax.training.step import compile_train_step, make_train_step
  from rwkv_jax.training.trainer import init_state_from_params

  cfg = RWKVConfig.preset(preset, ctx_len=ctx_len)
  tx, _ = make_optimizer(lr=1e-4, steps=1000, warmup=10, weight_decay=0.01, clip=1.0)
  graphdef, abstract_params = nnx.split(nnx.eval_shape(lambda: RWKV(cfg, rngs=nnx.Rngs(0))),
                                        nnx.Param)
  state = jax.eval_shape(lambda p: init_state_from_params(p, tx), abstract_params)
  state_sh = sharding.state_shardings(state, mesh, state.params)
  step = compile_train_step(
      make_train_step(graphdef, tx, gather=sharding.compute_gather(mesh, state.params)),
      state_shardings=state_sh, batch_shardings=sharding.batch_sharding(mesh))
  tok = jax.ShapeDtypeStruct((batch, ctx_len), jax.numpy.int32)
  mask = jax.ShapeDtypeStruct((batch, ctx_len), jax.numpy.float32)
  t0 = time.perf_counter()
  mem = step.lower(state, (tok, tok, mask)).compile().memory_analysis()
  return {"batch": batch, "ctx_len": ctx_len, "compile_s": time.perf_counter() - t0,
          "argument_bytes": mem.argument_size_in_bytes, "temp_bytes": mem.temp_size_in_bytes,
          "output_bytes": mem.output_size_in_bytes, "alias_bytes": mem.alias_size_in_bytes}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--presets", default="1.5b,7b")
  p.add_argument("--mesh", default="fsdp=8", help="mesh spec over the fake devices")
  p.add_argument("--train-step", metavar="BxT",
                 help="also compile one train step of batch B, context T (e.g. 8x256) and "
                      "report its per-device arguments / temporaries")
  p.add_argument("--json", default="experiments/out/bench_sharding.json")
  args = p.parse_args(argv)
  mesh = sharding.make_mesh(args.mesh)
  rows, results = [], []
  for preset in args.presets.split(","):
    r = measure(preset.strip(), mesh)
    if args.train_step:
      b, t = (int(v) for v in args.train_step.lower().split("x"))
      r["train_step"] = measure_step(preset.strip(), mesh, b, t)
    results.append(r)
    rows.append([r["preset"], f"{r['params'] / 1e9:.3f}B", r["mesh"],
                 f"{r['replicated_bytes'] / GIB:.2f}",
                 f"{r['params_bytes'] / GIB:.3f}", f"{r['opt_state_bytes'] / GIB:.3f}",
                 f"{r['analytic_bytes'] / GIB:.3f}", f"{r['compiled_output_bytes'] / GIB:.3f}",
                 f"{r['compiled_temp_bytes'] / 2**20:.1f}",
                 f"{r['replicated_bytes'] / r['compiled_output_bytes']:.2f}x"])
  print(f"# {machine()}")
  print_table(["preset", "N", "mesh", "1 device GiB", "params GiB/dev", "AdamW GiB/dev",
               "analytic GiB/dev", "compiled GiB/dev", "init temp MiB/dev", "saving"], rows)
  if args.train_step:
    print_table(["preset", "B x T", "state+batch GiB/dev", "temporaries GiB/dev", "compile s"],
                [[r["preset"], f"{r['train_step']['batch']}x{r['train_step']['ctx_len']}",
                  f"{r['train_step']['argument_bytes'] / GIB:.3f}",
                  f"{r['train_step']['temp_bytes'] / GIB:.3f}",
                  f"{r['train_step']['compile_s']:.0f}"] for r in results])
  write_json(args.json, {"machine": machine(), "command": " ".join(sys.argv),
                         "results": results})
  print(f"wrote {args.json}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
