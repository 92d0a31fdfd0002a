"""The jitted device programs behind generation: ragged parallel prefill and the decode scan.

Both take the model as ``(graphdef, params)`` (``nnx.split``) so ``jax.jit`` caches one
executable per (graphdef, shapes, static options): a second call with the same shapes, or
a second model of the same architecture, does not recompile.

Ragged prefill. Prompts of different lengths are right-padded to a power of two Tb, and
each sequence consumes its own length n_b as the binary expansion of n_b: for
j = log2(Tb) down to log2(min_parallel), every sequence whose bit j is set advances by the
next 2^j of its own tokens in one parallel forward (the others keep their state, selected
with ``where``).
Padding never enters a state, and a sequence's state is the composition of parallel
forwards over consecutive pieces of its own prompt, which equals one forward over the whole
prompt (state carry is exact up to float rounding). Work is at most 2x one pass over Tb;
levels no sequence needs are skipped by ``lax.cond``. Pieces longer than ``chunk`` run as a
``lax.scan`` over chunks, which bounds activation memory for very long prompts. Bits below
``min_parallel`` (the last < 16 tokens by default) go through a masked recurrent tail.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from rwkv_jax.inference.sampling import SamplingConfig, sample
from rwkv_jax.state import select_rows


class DecodeCarry(NamedTuple):
  """What the decode loop carries from one token to the next (B = batch, V = vocab)."""

  state: object        # the family's state pytree, after every consumed token
  logits: jax.Array    # B V float32, the next-token logits
  done: jax.Array      # B bool, hit a stop token or the token limit
  counts: jax.Array | None  # B V int32 generated-token counts (only with penalties)
  step: jax.Array      # () int32, tokens decoded so far (keys are folded in by step)


def resolve_decode_step(step: str | None, model, batch: int, on_mesh: bool = False) -> str:
  """The decode step to use: one of ``model.decode_steps()`` ("model" is the model's own
  one-token forward; a family may offer fused kernels). None picks the family's default on
  one device and "model" on a mesh. ValueError for an unknown name or a step that cannot
  take this batch."""
  wrapped = _has_wrapped_matrices(model)
  if step is None:
    return "model" if on_mesh or wrapped else model.default_decode_step(batch)
  if step != "model" and wrapped:
    raise ValueError(f"decode_step={step!r} reads plain float matrices; a model with int8 "
                     "or unmerged LoRA matrices decodes with 'model' (or merge the LoRA)")
  if step not in model.decode_steps():
    raise ValueError(f"unknown decode step {step!r} for {model.cfg.family}; choose from "
                     f"{model.decode_steps()} or None")
  if step != "model":
    if on_mesh:
      raise ValueError(f"decode_step={step!r} runs on one device; use 'model' with a mesh")
    model.check_decode_step(step, batch)
  return step


def _has_wrapped_matrices(model) -> bool:
  """True when some parameter is an int8 / LoRA matrix object rather than an array."""
  from rwkv_jax.layers import is_wrapped_matrix

  leaves = jax.tree.leaves(nnx.state(model, nnx.Param), is_leaf=is_wrapped_matrix)
  return any(is_wrapped_matrix(x) for x in leaves)


def _hidden_with_state(model, tokens, state, implementation):
  return model.hidden_with_state(tokens, state, implementation=implementation)


def advance(model, tokens, state, implementation, chunk):
  """Consumes tokens (B, n) -> (hidden of the last token (B, C), state); n > chunk is
  processed as n / chunk consecutive parallel pieces (chunk must divide n)."""
  n = tokens.shape[1]
  if n > chunk and n % chunk:
    raise ValueError(f"advance: chunk {chunk} does not divide the {n} tokens")
  if n <= chunk:
    x, state = _hidden_with_state(model, tokens, state, implementation)
    return x[:, -1], state
  pieces = tokens.reshape(tokens.shape[0], n // chunk, chunk).swapaxes(0, 1)  # P B chunk

  def body(s, piece):
    x, s = _hidden_with_state(model, piece, s, implementation)
    return s, x[:, -1]

  state, last = jax.lax.scan(body, state, pieces)
  return last[-1], state


@functools.partial(jax.jit,
                   static_argnames=("graphdef", "implementation", "chunk", "min_parallel"))
def prefill_program(graphdef, params, tokens, lengths, state, *, implementation, chunk,
                    min_parallel):
  """tokens (B, Tb) right-padded, Tb a power of two; lengths (B,) in [1, Tb].

  Pieces of >= min_parallel tokens (a power of two) run in parallel mode; the remaining
  < min_parallel tokens of each sequence run through the recurrent step, masked per
  sequence (a 16-token recurrent tail costs about what a 16-token parallel forward does on
  a GPU, and saves compiling one forward per small power of two).
  Returns (next-token logits (B, V) float32 at each sequence's last prompt token, state).
  """
  return _prefill_body(nnx.merge(graphdef, params), tokens, lengths, state, implementation,
                       chunk, min_parallel)


def _prefill_body(model, tokens, lengths, state, implementation, chunk, min_parallel):
  batch, t_pad = tokens.shape
  pos = jnp.zeros((batch,), jnp.int32)
  last_x = jnp.zeros((batch, model.cfg.n_embd), jnp.float32)
  _select = functools.partial(select_rows, model)
  gather = lambda idx: jnp.take_along_axis(tokens, jnp.minimum(idx, t_pad - 1), axis=1)
  for j in reversed(range(t_pad.bit_length())):
    size = 1 << j
    if size < min_parallel:
      break
    take = ((lengths >> j) & 1).astype(bool)

    def run(operands, size=size, take=take):
      state, last_x, pos = operands
      piece = gather(pos[:, None] + jnp.arange(size, dtype=jnp.int32))
      x, new = advance(model, piece, state, implementation, chunk)
      return _select(take, new, state), jnp.where(take[:, None], x, last_x)

    state, last_x = jax.lax.cond(jnp.any(take), run, lambda ops: ops[:2], (state, last_x, pos))
    pos = pos + take.astype(jnp.int32) * size
  tail = min(min_parallel - 1, t_pad)
  if tail:
    def step(carry, i):
      state, last_x = carry
      x, new = _hidden_with_state(model, gather(pos[:, None] + i), state, implementation)
      active = pos + i < lengths
      return (_select(active, new, state), jnp.where(active[:, None], x[:, -1], last_x)), None

    (state, last_x), _ = jax.lax.scan(step, (state, last_x), jnp.arange(tail, dtype=jnp.int32))
  return model.logits(last_x[:, None])[:, 0], state


def cast_matmul_weights(params, dtype: str, names=frozenset({"kernel", "head"})):
  """The matrices named ``names`` (the model's ``MATMUL_PARAMS``) in the compute dtype
  (bf16 halves what each decode step reads). The math is unchanged: ``layers.matmul``
  casts them to this dtype anyway; the embedding, LayerNorms, mixes and decays stay
  float32."""
  if dtype == "float32":
    return params

  def cast(path, x):
    keys = {getattr(p, "key", None) for p in path}
    floating = jnp.issubdtype(x.dtype, jnp.floating)  # int8 matrices stay int8
    return x.astype(dtype) if x.ndim == 2 and floating and keys & set(names) else x

  return jax.tree_util.tree_map_with_path(cast, params)


def stop_array(stop_tokens) -> jax.Array:
  """Stop ids padded with -1 (never a token) to a power-of-two length >= 1, so the number
  of stop tokens rarely changes the compiled shape."""
  n = 1 << max(len(stop_tokens) - 1, 0).bit_length()
  return jnp.asarray(list(stop_tokens) + [-1] * (n - len(stop_tokens)), jnp.int32)


@functools.partial(jax.jit,
                   static_argnames=("graphdef", "steps", "sampling", "unroll", "step_impl",
                                    "step_options"))
def decode_program(graphdef, params, carry: DecodeCarry, key, limit, stops, pad_id, *, steps,
                   sampling: SamplingConfig, unroll: int = 1, step_impl: str = "model",
                   step_options: tuple = ()):
  """``steps`` tokens in one ``lax.scan``: sample, then feed the token back.

  ``step_impl`` is a resolved ``_fused.DECODE_STEPS`` name: the model's own T = 1 forward
  or the fused decode kernels; ``step_options`` ((name, value) pairs) go to the fused
  step's ``DecodePlan.make`` (block sizes, for benchmarks).

  A sequence is active until it emits one of ``stops`` (which is emitted and consumed) or
  the step count reaches ``limit``. limit, stops and pad_id are traced, so one executable
  serves them all. Inactive sequences emit ``pad_id`` and keep their state and logits.
  Returns (carry, tokens (B, steps) int32, active (B, steps) bool).
  """
  return _decode_body(graphdef, params, carry, key, limit, stops, pad_id, steps, sampling,
                      unroll, step_impl, step_options)


def _decode_body(graphdef, params, carry, key, limit, stops, pad_id, steps, sampling, unroll,
                 step_impl="model", step_options=()):
  template = nnx.merge(graphdef, params)
  model = nnx.merge(graphdef, cast_matmul_weights(params, template.cfg.dtype,
                                                  template.MATMUL_PARAMS))
  forward = model.decode_step_function(step_impl, **dict(step_options))

  def body(c: DecodeCarry, _):
    active = ~c.done & (c.step < limit)
    tok = sample(c.logits, jax.random.fold_in(key, c.step), sampling, c.counts)
    feed = jnp.where(active, tok, 0)  # a valid id for rows whose result is discarded
    logits, state = forward(feed, c.state)
    counts = c.counts
    if counts is not None:
      counts = counts.at[jnp.arange(feed.shape[0]), feed].add(active.astype(counts.dtype))
    stopped = jnp.any(tok[:, None] == stops[None, :], axis=1)
    new = DecodeCarry(
        state=select_rows(model, active, state, c.state),
        logits=jnp.where(active[:, None], logits, c.logits),
        done=c.done | (active & stopped) | (c.step + 1 >= limit),
        counts=counts,
        step=c.step + 1)
    return new, (jnp.where(active, tok, pad_id), active)

  carry, (tokens, active) = jax.lax.scan(body, carry, None, length=steps, unroll=unroll)
  return carry, tokens.T, active.T



# ----------------------------------------------------------------------------- on a mesh
# The same programs jitted with explicit shardings: parameters as the rules table says,
# every per-sequence array (tokens, lengths, state leaves, logits, flags) split over the
# table's batch axes, scalars and keys replicated. Static options come first, positionally
# (jit takes no keyword arguments together with in_shardings); jit's cache is keyed by the
# function and the shardings, so building the jit object per call does not recompile.

def _gathered(mesh, params):
  """Parameters pinned to the layout they are computed in (FSDP shards gathered per use,
  as in training), so XLA splits the activations by rows rather than by channels."""
  from rwkv_jax import sharding as sh

  return sh.compute_gather(mesh, params)(params)


def _prefill_on_mesh(mesh, graphdef, implementation, chunk, min_parallel, params, tokens,
                     lengths, state):
  from rwkv_jax import sharding as sh

  run = sh.traced_on_mesh(_prefill_body, mesh)  # a Pallas WKV runs per shard
  return run(nnx.merge(graphdef, _gathered(mesh, params)), tokens, lengths, state,
             implementation, chunk, min_parallel)


def _decode_on_mesh(mesh, graphdef, steps, sampling, unroll, params, carry, key, limit, stops,
                    pad_id):
  return _decode_body(graphdef, _gathered(mesh, params), carry, key, limit, stops,
                      pad_id, steps, sampling, unroll)


def mesh_shardings(mesh, graphdef, params, penalties: bool = False):
  """(parameter shardings, per-sequence sharding, the state's shardings, DecodeCarry of
  shardings (``counts`` only with ``penalties``), replicated sharding) on ``mesh``."""
  from rwkv_jax import sharding as sh

  rows = sh.batch_sharding(mesh)
  state = sh.rnn_state_shardings(mesh, nnx.merge(graphdef, params).state_axes())
  rep = NamedSharding(mesh, P())
  carry = DecodeCarry(state, rows, rows, rows if penalties else None, rep)
  return sh.param_shardings(params, mesh), rows, state, carry, rep


def prefill_on_mesh(mesh, graphdef, params, tokens, lengths, state, *, implementation, chunk,
                    min_parallel):
  """``prefill_program`` on ``mesh``; the arguments must already lie as
  ``mesh_shardings`` says (``generate`` places them)."""
  p_sh, rows, st, _, _ = mesh_shardings(mesh, graphdef, params)
  run = jax.jit(_prefill_on_mesh, static_argnums=(0, 1, 2, 3, 4),
                in_shardings=(p_sh, rows, rows, st), out_shardings=(rows, st))
  return run(mesh, graphdef, implementation, chunk, min_parallel, params, tokens, lengths,
             state)


def decode_on_mesh(mesh, graphdef, params, carry: DecodeCarry, key, limit, stops, pad_id, *,
                   steps, sampling: SamplingConfig, unroll: int = 1):
  """``decode_program`` on ``mesh``: tokens and active flags come back split by rows."""
  p_sh, rows, _, carry_sh, rep = mesh_shardings(mesh, graphdef, params, carry.counts is not None)
  run = jax.jit(_decode_on_mesh, static_argnums=(0, 1, 2, 3, 4),
                in_shardings=(p_sh, carry_sh, rep, rep, rep, rep),
                out_shardings=(carry_sh, rows, rows))
  return run(mesh, graphdef, steps, sampling, unroll, params, carry, key, limit, stops, pad_id)
