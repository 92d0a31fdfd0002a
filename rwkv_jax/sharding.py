"""Device meshes, the one logical-axis rules table, and the shardings derived from it.

The mesh always has the three axes ``("data", "fsdp", "tensor")`` (size 1 when unused),
so one table serves every strategy:

  data    data parallel: the batch is split, parameters are replicated.
  fsdp    fully sharded data parallel: the batch is split AND parameters/optimizer
          state are split over their ``embed`` dimension; inside the step
          ``compute_gather`` has XLA all-gather each weight where it is used.
  tensor  tensor parallel: the channel dimension of R/K/V/W_o, the FFN hidden dimension
          and the vocabulary are split. WKV is channel-wise, so it runs with no
          communication (tests/test_sharding.py inspects the compiled HLO for this); the
          Pallas kernel runs per shard in ``shard_map`` (``rwkv_jax.ops.per_shard``).

Parameters carry logical axis names in their ``out_sharding`` metadata
(``rwkv_jax.layers.param``). Optimizer states (optax, ``nnx.Optimizer``) mirror the
parameter tree, so their leaves are matched to parameters by path suffix and shape:
``opt_state/0/mu/blocks/3/att/key/kernel`` takes the sharding of ``blocks/3/att/key/kernel``.
Leaves that match no parameter (step counters, scalars) are replicated.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# THE table: logical axis name -> mesh axis (or axes, or None = replicated).
LOGICAL_AXIS_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),  # activations / token batches
    "vocab": "tensor",          # embedding rows, head columns
    "embed": "fsdp",            # model width D: the FSDP-sharded dimension
    "att": "tensor",            # time-mix channels: R/K/V outputs, W_o inputs, decay, bonus
    "mlp": "tensor",            # channel-mix hidden size F
    "embed_out": None,          # channel-mix receptance outputs (D); its input is on fsdp
    "norm": None,               # LayerNorm weight/bias: tiny, replicated
    "lora": None,               # low-rank inner dimensions (RWKV-7 decay/iclr/gate LoRAs)
    "head": None,               # heads of a per-head parameter or state (RWKV-7)
    "head_v": None,             # value / key index inside a head's N x N WKV-7 state
    "head_k": None,
    "layer": None,              # the layer axis of stacked states (and stacked layers)
}

_warned: set[str] = set()


# ----------------------------------------------------------------------------- meshes

def parse_mesh_spec(spec: str | None, num_devices: int) -> dict[str, int]:
  """``"data=2,fsdp=2,tensor=2"`` -> ``{"data": 2, "fsdp": 2, "tensor": 2}``.

  Omitted axes get size 1; one axis may be ``-1`` (the remaining devices). An empty or
  ``None`` spec puts every device on ``data``. The sizes must multiply to ``num_devices``.
  """
  if spec is None or not spec.strip():
    return {"data": num_devices, "fsdp": 1, "tensor": 1}
  sizes: dict[str, int] = {}
  for part in spec.split(","):
    name, sep, value = part.strip().partition("=")
    name = name.strip()
    if not sep:
      raise ValueError(f"mesh spec {spec!r}: {part.strip()!r} is not of the form axis=size")
    if name not in MESH_AXES:
      raise ValueError(f"mesh spec {spec!r}: unknown axis {name!r}; axes are {MESH_AXES}")
    if name in sizes:
      raise ValueError(f"mesh spec {spec!r}: axis {name!r} given twice")
    try:
      size = int(value.strip())
    except ValueError:
      raise ValueError(
          f"mesh spec {spec!r}: size of {name!r} must be an integer, got {value.strip()!r}"
      ) from None
    if size < 1 and size != -1:
      raise ValueError(f"mesh spec {spec!r}: size of {name!r} must be >= 1 or -1, got {size}")
    sizes[name] = size
  free = [n for n, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise ValueError(f"mesh spec {spec!r}: only one axis may be -1, got {free}")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(
          f"mesh spec {spec!r}: {num_devices} devices are not divisible by the fixed "
          f"sizes' product {fixed}, so {free[0]}=-1 has no integer size")
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ValueError(
        f"mesh spec {spec!r}: axis sizes multiply to {fixed} but there are "
        f"{num_devices} devices")
  return {n: sizes.get(n, 1) for n in MESH_AXES}


def make_mesh(spec: str | None = None, *, devices=None) -> Mesh:
  """A mesh with axes ``("data", "fsdp", "tensor")`` over ``devices`` (default: all).

  Axis types are ``Auto``: XLA's sharding propagation (GSPMD, "pjit style") places the
  activations from the parameter and batch shardings.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = parse_mesh_spec(spec, len(devices))
  shape = tuple(sizes[n] for n in MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def mesh_description(mesh: Mesh) -> str:
  return ",".join(f"{n}={s}" for n, s in mesh.shape.items())


# ----------------------------------------------------------------------------- rules

def _warn_once(message: str):
  if message not in _warned:
    _warned.add(message)
    warnings.warn(message, stacklevel=3)


def logical_to_mesh_spec(names, shape=None, mesh: Mesh | None = None,
                         rules: Mapping[str, Any] = LOGICAL_AXIS_RULES,
                         drop: tuple[str, ...] = ()) -> P:
  """Logical axis names (one per dimension) -> a ``PartitionSpec`` of mesh axes.

  With ``shape`` and ``mesh`` given, a dimension whose size is not divisible by its mesh
  axes stays replicated (with a warning), e.g. the odd vocabulary 50277 under tensor=2;
  a mesh axis already used by an earlier dimension is not used twice. Mesh axes in
  ``drop`` are left out (``("fsdp",)`` gives the layout parameters are computed in).
  """
  if names is None:
    return P()
  names = tuple(names)
  if shape is not None and len(shape) != len(names):
    raise ValueError(f"{len(names)} logical axis names {names} for a shape {tuple(shape)}")
  used: set[str] = set()
  out = []
  for dim, name in enumerate(names):
    if name is None:
      out.append(None)
      continue
    if name not in rules:
      raise ValueError(f"logical axis {name!r} is not in the rules table {sorted(rules)}")
    target = rules[name]
    axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
    axes = tuple(a for a in axes if a not in used and a not in drop)
    if mesh is not None and shape is not None and axes:
      size = math.prod(mesh.shape[a] for a in axes)
      if shape[dim] % size:
        _warn_once(f"dimension {dim} ({name!r}, size {shape[dim]}) of a {tuple(shape)} "
                   f"array is not divisible by mesh axes {axes} (size {size}); replicated")
        axes = ()
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*out)


def _key_name(entry) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _path_key(path) -> tuple[str, ...]:
  """A key path as strings, without the ``.value`` step of an NNX Variable."""
  names = [_key_name(e) for e in path]
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and names[-1] == "value":
    names.pop()
  return tuple(names)


def logical_axes(model_or_state) -> dict[tuple[str, ...], tuple[tuple, tuple]]:
  """{parameter path: (logical axis names, shape)} read from the Variables' metadata."""
  state = model_or_state
  if isinstance(model_or_state, nnx.Module):
    state = nnx.state(model_or_state)
  is_var = lambda x: isinstance(x, nnx.Variable)
  out = {}
  for path, var in jax.tree_util.tree_flatten_with_path(state, is_leaf=is_var)[0]:
    if not is_var(var):
      continue
    names = var.get_metadata().get("out_sharding")
    shape = tuple(getattr(var.get_value(), "shape", ()))
    out[_path_key(path)] = (tuple(names) if names is not None else None, shape)
  return out


def tree_shardings(tree, mesh: Mesh, axes: Mapping[tuple[str, ...], tuple],
                   drop: tuple[str, ...] = ()):
  """A ``NamedSharding`` for every leaf of ``tree`` (params, optimizer state, a whole
  train state; concrete, abstract or traced), same structure. A leaf takes the sharding
  of the parameter whose path is the longest suffix of its own path and whose shape
  equals its shape; other leaves are replicated."""
  def one(path, leaf):
    shape = tuple(getattr(leaf, "shape", ()))
    key = _path_key(path)
    for i in range(len(key)):
      hit = axes.get(key[i:])
      if hit is not None and hit[1] == shape:
        return NamedSharding(mesh, logical_to_mesh_spec(hit[0], shape, mesh, drop=drop))
    return NamedSharding(mesh, P())
  return jax.tree_util.tree_map_with_path(one, tree)


def param_shardings(model_or_state, mesh: Mesh):
  """Shardings of ``nnx.state(model)`` (or of the given state) from the rules table."""
  state = model_or_state
  if isinstance(model_or_state, nnx.Module):
    state = nnx.state(model_or_state)
  return tree_shardings(state, mesh, logical_axes(state))


def state_shardings(tree, mesh: Mesh, model_or_state):
  """Shardings of any tree that mirrors the model's parameters (optimizer state, a
  train state holding params + opt state) from the model's logical axes."""
  return tree_shardings(tree, mesh, logical_axes(model_or_state))


def compute_gather(mesh: Mesh, model_or_state):
  """``gather(params) -> params`` for use INSIDE a jitted step, before the forward: pins
  the parameters to the layout they are computed in (the table without ``fsdp``).

  Without it XLA's propagation is free to keep the FSDP split of the ``embed`` dimension
  and split the activations' channels instead of the batch (measured on the tiny model:
  an all-reduce per LayerNorm). With it XLA all-gathers each weight over ``fsdp`` for
  its use and sums its gradient back over the batch axes, while the activations stay
  split over the batch; parameters and optimizer state remain sharded between steps.
  """
  axes = logical_axes(model_or_state)

  def gather(params):
    shardings = tree_shardings(params, mesh, axes, drop=("fsdp",))
    return jax.lax.with_sharding_constraint(params, shardings)
  return gather


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
  """Moves the model's state onto ``mesh`` as the table says, in place; returns it."""
  state = nnx.state(model)
  nnx.update(model, jax.device_put(state, param_shardings(state, mesh)))
  return model


def abstract_tree(tree, shardings):
  """``jax.ShapeDtypeStruct`` leaves carrying ``shardings``: the restore target that
  makes orbax place a checkpoint onto a (possibly different) mesh."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def abstract_on_device(tree, device=None):
  """``abstract_tree`` on one device (default: the first local one): the restore target
  of a single-device run, whatever mesh the checkpoint was saved from."""
  one = jax.sharding.SingleDeviceSharding(device or jax.local_devices()[0])
  return abstract_tree(tree, jax.tree.map(lambda _: one, tree))


def traced_on_mesh(fn, mesh: Mesh | None):
  """``fn`` traced under ``mesh`` as JAX's abstract mesh context (wrap it before
  ``jax.jit``), so that WKV kernels XLA cannot split run per shard
  (``rwkv_jax.ops.per_shard`` reads ``jax.sharding.get_abstract_mesh()``). Identity for
  ``mesh=None``. Calling a jitted step inside ``jax.set_mesh(mesh)`` does the same."""
  if mesh is None:
    return fn

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)
  return wrapped


# ----------------------------------------------------------------------------- batches

def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the table's ``batch`` axes; the rest replicated."""
  return NamedSharding(mesh, logical_to_mesh_spec(("batch",)))


def rnn_state_shardings(mesh: Mesh, state_axes):
  """Shardings of a family's recurrent state from its logical axes (``state_axes()``):
  the batch split like the tokens; every other axis (layers, channels, heads) whole on
  each device (a decode step's state is small next to the weights)."""
  from rwkv_jax.state import is_axes

  def one(axes):
    names = tuple(n if n == "batch" else None for n in axes)
    return NamedSharding(mesh, logical_to_mesh_spec(names))
  return jax.tree.map(one, state_axes, is_leaf=is_axes)


def batch_shards(mesh: Mesh) -> int:
  """How many ways the batch is split (data * fsdp)."""
  spec = logical_to_mesh_spec(("batch",))[0]
  return math.prod(mesh.shape[a] for a in ((spec,) if isinstance(spec, str) else spec))


def local_batch_indices(mesh: Mesh, global_batch: int) -> np.ndarray:
  """Rows of the global batch this process must load (sorted), so that every process
  count sees the same global batch. One process: ``arange(global_batch)``."""
  if global_batch % batch_shards(mesh):
    raise ValueError(f"global batch {global_batch} is not divisible by the mesh's batch "
                     f"shards {batch_shards(mesh)} ({mesh_description(mesh)})")
  index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch,))
  rows = set()
  for idx in index_map.values():
    rows.update(range(*idx[0].indices(global_batch)))
  return np.array(sorted(rows), np.int64)


def place_batch(batch, mesh: Mesh, global_batch: int | None = None):
  """Process-local batch rows (numpy, any pytree) -> global arrays split over the batch
  axes, via ``jax.make_array_from_process_local_data`` (works unchanged multi-host).

  ``global_batch`` defaults to the local rows times the processes' share; pass it when
  tensor-parallel replicas span processes. Local rows must be the rows given by
  ``local_batch_indices``.
  """
  sharding = batch_sharding(mesh)

  def one(x):
    x = np.asarray(x)
    if x.ndim < 1:
      raise ValueError(f"batch leaves need a leading batch dimension, got shape {x.shape}")
    n = global_batch
    if n is None:
      n = x.shape[0] * jax.process_count() if jax.process_count() > 1 else x.shape[0]
    if n % batch_shards(mesh):
      raise ValueError(f"global batch {n} is not divisible by the mesh's batch shards "
                       f"{batch_shards(mesh)} ({mesh_description(mesh)})")
    return jax.make_array_from_process_local_data(sharding, x, (n, *x.shape[1:]))
  return jax.tree.map(one, batch)


# ----------------------------------------------------------------------------- processes

def distributed_env(environ: Mapping[str, str] | None = None) -> dict | None:
  """The multi-process launch the environment describes, as keyword arguments for
  ``jax.distributed.initialize`` (``{}``: let JAX detect the cluster), or None when the
  environment describes a single process. ``RWKV_JAX_DISTRIBUTED=0/1`` forces it."""
  env = os.environ if environ is None else environ
  forced = env.get("RWKV_JAX_DISTRIBUTED")
  if forced == "0":
    return None

  def count(name):
    value = env.get(name, "1")
    try:
      return int(value)
    except ValueError:
      raise ValueError(f"environment variable {name}={value!r} is not an integer") from None

  if env.get("JAX_COORDINATOR_ADDRESS") and count("JAX_NUM_PROCESSES") > 1:
    if "JAX_PROCESS_ID" not in env:
      raise ValueError("JAX_COORDINATOR_ADDRESS and JAX_NUM_PROCESSES are set but "
                       "JAX_PROCESS_ID is missing")
    return dict(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                num_processes=count("JAX_NUM_PROCESSES"), process_id=count("JAX_PROCESS_ID"))
  if "SLURM_STEP_NODELIST" in env and count("SLURM_NTASKS") > 1:
    return {}
  if "OMPI_MCA_orte_hnp_uri" in env and count("OMPI_COMM_WORLD_SIZE") > 1:
    return {}
  hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
  if len([h for h in hosts.split(",") if h.strip()]) > 1:
    return {}
  if forced == "1":
    return {}
  return None


def maybe_initialize_distributed(environ: Mapping[str, str] | None = None) -> bool:
  """Calls ``jax.distributed.initialize`` when the environment describes several
  processes (JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID, SLURM with
  several tasks, Open MPI, a multi-host TPU slice). Must run before JAX touches a device.
  Returns True when this is a multi-process run."""
  kwargs = distributed_env(environ)
  if kwargs is None:
    return False
  if not jax.distributed.is_initialized():
    jax.distributed.initialize(**kwargs)
  return True


def is_main_process() -> bool:
  """Only process 0 prints and writes logs."""
  return jax.process_index() == 0


__all__ = [
    "LOGICAL_AXIS_RULES", "MESH_AXES", "abstract_on_device", "abstract_tree",
    "batch_sharding", "batch_shards", "compute_gather", "distributed_env", "is_main_process",
    "local_batch_indices", "logical_axes", "logical_to_mesh_spec", "make_mesh",
    "maybe_initialize_distributed", "mesh_description", "param_shardings", "parse_mesh_spec",
    "place_batch", "rnn_state_shardings", "shard_model", "state_shardings",
    "traced_on_mesh", "tree_shardings",
]
