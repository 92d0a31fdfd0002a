"""Helpers shared by the experiment scripts: one training loop for any token-in/logits-out
NNX model (RWKV and the baselines), recurrent-decode timing, and small I/O utilities."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

REPO = Path(__file__).resolve().parents[1]
RUN_DATE = "2026-11-23"


def machine() -> str:
  """One line naming where the numbers came from."""
  dev = jax.devices()[0]
  kind = getattr(dev, "device_kind", dev.platform)
  return (f"{dev.platform}:{kind} x{jax.device_count()}, {os.cpu_count()} CPU cores, "
          f"jax {jax.__version__}, python {platform.python_version()}")


def write_json(path: str | os.PathLike, data) -> None:
  """Writes JSON atomically (temp file + rename), so a kill never leaves half a file."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(data, indent=1, default=float))
  os.replace(tmp, path)


def print_table(header: list[str], rows: list[list], file=sys.stdout) -> str:
  """Prints (and returns) a Markdown table."""
  fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
  text = "\n".join(lines)
  print(text + "\n", file=file)
  return text


# ---------------------------------------------------------------- training


def train_lm(model, batch_fn: Callable[[int], tuple], steps: int, *, lr: float = 1e-3,
             b1: float = 0.9, b2: float = 0.95, weight_decay: float = 0.01, clip: float = 1.0,
             eval_set: tuple | None = None, eval_every: int = 0, eval_batch: int = 64,
             log: Callable[[str], None] = print):
  """The one training loop of a comparison, built from the trainer's own pieces
  (``rwkv_jax.training.optim.make_optimizer``, ``step.make_train_step`` /
  ``make_eval_step``): AdamW (decay on matrices), cosine decay from lr to 0, global-norm
  clipping, masked next-token cross-entropy. Any NNX model whose ``__call__(tokens, *,
  implementation=None)`` returns logits works, so RWKV and the baselines share it.

  batch_fn(step) -> (inputs, targets, mask) NumPy (B, T); eval_set = (inputs, targets,
  mask[, more]) NumPy (N, T). Returns (history, trained params: an nnx.State to
  ``nnx.update`` the model with, evaluate(params, mask=None) -> {"loss", "acc"} on
  eval_set, optionally under another mask).
  """
  from rwkv_jax.training import optim, step as S

  tx, _ = optim.make_optimizer(lr=lr, steps=steps, warmup=0, schedule="cosine",
                               final_lr_ratio=0.0, weight_decay=weight_decay, b1=b1, b2=b2,
                               clip=clip)
  graphdef, state = S.init_state(model, tx, seed=0)
  train_step = S.compile_train_step(S.make_train_step(graphdef, tx))
  eval_step = S.compile_eval_step(S.make_eval_step(graphdef))

  def evaluate(params, mask=None):
    inputs, targets, full_mask = eval_set[:3]
    mask = full_mask if mask is None else mask
    tot = np.zeros(3)
    for i in range(0, len(inputs), eval_batch):
      sl = slice(i, i + eval_batch)
      out = jax.device_get(eval_step(params, S.place_batch((inputs[sl], targets[sl],
                                                            mask[sl]))))
      tot += [float(out["loss_sum"]), float(out["correct"]), float(out["count"])]
    return {"loss": tot[0] / tot[2], "acc": tot[1] / tot[2]}

  hist = {"train_loss": [], "train_acc": [], "eval": [], "first_step_s": None}
  t0 = time.perf_counter()
  for i in range(steps):
    state, m = train_step(state, S.place_batch(batch_fn(i)))
    m = jax.device_get(m)
    hist["train_loss"].append(float(m["loss"]))
    hist["train_acc"].append(float(m["accuracy"]))
    if i == 0:
      hist["first_step_s"] = time.perf_counter() - t0
    if not np.isfinite(hist["train_loss"][-1]):
      raise FloatingPointError(f"loss became {hist['train_loss'][-1]} at step {i + 1}")
    if eval_set is not None and ((eval_every and (i + 1) % eval_every == 0) or i == steps - 1):
      metrics = evaluate(state.params)
      hist["eval"].append({"step": i + 1, **metrics})
      log(f"  step {i + 1:5d}  train {hist['train_loss'][-1]:.4f}  test {metrics['loss']:.4f}"
          f"  acc {metrics['acc']:.3f}")
  hist["wall_s"] = time.perf_counter() - t0
  return hist, state.params, evaluate


def _batch_range(batch_fn, start: int, stop: int, args) -> list:
  return [batch_fn(i, *args) for i in range(start, stop)]


def precompute_batches(batch_fn: Callable, steps: int, *args, workers: int | None = None):
  """[batch_fn(i, *args) for i in range(steps)], built in parallel processes.

  For host-side generators that are deterministic in the step (the synthetic task), so
  several models can train on the same batches without paying for generation in the
  loop. ``spawn`` processes: forking a process that holds JAX's threads is unsafe.
  """
  import concurrent.futures as cf
  import multiprocessing as mp

  workers = min(workers or os.cpu_count() or 1, 16, max(1, steps // 8))
  if workers <= 1:
    return _batch_range(batch_fn, 0, steps, args)
  bounds = np.linspace(0, steps, workers * 4 + 1).astype(int)
  with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
    parts = pool.map(_batch_range, [batch_fn] * (len(bounds) - 1), bounds[:-1], bounds[1:],
                     [args] * (len(bounds) - 1))
    return [b for part in parts for b in part]


# ---------------------------------------------------------------- decode timing


def make_decode_loop(model, n_steps: int):
  """A jitted greedy loop of ``n_steps`` single-token steps, all on device (lax.scan).

  Returns f(params, state, token (B,)) -> (last token, state); each step feeds back its
  argmax, so steps cannot overlap. ``model.forward_with_state(tokens (B,1), state)`` is
  the one interface the RWKV and baseline models share.
  """
  graphdef, _ = nnx.split(model)

  @jax.jit
  def run(params, state, token):
    m = nnx.merge(graphdef, params)

    def step(carry, _):
      tok, st = carry
      logits, st = m.forward_with_state(tok[:, None], st)
      return (jnp.argmax(logits[:, -1], -1).astype(jnp.int32), st), None

    (tok, state), _ = jax.lax.scan(step, (token, state), None, length=n_steps)
    return tok, state

  return run


def time_decode(model, state, n_steps: int, repeats: int, seed: int = 0) -> dict:
  """Median seconds per token of ``n_steps`` greedy steps from ``state`` (batch from state).

  Also returns the compiled loop's memory analysis (argument/temp/output bytes).
  """
  run = make_decode_loop(model, n_steps)
  params = nnx.state(model)
  batch = jax.tree.leaves(state)[0].shape[1]
  vocab = model.cfg.vocab_size
  token = jnp.asarray(np.random.default_rng(seed).integers(0, vocab, batch), jnp.int32)
  compiled = run.lower(params, state, token).compile()
  jax.block_until_ready(compiled(params, state, token))  # warm-up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(params, state, token))
    times.append(time.perf_counter() - t0)
  mem = compiled.memory_analysis()
  mem_d = {k: int(getattr(mem, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                              "temp_size_in_bytes", "alias_size_in_bytes")
           } if mem is not None else {}
  return {"s_per_token": float(np.median(times)) / n_steps, "n_steps": n_steps,
          "repeats": repeats, "compiled_memory": mem_d}


def time_train_steps(step_fn, state, batches, warmup: int, steps: int):
  """Compile, warm up, then time ``steps`` calls of ``state, metrics = step_fn(state, b)``,
  alternating the given batches (never one input timed twice in a row).

  Returns (state, compile seconds, per-step seconds, last loss).
  """
  t0 = time.perf_counter()
  state, m = step_fn(state, batches[0])
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  for i in range(warmup):
    state, m = step_fn(state, batches[(i + 1) % len(batches)])
  jax.block_until_ready((state, m))
  times = []
  for i in range(steps):
    t0 = time.perf_counter()
    state, m = step_fn(state, batches[i % len(batches)])
    jax.block_until_ready((state.params, m))
    times.append(time.perf_counter() - t0)
  return state, compile_s, times, float(m["loss"])


def device_bytes_in_use() -> int | None:
  """Bytes in use on the first device (None where the backend keeps no stats, e.g. CPU)."""
  stats = jax.devices()[0].memory_stats()
  return None if not stats else int(stats.get("bytes_in_use", 0))
