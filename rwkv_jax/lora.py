"""LoRA for any model family: low-rank adapters on chosen matrices, the base frozen.

An adapted matrix W (in, out) is read as ``W + (alpha / r) A @ B`` with A (in, r) and
B (r, out) (Hu et al. 2021; PEFT's defaults: A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0, so an
untrained adapter is the base exactly). Nothing in the models changes: the adapters are
a separate pytree, and ``apply_lora`` puts a ``LoraKernel`` where each selected matrix
was; ``layers.matmul`` computes ``x W + s (x A) B`` from it, never forming W + s A B (so
training differentiates only A and B and no full-size gradient exists).

Which matrices: ``parts``, names the model class declares in ``LORA_PARTS``
(``rwkv_jax.models.base``): "att" (every block's time-mix Dense matrices), "ffn" (the
channel-mix ones) and "head" (the output head). The embedding is no part: it is read by
a gather, not a matmul (train it fully if it must change). RWKV-7's own small decay /
ICLR / value / gate LoRAs are not adapted (they are not Dense kernels).

The adapters are a nested dict mirroring the parameter paths, e.g.
``{"blocks": {"0": {"att": {"key": {"kernel": {"a": A, "b": B}}}}}, "head": {...}}``.

  spec = LoraSpec(rank=8, alpha=16, parts=("att", "ffn"))
  adapters = init_adapters(model, spec, seed=0)
  adapted = apply_lora(model, adapters, spec)       # unmerged: x W + s (x A) B
  merged = merge_lora(model, adapters, spec)        # W + s A B written into the weights
  adapters, spec = load_adapters("runs/lora", model)  # a `rwkv-jax train --lora-rank` run
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from rwkv_jax import layers


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraKernel:
  """A matrix read as ``w + scale * a @ b``; ``w`` (in, out) may itself be wrapped (an
  int8 ``QuantizedMatrix``). Stands in for the array of an ``nnx.Param``."""

  w: Any
  a: jax.Array  # in r
  b: jax.Array  # r out
  scale: float = dataclasses.field(metadata=dict(static=True))

  def __getitem__(self, index):  # ``param[...]`` reads the wrapped matrix as it is
    if index is not Ellipsis:
      raise TypeError("a LoRA-adapted matrix is read whole (param[...])")
    return self

  @property
  def shape(self) -> tuple[int, int]:
    return tuple(self.w.shape)

  def matmul(self, x, dtype):
    """x (..., in) -> (..., out) float32: x w + scale (x a) b, each product in ``dtype``
    accumulated in float32."""
    y = layers.matmul(x, self.w, dtype)
    return y + self.scale * layers.matmul(layers.matmul(x, self.a, dtype), self.b, dtype)

  def merged(self):
    """w + scale * a @ b as a float32 array (float32 matmul at full precision)."""
    w = self.w.dequantize() if hasattr(self.w, "dequantize") else self.w
    delta = jnp.matmul(self.a.astype(jnp.float32), self.b.astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)
    return w.astype(jnp.float32) + self.scale * delta


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """rank r >= 1, alpha > 0 (the update is scaled by alpha / r; default alpha = r, a
  scale of 1), parts: names of the model's ``LORA_PARTS``."""

  rank: int
  alpha: float | None = None
  parts: tuple[str, ...] = ("att", "ffn")

  def __post_init__(self):
    parts = self.parts
    if isinstance(parts, str):
      parts = tuple(p.strip() for p in parts.split(",") if p.strip())
    object.__setattr__(self, "parts", tuple(parts))
    if self.alpha is None:
      object.__setattr__(self, "alpha", float(self.rank) if _is_int(self.rank) else None)
    self.validate()

  def validate(self) -> "LoraSpec":
    if not _is_int(self.rank) or self.rank < 1:
      raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}")
    if not (isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool)
            and math.isfinite(self.alpha) and self.alpha > 0):
      raise ValueError(f"LoRA alpha must be a positive number, got {self.alpha!r}")
    if not self.parts:
      raise ValueError("LoRA parts must name at least one part, e.g. att,ffn")
    if len(set(self.parts)) != len(self.parts):
      raise ValueError(f"LoRA parts {list(self.parts)} name a part twice")
    return self

  @property
  def scale(self) -> float:
    return float(self.alpha) / self.rank

  def to_dict(self) -> dict:
    return {"rank": self.rank, "alpha": float(self.alpha), "parts": list(self.parts)}

  @classmethod
  def from_dict(cls, data: dict) -> "LoraSpec":
    return cls(rank=data["rank"], alpha=data.get("alpha"), parts=tuple(data["parts"]))


def _is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


# ----------------------------------------------------------------------------- paths

def _key(entry) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def param_path(path) -> tuple[str, ...]:
  """A key path of an ``nnx.State`` leaf as strings, without the Variable's ``value``."""
  names = [_key(e) for e in path]
  if names and names[-1] == "value" and isinstance(path[-1], jax.tree_util.GetAttrKey):
    names.pop()
  return tuple(names)


def _params(model_or_params):
  if isinstance(model_or_params, nnx.Module):
    return nnx.state(model_or_params, nnx.Param)
  return model_or_params


def select_targets(model, parts: Sequence[str]) -> dict[tuple[str, ...], tuple[int, int]]:
  """{parameter path: (in, out)} of the matrices the parts select, in parameter order.
  ValueError for a part the model does not declare, or one that selects nothing."""
  declared = type(model).LORA_PARTS
  unknown = [p for p in parts if p not in declared]
  if unknown:
    hint = (" (the embedding is read by a gather, not a matmul: it cannot take a LoRA)"
            if any(p in ("emb", "embed", "embedding") for p in unknown) else "")
    raise ValueError(f"unknown LoRA part(s) {unknown} for {model.cfg.family}; parts are "
                     f"{sorted(declared)}{hint}")
  params = nnx.state(model, nnx.Param)
  found: dict[tuple[str, ...], tuple[int, int]] = {}
  for part in parts:
    component, leaves = declared[part]
    hits = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
      key = param_path(path)
      if key[-1] in leaves and len(leaf.shape) == 2 and (
          component is None or component in key[:-1]):
        found[key] = tuple(leaf.shape)
        hits += 1
    if not hits:
      raise ValueError(f"LoRA part {part!r} selects no matrix of this {model.cfg.family} "
                       "model")
  order = [param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  return {k: found[k] for k in order if k in found}


def _flat(adapters) -> dict[tuple[str, ...], dict]:
  """{parameter path: {"a": A, "b": B}} of a nested adapters dict."""
  flat = traverse_util.flatten_dict(adapters)
  out: dict[tuple[str, ...], dict] = {}
  for key, value in flat.items():
    out.setdefault(tuple(key[:-1]), {})[key[-1]] = value
  return out


def adapter_paths(adapters) -> list[tuple[str, ...]]:
  return list(_flat(adapters))


# ----------------------------------------------------------------------------- adapters

def init_adapters(model, spec: LoraSpec, seed: int = 0) -> dict:
  """Fresh adapters for ``model``'s selected matrices: A ~ U(-1/sqrt(in), 1/sqrt(in))
  (PEFT's kaiming-uniform with a = sqrt(5)), B = 0, float32; the key of matrix i is
  ``fold_in(key(seed), i)``, so the draw does not depend on the device or mesh."""
  spec.validate()
  targets = select_targets(model, spec.parts)
  key = jax.random.key(seed)
  flat = {}
  for i, (path, (n_in, n_out)) in enumerate(targets.items()):
    bound = 1.0 / math.sqrt(n_in)
    flat[path + ("a",)] = jax.random.uniform(jax.random.fold_in(key, i), (n_in, spec.rank),
                                             jnp.float32, -bound, bound)
    flat[path + ("b",)] = jnp.zeros((spec.rank, n_out), jnp.float32)
  return traverse_util.unflatten_dict(flat)


def abstract_adapters(model, spec: LoraSpec) -> dict:
  """The adapters' shapes only (``jax.ShapeDtypeStruct`` leaves)."""
  return jax.eval_shape(lambda: init_adapters(model, spec))


def check_adapters(model, adapters, spec: LoraSpec) -> None:
  """ValueError unless ``adapters`` holds exactly the spec's matrices of this model, each
  of the right shape."""
  targets = select_targets(model, spec.parts)
  flat = _flat(adapters)
  missing = [".".join(p) for p in targets if p not in flat]
  extra = [".".join(p) for p in flat if p not in targets]
  if missing or extra:
    raise ValueError(f"the adapters do not fit this {model.cfg.family} model and parts "
                     f"{list(spec.parts)}: missing {missing[:4]}, unexpected {extra[:4]}")
  for path, (n_in, n_out) in targets.items():
    got = (tuple(np.shape(flat[path].get("a"))), tuple(np.shape(flat[path].get("b"))))
    want = ((n_in, spec.rank), (spec.rank, n_out))
    if got != want:
      raise ValueError(f"adapter {'.'.join(path)} has shapes {got}; rank {spec.rank} on "
                       f"this model needs {want}")


def apply_to_params(params, adapters, scale: float):
  """``params`` (an nnx.State of the model's parameters) with a ``LoraKernel`` in place of
  every adapted matrix. Works inside jit (the base may be traced, e.g. gathered)."""
  flat = _flat(adapters)

  def wrap(path, leaf):
    hit = flat.get(param_path(path))
    return leaf if hit is None else LoraKernel(leaf, hit["a"], hit["b"], scale)

  return jax.tree_util.tree_map_with_path(wrap, params)


def apply_lora(model, adapters, spec: LoraSpec):
  """A new model whose adapted matrices are ``LoraKernel``s (the unmerged adapters:
  ``x W + s (x A) B``); ``model`` is left as it is."""
  check_adapters(model, adapters, spec)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return nnx.merge(graphdef, apply_to_params(params, adapters, spec.scale), rest)


def merge_params(params, adapters, scale: float):
  """``params`` with W + scale * A @ B (float32) in place of every adapted matrix."""
  wrapped = apply_to_params(params, adapters, scale)
  is_lora = lambda x: isinstance(x, LoraKernel)
  return jax.tree.map(lambda x: x.merged() if is_lora(x) else x, wrapped, is_leaf=is_lora)


def merge_lora(model, adapters, spec: LoraSpec):
  """A new model with the adapters merged into its float32 weights (W + s A B): an
  ordinary model again, for any writer (``save_pretrained``, run dirs) or training."""
  check_adapters(model, adapters, spec)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return nnx.merge(graphdef, merge_params(params, adapters, spec.scale), rest)


def adapter_count(adapters) -> int:
  return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(adapters)))


def adapter_axes(adapters, model_or_params) -> dict:
  """{adapter leaf path: (logical axis names, shape)}, in the form
  ``rwkv_jax.sharding.tree_shardings`` takes: A (in, r) takes its matrix's input axis,
  B (r, out) its output axis, the rank axis ("lora") is replicated. Optimizer states
  mirroring the adapters match these paths by suffix, as they do for parameters."""
  from rwkv_jax import sharding

  axes = sharding.logical_axes(_params(model_or_params))
  out = {}
  for path, leaf in traverse_util.flatten_dict(adapters).items():
    names = (axes.get(tuple(path[:-1])) or (None,))[0]
    if names is None or len(names) != 2:
      names = (None, None)
    logical = (names[0], "lora") if path[-1] == "a" else ("lora", names[1])
    out[tuple(path)] = (logical, tuple(leaf.shape))
  return out


def adapter_shardings(adapters, mesh, model_or_params):
  """Shardings of the adapters on ``mesh`` (see ``adapter_axes``)."""
  from rwkv_jax import sharding

  return sharding.tree_shardings(adapters, mesh, adapter_axes(adapters, model_or_params))


def load_adapters(run_dir, model=None, *, step: int | None = None, check_base: bool = True):
  """(adapters, spec) of a LoRA training run (``rwkv-jax train --lora-rank R``): its
  latest checkpoint (or ``step``). With ``model`` (the base) the adapters are checked
  against it: ValueError when the run was trained on another base (fingerprints differ)
  unless ``check_base=False``."""
  from rwkv_jax import tuning

  info = tuning.read_tuned_run(run_dir, step)
  if info.kind != "lora":
    raise ValueError(f"{run_dir} is a {info.kind} run, not a LoRA run")
  if model is None:
    model = tuning.load_base(info)
  elif check_base:
    tuning.check_base(model, info)
  adapters = tuning.restore_trainable(info, abstract_adapters(model, info.lora))
  check_adapters(model, adapters, info.lora)
  return adapters, info.lora


__all__ = ["LoraKernel", "LoraSpec", "abstract_adapters", "adapter_axes", "adapter_count",
           "adapter_shardings", "apply_lora", "apply_to_params", "check_adapters",
           "init_adapters", "load_adapters", "merge_lora", "merge_params", "param_path",
           "select_targets"]
