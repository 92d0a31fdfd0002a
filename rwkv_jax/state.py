"""Recurrent-state utilities, written once over any family's state pytree.

A family's state is a NamedTuple of float32 arrays; ``model.state_axes()`` names each
leaf's axes (always ``("layer", "batch", ...)``). Everything here finds the batch axis from
those names, so it works unchanged for RWKV-4's (L, B, C) vectors and RWKV-7's
(L, B, H, N, N) matrices.

``RWKVState`` (RWKV-4's state) is importable from here, as before the families split.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BATCH = "batch"


def is_axes(x) -> bool:
  """A leaf of ``state_axes()``: a tuple of axis names."""
  return isinstance(x, tuple) and all(isinstance(n, (str, type(None))) for n in x)


def tree_with_axes(fn, axes, state, *others):
  """``fn(leaf_axes, leaf, *other_leaves)`` over the state's leaves; ``axes`` is the
  state's structure with a tuple of names per leaf, ``others`` have the state's structure."""
  leaves, treedef = jax.tree.flatten(state)
  axes_leaves = jax.tree.leaves(axes, is_leaf=is_axes)
  if len(axes_leaves) != len(leaves):
    raise ValueError(f"state has {len(leaves)} leaves but its axes name {len(axes_leaves)}")
  rest = [jax.tree.leaves(o) for o in others]
  return jax.tree.unflatten(
      treedef, [fn(a, x, *(r[i] for r in rest)) for i, (a, x) in enumerate(zip(axes_leaves, leaves))])


def expected_state(model, batch: int):
  """``jax.eval_shape(model.init_state)``: the state's structure, shapes and dtypes."""
  return jax.eval_shape(lambda: model.init_state(batch))


def _describe(state) -> str:
  fields = getattr(state, "_fields", None)
  leaves = jax.tree.leaves(state)
  shapes = [tuple(getattr(x, "shape", ())) for x in leaves]
  if fields and len(fields) == len(shapes):
    return f"{type(state).__name__}(" + ", ".join(
        f"{f}={s}" for f, s in zip(fields, shapes)) + ")"
  return f"{type(state).__name__} with leaf shapes {shapes}"


def check_state(model, state, batch: int):
  """``state`` validated against ``model.init_state(batch)`` (structure and every shape),
  as float32; None gives the empty state. ValueError names the field and both shapes, or
  both families when the state is of another family's type."""
  if state is None:
    return model.init_state(batch)
  want = expected_state(model, batch)
  family = model.cfg.family
  if type(state) is not type(want) and hasattr(state, "_fields"):
    raise ValueError(f"the state is a {type(state).__name__} but this {family} model needs a "
                     f"{type(want).__name__}: {_describe(want)}")
  try:
    state = type(want)(*state) if hasattr(want, "_fields") else state
    leaves = jax.tree.leaves(state)
  except TypeError as e:
    raise ValueError(f"the state does not fit this {family} model's {_describe(want)}: "
                     f"{e}") from None
  want_leaves = jax.tree.leaves(want)
  if len(leaves) != len(want_leaves):
    raise ValueError(f"the state has {len(leaves)} arrays; this {family} model needs "
                     f"{_describe(want)}")
  names = getattr(want, "_fields", [str(i) for i in range(len(want_leaves))])
  for name, x, w in zip(names, leaves, want_leaves):
    if tuple(jnp.shape(x)) != w.shape:
      raise ValueError(
          f"state.{name} has shape {tuple(jnp.shape(x))}; this {family} model "
          f"({model.cfg.describe_shape()}) and {batch} sequence(s) need {w.shape}")
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), state)


def batch_axis(axes: tuple) -> int:
  return axes.index(BATCH)


def select_rows(model, mask, new, old):
  """Per-sequence choice between two states: ``new`` where mask (B,) is True."""
  def pick(axes, n, o):
    shape = [1] * n.ndim
    shape[batch_axis(axes)] = -1
    return jnp.where(mask.reshape(shape), n, o)

  return tree_with_axes(pick, model.state_axes(), new, old)


def take_rows(model, state, rows):
  """The state of the sequences ``rows`` (an index array) only."""
  rows = jnp.asarray(rows)
  return tree_with_axes(lambda a, x: jnp.take(x, rows, axis=batch_axis(a)),
                        model.state_axes(), state)


def __getattr__(name):
  if name == "RWKVState":  # the RWKV-4 state, where it was before the families split
    from rwkv_jax.models.rwkv4.state import RWKVState

    return RWKVState
  raise AttributeError(f"module 'rwkv_jax.state' has no attribute {name!r}")


__all__ = ["batch_axis", "is_axes", "check_state", "expected_state", "select_rows", "take_rows",
           "tree_with_axes"]
