"""LoRA and state tuning inside ``run_training``: only a small part is trained.

``TrainConfig.tune``: "lora" trains adapters (``rwkv_jax.lora``) on the chosen matrices of
the ``--init-from`` base, "state" a learned initial state (the family's state pytree,
batch 1, broadcast over the batch). The base is frozen: it is an argument of the jitted
step that is not differentiated (never a closed-over constant), its matrices are kept in
the compute dtype (bf16 halves them; ``layers.matmul`` casts them to it anyway), and it is
never in the optimizer state or a checkpoint. The ``TrainState`` holds the trained part
only, so checkpoints, exact resume and ``--mesh`` work as for full training: on a mesh the
base is placed by the rules table and gathered per use as in full training, adapters are
sharded like their matrices (A by the input axis, B by the output axis), a tuned state
is replicated. Every checkpoint's meta records the base fingerprint; a resume with
another base is an error before anything is written.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from rwkv_jax import lora, sharding, tuning
from rwkv_jax.training.step import TrainState, head_losses


class _Bound:
  """A jitted function with trailing arguments bound (the frozen base), keeping
  ``lower`` (the trainer compiles the first step through it)."""

  def __init__(self, jitted, *extra):
    self.jitted, self.extra = jitted, extra

  def __call__(self, *args):
    return self.jitted(*args, *self.extra)

  def lower(self, *args):
    return self.jitted.lower(*args, *self.extra)


def _no_decay_rules(params):
  return (jax.tree.map(lambda x: False, params), jax.tree.map(lambda x: 1.0, params))


class Tuner:
  """What a LoRA / state-tuning run trains, and its train and eval steps."""

  def __init__(self, cfg, base_model, mesh=None):
    from rwkv_jax.inference._engine import cast_matmul_weights
    from rwkv_jax.training.optim import default_rules

    self.kind = cfg.tune
    self.model = base_model
    self.graphdef, params = nnx.split(base_model, nnx.Param)
    # A shapes-only base (``abstract_model``) builds steps that can be lowered and
    # compiled with abstract arguments (experiments/finetune_memory.py), not run.
    abstract = any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params))
    self.fingerprint = None if abstract else tuning.base_fingerprint(params)
    self.spec = None
    if self.kind == "lora":
      self.spec = lora.LoraSpec(cfg.lora_rank, cfg.lora_alpha, cfg.lora_parts)
      self.targets = lora.select_targets(base_model, self.spec.parts)  # checks the parts
      self.rules = default_rules  # weight decay on A and B (2-D), lr x 1
    elif self.kind == "state":
      self.rules = _no_decay_rules
    else:
      raise ValueError(f"no tuner for tune={self.kind!r}")
    # Frozen: matrices in the compute dtype (what layers.matmul reads anyway).
    cast = lambda p: cast_matmul_weights(p, cfg.dtype, base_model.MATMUL_PARAMS)
    base = jax.eval_shape(cast, params) if abstract else cast(params)
    self.base_shardings = None
    if mesh is not None:
      self.base_shardings = sharding.param_shardings(base, mesh)
      if not abstract:
        base = jax.device_put(base, self.base_shardings)
    elif not abstract:
      base = jax.tree.map(jnp.copy, base)  # own buffers (the model may share zeros)
    self.base = base

  # ---- the trained part
  def init_trainable(self, seed: int):
    if self.kind == "lora":
      trainable = lora.init_adapters(self.model, self.spec, seed)
    else:
      trainable = tuning.state_to_dict(self.model.tunable_state(1))
    return jax.tree.map(jnp.copy, trainable)  # own buffers: the state is donated

  def abstract_trainable(self):
    return jax.eval_shape(lambda: self.init_trainable(0))

  def state_shardings(self, train_state, mesh):
    """Shardings of a TrainState (or its shapes) of the trained part on ``mesh``."""
    axes = ({} if self.kind == "state" else
            lora.adapter_axes(train_state.params, nnx.state(self.model, nnx.Param)))
    return sharding.tree_shardings(train_state, mesh, axes)

  def expand(self, trainable, base, batch: int):
    """(parameters, initial state) of the forward: the base with LoraKernels in place of
    the adapted matrices, or the base and the tuned state repeated over the batch."""
    if self.kind == "lora":
      return lora.apply_to_params(base, trainable, self.spec.scale), None
    state = tuning.state_from_dict(self.model, trainable)
    return base, tuning.broadcast_state(self.model, state, batch)

  def count(self, trainable) -> int:
    return lora.adapter_count(trainable)

  def describe(self, trainable) -> str:
    n, total = self.count(trainable), self.model.cfg.param_count()
    if self.kind == "lora":
      what = (f"LoRA rank {self.spec.rank}, alpha {self.spec.alpha:g} on "
              f"{','.join(self.spec.parts)} ({len(self.targets)} matrices)")
    else:
      what = "the initial state (batch 1, broadcast over the batch)"
    return (f"  tuning {what}: {n:,} trainable parameters ({100 * n / total:.3g}% of the "
            f"base); base frozen, fingerprint {self.fingerprint}")

  def meta(self) -> dict:
    return {"tuning": tuning.tuning_meta(self.kind, self.fingerprint, self.spec)}

  def on_save(self, out, state, step: int) -> None:
    """After a checkpoint (process 0): a state run writes OUT/state.safetensors."""
    if self.kind == "state":
      trained = tuning.state_from_dict(self.model, jax.device_get(state.params))
      tuning.save_tuned_state(out / tuning.STATE_FILE, trained, self.model,
                              self.fingerprint, step)

  # ---- steps
  def steps(self, tx, cfg, mesh=None, implementation=None):
    """(train_step(state, batch), eval_step(trainable, batch)), jitted with the frozen
    base bound as a non-differentiated, non-donated argument."""
    graphdef, expand = self.graphdef, self.expand
    gather = None if mesh is None else sharding.compute_gather(mesh, self.base)
    z_loss = cfg.z_loss

    def losses(trainable, base, batch, dropout_key=None):
      inputs, targets, _ = batch
      if gather is not None:
        base = gather(base)
      params, state = expand(trainable, base, inputs.shape[0])
      model = nnx.merge(graphdef, params)
      x, _ = model.hidden_with_state(inputs, state, implementation=implementation,
                                     dropout_key=dropout_key)
      return head_losses(model, x, targets)

    def loss_fn(trainable, base, batch, dropout_key):
      out = losses(trainable, base, batch, dropout_key)
      mask = batch[2]
      count = jnp.maximum(mask.sum(), 1.0)
      loss = (out.ce * mask).sum() / count
      total = loss
      if z_loss > 0:
        total = total + z_loss * (jnp.square(out.lse) * mask).sum() / count
      return total, (loss, (out.correct * mask).sum() / count)

    def train_step(state: TrainState, batch, base):
      rng, dropout_key = jax.random.split(jax.random.wrap_key_data(state.rng))
      (total, (loss, acc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          state.params, base, batch, dropout_key)
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      metrics = {"loss": loss, "total_loss": total, "accuracy": acc,
                 "grad_norm": optax.tree.norm(grads)}
      return TrainState(params, opt_state, state.step + 1, jax.random.key_data(rng)), metrics

    def eval_step(trainable, batch, base):
      out = losses(trainable, base, batch)
      mask = batch[2]
      return {"loss_sum": (out.ce * mask).sum(), "correct": (out.correct * mask).sum(),
              "count": mask.sum()}

    on_mesh = lambda fn: sharding.traced_on_mesh(fn, mesh)
    if mesh is None:
      train = jax.jit(train_step, donate_argnums=0)
      evaluate = jax.jit(eval_step)
    else:
      abstract = jax.eval_shape(
          lambda p: TrainState(p, tx.init(p), jnp.zeros((), jnp.int32),
                               jax.random.key_data(jax.random.key(0))),
          self.abstract_trainable())
      state_sh = self.state_shardings(abstract, mesh)
      batch_sh = sharding.batch_sharding(mesh)
      train = jax.jit(on_mesh(train_step), donate_argnums=0,
                      in_shardings=(state_sh, batch_sh, self.base_shardings),
                      out_shardings=(state_sh, None))
      evaluate = jax.jit(on_mesh(eval_step),
                         in_shardings=(state_sh.params, batch_sh, self.base_shardings))
    return _Bound(train, self.base), _Bound(evaluate, self.base)


def run(cfg, out, ckpt, mesh, model, data, latest: int | None, wall0: float, loop) -> dict:
  """The tuned counterpart of the trainer's ``_run`` after the data and model are known:
  ``model`` is the concrete base of a new run (``--init-from``); a resume (``latest``,
  the checkpoint step) loads the base again from the run's ``init_from`` and checks its
  fingerprint. Then the trainer's own loop (``loop``) runs with this tuner's steps."""
  from rwkv_jax.checkpoint import write_run_config
  from rwkv_jax.training.optim import make_optimizer
  from rwkv_jax.training.trainer import _initial_model

  resuming = latest is not None
  base_model = _initial_model(cfg, None) if resuming else model
  tuner = Tuner(cfg, base_model, mesh)
  tx, schedule = make_optimizer(
      lr=cfg.lr, steps=cfg.steps, warmup=cfg.warmup, schedule=cfg.schedule,
      final_lr_ratio=cfg.final_lr_ratio, weight_decay=cfg.weight_decay, b1=cfg.b1, b2=cfg.b2,
      eps=cfg.eps, clip=cfg.clip, grad_accum=cfg.grad_accum, rules=tuner.rules)
  init = lambda p: TrainState(p, tx.init(p), jnp.zeros((), jnp.int32),
                              jax.random.key_data(jax.random.key(cfg.seed + 1)))
  if resuming:
    saved = (ckpt.read_meta(latest).get("tuning") or {})
    if saved.get("kind") != tuner.kind:
      raise ValueError(f"cannot resume {out}: checkpoint {latest} holds no {tuner.kind} "
                       f"tuning record")
    if saved.get("base_fingerprint") != tuner.fingerprint:
      raise ValueError(
          f"cannot resume {out}: its base model had fingerprint "
          f"{saved.get('base_fingerprint')}, but {cfg.init_from} now has "
          f"{tuner.fingerprint} (another model); nothing was changed")
    template = jax.eval_shape(init, tuner.abstract_trainable())
    template = (sharding.abstract_on_device(template) if mesh is None else
                sharding.abstract_tree(template, tuner.state_shardings(template, mesh)))
    state, _ = ckpt.restore_train_state(latest, template, data.fingerprint, out)
    start = latest
  else:
    state = init(tuner.init_trainable(cfg.seed))
    if mesh is not None:
      state = jax.device_put(state, tuner.state_shardings(state, mesh))
    start = 0
  if sharding.is_main_process():
    write_run_config(out, base_model.cfg, cfg)
  return loop(cfg, out, ckpt, tuner.graphdef, tx, schedule, state, data, base_model.cfg,
              start, resuming, wall0, mesh, tuner=tuner)


__all__ = ["Tuner", "run"]
