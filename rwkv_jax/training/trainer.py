"""The training loop: ``run_training(TrainConfig) -> summary dict``.

The step is jitted in ``step.compile_train_step`` and batches are placed in
``step.place_batch``; with ``--mesh`` (or several devices) both get the shardings of
``rwkv_jax.sharding``. In a multi-process run only process 0 prints and writes logs;
every process takes part in the orbax checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rwkv_jax import sharding
from rwkv_jax.checkpoint import is_run_dir, load_model, read_run_config, write_run_config
from rwkv_jax.data.synthetic import SyntheticTask
from rwkv_jax.models import abstract_model, build_model
from rwkv_jax.training import metrics as M
from rwkv_jax.training.checkpointing import CHECKPOINT_DIR, Checkpointer, checkpoint_steps
from rwkv_jax.training.config import TrainConfig
from rwkv_jax.training.optim import make_optimizer
from rwkv_jax.training.step import (TrainState, compile_eval_step, compile_train_step,
                                    init_state, init_state_on_mesh, make_eval_step,
                                    make_train_step, place_batch)


class TrainingDiverged(FloatingPointError):
  """The loss or gradient norm became NaN/Inf; nothing of that step was saved."""


class SyntheticData:
  """The synthetic task behind the same interface as ``TextData``."""

  vocab_size = 64

  def __init__(self, seed: int, ctx_len: int):
    self.task = SyntheticTask(seed, vocab_size=self.vocab_size)
    self.ctx_len = ctx_len
    self.fingerprint = f"synthetic-{seed}"

  def batch(self, step: int, batch_size: int):
    return self.task.batch(step, batch_size, self.ctx_len)

  def eval_batches(self, batch_size: int, max_windows: int):
    n = max(max_windows // batch_size, 1) * batch_size
    inputs, targets, mask = self.task.test_set(n, self.ctx_len)
    for i in range(0, n, batch_size):
      yield inputs[i:i + batch_size], targets[i:i + batch_size], mask[i:i + batch_size]

  def describe(self) -> str:
    return (f"synthetic task (seed {self.task.seed}): vocab 64, sequences "
            f"{self.task.min_len}..{self.task.max_len} tokens, held-out test motifs")

  def summarize(self, loss_sum: float, correct: float, count: float) -> dict[str, float]:
    return {"loss": loss_sum / count, "accuracy": correct / count}


class _StopOnSignal:
  """SIGINT / SIGTERM set a flag; the loop saves a checkpoint and stops after the current
  step. The first signal is acknowledged at once through ``say``; a second one restores
  the default handler and interrupts at once. ``first_step``: the loop is still on its
  first step (compiling it)."""

  def __init__(self, say=None):
    self.signum = None
    self.say = say or (lambda message: None)
    self.first_step = False
    self._old = {}

  def _handle(self, signum, frame):
    if self.signum is not None:
      self.__exit__()
      raise KeyboardInterrupt
    self.signum = signum
    step = "the step being compiled and run" if self.first_step else "the current step"
    self.say(f"{signal.Signals(signum).name} received: stopping after {step}, then saving "
             f"a checkpoint (again: stop without saving)")

  def __enter__(self):
    for sig in (signal.SIGINT, signal.SIGTERM):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: signals stay with the caller
        pass
    return self

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)
    self._old = {}


def _absolute(path):
  return None if path is None else str(Path(path).expanduser().absolute())


def _build_data(cfg: TrainConfig, vocab_size: int | None):
  if cfg.data is None:
    data = SyntheticData(cfg.seed, cfg.ctx_len)
    if vocab_size is not None and vocab_size < data.vocab_size:
      raise ValueError(f"the synthetic task has token ids up to 63, beyond the model's "
                       f"vocabulary size {vocab_size}")
    return data
  from rwkv_jax.data.binidx import BinidxData, find_binidx
  from rwkv_jax.data.text import TextData
  from rwkv_jax.tokenizers import load_tokenizer

  if vocab_size is not None and cfg.vocab_size is not None and vocab_size != cfg.vocab_size:
    raise ValueError(f"--vocab-size {cfg.vocab_size} differs from the model's vocabulary "
                     f"size {vocab_size}")
  vocab_size = vocab_size or cfg.vocab_size
  if find_binidx(cfg.data) is not None:  # pre-tokenized: the tokenizer only sizes the vocab
    if vocab_size is None and cfg.tokenizer is not None:
      vocab_size = load_tokenizer(cfg.tokenizer).vocab_size
    return BinidxData(cfg.data, cfg.ctx_len, val_fraction=cfg.val_fraction, seed=cfg.seed,
                      vocab_size=vocab_size)
  tok = load_tokenizer(cfg.tokenizer)
  tok_file = None if cfg.tokenizer in (None, "bytes") else cfg.tokenizer
  return TextData(cfg.data, tok, cfg.ctx_len, val_fraction=cfg.val_fraction, seed=cfg.seed,
                  vocab_size=vocab_size or tok.vocab_size, tokenizer_file=tok_file,
                  cache_dir=cfg.cache_dir, encoding=cfg.encoding,
                  jsonl_field=cfg.jsonl_field)


def _initial_model(cfg: TrainConfig, data_vocab: int | None, abstract: bool = False):
  """A fresh model (only its shapes with ``abstract``: it is then built on the mesh), or
  the --init-from weights rebuilt under this run's dtype/ctx_len."""
  if cfg.init_from is None:
    model_cfg = cfg.model_config(data_vocab)
    return abstract_model(model_cfg) if abstract else build_model(model_cfg, cfg.seed)
  if cfg.preset or cfg.n_layer or cfg.n_embd or cfg.family:
    raise ValueError("--init-from fixes the model family and shape; drop "
                     "--family/--preset/--n-layer/--n-embd")
  loaded, loaded_cfg = load_model(cfg.init_from)
  model_cfg = loaded_cfg.replace(ctx_len=cfg.ctx_len, **cfg.runtime_fields())
  model = abstract_model(model_cfg)
  nnx.update(model, nnx.state(loaded, nnx.Param))
  return model


def _compile_interruptibly(jitted, *args) -> None:
  """Compiles ``jitted`` for ``args`` (the jit's cache then holds the executable) in a
  worker thread while this thread waits. Python runs signal handlers only in the main
  thread and between bytecodes, so during a compile of many seconds in this thread a
  Ctrl-C would be acknowledged only when it ends. The trace stays in this thread (under
  its JAX contexts); only XLA's compile moves."""
  lowered = jitted.lower(*args)
  if threading.current_thread() is not threading.main_thread():
    return  # no signal handlers here: the first call compiles it
  errors, done = [], threading.Event()

  def work():
    try:
      lowered.compile()
    except BaseException as e:  # re-raised in the caller's thread
      errors.append(e)
    finally:
      done.set()

  # Not a daemon: after a second Ctrl-C (a KeyboardInterrupt out of the wait) the
  # interpreter waits for the compile at exit (XLA cannot be stopped; a thread killed
  # inside it aborts the process). An Event, not join(): before Python 3.13 a join
  # interrupted by a signal marks the running thread as stopped, and exit then kills it.
  threading.Thread(target=work, name="rwkv-jax-compile").start()
  done.wait()  # interruptible: a signal handler runs while this thread waits
  if errors:
    raise errors[0]


def _restart_clock(bar, n: int) -> None:
  """Sets the bar to ``n`` steps done, timed from now (in place of ``update`` for the
  first step): its rate and ETA leave out the compile, which otherwise gives an ETA of
  hours until the average catches up."""
  if bar.disable:
    return
  bar.initial = bar.n = bar.last_print_n = n
  bar.start_t = bar.last_print_t = time.time()  # tqdm's clock
  bar.refresh()


def _evaluate(eval_step, params, data, cfg: TrainConfig, mesh=None) -> dict[str, float]:
  sums = np.zeros(3)
  for batch in data.eval_batches(cfg.batch_size, cfg.eval_size):
    out = jax.device_get(eval_step(params, place_batch(batch, mesh)))
    sums += [float(out["loss_sum"]), float(out["correct"]), float(out["count"])]
  return {k: float(v) for k, v in data.summarize(*sums).items()}  # not np.float64


def _mesh(cfg: TrainConfig):
  """None for the plain single-device path (one device, no --mesh), else the mesh."""
  if cfg.mesh is None and jax.device_count() == 1:
    return None
  mesh = sharding.make_mesh(cfg.mesh)
  shards = sharding.batch_shards(mesh)
  if cfg.batch_size % shards:
    raise ValueError(f"--batch-size {cfg.batch_size} is not divisible by the {shards} batch "
                     f"shards of the mesh {sharding.mesh_description(mesh)}")
  return mesh


# What a run writes in OUT before its first step; a failed start removes those it created.
_SETUP_FILES = ("config.json", "metrics.jsonl")
_SETUP_DIRS = (CHECKPOINT_DIR, "tensorboard")


def _prepare_out(cfg: TrainConfig) -> tuple[Path, list[Path]]:
  """Creates OUT; returns it and what of the run's files and folders did not exist
  before (deepest first), for ``_remove_failed_start``."""
  out = Path(cfg.out or time.strftime("runs/train-%Y%m%d-%H%M%S"))
  new = [p for p in (out / n for n in _SETUP_FILES + _SETUP_DIRS) if not p.exists()]
  new += [p for p in (out, *out.parents) if not p.exists()]
  out.mkdir(parents=True, exist_ok=True)
  return out, new


def _remove_failed_start(out: Path, new: list[Path]) -> None:
  """After a run failed before its first step (missing data, a bad mesh, an error or a
  second Ctrl-C while compiling): removes what it created, so no empty run folder is
  left behind. Anything that existed before, any checkpoint and any metrics line stay
  (then nothing is removed); folders are only removed when empty."""
  metrics = out / "metrics.jsonl"
  try:
    if checkpoint_steps(out) or (metrics.is_file() and metrics.stat().st_size):
      return
  except Exception:  # cannot tell: leave everything as it is
    return
  for path in new:
    try:
      if path.name == "tensorboard" and path.parent == out:
        import shutil

        shutil.rmtree(path)  # only this run's (empty) event file
      elif path.is_dir():
        path.rmdir()  # only if empty: a folder with anything in it stays
      elif path.exists():
        path.unlink()
    except OSError:
      pass


def _saved_model_family(cfg: TrainConfig) -> str | None:
  """The model family of the run that ``cfg`` resumes (OUT/config.json), else None."""
  if not (cfg.resume and cfg.out is not None and is_run_dir(cfg.out)
          and checkpoint_steps(cfg.out)):
    return None
  return read_run_config(cfg.out)[0].family


def _model_differences(cfg: TrainConfig, model_cfg, saved: TrainConfig | None) -> list[str]:
  """The model flags of a resume that contradict the run's saved model."""
  diffs = [f"{name}: saved {getattr(model_cfg, name)!r}, now {getattr(cfg, name)!r}"
           for name in ("family", "n_layer", "n_embd")
           if getattr(cfg, name) is not None and getattr(cfg, name) != getattr(model_cfg, name)]
  if cfg.preset is not None and saved is not None and cfg.preset != saved.preset:
    diffs.append(f"preset: saved {saved.preset!r}, now {cfg.preset!r}")
  return diffs


def run_training(cfg: TrainConfig) -> dict[str, Any]:
  """Trains per ``cfg`` and returns a summary dict (also written to OUT/summary.json).

  Raises ValueError / FileNotFoundError for bad input, CheckpointError for a checkpoint
  that cannot be restored, TrainingDiverged when the loss turns NaN/Inf.
  """
  sharding.maybe_initialize_distributed()  # before anything touches a device
  cfg = dataclasses.replace(cfg, data=_absolute(cfg.data), init_from=_absolute(cfg.init_from),
                            tokenizer=cfg.tokenizer if cfg.tokenizer in (None, "bytes")
                            else _absolute(cfg.tokenizer))
  # A resumed model keeps its family, whatever --family/--preset say (checked in _run).
  cfg.validate(family=_saved_model_family(cfg))
  out, new = _prepare_out(cfg)
  cfg.out = str(out)
  finished = False
  try:
    ckpt = Checkpointer(out, cfg.max_to_keep)
    try:
      summary = _run(cfg, out, ckpt)
      finished = True
      return summary
    finally:
      ckpt.close()
  finally:
    if not finished:  # removes nothing once a step is logged or saved
      _remove_failed_start(out, new)


def _run(cfg: TrainConfig, out: Path, ckpt: Checkpointer) -> dict[str, Any]:
  wall0 = time.perf_counter()
  latest = ckpt.latest_step()
  if latest is not None and not cfg.resume:
    raise FileExistsError(f"{out} already holds checkpoints (latest step {latest}): pass "
                          f"--resume to continue, or choose another --out")
  resuming = latest is not None
  mesh = _mesh(cfg)
  if resuming:
    model_cfg, saved = read_run_config(out)
    diffs = ([] if saved is None else cfg.incompatibilities(saved)) + \
        _model_differences(cfg, model_cfg, saved)
    if diffs:
      raise ValueError(f"cannot resume {out}: the config differs from the saved run in "
                       + "; ".join(diffs))
    if cfg.steps < latest:
      raise ValueError(f"cannot resume {out} to --steps {cfg.steps}: it is already at "
                       f"step {latest}")
    if saved is not None and saved.steps != cfg.steps and cfg.schedule != "constant":
      print(f"note: --steps changed from {saved.steps} to {cfg.steps}; the {cfg.schedule} "
            f"schedule is stretched from here on, so the run is not the same as either")
    model_cfg = model_cfg.replace(**cfg.runtime_fields())
    data = _build_data(cfg, model_cfg.vocab_size)
    model = abstract_model(model_cfg)
  elif cfg.init_from is not None:
    model = _initial_model(cfg, None)
    data = _build_data(cfg, model.cfg.vocab_size)
  else:
    data = _build_data(cfg, None)
    model = _initial_model(cfg, data.vocab_size, abstract=mesh is not None)
  model_cfg = model.cfg
  if cfg.tune != "full":  # LoRA / state tuning: only a small part is trained
    from rwkv_jax.training import tuning

    return tuning.run(cfg, out, ckpt, mesh, model, data, latest if resuming else None,
                      wall0, _loop)
  tx, schedule = make_optimizer(
      lr=cfg.lr, steps=cfg.steps, warmup=cfg.warmup, schedule=cfg.schedule,
      final_lr_ratio=cfg.final_lr_ratio, weight_decay=cfg.weight_decay, b1=cfg.b1, b2=cfg.b2,
      eps=cfg.eps, clip=cfg.clip, grad_accum=cfg.grad_accum, rules=model.optimizer_rules)
  if resuming:
    graphdef, abstract = nnx.split(model, nnx.Param)
    template = jax.eval_shape(lambda p: init_state_from_params(p, tx), abstract)
    # Restore straight onto this run's devices, whatever mesh the checkpoint was saved on.
    template = (sharding.abstract_on_device(template) if mesh is None else
                sharding.abstract_tree(
                    template, sharding.state_shardings(template, mesh, template.params)))
    state, _ = ckpt.restore_train_state(latest, template, data.fingerprint, out)
    start = latest
  elif mesh is not None and cfg.init_from is None:
    # Fresh run on a mesh: parameters and optimizer state are created already sharded.
    graphdef, state = init_state_on_mesh(lambda: build_model(model_cfg, cfg.seed),
                                         tx, cfg.seed, mesh)
    start = 0
  else:
    graphdef, state = init_state(model, tx, cfg.seed)
    if mesh is not None:  # --init-from weights, loaded on the host: move them onto the mesh
      state = jax.device_put(state if jax.process_count() == 1 else jax.device_get(state),
                             sharding.state_shardings(state, mesh, state.params))
    start = 0
  if sharding.is_main_process():
    write_run_config(out, model_cfg, cfg)
  del model
  return _loop(cfg, out, ckpt, graphdef, tx, schedule, state, data, model_cfg, start,
               resuming, wall0, mesh)


def init_state_from_params(params, tx) -> TrainState:
  rng = jax.random.key_data(jax.random.key(0))
  return TrainState(params, tx.init(params), jnp.zeros((), jnp.int32), rng)


class _NoLog:
  """The metrics log of processes other than 0."""

  def write(self, record):
    pass

  def close(self):
    pass


def _loop(cfg, out, ckpt, graphdef, tx, schedule, state, data, model_cfg, start, resuming,
          wall0, mesh=None, tuner=None) -> dict[str, Any]:
  tqdm = M.progress_bar_class()
  main = sharding.is_main_process()
  state_sh = batch_sh = gather = None
  if mesh is not None and tuner is None:
    state_sh = sharding.state_shardings(state, mesh, state.params)
    batch_sh = sharding.batch_sharding(mesh)
    gather = sharding.compute_gather(mesh, state.params)
  n_devices = 1 if mesh is None else mesh.size
  on_mesh = lambda fn: sharding.traced_on_mesh(fn, mesh)  # the Pallas WKV runs per shard
  if tuner is not None:  # the steps of a LoRA / state-tuning run (training/tuning.py)
    train_step, eval_step = tuner.steps(tx, cfg, mesh)
  else:
    train_step = compile_train_step(
        on_mesh(make_train_step(graphdef, tx, z_loss=cfg.z_loss, gather=gather)),
        state_shardings=state_sh, batch_shardings=batch_sh)
    eval_step = compile_eval_step(
        on_mesh(make_eval_step(graphdef, gather=gather)),
        param_shardings=None if state_sh is None else state_sh.params,
        batch_shardings=batch_sh)
  log = (M.MetricsLog(out, resume_step=start if resuming else None,
                      tensorboard=cfg.tensorboard) if main else _NoLog())
  tokens_per_step = cfg.batch_size * cfg.ctx_len * cfg.grad_accum
  flops_per_token = M.train_flops_per_token(model_cfg)
  peak = M.peak_flops(jax.devices()[0].device_kind, model_cfg.dtype, cfg.peak_tflops)
  if main:
    print(f"rwkv-jax train: {model_cfg.describe()}, "
          f"{model_cfg.param_count():,} parameters, {model_cfg.dtype}; {data.describe()}")
    print(f"  out: {out}  ({'resuming from step ' + str(start) if resuming else 'new run'})"
          + ("" if mesh is None else f"; mesh {sharding.mesh_description(mesh)}"))
    if tuner is not None:
      print(tuner.describe(state.params))

  def save(step, loss):
    ckpt.save(step, state, {"step": step, "data_position": step * cfg.grad_accum,
                            "data_fingerprint": data.fingerprint, "loss": loss,
                            **({} if tuner is None else tuner.meta())})
    if tuner is not None and main:
      tuner.on_save(out, state, step)

  rates, eval_metrics, saved_step = [], None, (start if resuming else None)
  last = {"loss": float("nan"), "accuracy": float("nan")}
  interrupted = None
  bar = tqdm(total=cfg.steps, initial=start, disable=not (cfg.progress and main), unit="step",
             dynamic_ncols=True)
  say = bar.write if main else (lambda message: None)
  deadline = None if cfg.max_minutes is None else wall0 + 60 * cfg.max_minutes
  bar.set_postfix_str("compiling the train step…")  # the first step; then loss and acc
  with _StopOnSignal(say) as stop:
    stop.first_step = True
    for step in range(start + 1, cfg.steps + 1):
      t0 = time.perf_counter()
      micro = []
      for i in range(cfg.grad_accum):
        position = (step - 1) * cfg.grad_accum + i
        batch = place_batch(data.batch(position, cfg.batch_size), mesh)
        if stop.first_step and i == 0:
          _compile_interruptibly(train_step, state, batch)
        state, m = train_step(state, batch)
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        micro.append(m)
        if not (math.isfinite(m["total_loss"]) and math.isfinite(m["grad_norm"])):
          log.write({"step": step, "loss": m["loss"], "grad_norm": m["grad_norm"]})
          log.close()
          bar.close()
          kept = (f"the last good checkpoint, step {saved_step}, is intact in {ckpt.directory}"
                  if saved_step is not None else "no checkpoint had been saved")
          raise TrainingDiverged(
              f"training stopped: loss {m['loss']} / grad norm {m['grad_norm']} at step "
              f"{step} (micro-batch {i}); nothing of this step was saved; {kept}")
      dt = time.perf_counter() - t0
      first = step == start + 1
      rate = tokens_per_step / dt
      if not first:
        rates.append(rate)
      last = {k: sum(x[k] for x in micro) / len(micro) for k in micro[0]}
      record = {"step": step, "loss": last["loss"], "accuracy": last["accuracy"],
                "lr": float(schedule(step - 1)), "grad_norm": last["grad_norm"],
                "tokens_per_s": rate,
                "mfu": None if peak is None else rate * flops_per_token / (peak * n_devices),
                "step_time_s": dt}
      if cfg.z_loss > 0:
        record["total_loss"] = last["total_loss"]
      if first:
        record["includes_compile"] = True
      log.write(record)
      bar.set_postfix(loss=f"{last['loss']:.3f}", acc=f"{last['accuracy']:.3f}",
                      refresh=False)
      if first:
        _restart_clock(bar, step)
        stop.first_step = False
      else:
        bar.update(1)
      if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
        eval_metrics = _evaluate(eval_step, state.params, data, cfg, mesh)
        log.write({"step": step, **{f"eval_{k}": v for k, v in eval_metrics.items()}})
        say(f"step {step}: eval " + ", ".join(f"{k} {v:.4f}"
                                                    for k, v in eval_metrics.items()))
      out_of_time = (deadline is not None and step < cfg.steps
                     and time.perf_counter() >= deadline)
      if ((cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps or stop.signum
          or out_of_time):
        save(step, last["loss"])
        saved_step = step
      if stop.signum or out_of_time:
        interrupted = signal.Signals(stop.signum).name if stop.signum else "max_minutes"
        say(f"{interrupted}: saved step {step} to {ckpt.directory}; continue with "
                  f"--resume --out {out}")
        break
  bar.close()
  final = None
  if interrupted is None:
    final = _evaluate(eval_step, state.params, data, cfg, mesh)
    log.write({"step": cfg.steps, **{f"eval_{k}": v for k, v in final.items()}})
  log.close()
  if main:
    M.plot_loss_curve(out, title=f"rwkv-jax {model_cfg.family} "
                                 f"{model_cfg.n_layer}x{model_cfg.n_embd}")
  tps = statistics.median(rates) if rates else None
  summary = {
      "out": str(out), "steps": saved_step, "interrupted": interrupted,
      "family": model_cfg.family, "params": model_cfg.param_count(), "train_loss": last["loss"],
      "train_accuracy": last["accuracy"], "final_eval": final,
      "tokens_per_s": tps, "peak_flops": peak, "flops_per_token": flops_per_token,
      "mfu": (None if (peak is None or tps is None)
              else tps * flops_per_token / (peak * n_devices)),
      "device": jax.devices()[0].device_kind, "wall_s": time.perf_counter() - wall0,
      "devices": n_devices, "mesh": None if mesh is None else sharding.mesh_description(mesh),
  }
  if main:
    tmp = out / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    os.replace(tmp, out / "summary.json")
  return summary
