"""binidx (Megatron / GPT-NeoX MMapIndexedDataset, RWKV-LM's training data) and jsonl data:
header checks, interchange with an independent reference writer / reader written here from
the format's description, the packer, and training + exact resume through the CLI."""

import json
import os
import re
import struct

import numpy as np
import pytest

from rwkv_jax.data import binidx
from rwkv_jax.data.binidx import (BinidxData, BinidxError, find_binidx, pack, read_documents,
                                  write_binidx)
from rwkv_jax.data.text import TextData, build_token_cache
from rwkv_jax.tokenizers import ByteTokenizer

# --- an independent reference of the format (GPT-NeoX megatron/data/indexed_dataset.py) ---
# .idx: b"MMIDIDX\0\0", <Q version 1, <B dtype code, <Q n_items, <Q n_doc_idx,
# <i4 sizes[n_items], <i8 pointers[n_items] (byte offsets in .bin), <i8 doc_idx[n_doc_idx].
REF_CODES = {1: "B", 2: "b", 3: "h", 4: "i", 5: "q", 6: "f", 7: "d", 8: "H"}  # struct


def ref_write(prefix, items, code=8, doc_idx=None, version=1, magic=b"MMIDIDX\x00\x00"):
  """MMapIndexedDatasetBuilder.add_item per item, end_document after each (or ``doc_idx``
  as given), finalize: every field written with struct."""
  sizes, pointers, offset = [], [], 0
  with open(f"{prefix}.bin", "wb") as f:
    for item in items:
      raw = struct.pack(f"<{len(item)}{REF_CODES[code]}", *item)
      f.write(raw)
      sizes.append(len(item))
      pointers.append(offset)
      offset += len(raw)
  doc_idx = list(range(len(items) + 1)) if doc_idx is None else doc_idx
  with open(f"{prefix}.idx", "wb") as f:
    f.write(magic)
    f.write(struct.pack("<Q", version))
    f.write(struct.pack("<B", code))
    f.write(struct.pack("<Q", len(sizes)))
    f.write(struct.pack("<Q", len(doc_idx)))
    f.write(struct.pack(f"<{len(sizes)}i", *sizes))
    f.write(struct.pack(f"<{len(pointers)}q", *pointers))
    f.write(struct.pack(f"<{len(doc_idx)}q", *doc_idx))


def ref_read(prefix):
  """MMapIndexedDataset: (dtype code, documents as lists of ints), items read by pointer."""
  idx = open(f"{prefix}.idx", "rb").read()
  assert idx[:9] == b"MMIDIDX\x00\x00"
  assert struct.unpack_from("<Q", idx, 9) == (1,)
  (code,) = struct.unpack_from("<B", idx, 17)
  n, d = struct.unpack_from("<QQ", idx, 18)
  assert len(idx) == 34 + 12 * n + 8 * d
  sizes = struct.unpack_from(f"<{n}i", idx, 34)
  pointers = struct.unpack_from(f"<{n}q", idx, 34 + 4 * n)
  doc_idx = struct.unpack_from(f"<{d}q", idx, 34 + 12 * n)
  data = open(f"{prefix}.bin", "rb").read()
  fmt = REF_CODES[code]
  width = struct.calcsize("<" + fmt)
  items = [list(struct.unpack_from(f"<{s}{fmt}", data, p)) for s, p in zip(sizes, pointers)]
  assert sum(sizes) * width == len(data)
  docs = [sum(items[doc_idx[i]:doc_idx[i + 1]], []) for i in range(d - 1)]
  return code, docs, list(doc_idx)


def _docs(rng, n, high):
  return [list(map(int, rng.integers(0, high, size=int(rng.integers(1, 40)))))
          for _ in range(n)]


# --- reading files written by the reference ---

@pytest.mark.parametrize("code", [1, 2, 3, 4, 5, 8])
def test_reference_files_load_with_identical_documents(tmp_path, rng, code):
  high = {1: 256, 2: 128, 3: 30000, 4: 100000, 5: 100000, 8: 65536}[code]
  docs = _docs(rng, 30, high)
  prefix = str(tmp_path / "ref")
  ref_write(prefix, docs, code)
  got = read_documents(prefix)
  assert [list(map(int, d)) for d in got] == docs
  for name in (prefix, prefix + ".bin", prefix + ".idx"):
    data = BinidxData(name, ctx_len=8, val_fraction=0.2, vocab_size=high)
    stream = [t for d in docs for t in d]  # stored as is: no separators are inserted
    assert list(map(int, data.tokens)) == stream
    assert data.vocab_size == high and not data.tokens.flags.writeable
  assert BinidxData(prefix, ctx_len=8, val_fraction=0.2).vocab_size == max(stream) + 1


def test_reference_documents_of_several_items(tmp_path):
  """GPT-NeoX --split-sentences: a document is several items; doc_idx marks them."""
  items = [[5, 6], [7], [8, 9, 10], [11]]
  ref_write(tmp_path / "s", items, 8, doc_idx=[0, 2, 4])
  assert [list(map(int, d)) for d in read_documents(tmp_path / "s")] == [[5, 6, 7],
                                                                         [8, 9, 10, 11]]


# --- files written here, read by the reference ---

def test_our_files_load_in_the_reference(tmp_path, rng):
  docs = _docs(rng, 25, 65536)
  write_binidx(tmp_path / "w16", docs, np.uint16)
  assert ref_read(tmp_path / "w16") == (8, docs, list(range(26)))
  docs = _docs(rng, 7, 1 << 20)
  write_binidx(tmp_path / "w32", docs, np.int32)
  assert ref_read(tmp_path / "w32") == (4, docs, list(range(8)))
  write_binidx(tmp_path / "w8", [[1, 2], [3]], np.uint8)
  assert ref_read(tmp_path / "w8") == (1, [[1, 2], [3]], [0, 1, 2])
  assert sorted(os.listdir(tmp_path)) == sorted(f"w{b}.{s}" for b in (8, 16, 32)
                                                for s in ("bin", "idx"))  # no temp files


# --- header and consistency checks ---

def _damaged(tmp_path, how):
  prefix = tmp_path / "d"
  ref_write(prefix, [[1, 2, 3], [4, 5], [6, 7, 8, 9]], 8)
  idx, bin_ = tmp_path / "d.idx", tmp_path / "d.bin"
  raw = bytearray(idx.read_bytes())
  if how == "magic":
    raw[:9] = b"NOTBINIDX"
  elif how == "old_magic":
    raw[:8] = b"TNTIDX\x00\x00"
  elif how == "version":
    raw[9:17] = struct.pack("<Q", 2)
  elif how == "dtype":
    raw[17] = 9
  elif how == "float":
    raw[17] = 6
  elif how == "header":
    raw = raw[:20]
  elif how == "empty":
    raw = b""
  elif how == "idx_truncated":
    raw = raw[:-5]
  elif how == "idx_trailing":
    raw += b"\x00" * 8
  elif how == "counts":
    raw[18:26] = struct.pack("<Q", 4)
  elif how == "pointer":
    struct.pack_into("<q", raw, 34 + 12 + 8, 8)  # item 1 should start at byte 6
  elif how == "negative":
    struct.pack_into("<i", raw, 34 + 4, -2)
  elif how == "doc_idx":
    struct.pack_into("<q", raw, 34 + 36 + 8, 7)  # doc_idx[1] beyond the 3 items
  elif how == "bin_truncated":
    bin_.write_bytes(bin_.read_bytes()[:-3])
  elif how == "bin_long":
    bin_.write_bytes(bin_.read_bytes() + b"\x00\x00")
  idx.write_bytes(bytes(raw))
  return prefix


@pytest.mark.parametrize("how, message", [
    ("magic", r"d\.idx: not a binidx index: it starts with b'NOTBINIDX', expected the magic"),
    ("old_magic", r"d\.idx: an older, not memory-mapped IndexedDataset"),
    ("version", r"d\.idx: binidx version 2; only version 1"),
    ("dtype", r"d\.idx: unknown dtype code 9 \(known: 1 uint8, .*8 uint16\)"),
    ("float", r"d\.idx: dtype code 6 is a float type \(float32\)"),
    ("header", r"d\.idx: truncated index \(20 bytes, shorter than the 34-byte header\)"),
    ("empty", r"d\.idx: truncated index \(0 bytes"),
    ("idx_truncated", r"the header counts 3 items and 4 document-index entries, which take "
                      r"102 bytes, but the file has 97 bytes \(truncated"),
    ("idx_trailing", r"which take 102 bytes, but the file has 110 bytes \(trailing bytes"),
    ("counts", r"the header counts 4 items and 4 document-index entries, which take 114 "
               r"bytes, but the file has 102"),
    ("pointer", r"item 1 starts at byte 8 of the \.bin, but the items before it end at "
                r"byte 6"),
    ("negative", r"item 1 has a negative size \(-2\)"),
    ("doc_idx", r"the document index is corrupt"),
    ("bin_truncated", r"d\.bin is truncated: its index describes 9 uint16 tokens \(18 "
                      r"bytes\), the file has 15 bytes"),
    ("bin_long", r"d\.bin has 20 bytes, more than the 9 uint16 tokens \(18 bytes\)"),
])
def test_corrupt_files_are_clear_errors(tmp_path, how, message):
  prefix = _damaged(tmp_path, how)
  with pytest.raises(BinidxError, match=message):
    BinidxData(prefix, ctx_len=2, val_fraction=0.3)
  assert issubclass(BinidxError, ValueError)  # the CLIs report ValueErrors as errors


def test_finding_the_pair(tmp_path):
  write_binidx(tmp_path / "p", [[1, 2, 3]])
  for name in ("p", "p.bin", "p.idx"):
    assert find_binidx(tmp_path / name) == tmp_path / "p"
  assert find_binidx(tmp_path) is None
  (tmp_path / "t.txt").write_text("text")
  assert find_binidx(tmp_path / "t.txt") is None
  assert find_binidx(tmp_path / "nothing") is None
  (tmp_path / "p.idx").unlink()
  for name in ("p", "p.bin"):
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / 'p.idx'} not found")):
      find_binidx(tmp_path / name)
  os.replace(tmp_path / "p.bin", tmp_path / "q.idx")
  with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / 'q.bin'} not found")):
    find_binidx(tmp_path / "q.idx")
  with pytest.raises(FileNotFoundError, match=re.escape(
      f"{tmp_path / 'r.bin'} and {tmp_path / 'r.idx'} not found")):
    find_binidx(tmp_path / "r.bin")


def test_binidx_windows_and_metrics(tmp_path, rng):
  stream = rng.integers(0, 300, size=2000)
  write_binidx(tmp_path / "w", [stream[:700], stream[700:]], np.uint16)
  data = BinidxData(tmp_path / "w", ctx_len=16, val_fraction=0.1, seed=3, vocab_size=512)
  x, y, m = data.batch(5, 4)
  assert x.shape == y.shape == m.shape == (4, 16) and x.dtype == np.int32
  np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
  np.testing.assert_array_equal(x, BinidxData(tmp_path / "w.bin", ctx_len=16,
                                              val_fraction=0.1, seed=3).batch(5, 4)[0])
  assert data.val_tokens.size == 200
  for bx, by, _ in data.eval_batches(4, 8):
    for row in bx:
      assert any(np.array_equal(row, stream[1800 + s:1816 + s]) for s in range(185))
  s = data.summarize(loss_sum=np.log(2) * 10, correct=5, count=10)
  assert set(s) == {"loss", "accuracy", "bits_per_token", "perplexity"}  # no bytes
  assert s["bits_per_token"] == pytest.approx(1.0) and s["perplexity"] == pytest.approx(2.0)
  assert "2 documents, 2,000 tokens" in data.describe()
  with pytest.raises(ValueError, match=r"w\.bin holds token id \d+ >= the model's vocab"):
    BinidxData(tmp_path / "w", ctx_len=16, vocab_size=100)
  write_binidx(tmp_path / "neg", [[3, -1, 4] * 20], np.int16)
  with pytest.raises(ValueError, match=r"negative token id \(-1\)"):
    BinidxData(tmp_path / "neg", ctx_len=4)
  write_binidx(tmp_path / "none", [], np.uint16)
  with pytest.raises(ValueError, match="holds no tokens"):
    BinidxData(tmp_path / "none", ctx_len=4)


def test_fingerprint_follows_the_content_not_the_location(tmp_path):
  write_binidx(tmp_path / "a", [list(range(100))])
  fp = binidx.fingerprint(tmp_path / "a")
  (tmp_path / "moved").mkdir()
  for s in ("bin", "idx"):
    os.replace(tmp_path / f"a.{s}", tmp_path / "moved" / f"a.{s}")
  assert binidx.fingerprint(tmp_path / "moved" / "a") == fp
  write_binidx(tmp_path / "b", [list(range(1, 101))])  # same sizes, other tokens
  assert binidx.fingerprint(tmp_path / "b") != fp


# --- jsonl ---

def _jsonl(path, objects):
  path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n"
                          for o in objects))
  return path


def test_jsonl_documents(tmp_path):
  src = _jsonl(tmp_path / "d.jsonl", [{"text": "first", "body": "b1"}, "",
                                      {"text": "  ", "body": ""},
                                      {"text": "sécond", "body": "other"}])
  tokens, meta = build_token_cache(src, ByteTokenizer(), cache_dir=tmp_path / "c")
  assert bytes(np.asarray(tokens, np.uint8)) == "first\x00sécond".encode()
  assert meta["n_documents"] == 2 and meta["n_bytes"] == len("firstsécond".encode())
  tokens, meta_body = build_token_cache(src, ByteTokenizer(), cache_dir=tmp_path / "c",
                                        jsonl_field="body")
  assert bytes(np.asarray(tokens, np.uint8)) == b"b1\x00other"
  assert meta_body["fingerprint"] != meta["fingerprint"]
  folder = tmp_path / "f"
  folder.mkdir()
  (folder / "a.txt").write_text('{"text": "a plain file, not jsonl"}')
  _jsonl(folder / "b.jsonl", [{"text": "x"}, {"text": "y"}])
  tokens, meta = build_token_cache(folder, ByteTokenizer(), cache_dir=tmp_path / "c")
  assert bytes(np.asarray(tokens, np.uint8)) == b'{"text": "a plain file, not jsonl"}\x00x\x00y'
  assert sorted(os.listdir(folder)) == ["a.txt", "b.jsonl"]  # nothing written beside


@pytest.mark.parametrize("line, message", [
    ('{"text": "ok"', r"not valid JSON"),
    ("not json at all", r"not valid JSON"),
    ('["text"]', r"a JSON list, not an object with a 'text' field"),
    ('{"body": "x", "meta": 1}', r"no 'text' field \(its keys: 'body', 'meta'\); "
                                 r"--jsonl-field"),
    ('{"text": 5}', r"the 'text' field is a int, not a string"),
])
def test_jsonl_bad_lines_name_file_and_line(tmp_path, line, message):
  src = _jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, "", line])
  with pytest.raises(ValueError, match=re.escape(f"{src}, line 3: ") + message):
    TextData(src, ByteTokenizer(), 4, cache_dir=tmp_path / "c")
  with pytest.raises(ValueError, match=re.escape(f"{src}, line 3: ") + message):
    pack([src], tmp_path / "out", ByteTokenizer(), progress=False)
  assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "c"]  # no partial output


# --- the packer ---

def test_pack_text_folder_and_jsonl(tmp_path):
  corpus = tmp_path / "corpus"
  (corpus / "sub").mkdir(parents=True)
  (corpus / "a.txt").write_text("alpha")
  (corpus / "sub" / "b.txt").write_text("beta")
  (corpus / "blank.txt").write_text(" \n")
  (corpus / ".hidden").write_text("never")
  single = tmp_path / "single.txt"
  single.write_text("gamma")
  jl = _jsonl(tmp_path / "d.jsonl", [{"content": "delta"}, {"content": "epsilon"}])
  info = pack([corpus, single, jl], corpus / "packed", ByteTokenizer(),
              jsonl_field="content", progress=False)
  assert info["n_documents"] == 5 and info["dtype"] == "uint16"
  code, docs, doc_idx = ref_read(corpus / "packed")
  assert code == 8 and doc_idx == list(range(6))
  assert [bytes(d) for d in docs] == [b"alpha\x00", b"beta\x00", b"gamma\x00", b"delta\x00",
                                      b"epsilon\x00"]  # every document ends with the EOT
  with pytest.raises(FileExistsError, match="--force"):
    pack([corpus], corpus / "packed", ByteTokenizer(), progress=False)
  # repacking into the folder never reads its own output back
  info = pack([corpus], corpus / "packed.bin", ByteTokenizer(), progress=False, force=True)
  assert [bytes(d) for d in ref_read(corpus / "packed")[1]] == [b"alpha\x00", b"beta\x00"]
  assert sorted(os.listdir(corpus)) == [".hidden", "a.txt", "blank.txt", "packed.bin",
                                        "packed.idx", "sub"]
  with pytest.raises(ValueError, match="no non-whitespace text"):
    pack([corpus / "blank.txt"], tmp_path / "empty", ByteTokenizer(), progress=False)
  assert not list(tmp_path.glob("empty*")) and not list(tmp_path.glob(".empty*"))


class _BigVocab:
  vocab_size, eot_id = 70000, 69999

  def encode(self, text):
    return [69000 + ord(c) % 100 for c in text]


def test_pack_uses_int32_beyond_uint16_and_hf_tokenizers(tmp_path):
  (tmp_path / "t.txt").write_text("abc")
  pack([tmp_path / "t.txt"], tmp_path / "big", _BigVocab(), progress=False)
  assert ref_read(tmp_path / "big")[:2] == (4, [[69097, 69098, 69099, 69999]])
  tokenizers = pytest.importorskip("tokenizers")
  vocab = {"<|endoftext|>": 0, "[UNK]": 1, "hello": 2, "world": 3}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "h.txt").write_text("hello world hello")
  from rwkv_jax.cli import main

  assert main(["data", "pack", "--no-progress", "--tokenizer",
               str(tmp_path / "tokenizer.json"), str(tmp_path / "h.txt"),
               str(tmp_path / "h")]) == 0
  assert ref_read(tmp_path / "h")[:2] == (8, [[2, 3, 2, 0]])


def test_pack_cli_errors(tmp_path, capsys):
  from rwkv_jax.cli import main

  assert main(["data", "pack", "--no-progress", str(tmp_path / "missing"),
               str(tmp_path / "o")]) == 1
  assert "data pack: error: data path not found" in capsys.readouterr().err
  (tmp_path / "t.txt").write_text("text")
  assert main(["data", "pack", "--no-progress", "--encoding", "rot13",
               str(tmp_path / "t.txt"), str(tmp_path / "o")]) == 1
  assert "unknown text encoding 'rot13'" in capsys.readouterr().err
  assert main(["data", "pack", str(tmp_path / "t.txt"), str(tmp_path / "o")]) == 0
  out = capsys.readouterr()
  assert "packed 1 files: 1 documents, 5 tokens (uint16" in out.out
  assert "pack: 100%" in out.err  # the progress bar


# --- training ---

_TINY = ["--n-layer", "1", "--n-embd", "16", "--ctx-len", "16", "--batch-size", "2",
         "--wkv-impl", "scan", "--no-progress", "--eval-size", "4", "--save-every", "2",
         "--eval-every", "0", "--warmup", "0", "--schedule", "constant"]


def _losses(out):
  lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
  return [(r["step"], r["loss"]) for r in lines if "loss" in r and "step" in r]


def test_train_on_binidx_and_resume_exactly(tmp_path, rng, capsys):
  from rwkv_jax.cli import main

  docs = [rng.integers(1, 200, size=int(rng.integers(20, 80))).tolist() + [0]
          for _ in range(30)]
  ref_write(tmp_path / "corpus", docs, 8)
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  args = ["train", "--data", str(tmp_path / "corpus"), *_TINY]
  assert main([*args, "--steps", "4", "--out", str(straight)]) == 0
  out = capsys.readouterr().out
  assert "binidx, uint16" in out and "perplexity" in out and "bits_per_byte" not in out
  assert json.loads((straight / "config.json").read_text())["model"]["vocab_size"] == \
      max(max(d) for d in docs) + 1
  assert main([*args, "--steps", "2", "--out", str(resumed)]) == 0
  assert main([*args, "--steps", "4", "--out", str(resumed), "--resume"]) == 0
  assert _losses(resumed) == _losses(straight) and len(_losses(straight)) == 4
  final = [json.loads((d / "summary.json").read_text())["final_eval"]
           for d in (straight, resumed)]
  assert final[0] == final[1]
  # other tokens, same sizes: the fingerprint sees it and the resume is refused
  ref_write(tmp_path / "corpus", [[(t + 1) % 200 for t in d] for d in docs], 8)
  capsys.readouterr()
  assert main([*args, "--steps", "6", "--out", str(resumed), "--resume"]) == 1
  assert "the data changed since the checkpoint" in capsys.readouterr().err


def test_train_vocab_size_and_jsonl(tmp_path, capsys):
  from rwkv_jax.cli import main

  write_binidx(tmp_path / "c", [list(range(1, 50)) * 3 + [0]] * 4)
  out = tmp_path / "v"
  assert main(["train", "--data", str(tmp_path / "c.idx"), "--vocab-size", "300", *_TINY,
               "--steps", "1", "--out", str(out)]) == 0
  assert json.loads((out / "config.json").read_text())["model"]["vocab_size"] == 300
  assert main(["train", "--data", str(tmp_path / "c.bin"), "--vocab-size", "40", *_TINY,
               "--steps", "1", "--out", str(tmp_path / "small")]) == 1
  assert "holds token id 49 >= the model's vocabulary size 40" in capsys.readouterr().err
  jl = _jsonl(tmp_path / "d.jsonl", [{"body": "some text " * 20}] * 5)
  assert main(["train", "--data", str(jl), "--jsonl-field", "body", *_TINY, "--steps", "1",
               "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "j")]) == 0
  assert "5 documents" in capsys.readouterr().out
  assert main(["train", "--data", str(jl), *_TINY, "--steps", "1", "--cache-dir",
               str(tmp_path / "cache"), "--out", str(tmp_path / "j2")]) == 1
  assert f"{jl}, line 1: no 'text' field" in capsys.readouterr().err
