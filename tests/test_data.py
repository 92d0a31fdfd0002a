"""Data: the synthetic task (determinism, held-out split) and the text token cache."""

import hashlib
import os
import re

import numpy as np
import pytest

from rwkv_jax.data import text as text_module
from rwkv_jax.data.synthetic import SyntheticTask
from rwkv_jax.data.text import (TextData, build_token_cache, default_cache_dir,
                                resolve_cache_dir)
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


def _cache_env(monkeypatch, tmp_path):
  """Points the default cache directory at tmp_path/cache; returns its token folder."""
  monkeypatch.setenv("RWKV_JAX_CACHE", str(tmp_path / "cache"))
  return tmp_path / "cache" / "tokens"


def _snapshot(folder):
  """Every path below folder (and folder itself) with its size and mtime."""
  return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                for p in [folder, *folder.rglob("*")])


class CountingBytes(ByteTokenizer):
  """The byte tokenizer, counting how often it tokenizes data (inputs over 100 bytes: the
  cache key's probe strings are shorter)."""

  def __init__(self):
    self.calls = 0

  def encode(self, text):
    self.calls += len(text) > 100
    return super().encode(text)

  def encode_bytes(self, data):
    self.calls += len(data) > 100
    return super().encode_bytes(data)


def test_token_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
  tokens_dir = _cache_env(monkeypatch, tmp_path)
  (tmp_path / "data").mkdir()
  src = _write(tmp_path / "data" / "a.txt", "hello world\n" * 50)
  tokens, meta = build_token_cache(src, ByteTokenizer())
  assert tokens.dtype == np.uint16 and meta["n_tokens"] == 600 == meta["n_bytes"]
  np.testing.assert_array_equal(tokens, np.frombuffer(src.read_bytes(), np.uint8))
  assert os.listdir(tmp_path / "data") == ["a.txt"]  # nothing beside the data
  cache = sorted(p.name for p in tokens_dir.iterdir())
  assert len(cache) == 2 and all(n.startswith("a.txt-") for n in cache)
  assert isinstance(tokens, np.memmap) and meta["cache"] == str(tokens_dir / cache[1])
  mtime = (tokens_dir / cache[1]).stat().st_mtime_ns
  build_token_cache(src, ByteTokenizer())  # hit: nothing rewritten
  assert (tokens_dir / cache[1]).stat().st_mtime_ns == mtime
  _write(src, "changed text " * 40)
  tokens2, meta2 = build_token_cache(src, ByteTokenizer())
  assert meta2["key"] != meta["key"] and meta2["n_tokens"] == 13 * 40
  left = sorted(p.name for p in tokens_dir.iterdir())
  assert len(left) == 2 and meta2["key"] in left[0]  # the stale cache is gone, no tmp files


def test_default_cache_dir(tmp_path, monkeypatch):
  monkeypatch.setenv("RWKV_JAX_CACHE", str(tmp_path / "env"))
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert default_cache_dir() == tmp_path / "env" == resolve_cache_dir(None)
  assert resolve_cache_dir(tmp_path / "given") == tmp_path / "given"
  monkeypatch.delenv("RWKV_JAX_CACHE")
  assert default_cache_dir() == tmp_path / "xdg" / "rwkv-jax"
  monkeypatch.delenv("XDG_CACHE_HOME")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert default_cache_dir() == tmp_path / "home" / ".cache" / "rwkv-jax"


def test_read_only_data_is_cached_elsewhere_reused_and_rebuilt(tmp_path, monkeypatch):
  tokens_dir = _cache_env(monkeypatch, tmp_path)
  data = tmp_path / "dataset"
  data.mkdir()
  book = _write(data / "book.txt", "to be or not to be\n" * 30)
  _write(data / "notes.txt", "that is the question\n" * 30)

  def set_writable(on):
    for p in (*data.iterdir(), data):
      p.chmod((0o755 if p.is_dir() else 0o644) if on else (0o555 if p.is_dir() else 0o444))

  # chmod a-w stops writes except for root (CAP_DAC_OVERRIDE); either way the listing,
  # sizes and mtimes of the dataset must not change.
  set_writable(False)
  try:
    before = _snapshot(data)
    tok = CountingBytes()
    first = TextData(data, tok, ctx_len=8)
    assert _snapshot(data) == before
    assert tok.calls == 2 and isinstance(first.tokens, np.memmap)
    again = TextData(data, tok, ctx_len=8)
    assert tok.calls == 2  # reused: no re-tokenization
    np.testing.assert_array_equal(again.tokens, first.tokens)
    build_token_cache(book, tok)  # a single file of the folder: a cache of its own
    build_token_cache(book, tok)
    assert tok.calls == 3
    assert _snapshot(data) == before
    set_writable(True)
    _write(book, "a changed source\n" * 30)
    set_writable(False)
    before = _snapshot(data)
    changed = TextData(data, tok, ctx_len=8)
    assert tok.calls == 5  # rebuilt
    assert bytes(np.asarray(changed.tokens[:17], np.uint8)) == b"a changed source\n"
    assert changed.fingerprint != first.fingerprint
    assert _snapshot(data) == before
    # the folder's stale cache is gone; the file's (now stale) one is another source's
    assert len(list(tokens_dir.iterdir())) == 4
  finally:
    set_writable(True)


def test_unwritable_cache_dir_falls_back_to_memory(tmp_path, capsys, monkeypatch):
  blocker = _write(tmp_path / "a-file", "x")  # nothing can be created below a file, by anyone
  unwritable = blocker / "cache"
  src = _write(tmp_path / "t.txt", "abc " * 100)
  data = TextData(src, ByteTokenizer(), 8, cache_dir=unwritable)
  assert not isinstance(data.tokens, np.memmap) and data.meta["cache"] is None
  assert bytes(np.asarray(data.tokens, np.uint8)) == src.read_bytes()
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "warning" in err and str(unwritable) in err
  assert "in memory" in err and "in memory" in data.describe()
  monkeypatch.setattr(text_module, "MAX_IN_MEMORY_BYTES", 100)
  with pytest.raises(ValueError, match=re.escape(str(unwritable)) + ".*too large"):
    TextData(src, ByteTokenizer(), 8, cache_dir=unwritable)
  assert sorted(os.listdir(tmp_path)) == ["a-file", "t.txt"]


def test_fingerprint_is_independent_of_the_cache_location(tmp_path):
  src = _write(tmp_path / "t.txt", "abc " * 100)
  fingerprints = {TextData(src, ByteTokenizer(), 8, cache_dir=tmp_path / d).fingerprint
                  for d in ("c1", "c2", "t.txt/in-memory")}
  # ... and equal to the one of earlier versions, which checkpoints hold for --resume
  st = src.stat()
  old = "\n".join([text_module._tokenizer_id(ByteTokenizer()),
                   f"t.txt:{st.st_size}:{st.st_mtime_ns}"])
  assert fingerprints == {hashlib.sha256(old.encode()).hexdigest()[:16]}


def test_folder_documents_are_separated_by_eot(tmp_path):
  _write(tmp_path / "b.txt", "second")
  _write(tmp_path / "a.txt", "first")
  _write(tmp_path / "blank.txt", "  \n")
  (tmp_path / ".hidden").write_text("never read")
  tokens, meta = build_token_cache(tmp_path, ByteTokenizer())
  assert bytes(np.asarray(tokens, np.uint8)) == b"first\x00second"
  assert meta["n_documents"] == 2
  assert sorted(os.listdir(tmp_path)) == [".hidden", "a.txt", "b.txt", "blank.txt"]


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


def _word_tokenizer(folder, words):
  """A whitespace word-level tokenizer.json: <|endoftext|> 0, [UNK] 1, words from 2."""
  tokenizers = pytest.importorskip("tokenizers")
  vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.save(str(folder / "tokenizer.json"))
  return folder / "tokenizer.json"


def test_hf_tokenizer_json(tmp_path):
  from rwkv_jax.tokenizers import load_tokenizer

  path = _word_tokenizer(tmp_path, ["a", "b"])
  corpus = tmp_path / "docs"
  corpus.mkdir()
  _write(corpus / "1.txt", "a b a c")
  _write(corpus / "2.txt", "b b")
  tokens, meta = build_token_cache(corpus, load_tokenizer(path), path)
  np.testing.assert_array_equal(tokens, [2, 3, 2, 1, 0, 3, 3])
  assert meta["vocab_size"] == 4
  # Swapping two ids in the tokenizer file invalidates the cache.
  path.write_text(path.read_text().replace('"a": 2', '"a": 9').replace('"b": 3', '"a2": 3')
                  .replace('"a": 9', '"b": 2').replace('"a2": 3', '"a": 3'))
  tokens2, meta2 = build_token_cache(corpus, load_tokenizer(path), path)
  assert meta2["key"] != meta["key"]
  np.testing.assert_array_equal(tokens2, [3, 2, 3, 1, 0, 2, 2])


LATIN1 = "café au lait, crème brûlée\n".encode("latin-1") * 20  # not valid UTF-8


def test_byte_tokenizer_reads_raw_bytes(tmp_path):
  src = tmp_path / "latin1.txt"
  src.write_bytes(LATIN1)
  data = TextData(src, ByteTokenizer(), 8)
  assert bytes(np.asarray(data.tokens, np.uint8)) == LATIN1  # the file, byte for byte
  assert data.meta["n_bytes"] == src.stat().st_size == data.tokens.size
  s = data.summarize(loss_sum=np.log(2) * 10, correct=0, count=10)
  assert s["bits_per_byte"] == pytest.approx(1.0)  # one token per real byte of the file


def test_text_tokenizer_decodes_strictly_or_with_the_given_encoding(tmp_path):
  from rwkv_jax.tokenizers import load_tokenizer

  path = _word_tokenizer(tmp_path, ["café", "au", "lait", ",", "crème", "brûlée"])
  tok = load_tokenizer(path)
  src = tmp_path / "latin1.txt"
  src.write_bytes(LATIN1)
  with pytest.raises(ValueError, match=re.escape(f"{src}: not valid utf-8 at byte offset 3")):
    build_token_cache(src, tok, path)
  tokens, meta = build_token_cache(src, tok, path, encoding="latin-1")
  np.testing.assert_array_equal(tokens, [2, 3, 4, 5, 6, 7] * 20)
  assert meta["n_bytes"] == len(LATIN1) and meta["encoding"] == "latin-1"
  utf8 = tmp_path / "utf8.txt"
  utf8.write_bytes(LATIN1.decode("latin-1").encode("utf-8"))
  np.testing.assert_array_equal(build_token_cache(utf8, tok, path)[0], tokens)
  with pytest.raises(ValueError, match="unknown text encoding"):
    build_token_cache(src, tok, path, encoding="no-such-codec")


def test_binary_files_are_refused_by_text_tokenizers_and_warned_about_by_bytes(
    tmp_path, capsys):
  from rwkv_jax.tokenizers import load_tokenizer

  blob = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40  # first NUL at offset 8
  src = tmp_path / "image.png"
  src.write_bytes(blob)
  data = TextData(src, ByteTokenizer(), 8)
  assert bytes(np.asarray(data.tokens, np.uint8)) == blob
  assert data.meta["n_bytes"] == len(blob) == data.tokens.size
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and f"{src} looks binary (a NUL byte at offset 8)" in err
  path = _word_tokenizer(tmp_path, ["a"])
  for encoding in ("utf-8", "latin-1"):
    with pytest.raises(ValueError, match=re.escape(f"{src} looks binary")):
      build_token_cache(src, load_tokenizer(path), path, encoding=encoding)


def test_train_flags_cache_dir_and_encoding():
  import argparse

  from rwkv_jax.training.cli import add_arguments, config_from_args
  from rwkv_jax.training.config import TRAJECTORY_FIELDS, TrainConfig

  parser = argparse.ArgumentParser()
  add_arguments(parser)
  cfg = config_from_args(parser.parse_args([]))
  assert cfg.cache_dir is None and cfg.encoding == "utf-8"
  cfg = config_from_args(parser.parse_args(["--cache-dir", "/c", "--encoding", "latin-1"]))
  assert (cfg.cache_dir, cfg.encoding) == ("/c", "latin-1")
  help_text = " ".join(parser.format_help().split())
  assert "~/.cache/rwkv-jax" in help_text and "(utf-8)" in help_text
  # the encoding changes the tokens; the cache location does not
  assert "encoding" in TRAJECTORY_FIELDS and "cache_dir" not in TRAJECTORY_FIELDS
  old = TrainConfig().to_dict()
  del old["encoding"], old["cache_dir"]  # a config.json of an earlier version
  assert TrainConfig.from_dict(old).validate().encoding == "utf-8"
  for bad in ("no-such-codec", "rot13"):
    with pytest.raises(ValueError, match="invalid encoding="):
      TrainConfig(encoding=bad).validate()
