"""LoRA, state tuning and int8 weight-only inference (rwkv_jax.lora, rwkv_jax.tuning,
rwkv_jax.training.tuning, rwkv_jax.quantize) on tiny models, both families.

Tolerances: merged == adapted within 1e-5 (float32, relative, norm-wise); int8 logits
within 3% (relative, norm-wise) of float32 and of bf16 on a random model whose matrices
have unit-scale entries (measured ~1.4%; bf16 alone is ~0.5% from float32)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import rel_err
from rwkv_jax import lora, models, quantize, tuning
from rwkv_jax.training.config import TrainConfig
from rwkv_jax.training.trainer import run_training

ROOT = Path(__file__).resolve().parents[1]
# 1 layer x 16 on 32-token windows, the scan WKV: the fastest compiles on CPU.
TINY = dict(batch_size=4, ctx_len=32, warmup=1, eval_size=8, wkv_impl="scan", progress=False,
            eval_every=0)


def _family_cfg(family: str, **kw):
  try:
    if family == "rwkv7":
      return models.preset("rwkv7-tiny").replace(n_layer=2, n_embd=64, vocab_size=64,
                                                 wkv_impl="scan", **kw)
    return models.preset("tiny").replace(n_layer=2, n_embd=32, vocab_size=64,
                                         wkv_impl="scan", **kw)
  except ImportError as e:  # RWKV-7's package may be mid-edit in a shared tree
    pytest.skip(f"{family} not importable: {e}")


def _random_model(cfg, seed=0):
  """A model whose matrices all have unit-scale random entries (the init zeroes some)."""
  model = models.build_model(cfg, seed=seed)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  key = jax.random.key(seed + 100)
  leaves, treedef = jax.tree.flatten(params)
  leaves = [x + jax.random.normal(jax.random.fold_in(key, i), x.shape) / np.sqrt(x.shape[0])
            if x.ndim == 2 else x for i, x in enumerate(leaves)]
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves), rest)


def _tokens(rng, vocab, shape=(2, 24)):
  return jnp.asarray(rng.integers(0, vocab, shape), jnp.int32)


def _random_adapters(model, spec, seed=1):
  adapters = lora.init_adapters(model, spec, seed)
  leaves, treedef = jax.tree.flatten(adapters)
  key = jax.random.key(seed)
  return jax.tree.unflatten(treedef, [0.3 * jax.random.normal(jax.random.fold_in(key, i),
                                                              x.shape)
                                      for i, x in enumerate(leaves)])


# ----------------------------------------------------------------------------- LoRA math

@pytest.mark.parametrize("family", ["rwkv4", "rwkv7"])
def test_merged_model_equals_adapted_model(family, rng):
  cfg = _family_cfg(family)
  model = _random_model(cfg)
  spec = lora.LoraSpec(rank=4, alpha=8.0, parts=("att", "ffn", "head"))
  adapters = _random_adapters(model, spec)
  tokens = _tokens(rng, cfg.vocab_size)
  adapted = lora.apply_lora(model, adapters, spec)(tokens)
  merged = lora.merge_lora(model, adapters, spec)(tokens)
  assert rel_err(merged, adapted) < 1e-5
  assert rel_err(adapted, model(tokens)) > 1e-2  # the adapters do something
  # Untrained adapters (B = 0) are the base exactly.
  fresh = lora.apply_lora(model, lora.init_adapters(model, spec, 0), spec)(tokens)
  np.testing.assert_array_equal(np.asarray(fresh), np.asarray(model(tokens)))


@pytest.mark.parametrize("family", ["rwkv4", "rwkv7"])
def test_lora_and_int8_under_scanned_rematerialised_layers(family, rng):
  """Adapters and int8 matrices stack like arrays: --scan-layers --remat full gives the
  loop's logits and adapter gradients."""
  cfg = _family_cfg(family).replace(n_layer=3)
  model = _random_model(cfg)
  scanned = models.abstract_model(cfg.replace(scan_layers=True, remat="full"))
  nnx.update(scanned, nnx.state(model, nnx.Param))
  spec = lora.LoraSpec(rank=2, alpha=4.0, parts=("att", "ffn"))
  adapters = _random_adapters(model, spec)
  tokens = _tokens(rng, cfg.vocab_size, (1, 12))

  def loss(adapters, m):
    return jax.nn.log_softmax(lora.apply_lora(m, adapters, spec)(tokens)).mean()

  assert rel_err(lora.apply_lora(scanned, adapters, spec)(tokens),
                 lora.apply_lora(model, adapters, spec)(tokens)) < 1e-5
  want, got = jax.grad(loss)(adapters, model), jax.grad(loss)(adapters, scanned)
  for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    assert rel_err(y, x) < 1e-4
  assert rel_err(quantize.quantize_model(scanned)(tokens),
                 quantize.quantize_model(model)(tokens)) < 1e-5


@pytest.mark.parametrize("family", ["rwkv4", "rwkv7"])
def test_parts_select_the_dense_matrices_of_att_and_ffn(family):
  cfg = _family_cfg(family)
  model = models.abstract_model(cfg)
  targets = lora.select_targets(model, ("att", "ffn"))
  assert targets and all(k[-1] == "kernel" and k[0] == "blocks" for k in targets)
  assert {k[2] for k in targets} == {"att", "ffn"}
  per_block = {"rwkv4": 7, "rwkv7": 6}[family]  # R K V O + K' (R') V'
  assert len(targets) == per_block * cfg.n_layer
  assert list(lora.select_targets(model, ("head",))) == [("head",)]


def test_bad_lora_inputs_are_clear_errors():
  model = models.abstract_model(_family_cfg("rwkv4"))
  for rank in (0, -2, 1.5, True):
    with pytest.raises(ValueError, match="rank must be a positive integer"):
      lora.LoraSpec(rank=rank)
  with pytest.raises(ValueError, match="alpha must be a positive"):
    lora.LoraSpec(rank=4, alpha=0)
  with pytest.raises(ValueError, match="unknown LoRA part.*'emb'.*gather"):
    lora.select_targets(model, ("emb",))
  with pytest.raises(ValueError, match=r"unknown LoRA part\(s\) \['attn'\]"):
    lora.init_adapters(model, lora.LoraSpec(rank=2, parts=("attn",)))
  for kw, message in [(dict(lora_rank=0), "lora_rank"),
                      (dict(lora_rank=4, lora_parts="att,emb"), "lora_parts"),
                      (dict(lora_rank=4, lora_alpha=-1.0), "lora_alpha"),
                      (dict(tune="state", lora_rank=4), "applies to LoRA only"),
                      (dict(tune="bitfit"), "tune")]:
    with pytest.raises(ValueError, match=message):
      TrainConfig(init_from="base", **kw).validate()
  with pytest.raises(ValueError, match="needs --init-from"):
    TrainConfig(lora_rank=4).validate()
  with pytest.raises(ValueError, match="needs --init-from"):
    TrainConfig(tune="state").validate()


# ----------------------------------------------------------------------------- train steps

def _tuner(family, tune, **kw):
  from rwkv_jax.training.tuning import Tuner

  cfg = _family_cfg(family)
  model = _random_model(cfg)
  train = TrainConfig(init_from="x", tune=tune, **kw).validate(family=family)
  return model, Tuner(train, model), train


def _one_step(tuner, train, rng, vocab):
  from rwkv_jax.training.optim import make_optimizer
  from rwkv_jax.training.step import TrainState

  tx, _ = make_optimizer(lr=1e-2, steps=10, warmup=0, weight_decay=0.1, rules=tuner.rules)
  trainable = tuner.init_trainable(0)
  state = TrainState(trainable, tx.init(trainable), jnp.zeros((), jnp.int32),
                     jax.random.key_data(jax.random.key(1)))
  before = jax.tree.map(np.array, state)
  base_before = jax.tree.map(np.array, tuner.base)
  step, _ = tuner.steps(tx, train)
  tokens = np.asarray(_tokens(rng, vocab, (2, 17)))
  batch = (tokens[:, :-1], tokens[:, 1:], np.ones((2, 16), np.float32))
  new, metrics = step(state, tuple(jnp.asarray(b) for b in batch))
  return before, jax.tree.map(np.array, new), base_before, metrics


@pytest.mark.parametrize("family", ["rwkv4", "rwkv7"])
def test_lora_step_changes_only_the_adapters(family, rng):
  model, tuner, train = _tuner(family, "lora", lora_rank=2, lora_parts="att,ffn")
  before, after, base_before, metrics = _one_step(tuner, train, rng, model.cfg.vocab_size)
  assert np.isfinite(float(metrics["loss"]))
  # The trained tree is the adapters and nothing else; the optimizer state mirrors it.
  assert set(lora.adapter_paths(after.params)) == set(tuner.targets)
  n_adapter = lora.adapter_count(after.params)
  n_opt = sum(x.size for x in jax.tree.leaves(after.opt_state) if x.ndim >= 1)
  assert n_opt == 2 * n_adapter  # Adam's mu and nu of the adapters only
  changed = [not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(before.params), jax.tree.leaves(after.params))]
  assert any(changed)
  # Every B moved off zero (A's gradient is zero while B is zero).
  for path, ab in lora._flat(after.params).items():
    assert np.abs(ab["b"]).max() > 0, path
  # The base is an argument, not a parameter: bitwise unchanged, and still the model's.
  for a, b in zip(jax.tree.leaves(base_before), jax.tree.leaves(tuner.base)):
    np.testing.assert_array_equal(a, np.asarray(b))
  for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(tuner.base)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("family", ["rwkv4", "rwkv7"])
def test_state_tuning_step_changes_only_the_state(family, rng):
  model, tuner, train = _tuner(family, "state")
  before, after, base_before, metrics = _one_step(tuner, train, rng, model.cfg.vocab_size)
  want = tuning.state_to_dict(model.init_state(1))
  assert sorted(after.params) == sorted(want)
  for name, x in after.params.items():
    assert x.shape == want[name].shape
  n_opt = sum(x.size for x in jax.tree.leaves(after.opt_state) if x.ndim >= 1)
  assert n_opt == 2 * sum(x.size for x in jax.tree.leaves(want))
  assert any(not np.array_equal(before.params[k], after.params[k]) for k in want)
  for a, b in zip(jax.tree.leaves(base_before), jax.tree.leaves(tuner.base)):
    np.testing.assert_array_equal(a, np.asarray(b))


def test_rwkv4_tunable_state_is_the_empty_state_in_function(rng):
  cfg = _family_cfg("rwkv4")
  model = _random_model(cfg)
  tokens = _tokens(rng, cfg.vocab_size, (1, 12))
  a, sa = model.forward_with_state(tokens, model.init_state(1))
  b, sb = model.forward_with_state(tokens, model.tunable_state(1))
  assert rel_err(b, a) < 1e-6
  assert rel_err(sb.att_x, sa.att_x) < 1e-6


# ----------------------------------------------------------------------------- runs

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A base run, a second (other) base, a LoRA run on the first, a state run on it."""
  root = tmp_path_factory.mktemp("tuning")
  base = dict(TINY, n_layer=1, n_embd=16)
  run_training(TrainConfig(out=str(root / "base"), steps=2, **base))
  run_training(TrainConfig(out=str(root / "other"), steps=2, seed=7, **base))
  lora_run = run_training(TrainConfig(out=str(root / "lora"), steps=4, save_every=2, lr=1e-2,
                                      init_from=str(root / "base"), lora_rank=2,
                                      lora_alpha=4.0, lora_parts="att,ffn,head", **TINY))
  state_run = run_training(TrainConfig(out=str(root / "state"), steps=3, lr=1e-2,
                                       init_from=str(root / "base"), tune="state", **TINY))
  return root, lora_run, state_run


def _files(folder: Path) -> dict:
  return {str(p.relative_to(folder)): p.stat().st_mtime_ns
          for p in sorted(folder.rglob("*")) if p.is_file()}


def test_bad_tuning_flags_make_no_run_folder(runs, tmp_path, capsys):
  from rwkv_jax.cli import main

  root, _, _ = runs
  for flags, message in [(["--lora-rank", "0"], "lora_rank"),
                         (["--lora-rank", "4", "--lora-parts", "att,emb"], "lora_parts"),
                         (["--tune", "state", "--lora-rank", "4"], "LoRA only")]:
    out = tmp_path / "never"
    assert main(["train", "--init-from", str(root / "base"), "--out", str(out), *flags]) == 1
    assert message in capsys.readouterr().err
    assert not out.exists()
  assert main(["train", "--lora-rank", "4", "--out", str(tmp_path / "never")]) == 1
  assert "needs --init-from" in capsys.readouterr().err
  assert not (tmp_path / "never").exists()


def test_lora_run_checkpoints_hold_adapters_and_base_fingerprint(runs):
  root, summary, _ = runs
  assert summary["final_eval"]["loss"] > 0
  info = tuning.read_tuned_run(root / "lora")
  assert info.kind == "lora" and info.step == 4
  assert info.lora == lora.LoraSpec(2, 4.0, ("att", "ffn", "head"))
  base, _ = __import__("rwkv_jax.checkpoint").checkpoint.load_model(root / "base")
  assert info.base_fingerprint == tuning.base_fingerprint(base)
  adapters, spec = lora.load_adapters(root / "lora", base)
  # The checkpoint's params are exactly the adapters (no base weight is stored).
  saved = tuning.restore_trainable(info, lora.abstract_adapters(base, spec))
  assert set(lora.adapter_paths(saved)) == set(lora.select_targets(base, spec.parts))
  # load_model of the LoRA run is its base with the adapters merged.
  merged, _ = __import__("rwkv_jax.checkpoint").checkpoint.load_model(root / "lora")
  tokens = jnp.arange(20, dtype=jnp.int32)[None] % 64
  adapted = lora.apply_lora(base, adapters, spec)(tokens)
  assert rel_err(merged(tokens), adapted) < 1e-5
  assert rel_err(adapted, base(tokens)) > 1e-6  # trained: not the base any more


def test_lora_resume_is_exact(runs, tmp_path):
  import shutil

  root, _, _ = runs
  resumed = tmp_path / "resumed"
  shutil.copytree(root / "lora", resumed)
  shutil.rmtree(resumed / "checkpoints" / "4")
  run_training(TrainConfig(out=str(resumed), steps=4, resume=True, save_every=2, lr=1e-2,
                           init_from=str(root / "base"), lora_rank=2, lora_alpha=4.0,
                           lora_parts="att,ffn,head", **TINY))
  base = __import__("rwkv_jax.checkpoint").checkpoint.load_model(root / "base")[0]
  a, _ = lora.load_adapters(root / "lora", base)
  b, _ = lora.load_adapters(resumed, base)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_adapter_for_another_base_is_refused_and_nothing_is_touched(runs, tmp_path):
  from rwkv_jax import lora_cli
  from rwkv_jax.checkpoint import load_model

  root, _, _ = runs
  before = _files(root / "lora")
  other, _ = load_model(root / "other")
  with pytest.raises(ValueError, match="trained on another base model"):
    lora.load_adapters(root / "lora", other)
  with pytest.raises(ValueError, match="trained on another base model"):
    lora_cli.merge(root / "lora", tmp_path / "merged", base=root / "other")
  assert not (tmp_path / "merged").exists()
  # Resuming on another base: an error before anything is written.
  with pytest.raises(ValueError, match="fingerprint"):
    run_training(TrainConfig(out=str(root / "lora"), steps=6, resume=True, save_every=2,
                             lr=1e-2, init_from=str(root / "other"), lora_rank=2,
                             lora_alpha=4.0, lora_parts="att,ffn,head", **TINY))
  assert _files(root / "lora") == before
  with pytest.raises(ValueError, match="another base"):
    tuning.load_tuned_state(root / "state" / tuning.STATE_FILE, other)


def test_lora_merge_writes_run_dir_and_files_equal_to_the_adapted_model(runs, tmp_path):
  from rwkv_jax import interop
  from rwkv_jax.checkpoint import load_model
  from rwkv_jax.cli import main

  root, _, _ = runs
  base, _ = load_model(root / "base")
  adapters, spec = lora.load_adapters(root / "lora", base)
  tokens = (jnp.arange(40, dtype=jnp.int32)[None] * 7) % 64
  want = lora.apply_lora(base, adapters, spec)(tokens)
  assert main(["lora", "merge", str(root / "lora"), str(tmp_path / "run")]) == 0
  assert main(["lora", "merge", str(root / "lora"), str(tmp_path / "m.safetensors")]) == 0
  for path in (tmp_path / "run", tmp_path / "m.safetensors"):
    got = interop.from_pretrained(path, wkv_impl="scan")(tokens)
    assert rel_err(got, want) < 1e-5, path
  assert main(["lora", "merge", str(root / "lora"), str(tmp_path / "run")]) == 1  # exists
  assert main(["lora", "merge", str(root / "state"), str(tmp_path / "x")]) == 1
  assert not (tmp_path / "x").exists()


def test_state_run_writes_a_state_that_generate_and_chat_start_from(runs, tmp_path):
  from rwkv_jax import ChatSession, generate
  from rwkv_jax.checkpoint import load_model
  from rwkv_jax.inference import cli

  root, _, summary = runs
  assert summary["final_eval"]["loss"] > 0
  base, _ = load_model(root / "state")  # a state run's model is its base
  path = root / "state" / tuning.STATE_FILE
  state = tuning.load_tuned_state(path, base)
  assert jax.tree.leaves(state)[0].shape[1] == 1
  assert not np.array_equal(np.asarray(state.att_x), 0)  # trained
  out = generate(base, [1, 2, 3], max_new_tokens=6, key=0, state=state)
  empty = generate(base, [1, 2, 3], max_new_tokens=6, key=0)
  assert not np.allclose(np.asarray(out.logits), np.asarray(empty.logits))
  chat = ChatSession(base, key=0, initial_state=state)
  reply = chat.send([1, 2, 3], max_new_tokens=6)  # turn 0 draws with fold_in(key, 0)
  first = generate(base, [1, 2, 3], max_new_tokens=6, state=state,
                   key=jax.random.fold_in(jax.random.key(0), 0))
  assert reply == [int(t) for t in first.tokens[0, :first.lengths[0]]]
  with pytest.raises(ValueError, match="needs|shape"):
    ChatSession(base, initial_state=base.init_state(2))
  # The CLI starts from the run's state by default, and from --state FILE.
  import argparse
  import io

  def run(**kw):
    args = dict(checkpoint=str(root / "state"), tokenizer="ids", max_new_tokens=6,
                temperature=1.0, top_p=1.0, top_k=0, presence_penalty=0.0,
                frequency_penalty=0.0, seed=0, stop_token=None, chunk_size=4,
                decode_step=None, prompt="1 2 3", lora=None, state=None, quantize=None)
    args.update(kw)
    buf = io.StringIO()
    assert cli.run_generate(argparse.Namespace(**args), out=buf) == 0
    return buf.getvalue().split()[3:]

  expected = [str(t) for t in out.tokens[0, :out.lengths[0]]]
  assert run() == expected
  assert run(checkpoint=str(root / "base"), state=str(path)) == expected


def test_generate_with_unmerged_lora_and_int8_from_the_cli(runs):
  from rwkv_jax.cli import main

  root, _, _ = runs
  common = ["generate", "--checkpoint", str(root / "base"), "--prompt", "1 2 3",
            "--max-new-tokens", "4", "--tokenizer", "ids"]
  assert main(common + ["--lora", str(root / "lora")]) == 0
  assert main(common + ["--lora", str(root / "lora"), "--quantize", "int8"]) == 0
  assert main(common[:2] + [str(root / "other")] + common[3:]
              + ["--lora", str(root / "lora")]) == 1
  assert main(common + ["--quantize", "int8", "--decode-step", "pallas"]) == 1


def test_lora_on_a_mesh_matches_one_device(runs, tmp_path):
  """LoRA training on 4 CPU devices (fsdp=2,tensor=2) follows the one-device run."""
  root, _, _ = runs
  args = ["--init-from", str(root / "base"), "--lora-rank", "2", "--lora-parts", "att,ffn",
          "--steps", "3", "--lr", "1e-2", "--batch-size", "4", "--ctx-len", "32",
          "--warmup", "1", "--eval-every", "0", "--eval-size", "8", "--wkv-impl", "scan",
          "--no-progress"]
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=4",
             PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  for name, mesh in (("one", []), ("mesh", ["--mesh", "fsdp=2,tensor=2"])):
    cmd = [sys.executable, "-m", "rwkv_jax.cli", "train", "--out", str(tmp_path / name),
           *args, *mesh]
    if not mesh:
      env_one = dict(env, XLA_FLAGS="")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env=env if mesh else env_one)
    assert proc.returncode == 0, proc.stderr[-3000:]
  loss = {}
  for name in ("one", "mesh"):
    loss[name] = [json.loads(l)["loss"] for l in
                  (tmp_path / name / "metrics.jsonl").read_text().splitlines()
                  if "loss" in json.loads(l)]
  assert len(loss["one"]) == 3
  np.testing.assert_allclose(loss["mesh"], loss["one"], rtol=1e-5)
  from rwkv_jax.checkpoint import load_model

  base = load_model(root / "base")[0]
  a, _ = lora.load_adapters(tmp_path / "one", base)
  b, _ = lora.load_adapters(tmp_path / "mesh", base)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert rel_err(y, x) < 1e-5


# ----------------------------------------------------------------------------- int8

@pytest.mark.parametrize("family", ["rwkv4", "rwkv7"])
def test_int8_logits_close_to_float32_and_bf16(family, rng):
  cfg = _family_cfg(family)
  model = _random_model(cfg)
  tokens = _tokens(rng, cfg.vocab_size, (2, 32))
  f32 = model(tokens)
  q = quantize.quantize_model(model)
  err32 = rel_err(q(tokens), f32)
  bf16 = models.abstract_model(cfg.replace(dtype="bfloat16"))
  nnx.update(bf16, nnx.state(model, nnx.Param))
  qb = quantize.quantize_model(bf16)
  err16 = rel_err(qb(tokens), bf16(tokens))
  print(f"int8 vs float32 {err32:.4f}, int8(bf16) vs bf16 {err16:.4f}")
  assert err32 < 0.03 and err16 < 0.03
  # Every matrix of INT8_PARAMS is int8 + a float32 scale per output channel.
  paths = quantize.quantizable(model)
  assert ("head",) in paths and all(p[-1] in ("kernel", "head") for p in paths)
  assert quantize.weight_bytes(q) < 0.4 * quantize.weight_bytes(model) + \
      4 * cfg.vocab_size * cfg.n_embd  # the embedding stays float32
  # Decoding reads the int8 matrices (not cast to bf16) and works at batch > 1.
  from rwkv_jax import generate

  out = generate(qb, [[1, 2, 3], [4, 5]], max_new_tokens=5, key=0)
  assert out.tokens.shape == (2, 5)


def test_int8_file_round_trip_and_bad_inputs(rng, tmp_path):
  from rwkv_jax import interop

  cfg = _family_cfg("rwkv4")
  model = _random_model(cfg)
  tokens = _tokens(rng, cfg.vocab_size)
  q = quantize.quantize_model(model)
  path = interop.save_pretrained(model, tmp_path / "m.int8.safetensors", quantize="int8")
  assert quantize.is_int8_file(path)
  back = interop.from_pretrained(path)
  np.testing.assert_array_equal(np.asarray(back(tokens)), np.asarray(q(tokens)))
  assert os.path.getsize(path) < 0.5 * 4 * cfg.param_count()
  # rwkv-jax convert --quantize int8 writes the same file from a float one.
  from rwkv_jax.cli import main

  src = interop.save_pretrained(model, tmp_path / "f32.safetensors")
  assert main(["convert", src, str(tmp_path / "c.safetensors"), "--quantize", "int8"]) == 0
  converted = interop.from_pretrained(tmp_path / "c.safetensors", wkv_impl="scan")
  np.testing.assert_array_equal(np.asarray(converted(tokens)), np.asarray(q(tokens)))
  # Bad inputs: clear errors, nothing written.
  with pytest.raises(ValueError, match="cannot quantize.*'emb'.*gather"):
    quantize.quantize_model(model, paths=["emb"])
  with pytest.raises(ValueError, match="cannot quantize"):
    quantize.quantize_model(model, paths=["blocks.0.ln1.weight"])
  with pytest.raises(ValueError, match="unknown quantization"):
    quantize.quantize_model(model, "int4")
  for target, kw in [("m.pth", {}), ("hfdir", {}), ("x.safetensors", dict(dtype="float16"))]:
    with pytest.raises(ValueError):
      interop.save_pretrained(model, tmp_path / target, quantize="int8", **kw)
    assert not (tmp_path / target).exists()
  with pytest.raises(ValueError, match="decodes with 'model'"):
    from rwkv_jax.inference._engine import resolve_decode_step

    resolve_decode_step("pallas", q, 1)
  assert resolve_decode_step(None, q, 1) == "model"
