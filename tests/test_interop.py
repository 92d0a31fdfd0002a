"""Interop: HF transformers / BlinkDL checkpoints in and out, safe loading, HF state, CLI.

The reference is transformers' own RwkvForCausalLM on random tiny models built here
(nothing is downloaded: HF_HUB_OFFLINE=1). Every weight is randomised, including
time_decay, time_first and the time-mix vectors, so no path is trivially zero.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported (inside the tests)

import json
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import rwkv_jax
from rwkv_jax import RWKVConfig, RWKVState
from rwkv_jax.cli import main as cli_main
from rwkv_jax.interop import UnsafeCheckpointError, safe_load
from tests.conftest import rel_err, seed_for
from tests.test_model import random_model

TOL = 1e-5  # float32, ||a - b|| / ||b||

# name -> (vocab, hidden, layers, intermediate, rescale_every, layer_norm_epsilon)
HF_SIZES = {
    "L2": (61, 16, 2, 48, 6, 1e-5),        # rescale_every > L: eval mode rescales nothing
    "L7-R2": (97, 24, 7, 96, 2, 1e-5),     # eval halves after blocks 1, 3, 5
    "L4-R1-eps": (50, 8, 4, 40, 1, 1e-4),  # every block; eps != ln_out's fixed 1e-5
}
# Our own models use the L7-R2 shapes, so eager op compilations are shared between tests.
L7_CONFIG = RWKVConfig(n_layer=7, n_embd=24, vocab_size=97, dim_ffn=96)


NEEDS_TORCH = ('needs torch and transformers: pip install -e ".[torch]" (CPU torch first: '
               'see README, Tests)')


def _torch():
  """(torch, transformers), or skips the calling test (or fixture) when either is missing:
  the README's plain test install has no torch."""
  torch = pytest.importorskip("torch", reason=NEEDS_TORCH)
  transformers = pytest.importorskip("transformers", reason=NEEDS_TORCH)

  transformers.logging.set_verbosity_error()
  torch.set_num_threads(1)  # tiny models: threads only add overhead
  return torch, transformers


def random_hf_model(size: str, seed: int):
  torch, transformers = _torch()
  vocab, hidden, layers, ffn, rescale, eps = HF_SIZES[size]
  config = transformers.RwkvConfig(
      vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=ffn,
      attention_hidden_size=hidden, rescale_every=rescale, layer_norm_epsilon=eps,
      context_length=64)
  model = transformers.RwkvForCausalLM(config)
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      r = torch.randn(p.shape, generator=gen)
      if "time_mix" in name:
        value = torch.rand(p.shape, generator=gen)
      elif "time_decay" in name:
        value = r - 1.0
      elif "time_first" in name:
        value = 0.5 * r - 1.2
      elif name.endswith(".bias"):
        value = 0.1 * r
      elif p.ndim == 1:  # LayerNorm weights
        value = 1.0 + 0.2 * r
      elif "embeddings" in name:
        value = r
      else:
        value = r / p.shape[-1] ** 0.5
      p.copy_(value)
  return model


def hf_run(model, ids, *, train=False, **kw):
  """HF forward in eval (default) or train mode; switching modes (un)rescales in place."""
  torch, _ = _torch()
  model.train(train)
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(ids)), **kw)


def hf_to_blinkdl_name(name: str) -> str:
  """Written independently of rwkv_jax.interop._names, so the .pth test is not circular."""
  name = name.replace("rwkv.embeddings.", "emb.").replace("rwkv.", "")
  name = name.replace("pre_ln", "ln0").replace(".attention.", ".att.")
  name = name.replace(".feed_forward.", ".ffn.")
  for full, short in (("key", "k"), ("value", "v"), ("receptance", "r")):
    name = name.replace(f"time_mix_{full}", f"time_mix_{short}")
  return name


class Case:
  """A random HF model saved (before any eval forward rescales it) plus test tokens."""

  def __init__(self, size, tmp_dir, config):
    seed = seed_for(config, "interop-case", size)  # replayable with pytest --seed
    print(f"{size} seed={seed}")
    self.size, self.dir = size, str(tmp_dir)
    self.hf = random_hf_model(size, seed)
    self.weights = {k: v.clone() for k, v in self.hf.state_dict().items()}  # un-rescaled
    self.hf.save_pretrained(self.dir)
    vocab = HF_SIZES[size][0]
    self.ids = np.random.default_rng(seed).integers(0, vocab, (2, 10)).astype(np.int32)
    out = hf_run(self.hf, self.ids, use_cache=True)
    self.eval_logits = out.logits.numpy()
    self.eval_state = [s.numpy().copy() for s in out.state]
    self.train_logits = hf_run(self.hf, self.ids, train=True).logits.numpy()


@pytest.fixture(scope="module", params=list(HF_SIZES))
def case(request, tmp_path_factory):
  return Case(request.param, tmp_path_factory.mktemp(request.param), request.config)


@pytest.fixture(scope="module")
def case7(request, tmp_path_factory):
  return Case("L7-R2", tmp_path_factory.mktemp("L7"), request.config)


@nnx.jit
def forward(model, ids, state):
  """Jitted once per model structure: eager mode would compile op by op, and re-trace the
  recurrent step on every token."""
  return model.forward_with_state(ids, state)


def step_logits(model, ids, state=None):
  """Token-by-token recurrent decode: (B, T) -> logits (B, T, V), final state."""
  state = model.init_state(ids.shape[0]) if state is None else state
  out = []
  for t in range(ids.shape[1]):
    logits, state = forward(model, jnp.asarray(ids[:, t:t + 1]), state)
    out.append(logits)
  return jnp.concatenate(out, axis=1), state


@pytest.mark.torch
def test_hf_logits_and_state_match_transformers(case):
  model = rwkv_jax.from_pretrained(case.dir)
  assert model.cfg.n_layer == HF_SIZES[case.size][2] and model.cfg.ctx_len == 64
  logits, state = forward(model, jnp.asarray(case.ids), model.init_state(2))
  assert rel_err(logits, case.eval_logits) <= TOL
  stepped, step_state = step_logits(model, case.ids)
  assert rel_err(stepped, case.eval_logits) <= TOL
  for ours in (state, step_state):
    for j, (a, b) in enumerate(zip(ours.to_hf_state(), case.eval_state)):
      assert rel_err(a, b) <= TOL, f"HF state[{j}]"
  # HF's state after a prefix, carried into our model, continues the sequence.
  out = hf_run(case.hf, case.ids[:, :4], use_cache=True)
  carried = RWKVState.from_hf_state([s.numpy() for s in out.state])
  rest, _ = step_logits(model, case.ids[:, 4:], carried)
  assert rel_err(rest, case.eval_logits[:, 4:]) <= TOL


@pytest.mark.torch
def test_rescale_eps_matters_and_train_mode_is_the_unrescaled_model(case7):
  plain = rwkv_jax.from_pretrained(case7.dir, hf_eval_rescale=False)
  assert {n.eps for n in (plain.ln0, plain.ln_out, *(b.ln1 for b in plain.blocks))} == {1e-5}
  assert rel_err(plain(jnp.asarray(case7.ids)), case7.train_logits) <= TOL
  # The eval-mode LayerNorm epsilon effect is far above the tolerance at this size, so the
  # eval-mode match of the test above is not an accident of small differences.
  assert rel_err(case7.eval_logits, case7.train_logits) > 3 * TOL
  model = rwkv_jax.from_pretrained(case7.dir)
  assert [b.ln1.eps for b in model.blocks] == [1e-5 * 4 ** (i // 2) for i in range(7)]
  assert model.ln_out.eps == 1e-5 * 4 ** 3


@pytest.mark.torch
def test_save_pretrained_reloads_in_transformers(case7, tmp_path):
  _, transformers = _torch()
  model = rwkv_jax.from_pretrained(case7.dir)
  out = rwkv_jax.save_pretrained(model, tmp_path / "hf")
  config = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert config["rescale_every"] == 2 and config["intermediate_size"] == 96
  back = transformers.RwkvForCausalLM.from_pretrained(out)
  assert rel_err(hf_run(back, case7.ids).logits.numpy(), case7.eval_logits) <= TOL
  with pytest.raises(FileExistsError, match="overwrite"):
    rwkv_jax.save_pretrained(model, tmp_path / "hf")
  # A model of ours (uniform epsilons) exports with rescale_every=0: HF eval == ours.
  ours = random_model(L7_CONFIG, seed=3)
  rwkv_jax.save_pretrained(ours, tmp_path / "hf", overwrite=True)
  back = transformers.RwkvForCausalLM.from_pretrained(tmp_path / "hf")
  assert back.config.rescale_every == 0
  assert rel_err(hf_run(back, case7.ids).logits.numpy(), ours(jnp.asarray(case7.ids))) <= TOL


@pytest.mark.torch
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_blinkdl_pth_loads_to_the_same_logits(case7, tmp_path, dtype):
  torch, _ = _torch()
  tdt = getattr(torch, dtype)
  state_dict = {hf_to_blinkdl_name(k): v.to(tdt) for k, v in case7.weights.items()}
  assert "blocks.0.ln0.weight" in state_dict and "blocks.6.att.time_mix_k" in state_dict
  path = tmp_path / "RWKV-4-test.pth"
  # float16 also covers torch's legacy (pre-1.6, non-zip) file format.
  torch.save(state_dict, path, _use_new_zipfile_serialization=dtype != "float16")
  model = rwkv_jax.from_pretrained(path)
  assert (model.cfg.n_layer, model.cfg.n_embd, model.cfg.vocab_size, model.cfg.dim_ffn) == (
      7, 24, 97, 96)
  # Parameters are exactly the file's values in float32.
  np.testing.assert_array_equal(model.blocks[3].att.time_decay[...],
                                state_dict["blocks.3.att.time_decay"].float().numpy())
  np.testing.assert_array_equal(model.head[...], state_dict["head.weight"].float().numpy().T)
  # Reference: transformers in train mode (no rescale, like BlinkDL) on the rounded weights.
  ref = random_hf_model("L7-R2", 0)
  ref.load_state_dict({k: v.to(tdt).float() for k, v in case7.weights.items()})
  want = hf_run(ref, case7.ids, train=True).logits.numpy()
  assert rel_err(model(jnp.asarray(case7.ids)), want) <= TOL


@pytest.mark.torch
def test_hf_pytorch_model_bin(case7, tmp_path):
  torch, _ = _torch()
  # transformers 5 writes only safetensors; older releases (and hub repos) have this.
  torch.save(case7.weights, tmp_path / "pytorch_model.bin")
  (tmp_path / "config.json").write_text(open(os.path.join(case7.dir, "config.json")).read())
  model = rwkv_jax.from_pretrained(tmp_path)
  assert rel_err(model(jnp.asarray(case7.ids)), case7.eval_logits) <= TOL
  # A lone state dict in HF naming loads too (no config: no rescale).
  lone = rwkv_jax.from_pretrained(tmp_path / "pytorch_model.bin")
  assert rel_err(lone(jnp.asarray(case7.ids)), case7.train_logits) <= TOL


class Evil:
  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_pickle_with_code_is_refused(tmp_path, protocol):
  marker = tmp_path / "PWNED"
  path = tmp_path / "evil.pth"
  path.write_bytes(pickle.dumps({"emb.weight": Evil(marker)}, protocol=protocol))
  with pytest.raises(UnsafeCheckpointError, match=r"refusing to load .*system"):
    rwkv_jax.from_pretrained(path)
  assert not marker.exists()


@pytest.mark.torch
@pytest.mark.parametrize("zip_format", [True, False])
def test_torch_saved_code_is_refused_by_both_layers(tmp_path, monkeypatch, zip_format):
  torch, _ = _torch()
  marker = tmp_path / "PWNED"
  path = tmp_path / "evil.pth"
  torch.save({"emb.weight": torch.zeros(2, 2), "x": Evil(marker)}, path,
             _use_new_zipfile_serialization=zip_format)
  with pytest.raises(UnsafeCheckpointError, match="system"):
    rwkv_jax.from_pretrained(path)
  # With our import scan disabled, torch's weights_only unpickler still refuses it.
  monkeypatch.setattr(safe_load, "_SAFE_MODULES", ("torch", "collections", "posix", "nt"))
  with pytest.raises(UnsafeCheckpointError, match="weights_only"):
    rwkv_jax.from_pretrained(path)
  assert not marker.exists()


def _export(tmp_path):
  model = random_model(L7_CONFIG, seed=5)
  return model, rwkv_jax.save_pretrained(model, tmp_path / "model.safetensors")


def test_missing_misshaped_unexpected_are_listed(tmp_path):
  _, path = _export(tmp_path)
  tensors = load_file(path)
  del tensors["blocks.1.att.time_first"], tensors["ln_out.bias"]
  tensors["blocks.0.ffn.key.weight"] = tensors["blocks.0.ffn.key.weight"][:, :5].copy()
  tensors["blocks.0.att.head_qk"] = np.zeros(3, np.float32)
  save_file(tensors, path)
  with pytest.raises(ValueError) as err:
    rwkv_jax.from_pretrained(path)
  msg = str(err.value)
  assert "missing (2): blocks.1.att.time_first, ln_out.bias" in msg
  assert "mis-shaped (1): blocks.0.ffn.key.weight (96, 5) (expected (96, 24))" in msg
  assert "unexpected (1): blocks.0.att.head_qk" in msg
  # ChatRWKV-converted files (rewritten tensors) are refused, not misread.
  save_file({**load_file(path), "_version": np.zeros(1, np.float32)}, path)
  with pytest.raises(ValueError, match="convert_model"):
    rwkv_jax.from_pretrained(path)


def test_hf_dir_errors_name_hf_tensors(tmp_path):
  model, _ = _export(tmp_path)
  hf_dir = rwkv_jax.save_pretrained(model, tmp_path / "hf")
  weights = os.path.join(hf_dir, "model.safetensors")
  tensors = load_file(weights)
  del tensors["rwkv.blocks.1.attention.time_decay"]
  save_file(tensors, weights, metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"missing \(1\): rwkv.blocks.1.attention.time_decay"):
    rwkv_jax.from_pretrained(hf_dir)
  config = json.loads(open(os.path.join(hf_dir, "config.json")).read())
  with open(os.path.join(hf_dir, "config.json"), "w") as f:
    json.dump({**config, "model_type": "rwkv6"}, f)
  with pytest.raises(ValueError, match="'rwkv6' model; only RWKV-4"):
    rwkv_jax.from_pretrained(hf_dir)
  with pytest.raises(ValueError, match="neither an HF RWKV directory"):
    rwkv_jax.from_pretrained(tmp_path)
  with pytest.raises(ValueError, match="cannot be overridden"):
    rwkv_jax.from_pretrained(tmp_path / "model.safetensors", n_embd=8)
  (tmp_path / "junk.pth").write_bytes(b"not a pickle at all")
  with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
    rwkv_jax.from_pretrained(tmp_path / "junk.pth")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trips_without_torch(tmp_path, dtype):
  model, _ = _export(tmp_path)
  rounded = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}[dtype]
  ids = jnp.asarray(np.arange(20).reshape(2, 10) % 97)
  for target in ("hf", "w.safetensors"):
    path = rwkv_jax.save_pretrained(model, tmp_path / target, dtype=dtype)
    back = rwkv_jax.from_pretrained(path, dtype="bfloat16", wkv_impl="scan")
    assert back.cfg == model.cfg.replace(dtype="bfloat16", wkv_impl="scan")
    want = nnx.state(model, nnx.Param)
    for a, b in zip(jax.tree.leaves(nnx.state(back, nnx.Param)), jax.tree.leaves(want)):
      np.testing.assert_array_equal(a, np.asarray(b).astype(rounded).astype(np.float32))
    if dtype == "float32":
      back = rwkv_jax.from_pretrained(path)
      np.testing.assert_array_equal(back(ids), model(ids))


def test_safetensors_loading_does_not_import_torch(tmp_path):
  _, path = _export(tmp_path)
  code = ("import sys, rwkv_jax; m = rwkv_jax.from_pretrained(sys.argv[1]); "
          "assert 'torch' not in sys.modules, 'torch imported'; print(m.cfg.n_layer)")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "PYTHONPATH": root, "JAX_PLATFORMS": "cpu"}
  res = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True,
                       env=env, timeout=120)
  assert res.returncode == 0, res.stderr[-2000:]
  assert res.stdout.strip() == "7"


@pytest.mark.torch
def test_convert_cli_between_formats(case7, tmp_path, capsys):
  _, transformers = _torch()
  pth, hf2, hf3 = str(tmp_path / "m.pth"), str(tmp_path / "hf2"), str(tmp_path / "hf3")
  assert cli_main(["convert", case7.dir, pth]) == 0
  assert "family=rwkv4, n_layer=7, n_embd=24, vocab_size=97, dim_ffn=96" in \
      capsys.readouterr().out
  assert cli_main(["convert", pth, hf2]) == 0
  assert cli_main(["convert", case7.dir, hf3]) == 0
  # .pth and its HF conversion: the un-rescaled model (rescale_every=0 is written).
  assert rel_err(rwkv_jax.from_pretrained(pth)(jnp.asarray(case7.ids)),
                 case7.train_logits) <= TOL
  back = transformers.RwkvForCausalLM.from_pretrained(hf2)
  assert back.config.rescale_every == 0
  assert rel_err(hf_run(back, case7.ids).logits.numpy(), case7.train_logits) <= TOL
  # HF -> HF keeps rescale_every and HF's eval logits.
  back = transformers.RwkvForCausalLM.from_pretrained(hf3)
  assert back.config.rescale_every == 2
  assert rel_err(hf_run(back, case7.ids).logits.numpy(), case7.eval_logits) <= TOL
  capsys.readouterr()
  assert cli_main(["convert", pth, hf2]) == 1
  assert "overwrite" in capsys.readouterr().err
  evil = tmp_path / "evil.pth"
  evil.write_bytes(pickle.dumps({"x": Evil(tmp_path / "PWNED")}))
  assert cli_main(["convert", str(evil), str(tmp_path / "out")]) == 1
  assert "refusing to load" in capsys.readouterr().err and not (tmp_path / "PWNED").exists()
  assert cli_main(["convert", pth, hf2, "--overwrite", "--dtype", "float16",
                   "--rescale-every", "6"]) == 0
  assert json.loads(open(os.path.join(hf2, "config.json")).read())["rescale_every"] == 6
