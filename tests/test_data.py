"""Data: the synthetic task (determinism, held-out split) and the text token cache."""

import os

import numpy as np
import pytest

from rwkv_jax.data.synthetic import SyntheticTask
from rwkv_jax.data.text import CACHE_DIR, TextData, build_token_cache
from rwkv_jax.tokenizers import ByteTokenizer


def test_synthetic_batches_are_deterministic_and_shifted():
  a, b = SyntheticTask(3), SyntheticTask(3)
  x1, y1, m1 = a.batch(5, 8)
  x2, y2, m2 = b.batch(5, 8)
  assert x1.shape == (8, 255) and x1.dtype == np.int32 and m1.dtype == np.float32
  np.testing.assert_array_equal(x1, x2)
  np.testing.assert_array_equal(y1, y2)
  assert not np.array_equal(x1, a.batch(6, 8)[0])
  assert not np.array_equal(x1, SyntheticTask(4).batch(5, 8)[0])
  lengths = m1.sum(1).astype(int) + 1  # L tokens give L - 1 targets
  assert lengths.min() >= 32 and lengths.max() <= 256 and len(set(lengths)) > 1
  for row in range(8):
    n = lengths[row] - 1
    assert x1[row, 0] == 0 and (x1[row, 1:n] > 0).all()  # BOS then content
    np.testing.assert_array_equal(x1[row, 1:n], y1[row, :n - 1])  # targets = next token
    assert (m1[row, :n] == 1).all() and (m1[row, n:] == 0).all()
    assert (x1[row, n:] == 0).all() and (y1[row, n:] == 0).all()
  assert y1.max() < 64


def test_synthetic_sequences_repeat_with_their_period():
  task = SyntheticTask(0)
  x, y, m, phases = task.test_set_with_phases(64)
  # In the repeat phase the target equals the token one period back (up to 10% noise).
  agree = total = 0
  for (regime, motif), row, ph in zip(task.motifs(None, 64), y, phases):
    p = len(motif)
    rep = np.nonzero(ph == 3)[0]
    seq = np.concatenate([[0], row])  # seq[t] is token t (BOS at 0)
    agree += (seq[rep + 1] == seq[rep + 1 - p]).sum()
    total += rep.size
  assert 0.8 < agree / total < 0.97


def test_synthetic_test_split_is_held_out():
  task = SyntheticTask(0)
  test = task.motifs(None, 256)
  train = [k for step in range(40) for k in task.motifs(step, 16)]
  assert all(task.in_test_split(*k) for k in test)
  assert not any(task.in_test_split(*k) for k in train)
  assert not set(test) & set(train)
  # motifs() replays exactly the sequences of batch() / test_set()
  x = task.batch(7, 16)[0]
  for (regime, motif), row in zip(task.motifs(7, 16), x):
    np.testing.assert_array_equal(row[1:1 + len(motif)], motif)
  x_test = task.test_set(256)[0]
  np.testing.assert_array_equal(x_test, task.test_set(256)[0])
  assert x_test.shape == (256, 255)


def _write(path, text):
  path.write_text(text, encoding="utf-8")
  return path


def test_token_cache_is_reused_and_invalidated(tmp_path):
  src = _write(tmp_path / "a.txt", "hello world\n" * 50)
  tokens, meta = build_token_cache(src, ByteTokenizer())
  assert tokens.dtype == np.uint16 and meta["n_tokens"] == 600 == meta["n_bytes"]
  np.testing.assert_array_equal(tokens, np.frombuffer(src.read_bytes(), np.uint8))
  cache = sorted(p.name for p in tmp_path.iterdir() if p.name != "a.txt")
  assert len(cache) == 2 and all(n.startswith("a.txt.") for n in cache)
  assert isinstance(tokens, np.memmap)
  mtime = (tmp_path / cache[1]).stat().st_mtime_ns
  build_token_cache(src, ByteTokenizer())  # hit: nothing rewritten
  assert (tmp_path / cache[1]).stat().st_mtime_ns == mtime
  _write(src, "changed text " * 40)
  tokens2, meta2 = build_token_cache(src, ByteTokenizer())
  assert meta2["key"] != meta["key"] and meta2["n_tokens"] == 13 * 40
  left = sorted(p.name for p in tmp_path.iterdir() if p.name != "a.txt")
  assert len(left) == 2 and meta2["key"] in left[0]  # the stale cache is gone, no tmp files


def test_folder_documents_are_separated_by_eot(tmp_path):
  _write(tmp_path / "b.txt", "second")
  _write(tmp_path / "a.txt", "first")
  _write(tmp_path / "blank.txt", "  \n")
  (tmp_path / ".hidden").write_text("never read")
  tokens, meta = build_token_cache(tmp_path, ByteTokenizer())
  assert bytes(np.asarray(tokens, np.uint8)) == b"first\x00second"
  assert meta["n_documents"] == 2
  assert (tmp_path / CACHE_DIR).is_dir()


def test_windows_are_deterministic_and_validation_is_held_out(tmp_path, rng):
  text = "".join(chr(c) for c in rng.integers(97, 123, size=5000))
  src = _write(tmp_path / "t.txt", text)
  data = TextData(src, ByteTokenizer(), ctx_len=32, val_fraction=0.1, seed=1)
  x, y, m = data.batch(3, 4)
  x2, y2, _ = TextData(src, ByteTokenizer(), ctx_len=32, val_fraction=0.1, seed=1).batch(3, 4)
  np.testing.assert_array_equal(x, x2)
  assert x.shape == y.shape == m.shape == (4, 32) and m.all()
  np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
  assert not np.array_equal(x, data.batch(4, 4)[0])
  train = bytes(np.asarray(data.train_tokens, np.uint8))
  val = bytes(np.asarray(data.val_tokens, np.uint8))
  assert len(val) == 500 and train + val == text.encode()
  for step in range(20):  # every training window lies in the training part
    for row_x, row_y in zip(*data.batch(step, 4)[:2]):
      assert train.find(bytes(np.append(row_x, row_y[-1]).astype(np.uint8))) >= 0
  batches = list(data.eval_batches(4, 12))
  assert len(batches) == 3
  for bx, by, _ in batches:
    for row_x, row_y in zip(bx, by):
      window = bytes(np.append(row_x, row_y[-1]).astype(np.uint8))
      assert val.find(window) >= 0
  s = data.summarize(loss_sum=np.log(2) * 10, correct=5, count=10)
  assert s["bits_per_token"] == pytest.approx(1.0) and s["bits_per_byte"] == pytest.approx(1.0)


def test_bad_data_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="not found"):
    TextData(tmp_path / "missing.txt", ByteTokenizer(), 8)
  with pytest.raises(ValueError, match="empty"):
    TextData(_write(tmp_path / "empty.txt", ""), ByteTokenizer(), 8)
  os.mkdir(tmp_path / "void")
  with pytest.raises(ValueError, match="no files"):
    TextData(tmp_path / "void", ByteTokenizer(), 8)
  with pytest.raises(ValueError, match="too short"):
    TextData(_write(tmp_path / "short.txt", "x" * 100), ByteTokenizer(), 64)
  with pytest.raises(ValueError, match="token id 122 >= the model's vocabulary size 100"):
    TextData(_write(tmp_path / "z.txt", "az" * 100), ByteTokenizer(), 8, vocab_size=100)


def test_hf_tokenizer_json(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  from rwkv_jax.tokenizers import load_tokenizer

  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(
      {"<|endoftext|>": 0, "[UNK]": 1, "a": 2, "b": 3}, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.save(str(tmp_path / "tokenizer.json"))
  corpus = tmp_path / "docs"
  corpus.mkdir()
  _write(corpus / "1.txt", "a b a c")
  _write(corpus / "2.txt", "b b")
  path = tmp_path / "tokenizer.json"
  tokens, meta = build_token_cache(corpus, load_tokenizer(path), path)
  np.testing.assert_array_equal(tokens, [2, 3, 2, 1, 0, 3, 3])
  assert meta["vocab_size"] == 4
  # Swapping two ids in the tokenizer file invalidates the cache.
  path.write_text(path.read_text().replace('"a": 2', '"a": 9').replace('"b": 3', '"a2": 3')
                  .replace('"a": 9', '"b": 2').replace('"a2": 3', '"a": 3'))
  tokens2, meta2 = build_token_cache(corpus, load_tokenizer(path), path)
  assert meta2["key"] != meta["key"]
  np.testing.assert_array_equal(tokens2, [3, 2, 3, 1, 0, 2, 2])
