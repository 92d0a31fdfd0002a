"""Sharding checks on fake CPU devices, run by tests/test_sharding.py in subprocesses
(XLA_FLAGS must be set before JAX starts, and the other tests keep one device).

  single: one process, 8 devices. Loss/gradients/AdamW step on three meshes against one
          device; the parameter and optimizer shardings; orbax resharding restore; the
          collectives of tensor-parallel WKV in the compiled HLO; and, given the multi
          run's outputs, its gradients and its multi-host checkpoint.
  multi:  process JAX_PROCESS_ID of JAX_NUM_PROCESSES (4 devices each), started through
          rwkv_jax.sharding.maybe_initialize_distributed: one step on a mesh spanning both
          processes with batches placed from process-local rows, gradients gathered to
          process 0, parameters saved by orbax from every process.

  python tests/_sharding_worker.py single SEED WORKDIR
  python tests/_sharding_worker.py multi SEED WORKDIR
Reports go to WORKDIR/{single,multi}.json; the test file asserts on them.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from rwkv_jax import RWKV, RWKVConfig
from rwkv_jax import sharding as sh
from rwkv_jax.ops import WKVState

jax.config.update("jax_default_matmul_precision", "highest")

MESHES = ("data=8", "fsdp=4,data=2", "tensor=2,fsdp=2,data=2")
BATCH, STEPS = 8, 16
MULTI_WAIT_S = 180
# eps bounds |d update / d grad| by lr / eps, so the AdamW step inherits the gradients'
# ~1e-7 reduction-order noise instead of amplifying it for near-zero gradient entries.
TX = optax.adamw(1e-3, eps=1e-3, weight_decay=0.1)
_COLLECTIVE = re.compile(
    r"\b(all-gather|all-reduce|reduce-scatter|collective-permute|all-to-all)(-start)?\(")


def setup(seed: int):
  """The tiny model with every parameter perturbed (zero-initialised W_k/W_v/W_r would
  make many gradients trivially zero), as host numpy arrays, and one token batch."""
  cfg = RWKVConfig.preset("tiny")
  graphdef, params = nnx.split(RWKV(cfg, rngs=nnx.Rngs(seed)), nnx.Param)
  rng = np.random.default_rng(seed)
  params = jax.tree.map(
      lambda x: np.asarray(x) + 0.1 * rng.standard_normal(x.shape).astype(np.float32), params)
  tokens = rng.integers(0, cfg.vocab_size, (BATCH, STEPS + 1)).astype(np.int32)
  return graphdef, params, tokens[:, :-1], tokens[:, 1:]


def make_step(graphdef, gather=None, implementation=None):
  def loss_fn(params, inputs, targets):
    if gather is not None:
      params = gather(params)
    logits = nnx.merge(graphdef, params)(inputs, implementation=implementation)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

  def step(params, opt_state, inputs, targets):
    loss, grads = jax.value_and_grad(loss_fn)(params, inputs, targets)
    updates, opt_state = TX.update(grads, opt_state, params)
    return loss, grads, optax.apply_updates(params, updates), opt_state
  return step


def sharded_step(graphdef, params, mesh, implementation=None):
  """The step jitted with the table's shardings: (jitted, param_sh, opt_sh)."""
  p_sh = sh.param_shardings(params, mesh)
  o_sh = sh.state_shardings(jax.eval_shape(TX.init, params), mesh, params)
  b_sh = sh.batch_sharding(mesh)
  step = jax.jit(sh.traced_on_mesh(make_step(graphdef, sh.compute_gather(mesh, params),
                                             implementation), mesh),
                 in_shardings=(p_sh, o_sh, b_sh, b_sh),
                 out_shardings=(NamedSharding(mesh, P()), p_sh, p_sh, o_sh))
  return step, p_sh, o_sh


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def max_rel_err(tree, ref) -> float:
  return max(jax.tree.leaves(jax.tree.map(rel_err, tree, ref)))


def spec_list(spec) -> list:
  return [list(a) if isinstance(a, tuple) else a for a in spec]


def path_str(path) -> str:
  return "/".join(sh._path_key(path))


def placement(tree) -> dict:
  """{path: [spec, shape of one shard]} of every array leaf."""
  out = {}
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    out[path_str(path)] = [spec_list(x.sharding.spec), list(x.addressable_shards[0].data.shape)]
  return out


def collectives(hlo: str) -> list[dict]:
  """Collective ops of a compiled HLO module: kind, enclosing computation, op_name, and
  whether that computation is (reachable from) a while loop's body or condition."""
  comp, found, calls, loop_roots = None, [], {}, set()
  for line in hlo.splitlines():
    head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
    if head and not line.startswith(" "):
      comp = head.group(1)
      calls.setdefault(comp, set())
      continue
    for key, name in re.findall(r"\b(body|condition|calls|to_apply)=%?([\w.\-]+)", line):
      calls.setdefault(comp, set()).add(name)
      if key in ("body", "condition"):
        loop_roots.add(name)
    m = _COLLECTIVE.search(line)
    if m and "=" in line.split(m.group(0))[0]:
      op = re.search(r'op_name="([^"]*)"', line)
      found.append({"kind": m.group(1), "computation": comp,
                    "op_name": op.group(1) if op else ""})
  in_loop, todo = set(), list(loop_roots)
  while todo:
    name = todo.pop()
    if name not in in_loop:
      in_loop.add(name)
      todo.extend(calls.get(name, ()))
  for c in found:
    c["in_loop"] = c["computation"] in in_loop
  return found


def wkv_collectives(graphdef, params, implementation) -> dict:
  """Collectives of tensor-parallel WKV in compiled HLO, on one TimeMix block
  (projections -> WKV -> sigmoid(r) gate -> W_o):
    block      forward on data=2,tensor=4: only W_o's reduction over ``tensor`` may appear;
    wkv_state  forward of the WKV state alone (XLA drops W_o): none may appear;
    wkv_grad   gradient of sum(WKV state) w.r.t. what feeds WKV (W_k, W_v, decay, bonus)
               on tensor=8 (no batch split, so any collective would be tensor-parallel):
               none may appear. (The token-shift mixes sit before the projections: their
               gradient needs dx = dk W_k^T, a sum over the split channels, by design.)"""
  model = nnx.merge(graphdef, params)
  c = model.cfg.n_embd
  feeds_wkv = nnx.Any(*(nnx.PathContains(n) for n in ("key", "value", "time_decay",
                                                       "time_first")))
  tm_def, wkv_params, rest = nnx.split(model.blocks[0].att, feeds_wkv, ...)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((BATCH, 8, c)), jnp.float32)

  def block(p, rest, x):
    zero = jnp.zeros((x.shape[0], c), jnp.float32)
    return nnx.merge(tm_def, p, rest)(x, zero, WKVState.zeros(x.shape[0], c), implementation)

  def state_sum(p, rest, x):
    return sum(s.sum() for s in block(p, rest, x)[2])

  out = {}
  for name, fn, spec in (("block", lambda *a: block(*a)[0], "data=2,tensor=4"),
                         ("wkv_state", lambda *a: block(*a)[2], "data=2,tensor=4"),
                         ("wkv_grad", jax.grad(state_sum), "tensor=8")):
    mesh = sh.make_mesh(spec)
    jitted = jax.jit(fn, in_shardings=(sh.param_shardings(wkv_params, mesh),
                                       sh.param_shardings(rest, mesh),
                                       sh.batch_sharding(mesh)))
    out[name] = collectives(jitted.lower(wkv_params, rest, x).compile().as_text())
  return out


def model_forward_collectives(graphdef, params, inputs) -> dict:
  """The whole model's forward with the lax.scan WKV on tensor=2,fsdp=2,data=2: its
  while loops (the WKV recurrences) must hold no collective."""
  mesh = sh.make_mesh("tensor=2,fsdp=2,data=2")
  gather = sh.compute_gather(mesh, params)
  fwd = jax.jit(lambda p, x: nnx.merge(graphdef, gather(p))(x, implementation="scan"),
                in_shardings=(sh.param_shardings(params, mesh), sh.batch_sharding(mesh)))
  hlo = fwd.lower(params, inputs).compile().as_text()
  return {"collectives": collectives(hlo), "while_loops": len(re.findall(r"\bwhile\(", hlo))}


def check_equality(graphdef, params, inputs, targets) -> tuple[dict, dict]:
  step = jax.jit(make_step(graphdef))
  ref = step(params, TX.init(params), inputs, targets)
  report, saved = {}, {}
  for spec in MESHES:
    mesh = sh.make_mesh(spec)
    fn, p_sh, o_sh = sharded_step(graphdef, params, mesh)
    p = jax.device_put(params, p_sh)
    o = jax.device_put(TX.init(params), o_sh)
    got = fn(p, o, *sh.place_batch((inputs, targets), mesh))
    loss, grads, new_p, new_o = got
    report[spec] = {
        "loss": float(loss), "ref_loss": float(ref[0]),
        "loss_rel_err": abs(float(loss) - float(ref[0])) / abs(float(ref[0])),
        "grad_rel_err": max_rel_err(grads, ref[1]),
        "param_rel_err": max_rel_err(new_p, ref[2]),
        "opt_rel_err": max_rel_err(new_o, ref[3]),
        "params": placement(new_p),
        "grads": placement(grads),
        "opt_state": placement(new_o),
        "logical": {"/".join(k): list(v[0]) for k, v in sh.logical_axes(params).items()},
    }
    saved[spec] = (new_p, new_o)
  return report, {"ref": ref, "saved": saved}


def check_pallas_per_shard(graphdef, params, inputs, targets, ref) -> dict:
  """The Pallas WKV (interpreted on CPU) under tensor=2,fsdp=2,data=2: traced_on_mesh
  makes it run per shard inside shard_map (on a GPU its custom call would otherwise be
  gathered and replicated); the step must still equal one device."""
  mesh = sh.make_mesh("tensor=2,fsdp=2,data=2")
  fn, p_sh, o_sh = sharded_step(graphdef, params, mesh, implementation="pallas")
  opt = TX.init(params)
  lowered = fn.lower(params, opt, inputs, targets).as_text()
  loss, grads, _, _ = fn(jax.device_put(params, p_sh), jax.device_put(opt, o_sh),
                         *sh.place_batch((inputs, targets), mesh))
  return {"loss_rel_err": abs(float(loss) - float(ref[0])) / abs(float(ref[0])),
          "grad_rel_err": max_rel_err(grads, ref[1]),
          "shard_map_regions": len(re.findall(r"SPMDFullToShardShape|manual_computation",
                                              lowered))}


def check_resharding(saved, workdir: Path) -> dict:
  """Saves (params, opt_state) sharded as fsdp=4,data=2 and restores them under other
  meshes by giving orbax abstract arrays that carry the new shardings."""
  tree = {"params": saved["fsdp=4,data=2"][0], "opt_state": saved["fsdp=4,data=2"][1]}
  path = workdir / "ckpt_fsdp4_data2"
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, tree)
  report = {}
  targets = {"tensor=2,data=4": sh.make_mesh("tensor=2,data=4"),
             "data=1": sh.make_mesh("data=1", devices=jax.devices()[:1])}
  for name, mesh in targets.items():
    shardings = sh.state_shardings(tree, mesh, tree["params"])
    with ocp.StandardCheckpointer() as ckptr:
      restored = ckptr.restore(path, sh.abstract_tree(tree, shardings))
    diff = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                        restored, tree)
    same = jax.tree.map(lambda a, s: a.sharding == s, restored, shardings)
    report[name] = {"max_abs_diff": max(jax.tree.leaves(diff)),
                    "shardings_as_requested": all(jax.tree.leaves(same)),
                    "devices": len(mesh.devices.flat),
                    "params": placement(restored["params"])}
  return report


def check_multi(workdir: Path, ref, graphdef, params, inputs) -> dict:
  """Compares the multi-process run's loss/gradients and greedy generation with this
  process's, and restores its checkpoint here."""
  multi = json.loads((workdir / "multi.json").read_text())
  grads = dict(np.load(workdir / "multi_grads.npz"))
  ref_grads = {path_str(p): np.asarray(g)
               for p, g in jax.tree_util.tree_flatten_with_path(ref[1])[0]}
  mesh = sh.make_mesh("tensor=2,data=4")
  shardings = sh.param_shardings(params, mesh)
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(workdir / "ckpt_multi",
                             sh.abstract_tree(jax.eval_shape(lambda: params), shardings))
  ref_gen = generate_tokens(graphdef, params, inputs)
  gen = multi["generate"]
  return {
      "generate_tokens_equal": gen["tokens"] == ref_gen["tokens"],
      "generate_lengths": gen["lengths"],
      "generate_state_rel_err": max(rel_err(np.asarray(a), np.asarray(b))
                                    for a, b in zip(gen["state"], ref_gen["state"])),
      "processes": multi["processes"], "global_devices": multi["global_devices"],
      "local_rows": multi["local_rows"],
      "loss_rel_err": abs(multi["loss"] - float(ref[0])) / abs(float(ref[0])),
      "grad_rel_err": max(rel_err(grads[k], ref_grads[k]) for k in ref_grads),
      "grad_leaves": len(grads),
      "restore_max_abs_diff": max(jax.tree.leaves(jax.tree.map(
          lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
          restored, params))),
  }


GEN_MESHES = ("data=8", "tensor=2,fsdp=2,data=2")
GEN_NEW = 6


def gen_prompts(inputs) -> list[list[int]]:
  """BATCH prompts of lengths 3..17 (ragged prefill: a parallel piece plus the tail)."""
  return [inputs[b, :3 + 2 * b].tolist() for b in range(BATCH)]


def generate_tokens(graphdef, params, inputs, mesh=None) -> dict:
  """Greedy tokens of the GEN prompts, and the final state gathered to the host."""
  from jax.experimental import multihost_utils

  from rwkv_jax.inference.generation import generate
  from rwkv_jax.inference.sampling import SamplingConfig

  model = nnx.merge(graphdef, params)
  got = generate(model, gen_prompts(inputs), max_new_tokens=GEN_NEW, sampling=SamplingConfig.greedy(),
                 key=0, mesh=mesh)
  state = got.state
  if mesh is not None and jax.process_count() > 1:
    state = multihost_utils.process_allgather(state, tiled=True)
  return {"tokens": got.tokens.tolist(), "lengths": got.lengths.tolist(),
          "state": [np.asarray(x).tolist() for x in state]}


def check_generate(graphdef, params, inputs) -> dict:
  """Greedy ``generate(..., mesh=)`` on two meshes against one device: 8 prompts of
  lengths 3..17 (ragged prefill: a parallel piece plus the recurrent tail), GEN_NEW
  tokens. Also records where the outputs lie."""
  from rwkv_jax.inference.generation import generate
  from rwkv_jax.inference.sampling import SamplingConfig

  model = nnx.merge(graphdef, params)
  prompts = gen_prompts(inputs)
  kw = dict(max_new_tokens=GEN_NEW, sampling=SamplingConfig.greedy(), key=0)
  ref = generate(model, prompts, **kw)
  out = {"ref_tokens": ref.tokens.tolist()}
  for spec in GEN_MESHES:
    got = generate(model, prompts, mesh=sh.make_mesh(spec), **kw)
    out[spec] = {
        "tokens": got.tokens.tolist(), "lengths": got.lengths.tolist(),
        "state_rel_err": max(rel_err(a, b) for a, b in zip(got.state, ref.state)),
        "logits_rel_err": rel_err(got.logits, ref.logits),
        "state_spec": spec_list(got.state[0].sharding.spec),
        "logits_spec": spec_list(got.logits.sharding.spec)}
  try:
    generate(model, prompts[:3], mesh=sh.make_mesh("data=8"), **kw)
    out["indivisible_error"] = None
  except ValueError as e:
    out["indivisible_error"] = str(e)
  return out


def check_init_on_mesh(seed: int) -> dict:
  """The trainer's fresh-run init built directly on tensor=2,fsdp=2,data=2
  (``init_state_on_mesh``) against the one-device ``init_state``: same bits, and the
  outputs already carry the table's shardings."""
  from rwkv_jax.training.step import init_state, init_state_on_mesh

  make = lambda: RWKV(RWKVConfig.preset("tiny"), rngs=nnx.Rngs(seed))
  _, ref = init_state(make(), TX, seed)
  _, got = init_state_on_mesh(make, TX, seed, sh.make_mesh("tensor=2,fsdp=2,data=2"))
  same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
                      got, ref)
  return {"bitwise_equal": all(jax.tree.leaves(same)), "leaves": len(jax.tree.leaves(same)),
          "params": placement(got.params), "opt_state": placement(got.opt_state)}


TRAIN_ARGS = dict(n_layer=1, n_embd=32, batch_size=8, ctx_len=8, eval_every=0, eval_size=8,
                  save_every=2, schedule="constant", warmup=0, progress=False)


def check_trainer(seed: int, workdir: Path) -> dict:
  """``rwkv-jax train --mesh``: 2 steps on fsdp=4,data=2, then resumed to 4 steps on
  tensor=2,data=4 (the checkpoint is resharded); the test compares the losses with a
  one-device run and resumes this run's last checkpoint on one device."""
  from rwkv_jax.training.config import TrainConfig
  from rwkv_jax.training.trainer import run_training

  out = workdir / "train"
  first = run_training(TrainConfig(out=str(out), steps=2, mesh="fsdp=4,data=2", seed=seed,
                                   **TRAIN_ARGS))
  second = run_training(TrainConfig(out=str(out), steps=4, mesh="tensor=2,data=4", seed=seed,
                                    resume=True, **TRAIN_ARGS))
  records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
  return {"out": str(out), "train_args": TRAIN_ARGS, "meshes": [first["mesh"], second["mesh"]],
          "devices": [first["devices"], second["devices"]],
          "losses": {r["step"]: r["loss"] for r in records if "loss" in r}}


def run_single(seed: int, workdir: Path):
  if jax.device_count() != 8:
    raise SystemExit(f"expected 8 fake devices, got {jax.device_count()}")
  graphdef, params, inputs, targets = setup(seed)
  report, state = check_equality(graphdef, params, inputs, targets)
  out = {"equality": report, "resharding": check_resharding(state["saved"], workdir)}
  out["pallas"] = check_pallas_per_shard(graphdef, params, inputs, targets, state["ref"])
  out["wkv_hlo"] = {impl: wkv_collectives(graphdef, params, impl)
                    for impl in ("scan", "associative_scan")}
  out["model_hlo"] = model_forward_collectives(graphdef, params, inputs)
  out["generate"] = check_generate(graphdef, params, inputs)
  out["init_on_mesh"] = check_init_on_mesh(seed)
  out["trainer"] = check_trainer(seed, workdir)
  # The multi-process run goes on beside this one; wait for its report (process 0 writes
  # it last, after the multi-host checkpoint is complete).
  deadline = time.time() + MULTI_WAIT_S
  while not (workdir / "multi.json").exists() and time.time() < deadline:
    time.sleep(0.5)
  if (workdir / "multi.json").exists():
    out["multi"] = check_multi(workdir, state["ref"], graphdef, params, inputs)
  (workdir / "single.json").write_text(json.dumps(out))


def run_multi(seed: int, workdir: Path):
  if not sh.maybe_initialize_distributed():
    raise SystemExit("the environment did not describe several processes")
  graphdef, params, inputs, targets = setup(seed)
  mesh = sh.make_mesh("tensor=2,fsdp=2,data=2")
  fn, p_sh, o_sh = sharded_step(graphdef, params, mesh)
  rows = sh.local_batch_indices(mesh, BATCH)
  batch = sh.place_batch((inputs[rows], targets[rows]), mesh, BATCH)
  p = jax.device_put(params, p_sh)
  loss, grads, _, _ = fn(p, jax.device_put(TX.init(params), o_sh), *batch)
  from jax.experimental import multihost_utils
  full = multihost_utils.process_allgather(grads, tiled=True)
  gen = generate_tokens(graphdef, params, inputs, mesh)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(workdir / "ckpt_multi", p)
  if sh.is_main_process():
    np.savez(workdir / "multi_grads.npz",
             **{path_str(k): np.asarray(g) for k, g in jax.tree_util.tree_flatten_with_path(full)[0]})
    tmp = workdir / "multi.json.tmp"  # renamed when complete: the single run polls for it
    tmp.write_text(json.dumps({
        "loss": float(loss), "processes": jax.process_count(), "generate": gen,
        "global_devices": jax.device_count(), "local_rows": rows.tolist()}))
    tmp.rename(workdir / "multi.json")
  multihost_utils.sync_global_devices("done")


if __name__ == "__main__":
  mode, seed, workdir = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
  {"single": run_single, "multi": run_multi}[mode](seed, workdir)
