"""The interface every model family implements, and nothing family-specific.

A family is a folder (``rwkv_jax/models/rwkv4/``, ``rwkv_jax/models/rwkv7/``) holding

  * a config: a frozen dataclass subclassing ``FamilyConfig`` (presets, ``param_count``,
    ``shape_hash``, ``to_dict`` recording the family);
  * a model: an ``nnx.Module`` subclassing ``RecurrentLM`` (``init_state``, ``state_axes``,
    ``embed``, ``blocks_forward``, ``logits``; the rest is written here once);
  * its weight-file names (``weights.py``): what ``rwkv_jax.interop`` needs to read and
    write BlinkDL files without naming a parameter itself.

Training, inference, state I/O and sharding speak only to this interface. The recurrent
state of a family is a pytree (a NamedTuple) whose leaves all have the layer axis first and
the batch axis second; ``state_axes()`` gives each leaf's logical axis names, e.g.
``("layer", "batch", "embed")`` for a token-shift vector or
``("layer", "batch", "head", "head_v", "head_k")`` for RWKV-7's WKV matrices.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rwkv_jax._dataclasses import dataclass_from_dict

_DTYPES = ("float32", "bfloat16", "float16")
# Rematerialisation of the scanned layer body (see ``run_layers``): what the backward pass
# keeps from the forward, per layer.
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


def check_positive_ints(obj, names) -> None:
  for name in names:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{type(obj).__name__}.{name} must be a positive integer, got {value!r}")


class FamilyConfig:
  """Mixin of every family's frozen config dataclass.

  Every family config has the fields ``n_layer``, ``n_embd``, ``vocab_size``, ``ctx_len``,
  ``dtype`` (matmul compute dtype), ``wkv_impl`` (the parallel-mode WKV path),
  ``dropout``, ``scan_layers`` and ``remat`` (see ``run_layers``). ``SHAPE_FIELDS`` fix the parameter and state shapes (weights files provide
  them; a user may not override them on load).
  """

  family: ClassVar[str]
  SHAPE_FIELDS: ClassVar[tuple[str, ...]]
  WKV_IMPLEMENTATIONS: ClassVar[tuple]

  def _check_common(self) -> None:
    check_positive_ints(self, ("n_layer", "n_embd", "vocab_size", "ctx_len"))
    name = type(self).__name__
    if self.dtype not in _DTYPES:
      raise ValueError(f"{name}.dtype must be one of {_DTYPES}, got {self.dtype!r}")
    if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
      raise ValueError(f"{name}.dropout must be in [0, 1), got {self.dropout!r}")
    if self.wkv_impl not in self.WKV_IMPLEMENTATIONS:
      raise ValueError(
          f"{name}.wkv_impl must be one of {self.WKV_IMPLEMENTATIONS}, got {self.wkv_impl!r}")
    if not isinstance(self.scan_layers, bool):
      raise ValueError(f"{name}.scan_layers must be True or False, got {self.scan_layers!r}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"{name}.remat must be one of {REMAT_POLICIES}, got {self.remat!r}")

  @classmethod
  def preset_names(cls) -> tuple[str, ...]:
    return tuple(cls.presets())

  @classmethod
  def presets(cls) -> dict[str, dict[str, Any]]:
    """Preset name -> the config fields it sets (a family's table)."""
    raise NotImplementedError

  @classmethod
  def preset(cls, name: str, **overrides: Any):
    """The named preset's config, with ``overrides`` on top."""
    table = cls.presets()
    key = name.lower()
    if key not in table:
      raise ValueError(
          f"unknown {cls.__name__} preset {name!r}; choose from {list(table)}")
    return cls(**{**table[key], **overrides})

  def param_count(self) -> int:
    raise NotImplementedError

  def shape_key(self) -> list:
    """What fixes the parameter and state shapes (hashed by ``shape_hash``)."""
    return [self.family, *(getattr(self, f) for f in self.SHAPE_FIELDS)]

  def shape_hash(self) -> str:
    """A short hash of what fixes the parameter and state shapes (not dtype or ctx_len)."""
    return hashlib.sha256(json.dumps(self.shape_key()).encode()).hexdigest()[:16]

  def describe(self) -> str:
    return f"{self.family} {self.n_layer} layers x {self.n_embd}"

  def describe_shape(self) -> str:
    return ", ".join([f"family={self.family}"]
                     + [f"{k}={getattr(self, k)}" for k in self.SHAPE_FIELDS])

  def replace(self, **changes: Any):
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return {"family": self.family, **dataclasses.asdict(self)}

  @classmethod
  def from_dict(cls, data: dict[str, Any]):
    data = dict(data)
    family = data.pop("family", cls.family)
    if family != cls.family:
      raise ValueError(f"a {family} config cannot build a {cls.family} model")
    return dataclass_from_dict(cls, data)

  def matmul_params(self) -> int:
    """N for the 6·N FLOPs-per-token rule: every parameter except the embedding table
    (a gather, not a matmul); the head is counted."""
    return self.param_count() - self.vocab_size * self.n_embd


def _remat(policy: str):
  """The function transformation of a ``REMAT_POLICIES`` name (identity for "none")."""
  if policy == "none":
    return lambda f: f
  policies = {"full": None, "dots": jax.checkpoint_policies.checkpoint_dots,
              "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
  return lambda f: jax.checkpoint(f, policy=policies[policy])


def check_tokens(tokens, vocab_size: int):
  """Rejects token ids outside [0, vocab) when the ids are concrete (JAX would clamp them).

  Under a trace the ids cannot be inspected; ``embed_tokens`` then returns NaN for every
  out-of-range id (negative ones included) instead of clamping or wrapping, so a bad id
  can never pass silently.
  """
  if tokens.ndim != 2:
    raise ValueError(f"tokens must be (batch, time) integers, got shape {tokens.shape}")
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"tokens must be integers, got dtype {tokens.dtype}")
  if tokens.shape[1] < 1:
    raise ValueError("tokens must hold at least one time step")
  if isinstance(tokens, jax.core.Tracer):
    return
  ids = np.asarray(tokens)
  bad = (ids < 0) | (ids >= vocab_size)
  if bad.any():
    pos = tuple(int(i) for i in np.argwhere(bad)[0])
    raise ValueError(
        f"token id {int(ids[pos])} at position {pos} is outside the vocabulary [0, {vocab_size})")


def embed_tokens(table, tokens):
  """table (V, C), tokens (B, T) int -> (B, T, C) float32; NaN rows for ids outside [0, V)
  (``take`` would wrap negative ids from the end and clamp large ones)."""
  vocab = table.shape[0]
  ids = jnp.where(tokens < 0, vocab, tokens)  # negative -> out of range -> filled
  return jnp.take(table, ids, axis=0, mode="fill", fill_value=jnp.nan)


class RecurrentLM(nnx.Module):
  """A recurrent language model: parallel mode for training and prefill, the same
  function token by token for decoding.

  A family implements ``init_state``, ``state_axes``, ``embed``, ``blocks_forward`` and
  ``logits``; it may override ``decode_steps`` / ``decode_step_function`` to offer fused
  decode kernels, and ``optimizer_rules`` for per-parameter weight decay / lr scales.
  """

  cfg: FamilyConfig
  # Leaf names (a path component) of the matrices read by matmuls: inference casts them
  # to the compute dtype once (``rwkv_jax.inference._engine.cast_matmul_weights``).
  MATMUL_PARAMS: ClassVar[frozenset[str]] = frozenset({"kernel", "head"})
  # LoRA parts (``rwkv_jax.lora``): part name -> (a path component the matrix must lie
  # under, or None for any; the leaf names it selects). Only 2-D leaves read through
  # ``layers.matmul`` can be adapted (the embedding is a gather, so it is no part).
  LORA_PARTS: ClassVar[dict[str, tuple[str | None, frozenset[str]]]] = {
      "att": ("att", frozenset({"kernel"})),    # every block's time-mix Dense matrices
      "ffn": ("ffn", frozenset({"kernel"})),    # every block's channel-mix Dense matrices
      "head": (None, frozenset({"head"})),      # the output head
  }
  # Leaves that ``rwkv_jax.quantize`` stores as int8 (2-D, read through layers.matmul).
  INT8_PARAMS: ClassVar[frozenset[str]] = frozenset({"kernel", "head"})

  # ---- what a family implements
  def init_state(self, batch_size: int):
    """The empty recurrent state for ``batch_size`` sequences (a NamedTuple pytree)."""
    raise NotImplementedError

  def state_axes(self):
    """The state's logical axis names: the state's structure with a tuple per leaf."""
    raise NotImplementedError

  def tunable_state(self, batch_size: int = 1):
    """The starting point of state tuning (``rwkv-jax train --tune state``): a state equal
    to the empty one in function whose every leaf has a useful gradient. By default
    ``init_state``; a family overrides it where the empty state has a leaf that blocks
    gradients (RWKV-4's exponent of -1e38)."""
    return self.init_state(batch_size)

  def embed(self, tokens):
    """tokens (B, T) int -> x (B, T, C) float32 (validated; see ``check_tokens``)."""
    raise NotImplementedError

  def blocks_forward(self, x, state, implementation: str, dropout_key=None):
    """x (B, T, C) -> (x (B, T, C) before the output norm, the new state). The state is
    valid (``check_state``) and ``implementation`` a resolved WKV path name."""
    raise NotImplementedError

  def logits(self, x):
    """x (B, T, C) -> logits (B, T, V) float32."""
    raise NotImplementedError

  # ---- written once
  def run_layers(self, x, state, call, *, first: int = 0, carry=None, dropout_key=None):
    """Runs ``self.blocks`` over x (B, T, C): ``call(block, x, layer_state, carry, key) ->
    (x, layer_state, carry)``, where layer_state is ``state.layer(i)`` and ``carry`` what
    a layer hands the next (RWKV-7's ``v_first``). Returns (x, the stacked new state).

    With ``cfg.scan_layers`` the blocks from ``first`` on run as one ``lax.scan`` over their
    parameters stacked along a new leading axis (one traced layer body: compile time stops
    growing with depth), the body rematerialised per ``cfg.remat`` ("none": keep what
    autodiff keeps; "full": keep only each layer's input; "dots" / "dots_no_batch": keep
    matmul outputs, as ``jax.checkpoint_policies``). Blocks before ``first`` (a layer
    that differs, such as RWKV-7's layer 0 that sets ``v_first``) and models whose blocks
    differ in structure (e.g. per-layer LayerNorm epsilons from an HF import) run as a
    Python loop. Parameters stay stored per layer, so checkpoints and weight files are the
    same either way.
    """
    blocks = list(self.blocks)
    n = len(blocks)
    keys = [None] * n
    if dropout_key is not None and self.cfg.dropout > 0:
      keys = list(jax.random.split(dropout_key, n))
    remat = _remat(self.cfg.remat)
    layers = []
    scanned = None
    if self.cfg.scan_layers and n - first >= 2:
      splits = [nnx.split(b) for b in blocks[first:]]
      graphdef = splits[0][0]
      same = all(g == graphdef for g, _ in splits) and len(
          {jax.tree.structure(st) for _, st in splits}) == 1
      scanned = (graphdef, [st for _, st in splits]) if same else None
    stop = first if scanned is not None else n
    for i in range(stop):
      x, s, carry = remat(call)(blocks[i], x, state.layer(i), carry, keys[i])
      layers.append(s)
    if scanned is None:
      return x, type(state).stack(layers)
    graphdef, states = scanned
    params = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    rest = jax.tree.map(lambda a: a[first:], state)
    rest_keys = None if keys[first] is None else jnp.stack(keys[first:])

    def body(c, xs):
      x, carry = c
      p, s, key = xs
      x, s, carry = call(nnx.merge(graphdef, p), x, s, carry, key)
      return (x, carry), s

    (x, _), new = jax.lax.scan(remat(body), (x, carry), (params, rest, rest_keys))
    if not layers:
      return x, new
    head = type(state).stack(layers)
    return x, jax.tree.map(lambda a, b: jnp.concatenate([a, b]), head, new)

  def hidden_with_state(self, tokens, state=None, *, implementation: str | None = None,
                        dropout_key=None):
    """``forward_with_state`` without the head: (x (B, T, C) before the output norm, state).

    Prefill applies the head only where logits are needed (a long prompt's full (B, T, V)
    logits would dominate its time and memory).
    """
    from rwkv_jax.state import check_state

    x = self.embed(tokens)
    state = check_state(self, state, tokens.shape[0])
    impl = "scan" if tokens.shape[1] == 1 else (implementation or self.cfg.wkv_impl)
    return self.blocks_forward(x, state, impl, dropout_key)

  def forward_with_state(self, tokens, state=None, *, implementation: str | None = None,
                         dropout_key=None):
    """tokens (B, T) int -> (logits (B, T, V) float32, the state after the last token).

    Any T >= 1: T = 1 is a decode step (always the recurrent WKV step), T > 1 a prefill
    whose state continues exactly where a token-by-token run would. ``implementation``
    overrides ``cfg.wkv_impl`` for T > 1; ``dropout_key`` (training only) turns on
    ``cfg.dropout``.
    """
    x, state = self.hidden_with_state(tokens, state, implementation=implementation,
                                      dropout_key=dropout_key)
    return self.logits(x), state

  def __call__(self, tokens, *, implementation: str | None = None, dropout_key=None):
    """tokens (B, T) int -> logits (B, T, V) float32, from an empty state."""
    return self.forward_with_state(tokens, None, implementation=implementation,
                                   dropout_key=dropout_key)[0]

  # ---- decoding: the model's own step unless a family offers fused kernels
  def decode_steps(self) -> tuple[str, ...]:
    """Decode-step names this model offers; "model" (its own T = 1 forward) always."""
    return ("model",)

  def default_decode_step(self, batch: int) -> str:
    """The step ``generate`` uses when none is asked for, on one device."""
    return "model"

  def check_decode_step(self, step: str, batch: int) -> None:
    """Raises ValueError when ``step`` (one of ``decode_steps()``) cannot take this batch."""

  def decode_step_function(self, step: str, **options):
    """``f(tokens (B,), state) -> (logits (B, V), state)``; fused steps prepare their
    weights here, once, outside the decode loop."""
    if step != "model":
      raise ValueError(f"{self.cfg.family} has no decode step {step!r}; it has "
                       f"{self.decode_steps()}")

    def run(tokens, state):
      logits, state = self.forward_with_state(tokens[:, None], state)
      return logits[:, 0], state
    return run

  # ---- training
  @staticmethod
  def optimizer_rules(params):
    """(weight-decay mask, learning-rate multiplier) trees over ``params``: by default
    decay on every matrix, lr x 1 everywhere."""
    return (jax.tree.map(lambda x: x.ndim == 2, params),
            jax.tree.map(lambda x: 1.0, params))
