"""The pure training and evaluation steps.

State is a ``TrainState`` pytree of arrays; the model's structure (``nnx.GraphDef``) and
the optimizer are closed over, so ``train_step(state, batch) -> (state, metrics)`` is a
pure function. It is jitted in exactly one place, ``compile_train_step``, where a mesh
can later pass explicit shardings. A batch is ``(inputs, targets, mask)``, each (B, T):
int32 inputs and targets, float32 mask (1 = a real target).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx


class TrainState(NamedTuple):
  params: Any       # nnx.State of float32 parameters (the master weights)
  opt_state: Any    # optax state (MultiSteps state when accumulating)
  step: jax.Array   # int32 scalar: train_step calls so far (micro-steps); the data position
  rng: jax.Array    # uint32 (2,) raw key, advanced every step (for stochastic layers)


def init_state(model: nnx.Module, tx, seed: int) -> tuple[nnx.GraphDef, TrainState]:
  graphdef, params = nnx.split(model, nnx.Param)
  # The model may share one buffer between parameters (e.g. the zero-initialised W_k, W_v,
  # W_r); donation needs each leaf to own its buffer.
  params = jax.tree.map(jnp.copy, params)
  rng = jax.random.key_data(jax.random.key(seed + 1))
  state = TrainState(params, tx.init(params), jnp.zeros((), jnp.int32), rng)
  return graphdef, state


def init_state_on_mesh(make_model, tx, seed: int, mesh) -> tuple[nnx.GraphDef, TrainState]:
  """``init_state(make_model(), tx, seed)`` built directly on ``mesh``: one jitted program
  whose outputs carry the rules table's shardings, so no device ever holds the whole
  model or optimizer state (a 7b run starts under fsdp without fitting on one GPU). The
  shapes and shardings come from ``eval_shape`` (no allocation); the random draws are
  the same as on one device (threefry bits do not depend on the output sharding)."""
  from rwkv_jax import sharding

  graphdef, _ = nnx.split(nnx.eval_shape(make_model), nnx.Param)
  init = lambda: init_state(make_model(), tx, seed)[1]
  abstract = jax.eval_shape(init)
  shardings = sharding.state_shardings(abstract, mesh, abstract.params)
  return graphdef, jax.jit(init, out_shardings=shardings)()


# Logit elements (tokens x vocabulary) computed at once by the chunked head: 2^25 float32
# is 128 MiB (512 tokens at a 65,536 vocabulary), whatever the batch and context.
HEAD_CHUNK_ELEMENTS = 1 << 25


class TokenLosses(NamedTuple):
  """Per position (B, T): cross entropy, logsumexp of the logits, top-1 hit (float)."""

  ce: jax.Array
  lse: jax.Array
  correct: jax.Array


def head_losses(model, x, targets, chunk_elements: int = HEAD_CHUNK_ELEMENTS) -> TokenLosses:
  """The head, softmax cross entropy and argmax over x (B, T, C) in chunks of tokens, so the
  (B, T, V) float32 logits never exist at once: each chunk's logits are made, reduced to
  (ce, lse, hit) and dropped, and rebuilt in the backward pass (``jax.checkpoint``)."""
  b, t, c = x.shape
  n = b * t
  vocab = model.cfg.vocab_size
  size = min(n, max(1, chunk_elements // vocab))
  pad = -n % size
  xs = jnp.pad(x.reshape(n, c), ((0, pad), (0, 0))).reshape(-1, size, c)
  ts = jnp.pad(targets.reshape(n), (0, pad)).reshape(-1, size)

  @jax.checkpoint
  def chunk(args):
    xc, tc = args  # size C, size
    logits = model.logits(xc[None])[0]  # size V float32
    lse = jax.nn.logsumexp(logits, axis=-1)
    target = jnp.take_along_axis(logits, tc[:, None], axis=-1)[:, 0]
    return lse - target, lse, (jnp.argmax(logits, -1) == tc).astype(jnp.float32)

  out = jax.lax.map(chunk, (xs, ts))
  return TokenLosses(*(y.reshape(-1)[:n].reshape(b, t) for y in out))


def token_losses(graphdef, params, batch, *, implementation=None, gather=None,
                 dropout_key=None) -> TokenLosses:
  """``TokenLosses`` of a batch, each (B, T) (``head_losses``: no (B, T, V) logits).

  ``gather`` (``rwkv_jax.sharding.compute_gather``) pins the parameters to the layout
  they are computed in under a mesh (FSDP shards all-gathered per use). ``dropout_key``
  turns on the model's dropout (training steps only)."""
  inputs, targets, _ = batch
  model = nnx.merge(graphdef, params if gather is None else gather(params))
  x, _ = model.hidden_with_state(inputs, None, implementation=implementation,
                                 dropout_key=dropout_key)
  return head_losses(model, x, targets)


def loss_fn(params, graphdef, batch, z_loss: float, implementation=None, gather=None,
            dropout_key=None):
  """Masked mean cross entropy, plus z_loss * mean(logsumexp(logits)^2) (PaLM's auxiliary
  loss that keeps the softmax normaliser near 1) when z_loss > 0."""
  losses = token_losses(graphdef, params, batch, implementation=implementation,
                        gather=gather, dropout_key=dropout_key)
  mask = batch[2]
  count = jnp.maximum(mask.sum(), 1.0)
  loss = (losses.ce * mask).sum() / count
  total = loss
  if z_loss > 0:
    total = total + z_loss * (jnp.square(losses.lse) * mask).sum() / count
  correct = (losses.correct * mask).sum()
  return total, (loss, correct / count)


def make_train_step(graphdef, tx, *, z_loss: float = 0.0, implementation=None, gather=None):
  """Builds the pure ``train_step(state, batch) -> (state, metrics)``."""

  def train_step(state: TrainState, batch):
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    # The checkpointed rng: one key for this step's dropout, one carried to the next step.
    rng, dropout_key = jax.random.split(jax.random.wrap_key_data(state.rng))
    (total, (loss, acc)), grads = grad_fn(state.params, graphdef, batch, z_loss,
                                          implementation, gather, dropout_key)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    rng = jax.random.key_data(rng)
    metrics = {"loss": loss, "total_loss": total, "accuracy": acc,
               "grad_norm": optax.tree.norm(grads)}
    return TrainState(params, opt_state, state.step + 1, rng), metrics

  return train_step


def make_eval_step(graphdef, *, implementation=None, gather=None):
  """``eval_step(params, batch) -> {"loss_sum", "correct", "count"}`` (sums, not means, so
  batches of any padding combine exactly)."""

  def eval_step(params, batch):
    losses = token_losses(graphdef, params, batch, implementation=implementation,
                          gather=gather)
    mask = batch[2]
    return {"loss_sum": (losses.ce * mask).sum(), "correct": (losses.correct * mask).sum(),
            "count": mask.sum()}

  return eval_step


def compile_train_step(train_step, *, state_shardings=None, batch_shardings=None):
  """The single place the train step is jitted: the state is donated; a mesh passes
  ``state_shardings`` / ``batch_shardings`` (pytrees of shardings) here."""
  if state_shardings is None and batch_shardings is None:
    return jax.jit(train_step, donate_argnums=0)
  return jax.jit(train_step, donate_argnums=0,
                 in_shardings=(state_shardings, batch_shardings),
                 out_shardings=(state_shardings, None))


def compile_eval_step(eval_step, *, param_shardings=None, batch_shardings=None):
  if param_shardings is None and batch_shardings is None:
    return jax.jit(eval_step)
  return jax.jit(eval_step, in_shardings=(param_shardings, batch_shardings))


def place_batch(batch, mesh=None):
  """The single place a host batch goes to the device(s). With a mesh, each process
  passes on only its own rows of the (every-process-identical) global batch, split over
  the mesh's batch axes by ``jax.make_array_from_process_local_data``."""
  if mesh is None:
    return tuple(jnp.asarray(x) for x in batch)
  from rwkv_jax import sharding

  size = len(batch[0])
  rows = sharding.local_batch_indices(mesh, size)
  return sharding.place_batch(tuple(x[rows] for x in batch), mesh, size)
