"""RWKV-4 model: parallel == recurrent, state carry, parameter counts, Appendix E init."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rwkv_jax import RWKV, RWKVConfig, RWKVState
from rwkv_jax.models.rwkv4 import init as appendix_e
from rwkv_jax.testing import perturb_params
from tests.conftest import rel_err

TOL = 1e-5  # float32, ||a-b|| / ||b|| over all logits


def random_model(cfg, seed):
  """A model whose parameters are all perturbed, so zero-initialised paths are exercised."""
  return perturb_params(RWKV(cfg, rngs=nnx.Rngs(seed)), seed + 1, 0.3)


@pytest.fixture(scope="module")
def model():
  return random_model(RWKVConfig.preset("tiny", n_layer=3), seed=int(np.random.randint(1 << 20)))


def tokens(rng, b, t, vocab=64):
  return jnp.asarray(rng.integers(0, vocab, size=(b, t)), jnp.int32)


@pytest.mark.parametrize("impl", ["scan", "associative_scan"])
def test_parallel_equals_token_by_token(model, rng, impl):
  toks = tokens(rng, 2, 11)
  parallel = model(toks, implementation=impl)
  step = nnx.jit(lambda m, t, s: m.forward_with_state(t, s))
  state, outs = model.init_state(2), []
  for t in range(toks.shape[1]):
    logits, state = step(model, toks[:, t:t + 1], state)
    outs.append(logits)
  assert parallel.shape == (2, 11, 64)
  assert rel_err(jnp.concatenate(outs, 1), parallel) <= TOL


def test_split_with_state_equals_whole(model, rng):
  toks = tokens(rng, 3, 20)
  whole, s_whole = model.forward_with_state(toks)
  a, s = model.forward_with_state(toks[:, :7])
  b, s = model.forward_with_state(toks[:, 7:], s)
  assert rel_err(jnp.concatenate([a, b], 1), whole) <= TOL
  for x, y in zip(s, s_whole):
    assert np.allclose(x, y, rtol=1e-5, atol=1e-5)


def test_state_layout_and_hf_round_trip(model):
  state = model.init_state(4)
  assert isinstance(state, RWKVState)
  assert all(x.shape == (3, 4, 32) and x.dtype == jnp.float32 for x in state)
  assert float(state.att_max.max()) < -1e37
  hf = state.to_hf_state()
  assert len(hf) == 5 and hf[0].shape == (4, 32, 3)
  back = RWKVState.from_hf_state(hf)
  assert all(np.array_equal(a, b) for a, b in zip(back, state))


def test_bad_tokens_raise(model):
  with pytest.raises(ValueError, match=r"token id 64 at position \(0, 2\) is outside"):
    model(jnp.array([[1, 2, 64]]))
  with pytest.raises(ValueError, match="token id -1"):
    model(jnp.array([[-1, 2]]))
  with pytest.raises(ValueError, match="must be integers"):
    model(jnp.ones((1, 3)))
  with pytest.raises(ValueError, match="batch, time"):
    model(jnp.array([1, 2, 3]))
  with pytest.raises(ValueError, match=r"state.att_x has shape \(3, 2, 32\).*need \(3, 1, 32\)"):
    model.forward_with_state(jnp.array([[1]]), model.init_state(2))


def test_out_of_range_under_jit_is_nan_not_clamped(model):
  # Negative ids too: jnp.take would wrap -1 to the last row (issue 17.13).
  # One id per row (a NaN carries on through the recurrence to later positions).
  logits = nnx.jit(lambda m, t: m(t))(model, jnp.array([[1], [99], [-1], [-64], [63]]))
  finite = np.isfinite(np.asarray(logits[:, 0])).all(-1)
  nan = np.isnan(np.asarray(logits[:, 0])).all(-1)
  assert finite.tolist() == [True, False, False, False, True]
  assert nan.tolist() == [False, True, True, True, False]


@pytest.mark.parametrize("name", RWKVConfig.preset_names())
def test_parameter_counts_match_paper_formula(name):
  cfg = RWKVConfig.preset(name)
  abstract = nnx.eval_shape(lambda: RWKV(cfg, rngs=nnx.Rngs(0)))
  count = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  d, l, v = cfg.n_embd, cfg.n_layer, cfg.vocab_size
  assert count == 2 * v * d + 13 * d * d * l + d * (11 * l + 4) == cfg.param_count()
  if name == "169m":
    assert count == 169_342_464


def test_init_follows_appendix_e():
  cfg = RWKVConfig.preset("tiny", n_layer=4, n_embd=64)
  m = RWKV(cfg, rngs=nnx.Rngs(0))
  s, L = 64, 4
  i = np.arange(s)
  for l, block in enumerate(m.blocks):
    att, ffn = block.att, block.ffn
    base = (i / s) ** (1 - l / L)
    np.testing.assert_allclose(att.time_mix_k[...], base, rtol=1e-6)
    np.testing.assert_allclose(att.time_mix_v[...], base + 0.3 * l / (L - 1), rtol=1e-6)
    np.testing.assert_allclose(att.time_mix_r[...], 0.5 * base, rtol=1e-6)
    np.testing.assert_allclose(ffn.time_mix_k[...], base, rtol=1e-6)
    np.testing.assert_allclose(ffn.time_mix_r[...], base, rtol=1e-6)
    decay = -5 + 8 * (i / (s - 1)) ** (0.7 + 1.3 * l / (L - 1))
    np.testing.assert_allclose(att.time_decay[...], decay, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(att.time_first[...],
                               0.5 * (((i + 1) % 3) - 1) + np.log(0.3), rtol=1e-6)
    for dense in (att.key, att.value, att.receptance, ffn.receptance):
      assert not np.any(dense.kernel[...])
    assert abs(float(jnp.std(att.output.kernel[...])) - 2 / np.sqrt(s)) < 0.1 * 2 / np.sqrt(s)
    assert abs(float(jnp.std(ffn.value.kernel[...])) - 1 / np.sqrt(s)) < 0.1 / np.sqrt(s)
    assert float(jnp.std(ffn.key.kernel[...])) > 0  # ReLU^2 would never train from zero
  assert float(jnp.abs(m.emb[...]).max()) <= 1e-4
  assert float(jnp.std(m.emb[...])) > 1e-5
  for ln in (m.ln0, m.ln_out, m.blocks[0].ln1):
    assert np.all(ln.weight[...] == 1) and not np.any(ln.bias[...])
  # Layer 0: first channel decays fastest-memory end at -5, last at +3.
  assert appendix_e.time_decay_init(0, L, s)[0] == -5.0
  assert np.isclose(appendix_e.time_decay_init(0, L, s)[-1], 3.0)


def test_single_layer_init_is_finite():
  m = RWKV(RWKVConfig.preset("tiny", n_layer=1), rngs=nnx.Rngs(0))
  assert np.isfinite(np.asarray(m.blocks[0].att.time_decay[...])).all()


def test_bfloat16_compute_close_to_float32(rng):
  cfg = RWKVConfig.preset("tiny")
  m32 = random_model(cfg, 3)
  m16 = random_model(cfg.replace(dtype="bfloat16"), 3)
  toks = tokens(rng, 2, 9)
  assert rel_err(m16(toks), m32(toks)) < 5e-2


def test_dropout_only_with_a_key(rng):
  cfg = RWKVConfig.preset("tiny", dropout=0.5)
  m = random_model(cfg, 7)
  toks = tokens(rng, 2, 9)
  plain = m(toks)
  k1, k2 = jax.random.split(jax.random.PRNGKey(int(rng.integers(1 << 30))))
  a, a_again, b = m(toks, dropout_key=k1), m(toks, dropout_key=k1), m(toks, dropout_key=k2)
  assert np.array_equal(a, a_again) and not np.allclose(a, b) and not np.allclose(a, plain)
  # Without a key (evaluation, decode) the model is deterministic and equals rate 0.
  m0 = random_model(cfg.replace(dropout=0.0), 7)
  assert np.array_equal(plain, m0(toks))
  assert np.array_equal(m0(toks, dropout_key=k1), plain)
  with pytest.raises(ValueError, match="RWKVConfig.dropout"):
    RWKVConfig.preset("tiny", dropout=1.0)
