"""Both families through the one interface: registry, state utilities, state files,
generation, BlinkDL files, and the CLI (train -> resume -> generate -> convert) for RWKV-7.

Float32; tolerances: state-file and weight-file round trips are exact (bitwise), generate's
state vs a plain forward 1e-5 relative, .pth round-trip logits 1e-6 relative.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import rwkv_jax
from rwkv_jax import models
from rwkv_jax.cli import main as cli_main
from rwkv_jax.inference import ChatSession, SamplingConfig, generate, load_state, save_state
from rwkv_jax.state import check_state, select_rows
from rwkv_jax.testing import perturb_params
from tests.conftest import rel_err

TINY = {"rwkv4": "tiny", "rwkv7": "rwkv7-tiny"}


@pytest.fixture(scope="module", params=sorted(TINY))
def model(request):
  cfg = models.preset(TINY[request.param], n_layer=2, wkv_impl="scan")
  return perturb_params(models.build_model(cfg, seed=3), 4, 0.1)


def test_registry_builds_each_family_from_its_dict():
  for family, name in TINY.items():
    cfg = models.preset(name)
    assert cfg.family == family
    data = cfg.to_dict()
    assert data["family"] == family
    assert models.config_from_dict(data) == cfg
    assert type(models.build_model(cfg)).__name__ == {"rwkv4": "RWKV", "rwkv7": "RWKV7"}[family]
  old_run = {k: v for k, v in models.preset("tiny").to_dict().items() if k != "family"}
  assert models.config_from_dict(old_run).family == "rwkv4"  # run dirs written before RWKV-7
  with pytest.raises(ValueError, match="unknown model family 'rwkv9'"):
    models.config_from_dict({"family": "rwkv9"})
  assert "rwkv7-0.1b" in models.preset_names() and "169m" in models.preset_names()
  assert rwkv_jax.RWKV7Config.preset("0.1b").family == "rwkv7"


def test_state_utilities_work_on_every_family(model):
  state = model.forward_with_state(jnp.array([[1, 2, 3], [4, 5, 6]]))[1]
  empty = model.init_state(2)
  picked = select_rows(model, jnp.array([True, False]), state, empty)
  for new, old, got in zip(jax.tree.leaves(state), jax.tree.leaves(empty),
                           jax.tree.leaves(picked)):
    np.testing.assert_array_equal(got[:, 0], new[:, 0])
    np.testing.assert_array_equal(got[:, 1], old[:, 1])
  with pytest.raises(ValueError, match="need"):
    check_state(model, state, 3)


def test_a_state_of_the_other_family_is_refused(tmp_path):
  m4 = models.build_model(models.preset("tiny"))
  m7 = models.build_model(models.preset("rwkv7-tiny"))
  with pytest.raises(ValueError, match="RWKVState but this rwkv7 model needs a RWKV7State"):
    m7.forward_with_state(jnp.array([[1]]), m4.init_state(1))
  path = tmp_path / "s4.npz"
  save_state(path, m4.init_state(1), m4)
  with pytest.raises(ValueError, match="another family.*family=rwkv4.*this model is "
                                       "family=rwkv7"):
    load_state(path, m7)


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_state_files_round_trip_exactly(model, tmp_path, suffix):
  state = model.forward_with_state(jnp.array([[7, 8, 9]]))[1]
  path = tmp_path / f"s{suffix}"
  save_state(path, state, model, metadata={"note": "x"})
  back = load_state(path, model)
  assert type(back) is type(state)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)
  other = models.build_model(model.cfg.replace(n_layer=3))
  with pytest.raises(ValueError, match="another shape"):
    load_state(path, other)


def test_generate_and_chat_continue_the_parallel_state(model):
  prompt = [3, 1, 4, 1, 5, 9, 2, 6]
  out = generate(model, [prompt], max_new_tokens=4, sampling=SamplingConfig.greedy(),
                 decode_step="model")
  full = prompt + [int(t) for t in out.tokens[0]]
  # The state after prompt + all but the last generated token equals one parallel pass.
  _, want = model.forward_with_state(jnp.asarray([full[:-1]]))
  logits, want = model.forward_with_state(jnp.asarray([full[-1:]]), want)
  for a, b in zip(jax.tree.leaves(out.state), jax.tree.leaves(want)):
    assert rel_err(a, b) <= 1e-5
  chat = ChatSession(model, sampling=SamplingConfig.greedy(), decode_step="model")
  reply = chat.send(prompt, max_new_tokens=4)
  assert reply == [int(t) for t in out.tokens[0]]


def test_blinkdl_file_round_trip_detects_the_family(model, tmp_path):
  path = str(tmp_path / "m.safetensors")
  rwkv_jax.save_pretrained(model, path)
  # BlinkDL files hold no ctx_len (a training setting): the loader's default is taken.
  back = rwkv_jax.from_pretrained(path, wkv_impl="scan", ctx_len=model.cfg.ctx_len)
  assert back.cfg == model.cfg
  ids = jnp.array([[5, 4, 3, 2, 1]])
  assert rel_err(back(ids), model(ids)) <= 1e-6


def test_hf_directories_are_rwkv4_only(tmp_path):
  m7 = models.build_model(models.preset("rwkv7-tiny"))
  with pytest.raises(ValueError, match="RWKV-4 models only"):
    rwkv_jax.save_pretrained(m7, str(tmp_path / "hf"))


def test_rwkv7_from_the_cli_train_resume_generate_convert(tmp_path, capsys):
  text = tmp_path / "book.txt"
  text.write_text("the quick brown fox jumps over the lazy dog. " * 60)
  out = tmp_path / "run"
  common = ["train", "--data", str(text), "--preset", "rwkv7-tiny", "--n-layer", "1",
            "--batch-size", "2", "--ctx-len", "16", "--eval-size", "4", "--warmup", "1",
            "--wkv-impl", "scan", "--no-progress", "--out", str(out)]
  assert cli_main(common + ["--steps", "2", "--save-every", "1"]) == 0
  saved = json.loads((out / "config.json").read_text())
  assert saved["model"]["family"] == "rwkv7"
  assert cli_main(common + ["--steps", "3", "--resume"]) == 0
  summary = json.loads((out / "summary.json").read_text())
  assert summary["steps"] == 3 and summary["family"] == "rwkv7"
  capsys.readouterr()
  assert cli_main(["generate", "--checkpoint", str(out), "--prompt", "the ",
                   "--max-new-tokens", "5", "--temperature", "0"]) == 0
  assert capsys.readouterr().out.startswith("the ")
  pth = str(tmp_path / "m.safetensors")
  assert cli_main(["convert", str(out), pth]) == 0
  assert "family=rwkv7" in capsys.readouterr().out
  m_run, _ = rwkv_jax.load_model(str(out))
  assert rwkv_jax.from_pretrained(str(out)).cfg == m_run.cfg  # a run dir loads (17.4)
  m_file = rwkv_jax.from_pretrained(pth)
  for a, b in zip(jax.tree.leaves(nnx.state(m_run, nnx.Param)),
                  jax.tree.leaves(nnx.state(m_file, nnx.Param))):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("family", sorted(TINY))
def test_scanned_layers_equal_the_layer_loop(family, rng):
  """run_layers: one lax.scan over stacked block parameters (any remat policy) computes
  what the Python loop does. Logits and state within 1e-5 (float32; measured ~1e-6).
  Gradients within 1e-5, or within 10x of how far the loop's own gradient moves between
  an eager and a jitted run (XLA's other summation order): some mix-vector gradients of a
  random tiny model are sums that nearly cancel (1e-7 relative noise in the parameters
  moves them by 4e-4), and no reordering can be held tighter than that."""
  ids = jnp.asarray(rng.integers(0, 64, (2, 9)), jnp.int32)

  def run(scan_layers, remat, jit=True):
    cfg = models.preset(TINY[family], n_layer=4, scan_layers=scan_layers, remat=remat,
                        wkv_impl="scan")
    model = perturb_params(models.build_model(cfg, seed=5), 6, 0.2)
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p):
      logits, state = nnx.merge(graphdef, p).forward_with_state(ids)
      return (logits ** 2).mean() + sum((x ** 2).mean() for x in jax.tree.leaves(state))

    out = nnx.merge(graphdef, params).forward_with_state(ids)
    grad = jax.jit(jax.grad(loss)) if jit else jax.grad(loss)
    return out, jax.tree.leaves(grad(params))

  want, want_g = run(False, "none")
  _, eager_g = run(False, "none", jit=False)
  tol = [1e-5 + 10 * rel_err(a, b) for a, b in zip(eager_g, want_g)]
  for remat in ("none", "full", "dots"):
    got, got_g = run(True, remat)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      assert rel_err(a, b) <= 1e-5
    for a, b, t in zip(got_g, want_g, tol):
      assert rel_err(a, b) <= t


def test_blocks_that_differ_fall_back_to_the_loop():
  # Per-layer LayerNorm epsilons (as an HF rescale_every import sets) make the blocks'
  # structures differ: the model still runs, as a loop, and equals the unscanned model.
  ids = jnp.array([[1, 2, 3, 4]])
  outs = []
  for scan in (True, False):
    m = models.build_model(models.preset("tiny", n_layer=3, scan_layers=scan), seed=1)
    for i, block in enumerate(m.blocks):
      block.ln1.eps = 1e-5 * 4 ** i
    outs.append(m(ids))
  np.testing.assert_array_equal(outs[0], outs[1])
  with pytest.raises(ValueError, match="remat must be one of"):
    models.preset("rwkv7-tiny", remat="sometimes")


def test_a_truncated_safetensors_file_is_a_clear_error(tmp_path, capsys):
  """Issue 17.14: safetensors' own SafetensorError became a one-line ValueError."""
  path = tmp_path / "m.safetensors"
  rwkv_jax.save_pretrained(models.build_model(models.preset("rwkv7-tiny")), str(path))
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])
  with pytest.raises(ValueError, match="m.safetensors is not a readable .safetensors file"):
    rwkv_jax.from_pretrained(str(path))
  assert cli_main(["convert", str(path), str(tmp_path / "o.pth"), "--no-compile-cache"]) == 1
  assert "not a readable .safetensors file" in capsys.readouterr().err


def test_cli_help_does_not_import_jax():
  """Issue 17.12: `rwkv-jax --help` builds every sub-command's parser without JAX."""
  import subprocess
  import sys

  code = ("import sys, rwkv_jax, rwkv_jax.cli as c; c.build_parser().format_help(); "
          "assert 'jax' not in sys.modules, sorted(m for m in sys.modules if 'jax' in m)[:5]")
  res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120)
  assert res.returncode == 0, res.stderr[-1500:]
