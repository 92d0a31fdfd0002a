"""Inference: ragged prefill == token by token, generate == a Python reference loop, padding,
stop tokens, sampling rules, streaming, state files, ChatSession.

Float32 on CPU. Prompts are at most 8 tokens so most calls share one compiled prefill.
Greedy comparisons allow a divergence only at a near-tie of the reference logits (< 1e-4),
where float rounding of 1e-6 may legitimately pick the other token.
"""

import io
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rwkv_jax import RWKVConfig
from rwkv_jax.inference import (
    ChatSession, SamplingConfig, apply_penalties, filter_logits, generate, load_state, prefill,
    read_state_metadata, sample, save_state, stream)
from tests.conftest import rel_err
from tests.test_model import random_model

TOL = 1e-5      # float32 relative error of states / logits
NEAR_TIE = 1e-4  # a greedy token may differ only where the top two logits are this close
LENGTHS = (1, 3, 6, 8)  # mixed prompt lengths: every bit of the binary prefill is used
GREEDY = SamplingConfig.greedy()
SAMPLED = SamplingConfig(temperature=0.9, top_k=20, top_p=0.9, presence_penalty=0.3,
                         frequency_penalty=0.2)

_step = nnx.jit(lambda m, t, s: m.forward_with_state(t, s))


@pytest.fixture(scope="module")
def model():
  return random_model(RWKVConfig.preset("tiny"), seed=int(np.random.randint(1 << 20)))


def prompts(rng, lengths=LENGTHS, vocab=64):
  return [[int(t) for t in rng.integers(0, vocab, n)] for n in lengths]


def reference(model, prompt, n_new, state=None):
  """A plain Python loop over forward_with_state (batch 1): prompt, then argmax tokens.
  Returns (tokens, per-step logits used for each choice, final state)."""
  state = model.init_state(1) if state is None else state
  for t in prompt:
    logits, state = _step(model, jnp.array([[t]]), state)
  tokens, seen = [], []
  for _ in range(n_new):
    row = np.asarray(logits[0, -1])
    tokens.append(int(np.argmax(row)))
    seen.append(row)
    logits, state = _step(model, jnp.array([[tokens[-1]]]), state)
  return tokens, seen, state


def assert_same_greedy(got, want, want_logits):
  """got == want, except that after a near-tie of the reference the rest is not compared."""
  for i, (a, b) in enumerate(zip(got, want)):
    if a != b:
      row = want_logits[i]
      assert abs(row[a] - row[b]) < NEAR_TIE * max(1.0, np.abs(row).max()), (i, got, want)
      return
  assert len(got) == len(want)


def state_rel_err(a, b):
  return max(rel_err(x, y) for x, y in zip(a, b))


def column(state, b):
  return type(state)(*(x[:, b:b + 1] for x in state))


@pytest.mark.parametrize("min_parallel, tokens_per_call", [(1, 1 << 16), (4, 8), (16, 1 << 16)])
def test_prefill_equals_token_by_token(model, rng, min_parallel, tokens_per_call):
  # (1, ...): every bit of each length in parallel mode; (4, 8): the 8- and 4-token pieces
  # as scans over 2-token parallel chunks (8 tokens per call at batch 4), the last
  # length % 4 tokens recurrent; (16, ...), the default: prompts <= 8 fully recurrent.
  ps = prompts(rng)
  logits, state = prefill(model, ps, tokens_per_call=tokens_per_call,
                          min_parallel=min_parallel)
  chex.assert_shape(logits, (4, 64))
  chex.assert_shape(list(state), (2, 4, 32))  # every field (L, B, C)
  chex.assert_tree_all_finite((logits, state))
  for b, p in enumerate(ps):
    state_b = model.init_state(1)
    for t in p:
      want, state_b = _step(model, jnp.array([[t]]), state_b)
    assert rel_err(logits[b], want[0, -1]) <= TOL
    assert state_rel_err(column(state, b), state_b) <= TOL


def test_greedy_generate_equals_reference_loop_and_ignores_padding(model, rng):
  ps = prompts(rng)
  out = generate(model, ps, max_new_tokens=6, sampling=GREEDY)
  assert out.tokens.shape == (4, 6) and out.tokens.dtype == np.int32
  assert list(out.lengths) == [6] * 4
  for b, p in enumerate(ps):
    want, seen, state_b = reference(model, p, 6)
    assert_same_greedy(list(out.tokens[b]), want, seen)
    if list(out.tokens[b]) == want:
      assert state_rel_err(column(out.state, b), state_b) <= TOL
  # The 6-token prompt alone vs padded in a batch beside prompts of 1, 3 and 8 tokens.
  alone = generate(model, [ps[2]], max_new_tokens=6, sampling=GREEDY)
  assert state_rel_err(column(out.state, 2), alone.state) <= 1e-6
  assert rel_err(out.logits[2], alone.logits[0]) <= 1e-6
  assert_same_greedy(list(alone.tokens[0]), *reference(model, ps[2], 6)[:2])


def test_stop_tokens_stop_only_their_sequence(model, rng):
  # A token that row 0 emits but some other row never does (a random model sometimes
  # repeats one token in every row: then draw other prompts).
  for _ in range(20):
    ps = prompts(rng)
    free = generate(model, ps, max_new_tokens=6, sampling=GREEDY).tokens
    stop = next((int(t) for t in free[0] if any(int(t) not in row for row in free[1:])), None)
    if stop is not None:
      break
  assert stop is not None, "20 prompt sets gave no usable stop token"
  out = generate(model, ps, max_new_tokens=6, sampling=GREEDY, stop_tokens=[stop], pad_id=-7)
  # (pad_id and stop tokens are traced: this reuses the executable of the free run)
  stopped = 0
  for b in range(4):
    row = list(free[b])
    end = row.index(stop) + 1 if stop in row else 6
    stopped += end < 6 or stop in row
    assert out.lengths[b] == end
    assert list(out.tokens[b, :end]) == row[:end]
    assert (out.tokens[b, end:] == -7).all()
  assert 1 <= stopped < 4


def test_generate_rejects_bad_input(model):
  with pytest.raises(ValueError, match="token id 64 at position 1"):
    generate(model, [[1, 64]], max_new_tokens=2)
  with pytest.raises(ValueError, match="encode text"):
    generate(model, "hello", max_new_tokens=2)
  with pytest.raises(ValueError, match="non-empty"):
    generate(model, [[1], []], max_new_tokens=2)
  with pytest.raises(ValueError, match="max_new_tokens"):
    generate(model, [1, 2], max_new_tokens=0)
  with pytest.raises(ValueError, match="stop_tokens"):
    generate(model, [1, 2], max_new_tokens=2, stop_tokens=[99])
  with pytest.raises(ValueError, match=r"state.att_x has shape \(2, 3, 32\)"):
    generate(model, [[1], [2]], max_new_tokens=2, state=model.init_state(3))


# ---------------------------------------------------------------- sampling


def draws(logits, cfg, n, counts=None):
  keys = jax.random.split(jax.random.key(int(np.random.randint(1 << 30))), n)
  return np.asarray(jax.jit(jax.vmap(lambda k: sample(logits, k, cfg, counts)))(keys))


def test_top_k_stays_in_top_k_with_the_right_frequencies(rng):
  logits = jnp.asarray(rng.normal(size=(1, 40)) * 2, jnp.float32)
  got = draws(logits, SamplingConfig(top_k=5), 4000)[:, 0]
  top = np.argsort(-np.asarray(logits[0]))[:5]
  assert set(got) <= set(top) and len(set(got)) >= 3
  p = np.asarray(jax.nn.softmax(logits[0, top]))
  freq = np.array([(got == t).mean() for t in top])
  assert np.abs(freq - p).max() < 0.04  # 4000 draws: std <= 0.008


def test_temperature_to_zero_is_greedy(rng):
  # Distinct logits 0.05 apart: at T = 1e-3 the runner-up has probability < e^-50.
  logits = jnp.asarray(np.stack([rng.permutation(50) * 0.05 for _ in range(6)]), jnp.float32)
  got = draws(logits, SamplingConfig(temperature=1e-3), 500)
  assert (got == np.argmax(np.asarray(logits), -1)).all()
  greedy = np.asarray(sample(logits, jax.random.key(0), GREEDY))
  assert (greedy == np.argmax(np.asarray(logits), -1)).all()


@pytest.mark.parametrize("top_p", [0.3, 0.9])
def test_top_p_keeps_the_minimal_nucleus(rng, top_p):
  logits = np.asarray(rng.normal(size=(16, 50)) * 1.5, np.float32)
  kept = np.isfinite(np.asarray(filter_logits(jnp.asarray(logits), SamplingConfig(top_p=top_p))))
  for row, k in zip(logits, kept):
    order = np.argsort(-row)
    probs = np.exp(row[order] - row.max())
    probs /= probs.sum()
    n = int(np.searchsorted(np.cumsum(probs), top_p) + 1)  # minimal prefix reaching top_p
    assert probs[:n].sum() >= top_p - 1e-6 and probs[:n - 1].sum() < top_p + 1e-6
    assert set(np.flatnonzero(k)) == set(order[:n])
  got = draws(jnp.asarray(logits), SamplingConfig(top_p=top_p), 300)
  assert kept[np.arange(16)[None, :], got].all()


def test_penalties_change_logits_as_specified(rng):
  logits = rng.normal(size=(3, 20)).astype(np.float32)
  counts = rng.integers(0, 4, size=(3, 20))
  cfg = SamplingConfig(presence_penalty=0.7, frequency_penalty=0.25)
  want = logits - 0.7 * (counts > 0) - 0.25 * counts
  got = apply_penalties(jnp.asarray(logits), jnp.asarray(counts), cfg)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  greedy = SamplingConfig.greedy(presence_penalty=0.7, frequency_penalty=0.25)
  assert (np.asarray(sample(jnp.asarray(logits), None, greedy, jnp.asarray(counts)))
          == want.argmax(-1)).all()
  assert apply_penalties(logits, counts, SamplingConfig()) is logits


def test_sampling_config_validates():
  for bad in (dict(temperature=-1), dict(top_k=-2), dict(top_k=1.5), dict(top_p=0),
              dict(top_p=1.5), dict(presence_penalty=float("nan"))):
    with pytest.raises(ValueError, match="SamplingConfig"):
      SamplingConfig(**bad)


def test_same_key_same_tokens_and_streaming_matches(model, rng):
  ps = prompts(rng)
  a = generate(model, ps, max_new_tokens=6, sampling=SAMPLED, key=jax.random.key(5),
               stop_tokens=[7])
  b = generate(model, ps, max_new_tokens=6, sampling=SAMPLED, key=jax.random.key(5),
               stop_tokens=[7])
  c = generate(model, ps, max_new_tokens=6, sampling=SAMPLED, key=jax.random.key(6),
               stop_tokens=[7])
  assert (a.tokens == b.tokens).all() and (a.lengths == b.lengths).all()
  assert not (a.tokens == c.tokens).all()
  # Streaming in chunks of 4 (6 is not a multiple) gives the same tokens and state.
  s = stream(model, ps, max_new_tokens=6, sampling=SAMPLED, key=jax.random.key(5),
             stop_tokens=[7], chunk_size=4)
  steps = list(s)
  assert s.finished and len(steps) == max(a.lengths)
  for b_ in range(4):
    assert s.tokens[b_] == list(a.tokens[b_, :a.lengths[b_]])
  assert state_rel_err(s.state, a.state) <= 1e-6
  with pytest.raises(RuntimeError, match="once"):
    list(s)


# ---------------------------------------------------------------- state files and chat


def test_state_file_round_trip_and_shape_check(model, rng, tmp_path):
  state = jax.tree.map(lambda x: x + jnp.asarray(rng.normal(size=x.shape), jnp.float32),
                       model.init_state(2))
  for name in ("s.npz", "s.safetensors"):
    save_state(tmp_path / name, state, model, metadata={"note": "hi"})
    back = load_state(tmp_path / name, model)
    chex.assert_trees_all_equal(tuple(back), tuple(state))  # every field, bit for bit
    meta = read_state_metadata(tmp_path / name)
    assert meta["note"] == "hi" and meta["shape_hash"] == model.cfg.shape_hash()
    other = RWKVConfig.preset("tiny", n_embd=16)
    with pytest.raises(ValueError, match="another shape .*n_embd=32.*n_embd=16"):
      load_state(tmp_path / name, other)
  # Same shape, other dtype / ctx_len: accepted (the hash covers shapes only).
  load_state(tmp_path / "s.npz", model.cfg.replace(dtype="bfloat16", ctx_len=7))
  with pytest.raises(ValueError, match="must end in"):
    save_state(tmp_path / "s.pt", state, model)
  with pytest.raises(ValueError, match="n_layer=2, n_embd=32"):
    save_state(tmp_path / "bad.npz", model.init_state(1)[:4] + (jnp.zeros((2, 1, 5)),), model)
  np.savez(tmp_path / "foreign.npz", x=np.zeros(3))
  with pytest.raises(ValueError, match="not an rwkv-jax state"):
    load_state(tmp_path / "foreign.npz", model)


def test_save_load_continue_equals_uninterrupted(model, rng, tmp_path):
  p1, p2 = prompts(rng, (1, 1))  # p1 + 6 generated + p2 = 8 tokens: shapes shared with others
  first = generate(model, p1, max_new_tokens=6, sampling=GREEDY)
  g1 = list(first.tokens[0])
  save_state(tmp_path / "conv.safetensors", first.state, model)
  resumed = generate(model, p2, max_new_tokens=6, sampling=GREEDY,
                     state=load_state(tmp_path / "conv.safetensors", model))
  whole = generate(model, p1 + g1 + p2, max_new_tokens=6, sampling=GREEDY)
  want, seen, want_state = reference(model, p1 + g1 + p2, 6)
  assert_same_greedy(list(whole.tokens[0]), want, seen)
  assert_same_greedy(list(resumed.tokens[0]), want, seen)
  if list(resumed.tokens[0]) == want:
    assert state_rel_err(resumed.state, want_state) <= TOL


def test_chat_session_cache_and_continuation(model, rng):
  p1, p2 = prompts(rng, (1, 1))
  chat = ChatSession(model, sampling=GREEDY, max_conversations=2)
  g1 = chat.send(p1, "x", max_new_tokens=6)
  g2 = list(chat.stream(p2, "x", max_new_tokens=6))
  want, seen, _ = reference(model, p1 + g1 + p2, 6)
  assert_same_greedy(g2, want, seen)
  # Bounded LRU: touching "x" again keeps it; "y" is the least recently used and goes.
  chat.send(p1, "y", max_new_tokens=6)
  chat.send(p2, "x", max_new_tokens=6)
  chat.send(p1, "z", max_new_tokens=6)
  assert len(chat) == 2 and chat.conversations == ["x", "z"] and "y" not in chat
  with pytest.raises(ValueError, match="no tokenizer"):
    chat.send("text", "x")
  with pytest.raises(ValueError, match="max_conversations"):
    ChatSession(model, max_conversations=0)


# ---------------------------------------------------------------- command line


def test_cli_generate_and_chat_from_a_training_directory(tmp_path, capsys):
  from rwkv_jax.checkpoint import write_run_config
  from rwkv_jax.cli import build_parser, main
  from rwkv_jax.inference.cli import CHAT_TEMPLATE, run_chat
  from rwkv_jax.tokenizers import ByteTokenizer
  from rwkv_jax.training.checkpointing import Checkpointer
  from rwkv_jax.training.step import TrainState

  # A training output directory as `rwkv-jax train` leaves it (config.json + orbax step).
  model = random_model(RWKVConfig.preset("tiny", n_layer=1, n_embd=16, vocab_size=256), 7)
  params = nnx.state(model, nnx.Param)
  ckpt = Checkpointer(tmp_path)
  ckpt.save(1, TrainState(params, {"mu": jnp.zeros(1)}, jnp.int32(1), jnp.zeros(2, jnp.uint32)),
            {})
  ckpt.close()
  write_run_config(tmp_path, model.cfg, None)
  tok = ByteTokenizer()

  common = ["--checkpoint", str(tmp_path), "--max-new-tokens", "8", "--temperature", "0"]
  assert main(["generate", *common, "--prompt", "hi"]) == 0
  want = generate(model, tok.encode("hi"), max_new_tokens=8, sampling=GREEDY,
                  stop_tokens=[tok.eot_id])
  want_text = "hi" + tok.decode(list(want.tokens[0, :want.lengths[0]])) + "\n"
  assert capsys.readouterr().out == want_text
  assert main(["generate", *common, "--prompt", "hi", "--decode-step", "pallas"]) == 0
  assert capsys.readouterr().out == want_text  # the fused step computes the same function

  args = build_parser().parse_args(["chat", *common])
  out = io.StringIO()
  assert run_chat(args, inp=io.StringIO("hello\n/exit\nnever read\n"), out=out) == 0
  reply = ChatSession(model, tok, sampling=GREEDY).send(
      CHAT_TEMPLATE.format(message="hello"), max_new_tokens=8)
  assert out.getvalue() == "Assistant:" + tok.decode(reply) + "\n"
  assert run_chat(args, inp=io.StringIO(""), out=io.StringIO()) == 0  # EOF ends it

  assert main(["generate", "--checkpoint", str(tmp_path / "missing"), "--prompt", "x"]) == 1
  assert "model path not found" in capsys.readouterr().err
