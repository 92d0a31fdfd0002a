"""Dataclass helpers that need no JAX (configs are read by ``rwkv-jax --help``)."""

from __future__ import annotations

import dataclasses
from typing import Any


def dataclass_from_dict(cls, data: dict[str, Any]):
  """``cls(**data)``, refusing keys that are not fields of ``cls`` by name."""
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = set(data) - known
  if unknown:
    raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}")
  return cls(**data)
