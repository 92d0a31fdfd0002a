"""Meshes, the logical-axis rules table, and sharded training numerics.

The multi-device checks run in subprocesses (tests/_sharding_worker.py) with
XLA_FLAGS=--xla_force_host_platform_device_count set before JAX starts, so the rest of
the suite keeps one CPU device: one process with 8 devices, and beside it two processes
with 4 devices each joined by jax.distributed (a real multi-host run on one machine).
Tolerance: 1e-5 relative (float32, norm-wise per leaf) against one device.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from rwkv_jax import sharding as sh

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "_sharding_worker.py"
TOL = 1e-5
MESHES = ("data=8", "fsdp=4,data=2", "tensor=2,fsdp=2,data=2")
_MULTIHOST_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                  "SLURM_STEP_NODELIST", "OMPI_MCA_orte_hnp_uri", "TPU_WORKER_HOSTNAMES",
                  "TPU_PROCESS_ADDRESSES", "RWKV_JAX_DISTRIBUTED")


def _env(devices: int, **extra) -> dict:
  env = {k: v for k, v in os.environ.items() if k not in _MULTIHOST_ENV}
  # Backend optimisation level 0 only shortens LLVM codegen; the HLO (and so the
  # partitioning under test) is unchanged.
  env["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={devices} "
                      "--xla_backend_optimization_level=0")
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
  env.update(extra)
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  seed = int.from_bytes(os.urandom(4), "little") % 2**31
  print(f"seed={seed}")
  work = tmp_path_factory.mktemp("sharding")
  coordinator = f"localhost:{_free_port()}"
  logs = [open(work / f"multi{i}.log", "w") for i in range(2)]
  multi = [subprocess.Popen(
      [sys.executable, str(WORKER), "multi", str(seed), str(work)], stdout=logs[i],
      stderr=subprocess.STDOUT, cwd=ROOT,
      env=_env(4, JAX_COORDINATOR_ADDRESS=coordinator, JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(i))) for i in range(2)]
  start = time.time()
  single = subprocess.run([sys.executable, str(WORKER), "single", str(seed), str(work)],
                          capture_output=True, text=True, cwd=ROOT, env=_env(8), timeout=600)
  for p in multi:
    try:
      p.wait(timeout=max(10, 300 - (time.time() - start)))
    except subprocess.TimeoutExpired:
      p.kill()
  for f in logs:
    f.close()
  multi_logs = "\n".join((work / f"multi{i}.log").read_text()[-3000:] for i in range(2))
  if single.returncode != 0:
    pytest.fail(f"single-process worker failed (seed {seed}):\n{single.stderr[-5000:]}")
  out = json.loads((work / "single.json").read_text())
  out["seed"] = seed
  out["multi_returncodes"] = [p.returncode for p in multi]
  out["multi_logs"] = multi_logs
  return out


@pytest.mark.parametrize("spec", MESHES)
def test_sharded_step_matches_one_device(report, spec):
  r = report["equality"][spec]
  assert r["loss_rel_err"] <= TOL, r["loss_rel_err"]
  assert r["grad_rel_err"] <= TOL, r["grad_rel_err"]
  assert r["opt_rel_err"] <= TOL, r["opt_rel_err"]      # AdamW moments after one step
  assert r["param_rel_err"] <= TOL, r["param_rel_err"]  # parameters after one step


# Expected (mesh spec, one shard's shape) under tensor=2,fsdp=2,data=2 for the tiny model
# (C=32, F=128, V=64), written out from the table by hand.
_EXPECTED = {
    "emb": (["tensor", "fsdp"], [32, 16]),
    "head": (["fsdp", "tensor"], [16, 32]),
    "blocks/0/att/key/kernel": (["fsdp", "tensor"], [16, 16]),
    "blocks/1/att/value/kernel": (["fsdp", "tensor"], [16, 16]),
    "blocks/0/att/output/kernel": (["tensor", "fsdp"], [16, 16]),
    "blocks/0/att/time_decay": (["tensor"], [16]),
    "blocks/0/att/time_first": (["tensor"], [16]),
    "blocks/0/att/time_mix_k": (["fsdp"], [16]),
    "blocks/0/ffn/key/kernel": (["fsdp", "tensor"], [16, 64]),
    "blocks/0/ffn/value/kernel": (["tensor", "fsdp"], [64, 16]),
    "blocks/0/ffn/receptance/kernel": (["fsdp", None], [16, 32]),
    "blocks/0/ln1/weight": ([None], [32]),
    "ln_out/bias": ([None], [32]),
}


def test_params_and_optimizer_state_sharded_as_the_table_says(report):
  r = report["equality"]["tensor=2,fsdp=2,data=2"]
  params, opt = r["params"], r["opt_state"]
  for path, (spec, shard) in _EXPECTED.items():
    assert params[path] == [spec, shard], (path, params[path])
  # Every parameter follows the table applied to its logical names.
  for path, names in r["logical"].items():
    want = [list(a) if isinstance(a, tuple) else a for a in sh.logical_to_mesh_spec(names)]
    assert params[path][0] == want, (path, params[path], names)
    assert r["grads"][path][0] == want, path
  # AdamW's mu and nu mirror the parameters; the step counter is replicated.
  moments = {k: v for k, v in opt.items() if "/mu/" in k or "/nu/" in k}
  assert len(moments) == 2 * len(params)
  for key, placed in moments.items():
    assert placed == params[key.split("/mu/")[-1].split("/nu/")[-1]], key
  counts = [v for k, v in opt.items() if k.endswith("count")]
  assert counts and all(v == [[], []] for v in counts)
  # data=8: all replicated, each device holds whole arrays.
  full = report["equality"]["data=8"]["params"]
  assert full["blocks/0/ffn/key/kernel"][1] == [32, 128]
  assert full["emb"][1] == [64, 32]


def test_pallas_wkv_runs_per_shard_and_matches(report):
  r = report["pallas"]
  assert r["shard_map_regions"] >= 2, r  # one per layer (the tiny model has 2)
  assert r["loss_rel_err"] <= TOL and r["grad_rel_err"] <= TOL, r


def test_checkpoint_restores_onto_other_meshes(report):
  for target, devices in (("tensor=2,data=4", 8), ("data=1", 1)):
    r = report["resharding"][target]
    assert r["devices"] == devices
    assert r["max_abs_diff"] == 0.0, r["max_abs_diff"]
    assert r["shardings_as_requested"]
  restored = report["resharding"]["tensor=2,data=4"]["params"]
  assert restored["blocks/0/att/key/kernel"] == [["fsdp", "tensor"], [32, 16]]
  assert report["resharding"]["data=1"]["params"]["emb"][1] == [64, 32]


@pytest.mark.parametrize("impl", ["scan", "associative_scan"])
def test_tensor_parallel_wkv_has_no_collectives(report, impl):
  r = report["wkv_hlo"][impl]
  assert r["wkv_state"] == [], r["wkv_state"]
  assert r["wkv_grad"] == [], r["wkv_grad"]
  # The block with W_o must show W_o's reduction over `tensor`, and only that: this
  # also shows the HLO scan sees collectives when there are some.
  assert r["block"], "expected the output projection's reduction"
  for c in r["block"]:
    assert c["kind"] in ("all-reduce", "reduce-scatter"), c
    assert c["op_name"].endswith("dot_general"), c


def test_model_forward_has_no_collective_inside_wkv_loops(report):
  r = report["model_hlo"]
  assert r["while_loops"] >= 2  # one lax.scan per layer
  assert r["collectives"], "a tensor/fsdp-sharded forward must communicate somewhere"
  inside = [c for c in r["collectives"] if c["in_loop"]]
  assert inside == [], inside


@pytest.mark.parametrize("spec", ["data=8", "tensor=2,fsdp=2,data=2"])
def test_generate_on_mesh_matches_one_device(report, spec):
  """Greedy generate(mesh=...) gives the one-device tokens; the final states agree within
  TOL (norm-wise per field) and come back split over the batch axes."""
  r = report["generate"]
  got = r[spec]
  assert got["tokens"] == r["ref_tokens"]
  assert got["lengths"] == [len(t) for t in r["ref_tokens"]]
  assert got["state_rel_err"] <= TOL, got["state_rel_err"]
  assert got["logits_rel_err"] <= TOL, got["logits_rel_err"]
  assert got["state_spec"] == [None, ["data", "fsdp"], None]
  assert got["logits_spec"][0] == ["data", "fsdp"]


def test_generate_on_mesh_rejects_indivisible_batch(report):
  assert "3 prompt(s) cannot be split over the mesh's 8 batch shards" in (
      report["generate"]["indivisible_error"] or "")


def test_fresh_train_state_is_created_sharded_and_equals_one_device(report):
  """init_state_on_mesh (the trainer's init under --mesh) gives the one-device init's
  exact bits, already placed as the table says (no device held the whole state)."""
  r = report["init_on_mesh"]
  assert r["leaves"] > 20
  assert r["bitwise_equal"]
  for path, (spec, shard) in _EXPECTED.items():
    assert r["params"][path] == [spec, shard], (path, r["params"][path])
    assert r["opt_state"]["0/mu/" + path] == [spec, shard], path


def test_multi_process_run_matches_and_its_checkpoint_reshards(report):
  assert report["multi_returncodes"] == [0, 0], report["multi_logs"]
  m = report.get("multi")
  assert m is not None, report["multi_logs"]
  assert m["processes"] == 2 and m["global_devices"] == 8
  assert m["local_rows"] == [0, 1, 2, 3]  # process 0 holds the data=0 half of the batch
  assert m["grad_leaves"] > 20
  assert m["loss_rel_err"] <= TOL and m["grad_rel_err"] <= TOL, m
  assert m["restore_max_abs_diff"] == 0.0
  # generate(mesh=) on a mesh spanning both processes: every process gets all tokens back.
  assert m["generate_tokens_equal"], m
  assert m["generate_lengths"] == [6] * 8
  assert m["generate_state_rel_err"] <= TOL


def test_train_cli_mesh_resumes_on_other_meshes(report, tmp_path):
  """The trainer on fsdp=4,data=2, resumed on tensor=2,data=4 (in the worker), then on one
  device here, follows the one-device run step for step."""
  import shutil

  from rwkv_jax.training.config import TrainConfig
  from rwkv_jax.training.trainer import run_training

  r = report["trainer"]
  args = r["train_args"]  # the worker's run settings, so both sides train the same model
  assert r["meshes"] == ["data=2,fsdp=4,tensor=1", "data=4,fsdp=1,tensor=2"]
  assert r["devices"] == [8, 8]
  seed = report["seed"]
  ref_out, resumed_out = tmp_path / "ref", tmp_path / "resumed"
  run_training(TrainConfig(out=str(ref_out), steps=5, seed=seed, **args))
  shutil.copytree(r["out"], resumed_out)
  shutil.rmtree(resumed_out / "checkpoints" / "4")  # resume from step 2, saved on fsdp=4
  resumed = run_training(TrainConfig(out=str(resumed_out), steps=5, seed=seed, resume=True,
                                     **args))
  assert resumed["mesh"] is None and resumed["devices"] == 1
  ref = {}
  for line in (ref_out / "metrics.jsonl").read_text().splitlines():
    rec = json.loads(line)
    if "loss" in rec:
      ref[rec["step"]] = rec["loss"]
  mine = {int(k): v for k, v in r["losses"].items()}
  assert sorted(mine) == [1, 2, 3, 4]
  for step, loss in mine.items():
    assert abs(loss - ref[step]) <= TOL * abs(ref[step]), (step, loss, ref[step])
  here = {}
  for line in (resumed_out / "metrics.jsonl").read_text().splitlines():
    rec = json.loads(line)
    if "loss" in rec:
      here[rec["step"]] = rec["loss"]
  for step in (3, 4, 5):
    assert abs(here[step] - ref[step]) <= TOL * abs(ref[step]), (step, here[step], ref[step])


# ----------------------------------------------------------------------------- in process

@pytest.mark.parametrize("spec, message", [
    ("data=4", "multiply to 4 but there are 8 devices"),
    ("data=2,pipeline=4", "unknown axis 'pipeline'"),
    ("data=2,data=4", "axis 'data' given twice"),
    ("data=two", "must be an integer"),
    ("data=-1,fsdp=-1", "only one axis may be -1"),
    ("fsdp=3,data=-1", "not divisible"),
    ("data=0,fsdp=8", ">= 1 or -1"),
    ("data8", "not of the form axis=size"),
])
def test_bad_mesh_spec_is_a_clear_error(spec, message):
  with pytest.raises(ValueError, match=message):
    sh.parse_mesh_spec(spec, 8)


def test_mesh_spec_parsing():
  assert sh.parse_mesh_spec(None, 8) == {"data": 8, "fsdp": 1, "tensor": 1}
  assert sh.parse_mesh_spec("tensor=2, fsdp=-1", 8) == {"data": 1, "fsdp": 4, "tensor": 2}
  assert sh.parse_mesh_spec("fsdp=4,data=2", 8) == {"data": 2, "fsdp": 4, "tensor": 1}
  mesh = sh.make_mesh()  # this process has one CPU device
  assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
  with pytest.raises(ValueError, match="multiply to 2 but there are 1 devices"):
    sh.make_mesh("data=2")


def test_rules_table_and_divisibility():
  mesh = AbstractMesh((2, 2, 2), sh.MESH_AXES)
  assert sh.logical_to_mesh_spec(("embed", "att")) == P("fsdp", "tensor")
  assert sh.logical_to_mesh_spec(("batch",)) == P(("data", "fsdp"))
  assert sh.logical_to_mesh_spec(("att", "embed"), drop=("fsdp",)) == P("tensor", None)
  # The paper's odd vocabulary cannot be split in two: that dimension stays replicated.
  with pytest.warns(UserWarning, match="not divisible"):
    assert sh.logical_to_mesh_spec(("vocab", "embed"), (50277, 64), mesh) == P(None, "fsdp")
  with pytest.raises(ValueError, match="'heads' is not in the rules table"):
    sh.logical_to_mesh_spec(("heads",))


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"}, None),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"},
     {"coordinator_address": "h:1", "num_processes": 4, "process_id": 2}),
    ({"SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "16"}, {}),
    ({"SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "1"}, None),
    ({"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "2"}, {}),
    ({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}, {}),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),
    ({"TPU_WORKER_HOSTNAMES": "t0,t1", "RWKV_JAX_DISTRIBUTED": "0"}, None),
    ({"RWKV_JAX_DISTRIBUTED": "1"}, {}),
])
def test_distributed_env_detection(env, expected):
  assert sh.distributed_env(env) == expected


def test_distributed_env_errors_and_single_process():
  with pytest.raises(ValueError, match="JAX_PROCESS_ID is missing"):
    sh.distributed_env({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"})
  with pytest.raises(ValueError, match="SLURM_NTASKS='many' is not an integer"):
    sh.distributed_env({"SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "many"})
  assert sh.maybe_initialize_distributed({}) is False
  assert sh.is_main_process()
