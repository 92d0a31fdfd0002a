"""Running an opaque WKV kernel per shard of the mesh being traced for.

A Pallas custom call is opaque to XLA's partitioner, which would gather its inputs onto
every device and run the whole WKV on each. WKV is independent per (sequence, channel), so
running it on the local block is exact and needs no communication. The mesh comes from
JAX's own context (``jax.sharding.get_abstract_mesh()``: ``jax.set_mesh`` around the call,
or ``rwkv_jax.sharding.traced_on_mesh`` around the traced function).
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

from rwkv_jax.ops._state import WKVState
from rwkv_jax.sharding import logical_to_mesh_spec


def current_mesh():
  """The abstract mesh being traced under, or None when there is none (or one device)."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty or mesh.size == 1 else mesh


def per_shard_wkv(wkv_fn, w, u, k, v, state=None):
  """``wkv_fn(w, u, k, v, state) -> (y, WKVState)`` on each shard: batch over the rules
  table's ``batch`` axes, channels over its ``att`` axis; the gradients of w and u (shared
  over the batch) are summed over the batch axes by shard_map's transpose. Without a mesh
  it just calls wkv_fn."""
  mesh = current_mesh()
  if mesh is None:
    return wkv_fn(w, u, k, v, state)
  b, _, c = k.shape
  if state is None:
    state = WKVState.zeros(b, c)
  seq = logical_to_mesh_spec(("batch", None, "att"), k.shape, mesh)
  vec = logical_to_mesh_spec(("att",), (c,), mesh)
  st = P(seq[0], seq[2])
  run = jax.shard_map(lambda *a: wkv_fn(*a[:4], WKVState(*a[4:])), mesh=mesh,
                      in_specs=(vec, vec, seq, seq, st, st, st),
                      out_specs=(seq, WKVState(st, st, st)), check_vma=False)
  return run(w, u, k, v, *WKVState(*state))
