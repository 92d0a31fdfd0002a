"""Batched generation: ragged parallel prefill, then an on-device decode loop.

``generate`` runs the whole decode as one jitted ``lax.scan``; ``stream`` runs the same
program in small chunks and yields tokens as each chunk comes back. Both draw the token of
step i with ``fold_in(key, i)``, so for one key they produce the same tokens.
"""

from __future__ import annotations

import functools
from typing import Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rwkv_jax.inference._engine import (
    DecodeCarry, decode_on_mesh, decode_program, mesh_shardings, prefill_on_mesh,
    prefill_program, resolve_decode_step, stop_array)
from rwkv_jax.inference.sampling import SamplingConfig
from rwkv_jax.state import check_state

PREFILL_TOKENS_PER_CALL = 1 << 16  # B * chunk tokens per parallel forward in prefill
MIN_PARALLEL = 16  # prompt pieces shorter than this take the recurrent step


class GenerateOutput(NamedTuple):
  """Result of ``generate`` (always batched, B = number of prompts).

  tokens: (B, max_new_tokens) int32; after a sequence stops, ``pad_id``.
  lengths: (B,) how many tokens each sequence generated (a stop token counts).
  state: the model's state (its family's pytree) after each prompt and its generated tokens.
  logits: (B, V) float32 next-token logits after the last consumed token.
  """

  tokens: np.ndarray
  lengths: np.ndarray
  state: object
  logits: jax.Array


def as_batch(prompts, vocab_size: int) -> tuple[list[np.ndarray], bool]:
  """A prompt (ints) or a batch of prompts -> (list of 1-D int32 arrays, was_single)."""
  if isinstance(prompts, (str, bytes)) or (
      isinstance(prompts, (list, tuple)) and any(isinstance(p, (str, bytes)) for p in prompts)):
    raise ValueError("prompts must be token ids: encode text with a tokenizer first")
  if isinstance(prompts, (np.ndarray, jax.Array)):
    arr = np.asarray(prompts)
    if arr.ndim not in (1, 2):
      raise ValueError(f"prompts must be 1-D (one prompt) or 2-D (a batch), got {arr.shape}")
    single = arr.ndim == 1
    seqs = [arr] if single else list(arr)
  else:
    seqs = list(prompts)
    single = bool(seqs) and all(isinstance(t, (int, np.integer)) for t in seqs)
    if single:
      seqs = [seqs]
  if not seqs:
    raise ValueError("prompts is empty: give one prompt (a list of token ids) or a batch")
  out = []
  for b, seq in enumerate(seqs):
    arr = np.asarray(seq)
    if arr.ndim != 1 or arr.size == 0:
      raise ValueError(f"prompt {b} must be a non-empty 1-D list of token ids, got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
      raise ValueError(f"prompt {b} must hold integer token ids, got dtype {arr.dtype}")
    bad = (arr < 0) | (arr >= vocab_size)
    if bad.any():
      i = int(np.argmax(bad))
      raise ValueError(
          f"prompt {b}: token id {int(arr[i])} at position {i} is outside the vocabulary "
          f"[0, {vocab_size})")
    out.append(arr.astype(np.int32))
  return out, single


def pad_prompts(seqs: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads to a power-of-two length (one compilation per bucket) -> tokens (B, Tb),
  lengths (B,). The pad id 0 is never consumed (see ``_engine``)."""
  lengths = np.array([len(s) for s in seqs], np.int32)
  t_pad = 1 << int(lengths.max() - 1).bit_length()
  tokens = np.zeros((len(seqs), t_pad), np.int32)
  for b, s in enumerate(seqs):
    tokens[b, :len(s)] = s
  return tokens, lengths


def as_key(key):
  """None -> key 0; an int -> that seed; a JAX key (typed or raw uint32) as given."""
  if key is None:
    key = 0
  if isinstance(key, (int, np.integer)):
    return jax.random.key(int(key))
  return key


def _check_tokens_arg(ids, vocab_size: int, what: str) -> tuple[int, ...]:
  ids = tuple(int(t) for t in ids)
  bad = [t for t in ids if not 0 <= t < vocab_size]
  if bad:
    raise ValueError(f"{what} {bad} are outside the vocabulary [0, {vocab_size})")
  return ids


def _check_mesh(mesh, batch: int):
  if mesh is None:
    return
  from rwkv_jax import sharding as sh

  if batch % sh.batch_shards(mesh):
    raise ValueError(f"{batch} prompt(s) cannot be split over the mesh's "
                     f"{sh.batch_shards(mesh)} batch shards ({sh.mesh_description(mesh)}); "
                     "give a multiple of that many prompts")


def _prefill(model, seqs, state, implementation, tokens_per_call, min_parallel, mesh=None):
  if isinstance(min_parallel, bool) or not isinstance(min_parallel, int) or min_parallel < 1 \
      or min_parallel & (min_parallel - 1):
    raise ValueError(f"min_parallel must be a power of two >= 1, got {min_parallel!r}")
  graphdef, params = nnx.split(model)
  tokens, lengths = pad_prompts(seqs)
  batch, t_pad = tokens.shape
  chunk = 1 << max(int(tokens_per_call) // batch, 1).bit_length() - 1
  state = check_state(model, state, batch)
  options = dict(implementation=implementation, chunk=min(chunk, t_pad),
                 min_parallel=min_parallel)
  if mesh is None:
    logits, state = prefill_program(graphdef, params, tokens, lengths, state, **options)
    return graphdef, params, logits, state
  # Every process holds all prompts, so device_put places each process's shards.
  _check_mesh(mesh, batch)
  p_sh, rows, st, _, _ = mesh_shardings(mesh, graphdef, params)
  params = jax.device_put(params, p_sh)
  tokens, lengths = jax.device_put((tokens, lengths), rows)
  state = jax.device_put(jax.tree.map(np.asarray, state), st)
  logits, state = prefill_on_mesh(mesh, graphdef, params, tokens, lengths, state, **options)
  return graphdef, params, logits, state


def prefill(model, prompts, state=None, *,
            implementation: str | None = None,
            tokens_per_call: int = PREFILL_TOKENS_PER_CALL, min_parallel: int = MIN_PARALLEL,
            mesh=None):
  """Consumes prompts of any lengths in parallel mode.

  Args:
    model: a model of any family (``rwkv_jax.models``).
    prompts: one prompt (a list of ids) or a batch (list of lists / (B, T) array).
    state: the state to continue from (the model's ``init_state`` pytree, batch B);
      None for an empty past.
    implementation: WKV path for the parallel pieces (None: the model's / platform's).
    tokens_per_call: at most about this many B * T tokens per parallel forward.
    min_parallel: a power of two; each prompt's last (length mod min_parallel) tokens go
      through the recurrent step instead of small parallel forwards (1: all parallel).
    mesh: run on this ``jax.sharding.Mesh`` (see ``generate``); None: one device.

  Returns: (next-token logits (B, V) float32, the state after each prompt).
  """
  seqs, _ = as_batch(prompts, model.cfg.vocab_size)
  _, _, logits, state = _prefill(model, seqs, state, implementation, tokens_per_call,
                                 min_parallel, mesh)
  return logits, state


class _Setup(NamedTuple):
  graphdef: object
  params: object
  carry: DecodeCarry
  key: jax.Array
  options: dict
  single: bool
  mesh: object


def _setup(model, prompts, *, max_new_tokens, sampling, key, state, stop_tokens, pad_id,
           implementation, tokens_per_call, min_parallel, mesh=None,
           decode_step=None) -> _Setup:
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
      or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
  sampling = SamplingConfig() if sampling is None else sampling
  if not isinstance(sampling, SamplingConfig):
    raise ValueError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
  vocab = model.cfg.vocab_size
  seqs, single = as_batch(prompts, vocab)
  step_impl = resolve_decode_step(decode_step, model, len(seqs), on_mesh=mesh is not None)
  stop_tokens = _check_tokens_arg(stop_tokens, vocab, "stop_tokens")
  graphdef, params, logits, state = _prefill(model, seqs, state, implementation,
                                             tokens_per_call, min_parallel, mesh)
  batch = len(seqs)
  counts = jnp.zeros((batch, vocab), jnp.int32) if sampling.uses_penalties else None
  carry = DecodeCarry(state, logits, jnp.zeros((batch,), bool), counts, jnp.int32(0))
  if mesh is not None:
    _, _, _, carry_sh, _ = mesh_shardings(mesh, graphdef, params, counts is not None)
    carry = jax.device_put(
        carry._replace(done=np.zeros((batch,), bool), step=np.int32(0),
                       counts=None if counts is None else np.zeros((batch, vocab), np.int32)),
        carry_sh)
  options = dict(stops=stop_array(stop_tokens), pad_id=jnp.int32(pad_id), sampling=sampling)
  if mesh is None:  # on a mesh the decode is always the model's step
    options["step_impl"] = step_impl
  return _Setup(graphdef, params, carry, as_key(key), options, single, mesh)


def to_host(x) -> np.ndarray:
  """A device array as numpy. Under several processes (``jax.distributed``) an output
  split over a mesh spans devices this process cannot read: every process then gathers
  the whole array (a collective, so all processes must call this together)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def _decode(s: _Setup, carry, max_new_tokens: int, steps: int):
  program = decode_program if s.mesh is None else functools.partial(decode_on_mesh, s.mesh)
  return program(s.graphdef, s.params, carry, s.key, jnp.int32(max_new_tokens), steps=steps,
                 **s.options)


def generate(model, prompts, *, max_new_tokens: int, sampling: SamplingConfig | None = None,
             key=None, state=None, stop_tokens: Sequence[int] = (),
             pad_id: int = -1, implementation: str | None = None,
             tokens_per_call: int = PREFILL_TOKENS_PER_CALL,
             min_parallel: int = MIN_PARALLEL, mesh=None,
             decode_step: str | None = None) -> GenerateOutput:
  """Generates ``max_new_tokens`` tokens after each prompt.

  Args:
    model: a model of any family (``rwkv_jax.models``).
    prompts: one prompt (a list of token ids) or a batch of prompts of any lengths.
    max_new_tokens: decode steps (the scan always runs them all; use ``stream`` to stop
      early once every sequence is done).
    sampling: a ``SamplingConfig`` (default: temperature 1, no filtering).
    key: a JAX PRNG key or an int seed (default 0); the same key gives the same tokens.
    state: continue from this state (the model's state pytree) instead of an empty one.
    stop_tokens: ids that end their own sequence; the stop token is emitted and consumed
      into the state, later positions hold ``pad_id``.
    pad_id: what a finished sequence emits (-1 by default, never a real id).
    implementation: WKV path for the prefill (the decode always uses the recurrent step).
    tokens_per_call, min_parallel: prefill options, see ``prefill``.
    mesh: a ``jax.sharding.Mesh`` (``rwkv_jax.sharding.make_mesh``) to run on: the
      parameters are placed as the rules table says, prompts, states and logits
      are split over its batch axes (data, fsdp), and the prefill and decode programs are
      jitted with these explicit in/out shardings. The number of prompts must divide by
      data * fsdp. None: one device (the default device's programs, unchanged). Under
      ``jax.distributed`` every process calls ``generate`` with the same prompts and
      arguments (the mesh may span processes); each gets all tokens back, while ``state``
      and ``logits`` stay global arrays split over the mesh.
    decode_step: one of ``model.decode_steps()``: "model" (the model's own one-token
      forward) or a family's fused kernels (RWKV-4: "pallas", pallas_kernels/rwkv4_decode,
      batch <= 8, one device); None: the family's default (RWKV-4: "pallas" on a GPU
      where it fits, else "model"). All compute the same function.
  """
  s = _setup(model, prompts, max_new_tokens=max_new_tokens, sampling=sampling, key=key,
             state=state, stop_tokens=stop_tokens, pad_id=pad_id,
             implementation=implementation, tokens_per_call=tokens_per_call,
             min_parallel=min_parallel, mesh=mesh, decode_step=decode_step)
  carry, tokens, active = _decode(s, s.carry, max_new_tokens, max_new_tokens)
  return GenerateOutput(to_host(tokens), to_host(active).sum(1), carry.state, carry.logits)


class TokenStream:
  """Iterating yields tokens as they are decoded, ``chunk_size`` steps per device call.

  For one prompt it yields ints and ends at the stop token or the token limit; for a batch
  it yields (B,) int arrays (``pad_id`` for finished sequences) until all are done. After
  the iteration ends, ``state``, ``logits``, ``tokens`` (one list per sequence) and
  ``finished`` are set. A stream can be iterated once.
  """

  def __init__(self, model, prompts, *, max_new_tokens: int,
               sampling: SamplingConfig | None = None, key=None,
               state=None, stop_tokens: Sequence[int] = (),
               pad_id: int = -1, chunk_size: int = 16, implementation: str | None = None,
               tokens_per_call: int = PREFILL_TOKENS_PER_CALL, min_parallel: int = MIN_PARALLEL,
               mesh=None, decode_step: str | None = None):
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
      raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    self._setup = _setup(model, prompts, max_new_tokens=max_new_tokens, sampling=sampling,
                         key=key, state=state, stop_tokens=stop_tokens, pad_id=pad_id,
                         implementation=implementation, tokens_per_call=tokens_per_call,
                         min_parallel=min_parallel, mesh=mesh, decode_step=decode_step)
    self._max_new = max_new_tokens
    self._chunk = min(chunk_size, max_new_tokens)
    self._started = False
    batch = self._setup.carry.done.shape[0]
    self.tokens: list[list[int]] = [[] for _ in range(batch)]
    self.state=None
    self.logits: jax.Array | None = None
    self.finished = False

  def _launch(self, carry):
    return _decode(self._setup, carry, self._max_new, self._chunk)

  def __iter__(self) -> Iterator:
    if self._started:
      raise RuntimeError("a TokenStream can be iterated only once")
    self._started = True
    single = self._setup.single
    pending, produced = self._launch(self._setup.carry), 0
    while True:
      carry, tokens, active = pending
      produced += self._chunk
      # Queue the next chunk before reading this one back, so the device keeps working
      # while the host yields; an extra chunk after the end changes nothing (no sequence
      # is active in it).
      pending = self._launch(carry) if produced < self._max_new else None
      tokens, active = to_host(tokens), to_host(active)
      for i in range(tokens.shape[1]):
        if not active[:, i].any():
          break
        for b in np.flatnonzero(active[:, i]):
          self.tokens[b].append(int(tokens[b, i]))
        yield int(tokens[0, i]) if single else tokens[:, i].copy()
      if pending is None or bool(np.all(to_host(carry.done))):
        break
    self.state, self.logits, self.finished = carry.state, carry.logits, True


def stream(model, prompts, *, max_new_tokens: int, **kwargs) -> TokenStream:
  """Like ``generate`` but returns a ``TokenStream`` (see there); extra kwarg chunk_size."""
  return TokenStream(model, prompts, max_new_tokens=max_new_tokens, **kwargs)
