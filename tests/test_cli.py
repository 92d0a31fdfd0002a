"""The command line as a new user meets it: resume as printed, failed starts, the progress
bar while compiling, Ctrl-C, generate on the quick-start run, help and file modes."""

import io
import json
import os
import re
import shutil
import signal
import threading
import time

import pytest

from rwkv_jax.cli import main
from rwkv_jax.training.checkpointing import Checkpointer
from rwkv_jax.training.config import TrainConfig
from rwkv_jax.training.trainer import run_training

TINY_ARGS = ["--batch-size", "4", "--ctx-len", "32", "--n-layer", "1", "--n-embd", "16",
             "--warmup", "2", "--eval-size", "8", "--wkv-impl", "scan", "--no-progress"]
TINY = dict(batch_size=4, ctx_len=32, n_layer=1, n_embd=16, warmup=2, eval_size=8,
            wkv_impl="scan", progress=False)
BUDGET = ["--max-minutes", "0.00002"]  # the first step (with its compile) outlasts it


def _train(*argv):
  return main(["train", *map(str, argv)])


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
  """A synthetic run of 3 steps with non-default flags, stopped after step 1 (its budget
  ran out, as after a Ctrl-C: a checkpoint and the 'continue with' hint)."""
  out = tmp_path_factory.mktemp("stopped") / "run"
  import contextlib

  text = io.StringIO()
  with contextlib.redirect_stdout(text):
    rc = _train("--out", out, "--steps", 3, "--save-every", 0, "--eval-every", 0,
                "--lr", 5e-3, "--seed", 3, *TINY_ARGS, *BUDGET)
  assert rc == 0 and Checkpointer(out).all_steps() == [1]
  hint = re.search(r"continue with (--resume --out \S+)", text.getvalue())
  return out, hint.group(1).split()


def _copy(stopped, tmp_path):
  out = tmp_path / "run"
  shutil.copytree(stopped[0], out)
  return out


def _train_config(out):
  return json.loads((out / "config.json").read_text())["train"]


def test_resume_as_printed_takes_the_flags_not_given_from_the_run(stopped, tmp_path, capsys):
  out = _copy(stopped, tmp_path)
  before = _train_config(out)
  hint = [str(out) if a == str(stopped[0]) else a for a in stopped[1]]
  assert hint == ["--resume", "--out", str(out)]
  assert _train(*hint, "--no-progress") == 0  # no other flag: all come from config.json
  assert "resuming from step 1" in capsys.readouterr().out
  assert Checkpointer(out).latest_step() == 3  # the saved --steps 3
  after = _train_config(out)
  for name in ("lr", "seed", "batch_size", "ctx_len", "n_layer", "n_embd", "wkv_impl",
               "warmup", "eval_every", "save_every", "data", "tokenizer"):
    assert after[name] == before[name], name
  assert after["max_minutes"] is None  # the budget was the first invocation's
  # A trajectory flag given must match; a model flag too; others override.
  assert _train("--resume", "--out", out, "--steps", 4, "--lr", 0.1) == 1
  assert "lr: saved 0.005, now 0.1" in capsys.readouterr().err
  assert _train("--resume", "--out", out, "--steps", 4, "--n-layer", 2) == 1
  assert "n_layer: saved 1, now 2" in capsys.readouterr().err
  assert _train("--resume", "--out", out, "--steps", 4, "--lr", 5e-3, "--no-progress") == 0
  assert Checkpointer(out).latest_step() == 4


def test_for_resume_keeps_given_fields_and_the_model_family():
  saved = TrainConfig(steps=10, lr=1e-2, n_layer=3, data="/d", mesh="data=2", progress=False,
                      max_minutes=5.0, out="/old").validate()
  cfg = TrainConfig.for_resume(saved, {"out": "/new", "resume": True, "steps": 20,
                                       "lr": 2e-2, "mesh": "fsdp=2"}, model_family="rwkv7")
  assert (cfg.out, cfg.resume, cfg.steps, cfg.lr, cfg.mesh) == ("/new", True, 20, 2e-2,
                                                                  "fsdp=2")
  assert (cfg.n_layer, cfg.data, cfg.warmup, cfg.family) == (3, "/d", 1, "rwkv7")
  assert cfg.progress and cfg.max_minutes is None  # this invocation's, not the run's
  assert cfg.incompatibilities(saved) == ["lr: saved 0.01, now 0.02"]
  with pytest.raises(ValueError, match="unknown TrainConfig fields"):
    TrainConfig.for_resume(saved, {"nope": 1})
  # A resumed model's family decides which WKV paths are valid.
  with pytest.raises(ValueError, match="wkv_impl"):
    TrainConfig(wkv_impl="chunked").validate()
  TrainConfig(wkv_impl="chunked").validate(family="rwkv7")


def test_a_resumed_run_keeps_its_model_family(tmp_path, capsys):
  """An RWKV-7 run started without --family (from --init-from weights: its config.json
  names no family) resumed with --wkv-impl chunked, an RWKV-7-only path: validated against
  the saved model's family (the trajectory check after it then fails on purpose, before
  any restore or compile)."""
  import jax.numpy as jnp

  from rwkv_jax import models
  from rwkv_jax.checkpoint import write_run_config
  from rwkv_jax.training.step import TrainState

  out = tmp_path / "r7"
  ckpt = Checkpointer(out)
  ckpt.save(1, TrainState({"w": jnp.zeros(1)}, {"mu": jnp.zeros(1)}, jnp.int32(1),
                          jnp.zeros(2, jnp.uint32)), {})
  ckpt.close()
  saved = TrainConfig(out=str(out), steps=5, lr=1e-2, init_from="/weights/r7.pth", **TINY)
  write_run_config(out, models.preset("rwkv7-tiny", n_layer=1, vocab_size=64), saved)
  with pytest.raises(ValueError, match="lr: saved 0.01, now 0.02"):
    run_training(TrainConfig(out=str(out), resume=True, steps=5, lr=2e-2,
                             **dict(TINY, n_layer=None, n_embd=None, wkv_impl="chunked")))
  assert _train("--resume", "--out", out, "--wkv-impl", "chunked", "--lr", 0.02) == 1
  assert "lr: saved 0.01, now 0.02" in capsys.readouterr().err
  assert _train("--resume", "--out", out, "--family", "rwkv4", "--wkv-impl", "scan") == 1
  assert "family: saved 'rwkv7', now 'rwkv4'" in capsys.readouterr().err


def test_resume_of_a_folder_without_checkpoints_is_an_error(tmp_path, capsys):
  typo = tmp_path / "rnu"
  assert _train("--resume", "--out", typo, "--steps", 2, *TINY_ARGS) == 1
  err = capsys.readouterr().err
  assert f"cannot --resume {typo}: it does not exist" in err
  assert not typo.exists()
  empty = tmp_path / "empty"
  empty.mkdir()
  assert _train("--resume", "--out", empty, "--steps", 2, *TINY_ARGS) == 1
  assert f"cannot --resume {empty}: it holds no checkpoints" in capsys.readouterr().err
  assert list(empty.iterdir()) == []


def test_failed_starts_leave_no_run_folder(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "empty.txt").write_text("")
  cases = [(["--data", "missing.txt"], "not found"), (["--data", "empty.txt"], "empty"),
           (["--mesh", "foo=2"], "unknown axis")]
  for flags, message in cases:  # the default --out, runs/train-<time>
    assert _train("--steps", 2, *flags, *TINY_ARGS) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists(), flags
  # A folder that existed is kept as it was; so is an earlier run beside.
  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "notes.txt").write_text("keep")
  (tmp_path / "runs" / "old").mkdir(parents=True)
  for out in (mine, tmp_path / "runs" / "new"):
    assert _train("--out", out, "--steps", 2, "--data", "missing.txt", *TINY_ARGS) == 1
  assert [p.name for p in mine.iterdir()] == ["notes.txt"]
  assert [p.name for p in (tmp_path / "runs").iterdir()] == ["old"]


def test_the_progress_bar_says_compiling_before_the_first_step(tmp_path, capsys):
  run_training(TrainConfig(out=str(tmp_path / "bar"), steps=2, eval_every=0, save_every=0,
                           **dict(TINY, progress=True)))
  frames = re.split(r"[\r\n]", capsys.readouterr().err)
  compiling = [i for i, f in enumerate(frames) if "compiling the train step" in f]
  done = [i for i, f in enumerate(frames) if "2/2" in f]
  assert compiling and done and compiling[0] < done[0]
  assert all("0/2" in frames[i] for i in compiling)
  assert "compiling" not in frames[done[-1]] and "loss=" in frames[done[-1]]


def test_ctrl_c_while_compiling_is_acknowledged_at_once(tmp_path, monkeypatch, capsys):
  from rwkv_jax.training import trainer

  events = []
  _slow_compile(monkeypatch, events)
  real_handle = trainer._StopOnSignal._handle

  def handle(self, signum, frame):
    events.append("signal handled")
    return real_handle(self, signum, frame)

  monkeypatch.setattr(trainer._StopOnSignal, "_handle", handle)

  def interrupt_while_compiling():
    deadline = time.time() + 120
    while "compile starts" not in events and time.time() < deadline:
      time.sleep(0.01)
    if "compile starts" in events:  # never signal outside the training loop
      time.sleep(0.2)
      os.kill(os.getpid(), signal.SIGINT)

  sender = threading.Thread(target=interrupt_while_compiling, daemon=True)
  sender.start()
  summary = run_training(TrainConfig(out=str(tmp_path / "c"), steps=50, eval_every=0,
                                     save_every=0, **TINY))
  sender.join()
  assert events[:3] == ["compile starts", "signal handled", "compile ends"]
  out = capsys.readouterr().out
  assert ("SIGINT received: stopping after the step being compiled and run, then saving"
          in out)
  assert summary["interrupted"] == "SIGINT" and summary["steps"] == 1
  assert Checkpointer(tmp_path / "c").all_steps() == [1]  # then saved, as before


def _slow_compile(monkeypatch, events, seconds=3.0):
  import jax.stages

  real_compile = jax.stages.Lowered.compile

  def slow_compile(self, *args, **kwargs):  # a compile of several seconds
    events.append("compile starts")
    time.sleep(seconds)
    events.append("compile ends")
    return real_compile(self, *args, **kwargs)

  monkeypatch.setattr(jax.stages.Lowered, "compile", slow_compile)


def test_a_second_ctrl_c_while_compiling_stops_without_saving(tmp_path, monkeypatch, capsys):
  events = []
  _slow_compile(monkeypatch, events)

  def interrupt_twice():
    deadline = time.time() + 120
    while "compile starts" not in events and time.time() < deadline:
      time.sleep(0.01)
    if "compile starts" in events:
      for _ in range(2):
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGINT)

  sender = threading.Thread(target=interrupt_twice, daemon=True)
  sender.start()
  out = tmp_path / "twice"
  assert _train("--out", out, "--steps", 5, *TINY_ARGS) == 130  # at once, no traceback
  sender.join()
  assert "compile ends" not in events
  assert "interrupted; nothing saved" in capsys.readouterr().err
  assert not out.exists()  # a failed start: nothing left behind
  # The compile goes on in its (non-daemon) thread, which exit waits for: a thread killed
  # inside XLA aborts the process.
  workers = [t for t in threading.enumerate() if t.name == "rwkv-jax-compile"]
  assert workers and all(t.is_alive() and not t.daemon for t in workers)
  for t in workers:
    t.join()


def test_generate_on_the_synthetic_task_reads_and_writes_token_ids(stopped, capsys):
  out, _ = stopped
  capsys.readouterr()
  assert main(["generate", "--checkpoint", str(out), "--prompt", "0 1 2 3",
               "--max-new-tokens", "4", "--temperature", "0"]) == 0
  assert re.fullmatch(r"0 1 2 3( \d+){4}\n", capsys.readouterr().out)
  assert main(["generate", "--checkpoint", str(out), "--prompt", "0 1 x"]) == 1
  assert "'x' is not a token id" in capsys.readouterr().err


def test_generate_validates_before_printing_the_prompt(stopped, capsys):
  capsys.readouterr()
  for flag in ("--max-new-tokens", "--chunk-size"):
    assert main(["generate", "--checkpoint", str(stopped[0]), "--prompt", "0 1",
                 flag, "0"]) == 1
    got = capsys.readouterr()
    assert got.out == "" and "must be a positive integer" in got.err


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_generate_and_chat_help_show_the_defaults(command, capsys):
  with pytest.raises(SystemExit) as e:
    main([command, "--help"])
  assert e.value.code == 0
  text = " ".join(capsys.readouterr().out.split())
  for default in ("(200)", "(1.0)", "(0.85)", "(16)"):
    assert default in text, default


def _tiny_model(vocab_size=64):
  from flax import nnx

  from rwkv_jax import RWKV, RWKVConfig

  cfg = RWKVConfig.preset("tiny", n_layer=1, n_embd=16, vocab_size=vocab_size)
  return RWKV(cfg, rngs=nnx.Rngs(0))


def test_ctrl_c_in_chat_exits_cleanly(tmp_path, monkeypatch, capsys):
  import jax.numpy as jnp
  from flax import nnx

  from rwkv_jax.checkpoint import write_run_config
  from rwkv_jax.training.step import TrainState

  model, path = _tiny_model(256), tmp_path / "run"  # a run folder of a byte-level model
  ckpt = Checkpointer(path)
  ckpt.save(1, TrainState(nnx.state(model, nnx.Param), {"mu": jnp.zeros(1)}, jnp.int32(1),
                          jnp.zeros(2, jnp.uint32)), {})
  ckpt.close()
  write_run_config(path, model.cfg, None)

  class CtrlC(io.StringIO):
    def readline(self, *args):
      raise KeyboardInterrupt

  monkeypatch.setattr("sys.stdin", CtrlC())
  assert main(["chat", "--checkpoint", str(path)]) == 130
  got = capsys.readouterr()
  assert got.out == "\n" and got.err == ""


@pytest.mark.parametrize("target", ["hf", "m.safetensors",
                                    pytest.param("m.pth", marks=pytest.mark.torch)])
def test_saved_model_files_follow_the_umask(target, tmp_path):
  from rwkv_jax import save_pretrained

  old = os.umask(0o022)
  try:
    save_pretrained(_tiny_model(), tmp_path / target)
  finally:
    os.umask(old)
  files = [tmp_path / target] if target != "hf" else [tmp_path / "hf" / "model.safetensors",
                                                      tmp_path / "hf" / "config.json"]
  for f in files:
    assert oct(f.stat().st_mode & 0o777) == oct(0o644), f
