"""Torch-layout conversions shared by the families' weight-name modules.

A family's ``weights.layout(our_name)`` says how a torch tensor relates to ours: "same",
"T" (transposed: torch Linear weights are (out, in), our kernels (in, out)) or "mix"
((1, 1, C) in the file, (C,) here). ``bind(layout)`` turns that one function into the
family's ``to_torch_layout``, ``from_torch_layout`` and ``expected_torch_shape``.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable

import numpy as np


# Our paths whose BlinkDL names do not follow from the path (both families).
DIRECT = {"emb": "emb.weight", "ln0.weight": "blocks.0.ln0.weight",
          "ln0.bias": "blocks.0.ln0.bias", "head": "head.weight"}


def to_blinkdl(our_name: str) -> str:
  """Our dotted parameter path -> its BlinkDL name (a Dense ``.kernel`` is ``.weight``)."""
  if our_name in DIRECT:
    return DIRECT[our_name]
  if our_name.endswith(".kernel"):
    return our_name[: -len("kernel")] + "weight"
  return our_name


def bind(layout: Callable[[str], str]):
  """(to_torch_layout, from_torch_layout, expected_torch_shape) for a family's ``layout``."""

  def to_torch_layout(our_name: str, array: np.ndarray) -> np.ndarray:
    kind = layout(our_name)
    if kind == "T":
      return np.ascontiguousarray(array.T)
    if kind == "mix":
      return array.reshape(1, 1, -1)
    return array

  def from_torch_layout(our_name: str, array: np.ndarray, shape: tuple[int, ...]):
    """The torch tensor in our layout, or None when its shape does not fit ``shape``."""
    kind = layout(our_name)
    if kind == "T":
      array = array.T
    elif kind == "mix" and array.size == int(np.prod(shape)) and array.ndim in (1, 3):
      array = array.reshape(shape)  # (1, 1, C); some converters squeeze it to (C,)
    return array if tuple(array.shape) == tuple(shape) else None

  def expected_torch_shape(our_name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    kind = layout(our_name)
    if kind == "T":
      return tuple(reversed(shape))
    if kind == "mix":
      return (1, 1, *shape)
    return tuple(shape)

  return to_torch_layout, from_torch_layout, expected_torch_shape


def layer_ids(names: Iterable[str]) -> list[int]:
  """The block indices ``blocks.<i>.`` present among BlinkDL / HF names."""
  ids = {int(m.group(1)) for n in names if (m := re.search(r"(?:^|\.)blocks\.(\d+)\.", n))}
  return sorted(ids)
