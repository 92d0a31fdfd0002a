"""Model families behind one interface (``base.RecurrentLM``) and one registry.

  build_model(cfg, seed=0)     the family's model for any family config
  config_from_dict(d)          a config from ``cfg.to_dict()`` (a run's config.json);
                               dicts without "family" are RWKV-4 (runs written before RWKV-7)
  preset(name, **overrides)    "169m" ... (RWKV-4) or "rwkv7-0.1b" ... (RWKV-7), "tiny",
                               "rwkv7-tiny"
  family_module(name)          the family's package (CONFIG, MODEL, weights)

A new family is a folder here with those names and one line in ``FAMILIES``.
"""

from __future__ import annotations

import importlib
from typing import Any

# The interface classes (``base``) import JAX: loaded on first use, so that reading a
# config (``rwkv-jax --help``, TrainConfig) does not.
_LAZY = {"FamilyConfig": "rwkv_jax.models.base", "RecurrentLM": "rwkv_jax.models.base"}


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'rwkv_jax.models' has no attribute {name!r}")

# family name -> package; imported on first use.
FAMILIES = {"rwkv4": "rwkv_jax.models.rwkv4", "rwkv7": "rwkv_jax.models.rwkv7"}
DEFAULT_FAMILY = "rwkv4"


def family_module(family: str):
  if family not in FAMILIES:
    raise ValueError(f"unknown model family {family!r}; choose from {sorted(FAMILIES)}")
  return importlib.import_module(FAMILIES[family])


def config_class(family: str):
  return family_module(family).CONFIG


def config_from_dict(data: dict[str, Any]):
  """The config a ``to_dict()`` (or a run's config.json "model" entry) describes."""
  return config_class(data.get("family", DEFAULT_FAMILY)).from_dict(data)


def build_model(cfg, seed: int = 0, *, rngs=None):
  """The family's freshly initialised model for ``cfg`` (a family config)."""
  from flax import nnx

  from rwkv_jax.models.base import FamilyConfig

  if not isinstance(cfg, FamilyConfig):
    raise ValueError(f"build_model needs a family config, got {type(cfg).__name__}")
  return family_module(cfg.family).MODEL(cfg, rngs=rngs or nnx.Rngs(seed))


def abstract_model(cfg):
  """The model's structure and shapes only (``nnx.eval_shape``: no memory, no init)."""
  from flax import nnx

  return nnx.eval_shape(lambda: build_model(cfg))


def split_preset(name: str) -> tuple[str, str]:
  """"rwkv7-0.1b" -> ("rwkv7", "0.1b"); a name without a family prefix is RWKV-4's."""
  family, sep, rest = name.lower().partition("-")
  if sep and family in FAMILIES:
    return family, rest
  return DEFAULT_FAMILY, name.lower()


def preset(name: str, **overrides: Any):
  family, size = split_preset(name)
  return config_class(family).preset(size, **overrides)


def preset_names() -> tuple[str, ...]:
  names = []
  for family in FAMILIES:
    prefix = "" if family == DEFAULT_FAMILY else f"{family}-"
    try:
      names += [prefix + n for n in config_class(family).preset_names()]
    except ImportError:  # a family whose package is not importable here
      continue
  return tuple(names)


__all__ = ["DEFAULT_FAMILY", "FAMILIES", "FamilyConfig", "RecurrentLM", "abstract_model",
           "build_model", "config_class", "config_from_dict", "family_module", "preset",
           "preset_names", "split_preset"]
