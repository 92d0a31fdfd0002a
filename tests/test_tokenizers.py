"""Tokenizers: bytes, RWKV World vocabulary (greedy longest match), HF tokenizer.json."""

import pytest

from rwkv_jax.tokenizers import ByteTokenizer, HFTokenizer, WorldTokenizer, load_tokenizer

TEXT = ("Héllo wörld — naïve café, 日本語のテキスト, Ελληνικά, emoji 🙂🚀 "
        "and tabs\tnewlines\n!")


def write_vocab(path, tokens):
  """tokens: list of (id, str or bytes), written as ``id repr(token) byte_length``."""
  lines = []
  for idx, tok in tokens:
    size = len(tok.encode("utf-8") if isinstance(tok, str) else tok)
    lines.append(f"{idx} {tok!r} {size}")
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return path


def world_like_vocab(path, extra):
  """Like rwkv_vocab_v20230424.txt: ids 1..256 are the single bytes (str for ASCII, bytes
  above), then multi-byte tokens."""
  singles = [(b + 1, chr(b) if b < 128 else bytes([b])) for b in range(256)]
  return write_vocab(path, singles + [(257 + i, t) for i, t in enumerate(extra)])


def test_byte_round_trip_non_ascii():
  tok = ByteTokenizer()
  ids = tok.encode(TEXT)
  assert len(ids) == len(TEXT.encode("utf-8")) and max(ids) < 256
  assert tok.decode(ids) == TEXT
  with pytest.raises(ValueError, match="outside"):
    tok.decode([256])


def test_byte_encode_bytes_takes_any_bytes_as_they_are():
  raw = "café".encode("latin-1") + b"\x00\xff\xfe"  # not UTF-8
  tok = ByteTokenizer()
  assert list(tok.encode_bytes(raw)) == list(raw)
  assert list(tok.encode_bytes(TEXT.encode("utf-8"))) == tok.encode(TEXT)


def test_world_round_trip_non_ascii(tmp_path):
  extra = ["Hé", "llo", " w", "ö", "rld", "日本", "語", "🙂", b"\xf0\x9f", " and", "it's",
           'say "x y"']
  tok = load_tokenizer(world_like_vocab(tmp_path / "rwkv_vocab_v20230424.txt", extra))
  assert isinstance(tok, WorldTokenizer)
  assert tok.vocab_size == 257 + len(extra) and tok.eot_id == 0
  ids = tok.encode(TEXT)
  assert tok.decode(ids) == TEXT
  assert len(ids) < len(TEXT.encode("utf-8"))  # the multi-byte tokens were used
  # Tokens holding spaces and quotes survive the repr parsing.
  assert tok.encode("it's") == [257 + extra.index("it's")]
  assert tok.encode('say "x y"') == [257 + extra.index('say "x y"')]
  assert tok.decode([0] + tok.encode("日本") + [0]) == "日本"  # 0 = end of text


def test_world_greedy_longest_match(tmp_path):
  # Greedy takes "abc" at position 0 even though "a" + "bcd" would cover "abcd" in 2 too.
  vocab = [(1, "a"), (2, "b"), (3, "c"), (4, "d"), (5, "ab"), (6, "abc"), (7, "bcd"),
           (8, b"\xe6\x97"), (9, "日"), (10, "日本"), (11, b"\xe6"), (12, b"\x97"), (13, "本")]
  tok = WorldTokenizer(write_vocab(tmp_path / "v.txt", vocab))
  assert tok.encode("abcd") == [6, 4]
  assert tok.encode("abab") == [5, 5]
  assert tok.encode("bcdab") == [7, 5]
  assert tok.encode("日本日") == [10, 9]
  assert tok.encode("\u65e5") == [9]           # the whole char beats its 2-byte prefix
  assert tok.encode("") == []
  assert tok.decode([8]) == "\ufffd"           # a partial UTF-8 sequence decodes as U+FFFD
  assert tok.decode([11, 12, 0]) == "\ufffd"      # byte tokens join before decoding
  with pytest.raises(ValueError, match=r"byte 0x7a at offset 2"):
    tok.encode("abz")
  with pytest.raises(ValueError, match=r"ids \[99\]"):
    tok.decode([1, 99])


@pytest.mark.parametrize("line, match", [
    ("1 'ab' 3", "has 2 bytes, the line says 3"),
    ("1 foo 3", "cannot parse"),
    ("x 'a' 1", "cannot parse"),
    ("1 ['a'] 1", "str or bytes literal"),
    ("1 'a' 1\n1 'b' 1", "id 1 is repeated"),
    ("1 'a' 1\n2 'a' 1", "repeats id 1"),
])
def test_world_bad_vocab_lines(tmp_path, line, match):
  path = tmp_path / "bad.txt"
  path.write_text(line + "\n", encoding="utf-8")
  with pytest.raises(ValueError, match=match):
    WorldTokenizer(path)


def test_hf_tokenizer_json_round_trip(tmp_path):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator([TEXT, "café naïve wörld 日本語 " * 5], trainer)
  path = tmp_path / "tokenizer.json"
  tok.save(str(path))

  loaded = load_tokenizer(path)
  assert isinstance(loaded, HFTokenizer)
  assert loaded.eot_id == tok.token_to_id("<|endoftext|>") == 0
  assert loaded.vocab_size == tok.get_vocab_size()
  for text in (TEXT, "unseen: ψυχή, Ärger, 中文 ✓"):
    ids = loaded.encode(text)
    assert loaded.decode(ids) == text
  assert len(loaded.encode("café naïve")) < len("café naïve".encode("utf-8"))  # merges used


def test_load_tokenizer_dispatch(tmp_path):
  assert isinstance(load_tokenizer(None), ByteTokenizer)
  assert isinstance(load_tokenizer("bytes"), ByteTokenizer)
  with pytest.raises(ValueError, match="unknown tokenizer"):
    load_tokenizer(tmp_path / "vocab.model")
  with pytest.raises(FileNotFoundError):
    load_tokenizer(tmp_path / "missing.txt")


def test_ids_tokenizer_of_the_synthetic_task():
  from rwkv_jax.tokenizers import IntTokenizer

  tok = load_tokenizer("ids")
  assert isinstance(tok, IntTokenizer) and tok.vocab_size == 64 and tok.eot_id is None
  assert tok.encode("3 5 7") == [3, 5, 7] and tok.encode(" 0\n63\t1 ") == [0, 63, 1]
  assert tok.decode([3, 5, 7]) == "3 5 7" and tok.encode("") == []
  assert load_tokenizer("ids:300").encode("299") == [299]
  for bad, match in (("1 x", "'x' is not a token id"), ("64", r"outside \[0, 64\)"),
                     ("-1", "outside")):
    with pytest.raises(ValueError, match=match):
      tok.encode(bad)
  with pytest.raises(ValueError, match="outside"):
    tok.decode([64])
  with pytest.raises(ValueError, match="unknown tokenizer"):
    load_tokenizer("ids:x")
