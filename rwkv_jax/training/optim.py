"""Optimiser: AdamW (decay on matrices only), warmup + cosine / exponential schedule,
global-norm clipping and ``optax.MultiSteps`` gradient accumulation."""

from __future__ import annotations

import math

import jax
import optax

from rwkv_jax.training.config import SCHEDULES



def lr_schedule(lr: float, steps: int, warmup: int, schedule: str,
                final_lr_ratio: float) -> optax.Schedule:
  """Linear warmup 0 -> lr over ``warmup`` optimizer steps, then over the remaining steps:
  ``cosine`` down to lr * final_lr_ratio, ``exponential`` (the paper's RWKV-LM schedule,
  lr * ratio**progress) or ``constant``."""
  if schedule not in SCHEDULES:
    raise ValueError(f"unknown schedule {schedule!r}; choose from {SCHEDULES}")
  decay_steps = max(steps - warmup, 1)
  final = lr * final_lr_ratio
  if schedule == "cosine":
    main = optax.cosine_decay_schedule(lr, decay_steps, alpha=final_lr_ratio)
  elif schedule == "exponential":
    main = optax.exponential_decay(lr, decay_steps, final_lr_ratio, end_value=final)
  else:
    main = optax.constant_schedule(lr)
  if warmup <= 0:
    return main
  warm = optax.linear_schedule(0.0, lr, warmup)
  return optax.join_schedules([warm, main], [warmup])


def decay_mask(params):
  """True for 2-D matrices (projections, embedding, head); False for LayerNorm weights and
  biases and the time-mix / time-decay / time-first vectors, which weight decay would pull
  towards values the model was not initialised around. (RWKV-4's rule; a family states its
  own in ``optimizer_rules``.)"""
  return jax.tree.map(lambda x: x.ndim == 2, params)


def default_rules(params):
  """(decay mask, lr multipliers): ``decay_mask`` and 1 everywhere."""
  return decay_mask(params), jax.tree.map(lambda x: 1.0, params)


def scale_by_multipliers(rules) -> optax.GradientTransformation:
  """Multiplies each update by its parameter's lr multiplier (``rules(params)[1]``), a
  static per-parameter constant (e.g. RWKV-7's w0 at 2x lr)."""
  def update(updates, state, params=None):
    multipliers = rules(updates)[1]
    return jax.tree.map(lambda u, m: u if m == 1.0 else u * m, updates, multipliers), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(*, lr: float, steps: int, warmup: int = 0, schedule: str = "cosine",
                   final_lr_ratio: float = 0.1, weight_decay: float = 0.0,
                   b1: float = 0.9, b2: float = 0.99, eps: float = 1e-8, clip: float = 1.0,
                   grad_accum: int = 1, rules=default_rules):
  """Returns (optax transformation, schedule). With grad_accum = k every k-th update
  applies the mean of k micro-batch gradients; the schedule counts optimizer steps.
  ``rules(params) -> (decay mask, lr multipliers)`` is the model family's
  ``optimizer_rules``: weight decay only where the mask is True, each update scaled by its
  multiplier."""
  sched = lr_schedule(lr, steps, warmup, schedule, final_lr_ratio)
  parts = []
  if clip and clip > 0 and math.isfinite(clip):
    parts.append(optax.clip_by_global_norm(clip))
  parts.append(optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                           mask=lambda params: rules(params)[0]))
  if rules is not default_rules:
    parts.append(scale_by_multipliers(rules))
  tx = optax.chain(*parts)
  if grad_accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=grad_accum)
  return tx, sched
