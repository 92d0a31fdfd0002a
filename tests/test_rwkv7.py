"""RWKV-7 x070 model: a float64 NumPy RNN reference, parallel == recurrent, state carry,
parameter counts, init, config and state validation, gradients, weight names."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

from rwkv_jax.models import build_model, preset
from rwkv_jax.models.rwkv7 import RWKV7, RWKV7Config, RWKV7State, weights
from rwkv_jax.models.rwkv7 import init as x070_init
from rwkv_jax.models.rwkv7.config import lora_dims_formula
from rwkv_jax.testing import perturb_params
from tests import rwkv7_reference as reference
from tests.conftest import rel_err

# float32 model vs the float64 reference, ||a - b|| / ||b|| over all logits or a whole state
# field: measured 4e-7 .. 9e-7 (scan and chunked alike) on perturbed tiny models.
REF_TOL = 1e-5
TOL = 1e-5  # float32 vs float32 (parallel vs token by token, split vs whole)
GRAD_TOL = 2e-5  # chunked vs scan model gradients, per parameter, relative (measured <= 2e-6)


@nnx.jit(static_argnums=3)
def _forward(model, toks, state, impl):
  return model.forward_with_state(toks, state, implementation=impl)


def forward(model, toks, state, impl):
  """Jitted, always with a state array: one compile per (model structure, shape, impl);
  the tests share the shapes (2, 21), (2, 8), (2, 13), (2, 1) (eager chunked WKV is slow to
  dispatch, its compile is the cost here)."""
  return _forward(model, toks, model.init_state(toks.shape[0]) if state is None else state, impl)


def random_model(cfg, seed, scale=0.3):
  """Every parameter moved off its init (zero matrices, LoRA firsts, norms)."""
  return perturb_params(RWKV7(cfg, rngs=nnx.Rngs(seed)), seed + 1, scale)


@pytest.fixture(scope="module")
def model():
  return random_model(RWKV7Config.preset("tiny"), seed=int(np.random.randint(1 << 20)))


def tokens(rng, b, t, vocab=64):
  return jnp.asarray(rng.integers(0, vocab, size=(b, t)), jnp.int32)


def torch_tensors(model) -> dict[str, np.ndarray]:
  """The model's parameters under x070 .pth names and layouts (through weights.py)."""
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  out = {}
  for path, value in flat.items():
    ours = ".".join(map(str, path))
    out[weights.to_blinkdl(ours)] = weights.to_torch_layout(ours, np.asarray(value, np.float32))
  return out


def state_from_reference(ref_states) -> RWKV7State:
  """Per-sequence reference states (lists per layer) -> our (L, B, ...) state."""
  per_field = [np.stack([np.stack([layer[j] for layer in seq]) for seq in ref_states], axis=1)
               for j in range(3)]
  return RWKV7State(*per_field)


@pytest.mark.parametrize("impl", ["scan", "chunked"])
def test_matches_float64_reference(model, rng, impl):
  toks = tokens(rng, 2, 21)
  logits, state = forward(model, toks, None, impl)
  tensors = torch_tensors(model)
  runs = [reference.forward(tensors, np.asarray(seq)) for seq in toks]
  want_logits = np.stack([r[0] for r in runs])
  want_state = state_from_reference([r[1] for r in runs])
  assert logits.shape == (2, 21, 64)
  assert rel_err(logits, want_logits) <= REF_TOL
  for name, got, want in zip(RWKV7State._fields, state, want_state):
    assert got.shape == want.shape, name
    assert rel_err(got, want) <= REF_TOL, name


def test_reference_continues_from_a_state(model, rng):
  """A random non-empty starting state (every field), then two calls carrying the state,
  against the reference from the same state over the whole sequence."""
  toks = tokens(rng, 2, 21)
  start = model.init_state(2)
  start = RWKV7State(*(jnp.asarray(rng.standard_normal(x.shape), jnp.float32) for x in start))
  first, state = forward(model, toks[:, :8], start, "chunked")
  second, state = forward(model, toks[:, 8:], state, "chunked")
  logits = jnp.concatenate([first, second], 1)
  tensors = torch_tensors(model)
  for b in range(2):
    ref_start = [[np.asarray(x[i, b]) for x in start] for i in range(model.cfg.n_layer)]
    want, ref_state = reference.forward(tensors, np.asarray(toks[b]), ref_start)
    assert rel_err(logits[b], want) <= REF_TOL
    for j, name in enumerate(RWKV7State._fields):
      got = np.asarray(state[j][:, b])
      assert rel_err(got, np.stack([s[j] for s in ref_state])) <= REF_TOL, name


def test_parallel_equals_token_by_token(model, rng):
  toks = tokens(rng, 2, 21)
  parallel, s_parallel = forward(model, toks, None, "chunked")
  state, outs = model.init_state(2), []
  for t in range(toks.shape[1]):
    logits, state = forward(model, toks[:, t:t + 1], state, None)  # T = 1: the scan step
    outs.append(logits)
  assert rel_err(jnp.concatenate(outs, 1), parallel) <= TOL
  for name, x, y in zip(RWKV7State._fields, state, s_parallel):
    assert rel_err(x, y) <= TOL, name


def test_split_with_state_equals_whole(model, rng):
  toks = tokens(rng, 2, 21)
  whole, s_whole = forward(model, toks, None, "chunked")
  a, s = forward(model, toks[:, :8], None, "chunked")
  b, s = forward(model, toks[:, 8:], s, "chunked")
  assert rel_err(jnp.concatenate([a, b], 1), whole) <= TOL
  for name, x, y in zip(RWKV7State._fields, s, s_whole):
    assert rel_err(x, y) <= TOL, name


def test_state_layout_and_blinkdl_round_trip(model):
  cfg = model.cfg
  state = model.init_state(4)
  assert isinstance(state, RWKV7State)
  assert state.att_x.shape == state.ffn_x.shape == (2, 4, 64)
  assert state.wkv.shape == (2, 4, 4, 16, 16)
  assert all(x.dtype == jnp.float32 for x in state)
  axes = model.state_axes()
  assert axes.wkv == ("layer", "batch", "head", "head_v", "head_k")
  assert axes.att_x == axes.ffn_x == ("layer", "batch", "embed")
  flat = state.to_blinkdl_state()
  assert len(flat) == 3 * cfg.n_layer and flat[1].shape == (4, 4, 16, 16)
  back = RWKV7State.from_blinkdl_state(flat)
  assert all(np.array_equal(a, b) for a, b in zip(back, state))


def test_wrong_state_shape_is_a_clear_error(model):
  toks = jnp.array([[1, 2]])
  bad = model.init_state(1)._replace(wkv=jnp.zeros((2, 1, 4, 16, 8)))
  with pytest.raises(ValueError,
                     match=r"state\.wkv has shape \(2, 1, 4, 16, 8\).*\(2, 1, 4, 16, 16\)"):
    model.forward_with_state(toks, bad)
  with pytest.raises(ValueError, match="state.att_x"):
    model.forward_with_state(toks, model.init_state(2))  # batch 2 state, batch 1 tokens
  with pytest.raises(ValueError, match="tokens must be"):
    model(jnp.array([1, 2, 3]))


@pytest.mark.parametrize("name", RWKV7Config.preset_names())
def test_param_count_matches_every_preset(name):
  cfg = RWKV7Config.preset(name)
  abstract = nnx.eval_shape(lambda: RWKV7(cfg, rngs=nnx.Rngs(0)))
  counted = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  assert counted == cfg.param_count()


def test_param_count_readme_formula_and_tiny_real_count(model):
  # RWKV-LM README: V65536-L24-D1024 = 450.834432 M with its 64+32+64+128 LoRA dims.
  assert RWKV7Config.preset("0.4b").param_count() == 450_834_432
  counted = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert counted == model.cfg.param_count()


def test_presets_and_registry():
  cfg = preset("rwkv7-0.1b")
  assert (cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.n_head) == (12, 768, 65536, 12)
  assert (cfg.d_decay, cfg.d_aaa, cfg.d_mv, cfg.d_gate) == (64, 64, 32, 128)
  assert cfg.dim_ffn == 4 * 768
  assert lora_dims_formula(768) == (64, 64, 32, 128)
  assert lora_dims_formula(2048) == (128, 128, 64, 224)  # the 1.5B release uses 96/96/64/256
  assert RWKV7Config(n_layer=1, n_embd=1024).d_decay == 64  # round(2.5) = 2: ties to even
  tiny = preset("rwkv7-tiny", dtype="bfloat16")
  assert tiny.family == "rwkv7" and tiny.dtype == "bfloat16"
  assert RWKV7Config.from_dict(tiny.to_dict()) == tiny
  assert isinstance(build_model(RWKV7Config.preset("tiny")), RWKV7)
  assert tiny.shape_hash() != RWKV7Config.preset("tiny", head_size=32).shape_hash()


@pytest.mark.parametrize("overrides, match", [
    (dict(n_embd=60), r"n_embd \(60\) must be a multiple of RWKV7Config.head_size \(16\)"),
    (dict(head_size=0), r"RWKV7Config.head_size must be a positive integer"),
    (dict(d_gate=0), r"RWKV7Config.d_gate must be a positive integer"),
    (dict(dim_ffn=-4), r"RWKV7Config.dim_ffn must be a positive integer"),
    (dict(wkv_impl="associative_scan"), r"RWKV7Config.wkv_impl must be one of"),
    (dict(dtype="float64"), r"RWKV7Config.dtype must be one of"),
    (dict(dropout=1.0), r"RWKV7Config.dropout must be in"),
    (dict(layer_norm_eps=0), r"RWKV7Config.layer_norm_eps must be a positive number"),
    (dict(n_layer=0), r"RWKV7Config.n_layer must be a positive integer"),
])
def test_config_validation(overrides, match):
  with pytest.raises(ValueError, match=match):
    RWKV7Config.preset("tiny", **overrides)


def test_config_unknown_preset_and_field():
  with pytest.raises(ValueError, match="unknown RWKV7Config preset '3b'"):
    RWKV7Config.preset("3b")
  with pytest.raises(ValueError, match=r"unknown RWKV7Config fields \['n_heads'\]"):
    RWKV7Config.from_dict({"n_heads": 4})


def test_init_follows_train_temp():
  cfg = RWKV7Config.preset("tiny", n_layer=3)
  m = RWKV7(cfg, rngs=nnx.Rngs(0))
  att = m.blocks[1].att
  for name in ("w1", "a1", "v1", "g1"):
    assert not np.any(np.asarray(getattr(att, name)[...])), name
  assert not np.any(np.asarray(att.output.kernel[...]))
  assert not np.any(np.asarray(m.blocks[1].ffn.value.kernel[...]))
  w2 = np.asarray(att.w2[...])  # (d, C), d < C: orthonormal rows x 0.1
  np.testing.assert_allclose(w2 @ w2.T, 0.01 * np.eye(cfg.d_decay), atol=1e-6)
  head = np.asarray(m.head[...])  # (C, V) with V = C: orthogonal x 0.5
  np.testing.assert_allclose(head @ head.T, 0.25 * np.eye(64), atol=1e-5)
  np.testing.assert_allclose(att.ln_x.weight[...], (2 / 3) ** 0.7, rtol=1e-6)
  want = x070_init.time_mix_init(1, 3, 64, 16)
  for name in ("x_r", "x_w", "w0", "a0", "v0", "k_k", "k_a", "r_k"):
    np.testing.assert_allclose(getattr(att, name)[...], want[name], rtol=1e-6, err_msg=name)
  i = np.arange(3)  # layer 0: w0 = -6 + 6 i/(C-1) + 0.5 + 2.5 z|z|, z = (i - 7.5) / 7.5
  z = (i - 7.5) / 7.5
  np.testing.assert_allclose(m.blocks[0].att.w0[...][:3], -5.5 + 6 * i / 63 + 2.5 * z * np.abs(z),
                             rtol=1e-6)
  bound = 0.5 / 8
  assert np.abs(np.asarray(att.receptance.kernel[...])).max() <= bound
  assert np.abs(np.asarray(att.key.kernel[...])).max() <= 0.1 * bound
  assert np.abs(np.asarray(m.emb[...])).max() <= 1e-4
  same = RWKV7(cfg, rngs=nnx.Rngs(0))
  assert np.array_equal(same.blocks[2].att.a2[...], m.blocks[2].att.a2[...])  # deterministic


def test_optimizer_rules(model):
  params = nnx.state(model, nnx.Param)
  decay, lr = model.optimizer_rules(params)
  flat_d = traverse_util.flatten_dict(nnx.to_pure_dict(decay))
  flat_lr = traverse_util.flatten_dict(nnx.to_pure_dict(lr))
  decayed = {".".join(map(str, p)) for p, v in flat_d.items() if v}
  assert decayed == {"emb", "head"} | {
      f"blocks.{i}.{m}.kernel" for i in range(2)
      for m in ("att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value")}
  doubled = {".".join(map(str, p)) for p, v in flat_lr.items() if v == 2.0}
  assert doubled == {f"blocks.{i}.att.w0" for i in range(2)}
  pure_decay, pure_lr = model.optimizer_rules(nnx.to_pure_dict(params))  # paths without .value
  assert traverse_util.flatten_dict(pure_decay) == flat_d
  assert traverse_util.flatten_dict(pure_lr) == flat_lr


def test_gradients_finite_and_chunked_matches_scan(rng):
  # 70 steps: more than one 64-step chunk of the chunked WKV.
  m = random_model(RWKV7Config.preset("tiny"), seed=int(rng.integers(1 << 20)), scale=0.1)
  toks = tokens(rng, 2, 71)

  def loss(model, impl):
    logits = model(toks[:, :-1], implementation=impl)
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, toks[:, 1:, None], axis=-1))

  grad = nnx.jit(nnx.grad(loss), static_argnums=1)
  grads = {impl: grad(m, impl) for impl in ("chunked", "scan")}
  leaves = {impl: jax.tree.leaves(nnx.to_pure_dict(g)) for impl, g in grads.items()}
  for g in leaves["chunked"]:
    assert np.isfinite(np.asarray(g)).all()
  flat_c = traverse_util.flatten_dict(nnx.to_pure_dict(grads["chunked"]))
  flat_s = traverse_util.flatten_dict(nnx.to_pure_dict(grads["scan"]))
  for path, gc in flat_c.items():
    gs = flat_s[path]
    scale = max(float(np.linalg.norm(gs)), 1e-6)
    assert float(np.linalg.norm(np.asarray(gc) - np.asarray(gs))) / scale <= GRAD_TOL, path
  assert float(np.linalg.norm(flat_s[("blocks", 1, "att", "w1")])) > 0  # the LoRAs learn


def test_dropout_only_with_a_key(rng):
  cfg = RWKV7Config.preset("tiny", dropout=0.5)
  m = random_model(cfg, seed=3)
  toks = tokens(rng, 1, 5)
  run = nnx.jit(lambda mm, key: (mm(toks, implementation="scan"),
                                 mm(toks, implementation="scan", dropout_key=key)))
  a, b = run(m, jax.random.key(0))
  assert not np.allclose(a, b)
  assert np.array_equal(a, run(m, jax.random.key(1))[0])
  assert np.isfinite(np.asarray(b)).all()


# ----------------------------------------------------------------------------- weights

def _names(model):
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  return {".".join(map(str, p)): np.asarray(v) for p, v in flat.items()}


def test_torch_layout_round_trip_for_every_name(model):
  ours = _names(model)
  tensors = torch_tensors(model)
  assert len(tensors) == len(ours)  # one file name per parameter
  c = model.cfg.n_embd
  assert tensors["blocks.0.att.x_r"].shape == (1, 1, c)
  assert tensors["blocks.1.att.w0"].shape == (1, 1, c)
  assert tensors["blocks.1.ffn.x_k"].shape == (1, 1, c)
  assert tensors["blocks.0.att.receptance.weight"].shape == (c, c)
  assert tensors["blocks.0.ffn.key.weight"].shape == (model.cfg.dim_ffn, c)
  assert tensors["blocks.0.att.w1"].shape == (c, model.cfg.d_decay)
  assert tensors["blocks.0.att.r_k"].shape == (4, 16)
  assert tensors["blocks.0.ln0.weight"].shape == (c,) and "head.weight" in tensors
  assert "blocks.0.att.v2" in tensors  # layer 0 keeps its unused v0/v1/v2
  for name, value in ours.items():
    torch = tensors[weights.to_blinkdl(name)]
    assert weights.expected_torch_shape(name, value.shape) == torch.shape, name
    assert np.array_equal(weights.from_torch_layout(name, torch, value.shape), value), name
  assert weights.from_torch_layout("blocks.0.att.x_r", np.zeros(c), (c,)) is not None
  assert weights.from_torch_layout("blocks.0.att.key.kernel", np.zeros((c, 2 * c)),
                                   (c, c)) is None


def test_is_family_and_infer_config(model):
  tensors = torch_tensors(model)
  assert weights.is_family(tensors)
  assert not weights.is_family(["emb.weight", "blocks.0.att.time_decay",
                                "blocks.0.att.time_mix_k"])
  cfg = weights.infer_config(tensors, "m.pth", {"dtype": "bfloat16", "ctx_len": 128})
  assert cfg.replace(dtype="float32", ctx_len=model.cfg.ctx_len) == model.cfg
  # the tensors fill a model of the inferred config, which gives the same logits
  loaded = RWKV7(cfg.replace(dtype="float32", ctx_len=model.cfg.ctx_len), rngs=nnx.Rngs(1))
  flat = {}
  for name, value in _names(loaded).items():
    flat[tuple(int(p) if p.isdigit() else p for p in name.split("."))] = jnp.asarray(
        weights.from_torch_layout(name, tensors[weights.to_blinkdl(name)], value.shape))
  nnx.update(loaded, nnx.State(traverse_util.unflatten_dict(flat)))
  toks = jnp.asarray(np.arange(42).reshape(2, 21) % 64, jnp.int32)  # a shape compiled above
  got, want = forward(loaded, toks, None, "scan")[0], forward(model, toks, None, "scan")[0]
  assert np.array_equal(got, want)


def test_infer_config_errors(model):
  tensors = torch_tensors(model)
  with pytest.raises(ValueError, match=r"\['head_size'\] are read from m.pth"):
    weights.infer_config(tensors, "m.pth", {"head_size": 32})
  bad = dict(tensors, **{"blocks.0.att.r_k": np.zeros((4, 32), np.float32)})
  with pytest.raises(ValueError, match=r"m.pth: blocks.0.att.r_k has shape \(4, 32\).*"
                                       r"H \* N = 128 != n_embd 64"):
    weights.infer_config(bad, "m.pth", {})
  missing = {k: v for k, v in tensors.items() if k != "blocks.0.att.g1"}
  with pytest.raises(ValueError, match="m.pth: blocks.0.att.g1 is missing"):
    weights.infer_config(missing, "m.pth", {})
  no_emb = {k: v for k, v in tensors.items() if k != "emb.weight"}
  with pytest.raises(ValueError, match="m.pth: emb.weight is missing"):
    weights.infer_config(no_emb, "m.pth", {})
  gap = {k: v for k, v in tensors.items() if not k.startswith("blocks.0.")}
  with pytest.raises(ValueError, match=r"m.pth: blocks \[0\] are missing"):
    weights.infer_config(gap, "m.pth", {})
  # a head-size-16 file's r_k does not fit a head-size-32 model
  assert weights.from_torch_layout("blocks.0.att.r_k", tensors["blocks.0.att.r_k"], (2, 32)) is None
