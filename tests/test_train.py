"""Training: loss falls, exact resume after SIGKILL, held-out eval, checkpoints, bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rwkv_jax.checkpoint import load_model
from rwkv_jax.training.checkpointing import CheckpointError, Checkpointer
from rwkv_jax.training.config import TrainConfig
from rwkv_jax.training.optim import make_optimizer
from rwkv_jax.training.trainer import SyntheticData, TrainingDiverged, run_training

ROOT = Path(__file__).resolve().parents[1]
# A 1-layer, 16-wide model on 32-token windows; the lax.scan WKV compiles fastest on CPU.
TINY = dict(batch_size=4, ctx_len=32, n_layer=1, n_embd=16, warmup=2, eval_size=8,
            wkv_impl="scan", progress=False)
TINY_ARGS = ["--batch-size", "4", "--ctx-len", "32", "--n-layer", "1", "--n-embd", "16",
             "--warmup", "2", "--eval-size", "8", "--wkv-impl", "scan", "--no-progress"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """One short synthetic run shared by the tests that need a finished run."""
  out = tmp_path_factory.mktemp("run") / "out"
  cfg = TrainConfig(out=str(out), steps=40, lr=1e-2, eval_every=20, save_every=20,
                    **dict(TINY, batch_size=8, ctx_len=64, n_embd=32, eval_size=32))
  return out, run_training(cfg)


def test_loss_falls_on_the_synthetic_task(trained):
  out, summary = trained
  lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in lines if "loss" in r]
  evals = [r for r in lines if "eval_loss" in r]
  assert [r["step"] for r in train] == list(range(1, 41))
  for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "accuracy"):
    assert key in train[-1]
  first = np.mean([r["loss"] for r in train[:5]])
  last = np.mean([r["loss"] for r in train[-5:]])
  assert first > 3.9 and last < first - 0.8, (first, last)  # ln 64 = 4.16 at the start
  assert [r["step"] for r in evals] == [20, 40]
  assert summary["final_eval"]["loss"] < 3.3
  assert summary["final_eval"]["accuracy"] > 0.15  # chance is 1/64
  assert (out / "loss_curve.png").stat().st_size > 1000
  assert sorted(Checkpointer(out).all_steps()) == [20, 40]
  config = json.loads((out / "config.json").read_text())
  assert config["model"]["n_embd"] == 32 and config["train"]["steps"] == 40


def test_eval_is_held_out_and_independent_of_training(trained):
  out, summary = trained
  data = SyntheticData(seed=0, ctx_len=64)
  batches = list(data.eval_batches(8, 32))
  inputs = np.concatenate([b[0] for b in batches])
  np.testing.assert_array_equal(inputs, data.task.test_set(32, 64)[0])
  assert all(data.task.in_test_split(*k) for k in data.task.motifs(None, 32))
  # The run's final eval is reproduced from the saved weights alone.
  model, cfg = load_model(out)
  logits = np.asarray(model(jnp.asarray(inputs), implementation="scan"), np.float64)
  targets = np.concatenate([b[1] for b in batches])
  mask = np.concatenate([b[2] for b in batches])
  logp = logits - jax.scipy.special.logsumexp(logits, -1, keepdims=True)
  nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  assert (nll * mask).sum() / mask.sum() == pytest.approx(summary["final_eval"]["loss"],
                                                          rel=1e-4)


def _train_cmd(out, *extra):
  return [sys.executable, "-m", "rwkv_jax.cli", "train", "--out", str(out), "--steps", "40",
          "--save-every", "2", "--eval-every", "0", *TINY_ARGS, *extra]


def _env():
  return dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")


def test_sigkill_then_resume_is_bitwise_equal(tmp_path):
  full, killed = tmp_path / "full", tmp_path / "killed"
  ref = subprocess.Popen(_train_cmd(full), env=_env(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
  victim = subprocess.Popen(_train_cmd(killed), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  while not (killed / "checkpoints" / "6").is_dir():
    assert victim.poll() is None and time.time() < deadline, "no checkpoint appeared"
    time.sleep(0.01)
  victim.send_signal(signal.SIGKILL)
  victim.wait()
  done = max(Checkpointer(killed).all_steps())
  assert 6 <= done < 40, done  # killed mid-run
  resumed = subprocess.run(_train_cmd(killed, "--resume"), env=_env(), capture_output=True,
                           text=True, timeout=240)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert f"resuming from step {done}" in resumed.stdout
  assert ref.wait(timeout=240) == 0, ref.stderr.read().decode()[-2000:]

  a, _ = load_model(full)
  b, _ = load_model(killed)
  from flax import nnx

  leaves_a = jax.tree.leaves(nnx.state(a))
  leaves_b = jax.tree.leaves(nnx.state(b))
  assert len(leaves_a) == len(leaves_b) > 0
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # bitwise
  # Optimizer state, step and rng too: every saved array has the same CRC32.
  meta_a = json.loads((full / "checkpoints/40/meta/metadata").read_text())
  meta_b = json.loads((killed / "checkpoints/40/meta/metadata").read_text())
  assert meta_a["checksums"] == meta_b["checksums"]
  steps = [json.loads(l)["step"] for l in (killed / "metrics.jsonl").read_text().splitlines()
           if "loss" in json.loads(l)]
  assert steps == list(range(1, 41))  # lines after the checkpoint were redone, not doubled


def _copy_run(trained, tmp_path):
  out = tmp_path / "copy"
  shutil.copytree(trained[0], out)
  return out


def _resume_cfg(out, **changes):
  base = dict(out=str(out), steps=40, lr=1e-2, eval_every=20, save_every=20, resume=True,
              **dict(TINY, batch_size=8, ctx_len=64, n_embd=32, eval_size=32))
  return TrainConfig(**{**base, **changes})


def _data_files(step_dir):
  return sorted(p for p in (step_dir / "params").rglob("*")
                if p.is_file() and p.parent.name == "d")


# orbax leaves the failed read's coroutine unawaited; pytest reports it as unraisable.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_checkpoint_is_a_clear_error(trained, tmp_path, damage):
  out = _copy_run(trained, tmp_path)
  victim = max(_data_files(out / "checkpoints" / "40"), key=lambda p: p.stat().st_size)
  raw = bytearray(victim.read_bytes())
  if damage == "truncate":
    raw = raw[:len(raw) // 2]
  else:
    raw[len(raw) // 2] ^= 0x10
  victim.write_bytes(bytes(raw))
  before = sorted(str(p) for p in out.rglob("*"))
  with pytest.raises(CheckpointError, match="checkpoints/40.*(corrupt|truncated)"):
    run_training(_resume_cfg(out, steps=60))
  assert sorted(str(p) for p in out.rglob("*")) == before  # nothing deleted
  with pytest.raises(CheckpointError):
    load_model(out)
  load_model(out, step=20)  # the earlier checkpoint still loads
  import gc

  gc.collect()  # collect the failed read here, under this test's warning filter


def test_incompatible_resume_and_overwrite_are_errors(trained, tmp_path):
  out = _copy_run(trained, tmp_path)
  with pytest.raises(ValueError, match=r"lr: saved 0.01, now 0.02"):
    run_training(_resume_cfg(out, lr=2e-2))
  with pytest.raises(ValueError, match="batch_size"):
    run_training(_resume_cfg(out, batch_size=4))
  with pytest.raises(ValueError, match="already at step 40"):
    run_training(_resume_cfg(out, steps=30, warmup=2))
  with pytest.raises(FileExistsError, match="--resume"):
    run_training(_resume_cfg(out, resume=False))
  assert Checkpointer(out).all_steps() == [20, 40]


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
  # lr 1e30: step 1 is finite, its update makes every weight ~1e30, step 2 overflows.
  cfg = TrainConfig(out=str(tmp_path / "nan"), steps=10, save_every=1, eval_every=0,
                    lr=1e30, schedule="constant", **dict(TINY, warmup=0))
  with pytest.raises(TrainingDiverged, match="at step 2 .*last good checkpoint, step 1"):
    run_training(cfg)
  assert Checkpointer(tmp_path / "nan").all_steps() == [1]
  model, _ = load_model(tmp_path / "nan")
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(nnx_state(model)))


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path):
  import threading

  out = tmp_path / "term"

  def send_when_saved():
    deadline = time.time() + 120
    while not (out / "checkpoints" / "2").is_dir() and time.time() < deadline:
      time.sleep(0.01)
    if (out / "checkpoints" / "2").is_dir():  # never signal outside the training loop
      os.kill(os.getpid(), signal.SIGTERM)

  sender = threading.Thread(target=send_when_saved, daemon=True)
  sender.start()
  summary = run_training(TrainConfig(out=str(out), steps=400, save_every=2, eval_every=0,
                                     **TINY))
  sender.join()
  assert summary["interrupted"] == "SIGTERM"
  stopped = summary["steps"]
  assert 2 <= stopped < 400
  assert Checkpointer(out).latest_step() == stopped  # the step it stopped at is saved
  assert summary["final_eval"] is None


def test_max_minutes_saves_a_checkpoint_and_stops(tmp_path, capsys):
  from rwkv_jax.cli import main

  out = tmp_path / "budget"
  # The first step (with its compile) already outlasts a budget of 1 ms.
  rc = main(["train", "--out", str(out), "--steps", "400", "--save-every", "0",
             "--eval-every", "0", "--max-minutes", "0.00002", *TINY_ARGS])
  assert rc == 0
  assert Checkpointer(out).latest_step() == 1  # saved, though save_every is 0
  assert "max_minutes: saved step 1" in capsys.readouterr().out


def nnx_state(model):
  from flax import nnx

  return nnx.state(model)


def test_text_run_then_fine_tune_with_init_from(tmp_path):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  (corpus / "a.txt").write_text("the cat sat on the mat. " * 80)
  (corpus / "b.txt").write_text("a dog ran in the fog. " * 80)
  base = dict(TINY, n_layer=None, n_embd=None, eval_size=8)
  first = run_training(TrainConfig(out=str(tmp_path / "text"), steps=30, lr=1e-2,
                                   data=str(corpus), eval_every=0, save_every=0, **base,
                                   preset="tiny"))
  ev = first["final_eval"]
  assert set(ev) == {"loss", "accuracy", "bits_per_token", "bits_per_byte"}
  assert ev["bits_per_byte"] == pytest.approx(ev["loss"] / np.log(2) * 3681 / 3680,
                                              rel=1e-6)  # 2 documents, 1 EOT token
  assert ev["loss"] < np.log(256) - 1.5
  assert sorted(p.name for p in corpus.iterdir()) == ["a.txt", "b.txt"]  # no cache beside
  caches = Path(os.environ["RWKV_JAX_CACHE"]).glob("tokens/corpus-*.json")  # conftest's
  assert [json.loads(p.read_text())["source"] for p in caches].count(str(corpus)) == 1
  tuned = run_training(TrainConfig(out=str(tmp_path / "ft"), steps=2, lr=1e-9,
                                   data=str(corpus), init_from=str(tmp_path / "text"),
                                   eval_every=0, save_every=0, **dict(base, warmup=0)))
  assert tuned["params"] == first["params"]
  lines = [json.loads(l) for l in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
  assert lines[0]["loss"] < np.log(256) - 1.5  # starts from the trained weights


def test_init_from_checks_the_data_vocabulary(trained, tmp_path):
  text = tmp_path / "t.txt"
  text.write_text("hello world, " * 40)
  cfg = TrainConfig(out=str(tmp_path / "ft"), steps=2, data=str(text),
                    init_from=str(trained[0]), **dict(TINY, n_layer=None, n_embd=None))
  with pytest.raises(ValueError, match="token id 119 >= the model's vocabulary size 64"):
    run_training(cfg)


@pytest.mark.parametrize("field,value,match", [
    ("lr", -1.0, "lr"), ("lr", float("nan"), "lr"), ("steps", 0, "steps"),
    ("batch_size", 0, "batch_size"), ("warmup", 500, "warmup"), ("clip", -1.0, "clip"),
    ("grad_accum", 0, "grad_accum"), ("schedule", "linear", "schedule"),
    ("preset", "9b", "preset"), ("b2", 1.0, "b2"), ("z_loss", -1e-4, "z_loss"),
    ("weight_decay", -0.1, "weight_decay"), ("dtype", "int8", "dtype"),
    ("max_minutes", 0.0, "max_minutes"),
])
def test_invalid_hyper_parameters(field, value, match):
  with pytest.raises(ValueError, match=f"invalid {match}="):
    TrainConfig(**{field: value}).validate()


def test_bad_data_paths_through_the_cli(tmp_path, capsys):
  from rwkv_jax.cli import main

  empty = tmp_path / "empty.txt"
  empty.write_text("")
  short = tmp_path / "short.txt"
  short.write_text("tiny")
  cases = [(tmp_path / "missing.txt", "not found"), (empty, "empty"), (short, "too short")]
  for i, (path, message) in enumerate(cases):
    rc = main(["train", "--out", str(tmp_path / f"o{i}"), "--data", str(path), *TINY_ARGS])
    assert rc == 1
    assert message in capsys.readouterr().err
  assert main(["train", "--resume", "--steps", "1"]) == 1
  assert "needs --out" in capsys.readouterr().err


def test_optimizer_decay_mask_and_accumulation():
  params = {"w": jnp.ones((2, 3)), "b": jnp.ones((3,))}
  tx, sched = make_optimizer(lr=0.1, steps=10, weight_decay=0.5, schedule="constant",
                             clip=0.0)
  zero = jax.tree.map(jnp.zeros_like, params)
  upd, _ = tx.update(zero, tx.init(params), params)
  np.testing.assert_allclose(upd["w"], -0.1 * 0.5 * np.ones((2, 3)), rtol=1e-6)
  np.testing.assert_array_equal(upd["b"], 0.0)  # vectors are not decayed
  acc, _ = make_optimizer(lr=0.1, steps=10, schedule="constant", clip=0.0, grad_accum=2)
  state = acc.init(params)
  g1 = jax.tree.map(lambda x: jnp.full_like(x, 1.0), params)
  g2 = jax.tree.map(lambda x: jnp.full_like(x, 3.0), params)
  u1, state = acc.update(g1, state, params)
  assert all((np.asarray(x) == 0).all() for x in jax.tree.leaves(u1))  # accumulating
  u2, state = acc.update(g2, state, params)
  plain, _ = make_optimizer(lr=0.1, steps=10, schedule="constant", clip=0.0)
  mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
  ref, _ = plain.update(mean, plain.init(params), params)
  for x, y in zip(jax.tree.leaves(u2), jax.tree.leaves(ref)):
    np.testing.assert_allclose(x, y, rtol=1e-6)
  warm, _ = make_optimizer(lr=1.0, steps=100, warmup=10, schedule="cosine",
                           final_lr_ratio=0.1)
  _, s = make_optimizer(lr=1.0, steps=100, warmup=10, schedule="cosine", final_lr_ratio=0.1)
  assert float(s(0)) == 0.0 and float(s(10)) == pytest.approx(1.0)
  assert float(s(100)) == pytest.approx(0.1)
  _, e = make_optimizer(lr=1.0, steps=100, warmup=0, schedule="exponential",
                        final_lr_ratio=0.01)
  assert float(e(50)) == pytest.approx(0.1, rel=1e-5)


def test_z_loss_adds_the_logsumexp_penalty():
  from flax import nnx

  from rwkv_jax import RWKV, RWKVConfig
  from rwkv_jax.training.step import loss_fn

  model = RWKV(RWKVConfig.preset("tiny", n_layer=1, wkv_impl="scan"), rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  tokens = jnp.arange(16, dtype=jnp.int32).reshape(2, 8)
  batch = (tokens, (tokens + 1) % 64, jnp.ones((2, 8)))
  total0, (ce0, _) = loss_fn(params, graphdef, batch, 0.0)
  total1, (ce1, _) = loss_fn(params, graphdef, batch, 1e-2)
  lse = jax.nn.logsumexp(model(tokens), -1)
  assert float(total0) == pytest.approx(float(ce0)) and float(ce1) == pytest.approx(float(ce0))
  assert float(total1) == pytest.approx(float(ce0) + 1e-2 * float(jnp.mean(lse ** 2)),
                                        rel=1e-5)


def test_train_help_documents_the_flags():
  out = subprocess.run([sys.executable, "-m", "rwkv_jax.cli", "train", "--help"],
                       env=_env(), capture_output=True, text=True, timeout=60).stdout
  for flag in ("--out", "--steps", "--batch-size", "--ctx-len", "--preset", "--n-layer",
               "--n-embd", "--lr", "--data", "--tokenizer", "--resume", "--eval-every",
               "--save-every", "--seed", "--dtype", "--init-from", "--warmup", "--schedule",
               "--grad-accum", "--clip", "--weight-decay", "--z-loss", "--wkv-impl"):
    assert flag in out


def test_dropout_in_the_train_step_is_keyed_by_the_checkpointed_rng():
  import numpy as np
  from flax import nnx
  from rwkv_jax import RWKV, RWKVConfig
  from rwkv_jax.training.optim import make_optimizer
  from rwkv_jax.training.step import init_state, make_train_step

  tx, _ = make_optimizer(lr=1e-3, steps=10, warmup=0, weight_decay=0.0, clip=1.0)
  toks = np.random.default_rng(0).integers(0, 64, (2, 9)).astype(np.int32)
  batch = (toks[:, :-1], toks[:, 1:], np.ones((2, 8), np.float32))
  losses = {}
  for rate in (0.0, 0.3):
    graphdef, state = init_state(RWKV(RWKVConfig.preset("tiny", dropout=rate),
                                      rngs=nnx.Rngs(0)), tx, seed=0)
    step = make_train_step(graphdef, tx)
    (s1, m1), (_, m1_again) = step(state, batch), step(state, batch)
    assert float(m1["loss"]) == float(m1_again["loss"])  # same rng -> same mask
    _, m2 = step(s1, batch)
    losses[rate] = (float(m1["loss"]), float(m2["loss"]))
  assert losses[0.3][0] != losses[0.0][0]
