"""binidx: the Megatron / GPT-NeoX memory-mapped indexed dataset that RWKV-LM trains on.

A dataset is two files, ``PREFIX.bin`` (the token ids of every document, back to back, in
one integer dtype) and ``PREFIX.idx``. The index layout (GPT-NeoX
``megatron/data/indexed_dataset.py``, ``MMapIndexedDataset.Index``; RWKV-LM's
``src/binidx.py`` is a copy), all little-endian::

    magic      9 bytes   b"MMIDIDX\\x00\\x00"
    version    uint64    1
    dtype      uint8     code: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float32
                         (GPT-NeoX; Python float = float64 in RWKV-LM's copy),
                         7 float64, 8 uint16
    n_items    uint64    number of items (sequences)
    n_doc_idx  uint64    entries of the document index (documents + 1)
    sizes      int32[n_items]     tokens per item
    pointers   int64[n_items]     byte offset of each item in the .bin
    doc_idx    int64[n_doc_idx]   first item of each document, starting with 0 and ending
                                  with n_items (the builder's end_document)

Their builders write the items contiguously, so ``pointers`` are the running byte sums of
``sizes`` and the .bin is exactly ``sum(sizes) * itemsize`` bytes; RWKV-LM trains on the
.bin as one flat token stream (``data.get(idx=0, offset=i, length=n)``), and so does
``BinidxData`` here. ``read_index`` checks all of that (magic, version, dtype code, the
index length implied by the counts, sizes, pointers, the document index and the .bin's
length) and names what is wrong in a ``BinidxError`` (a ValueError). Float dtypes (codes 6
and 7) are refused: token ids are integers.

Document ends. RWKV-LM's ``make_data.py`` appends the end-of-document id 0 to every
document (``out.append(0)``) and GPT-NeoX's ``preprocess_data.py --append-eod`` appends
the tokenizer's EOD, so a binidx stream already carries its separators: ``BinidxData``
reads the stored stream as it is and inserts nothing. ``write_binidx`` / ``pack`` follow
the same convention (every document ends with the tokenizer's ``eot_id``), one item and
one document-index entry per document, uint16 when the vocabulary fits (<= 65536 ids, as
RWKV-LM's World data) else int32.

There are no raw bytes in a binidx dataset, so validation reports loss, accuracy, bits per
token and perplexity, not bits per byte. The vocabulary is the model's (``--vocab-size``,
the resumed or ``--init-from`` model, or the ``--tokenizer``'s), else the largest id + 1.
"""

from __future__ import annotations

import codecs
import hashlib
import math
import os
import struct
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rwkv_jax.data.text import (DEFAULT_JSONL_FIELD, TokenWindows, iter_documents,
                                source_files)

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, n_items, n_doc_idx: 34 B
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float32,
          7: np.float64, 8: np.uint16}
_OLD_MAGIC = b"TNTIDX\x00\x00"  # fairseq's older, not memory-mapped IndexedDataset
_CHUNK = 1 << 22  # index entries checked / written per step (bounded memory)
_SAMPLE_BLOCKS, _SAMPLE_BYTES = 64, 4096  # .bin blocks hashed into the fingerprint


class BinidxError(ValueError):
  """A binidx dataset that is corrupt, truncated or not binidx at all."""


def dtype_code(dtype) -> int:
  """The index's dtype code of a NumPy integer dtype."""
  dtype = np.dtype(dtype)
  for code, candidate in DTYPES.items():
    if np.dtype(candidate) == dtype:
      return code
  raise ValueError(f"binidx cannot store {dtype}")


def token_dtype(vocab_size: int) -> np.dtype:
  """uint16 when every id fits (vocab <= 65536), else int32."""
  return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.int32)


def binidx_paths(prefix) -> tuple[Path, Path]:
  """(PREFIX.bin, PREFIX.idx)."""
  prefix = str(prefix)
  return Path(prefix + ".bin"), Path(prefix + ".idx")


def find_binidx(path) -> Path | None:
  """The prefix of the binidx dataset that ``path`` names (``PREFIX`` with PREFIX.bin and
  PREFIX.idx beside it, ``PREFIX.bin`` or ``PREFIX.idx``), or None when it names none (a
  folder, or an existing file that is not .bin/.idx). One file of the pair without the
  other is a FileNotFoundError naming the missing one."""
  p = Path(path).expanduser()
  if p.is_dir():
    return None
  named = p.suffix in (".bin", ".idx")
  if not named and p.exists():
    return None  # a text or jsonl file
  prefix = p.with_suffix("") if named else p
  bin_path, idx_path = binidx_paths(prefix)
  if bin_path.is_file() and idx_path.is_file():
    return prefix
  if named or bin_path.exists() or idx_path.exists():
    missing = " and ".join(str(f) for f in (bin_path, idx_path) if not f.is_file())
    raise FileNotFoundError(f"binidx data {prefix}: {missing} not found (a binidx dataset "
                            f"is the pair PREFIX.bin + PREFIX.idx)")
  return None


@dataclass
class BinidxIndex:
  """A checked ``.idx``: the token dtype and its arrays (read-only, memory-mapped)."""

  path: Path
  dtype: np.dtype
  sizes: np.ndarray  # int32 [n_items]
  pointers: np.ndarray  # int64 [n_items]
  doc_idx: np.ndarray  # int64 [n_documents + 1]
  n_tokens: int

  @property
  def n_documents(self) -> int:
    return max(len(self.doc_idx) - 1, 0)

  def document_bounds(self, i: int) -> tuple[int, int]:
    """Token range [start, stop) of document ``i`` in the flat stream."""
    first, last = int(self.doc_idx[i]), int(self.doc_idx[i + 1])
    itemsize = self.dtype.itemsize
    start = int(self.pointers[first]) // itemsize if first < len(self.sizes) else self.n_tokens
    stop = int(self.pointers[last]) // itemsize if last < len(self.sizes) else self.n_tokens
    return start, stop


def _array(path: Path, dtype, offset: int, count: int) -> np.ndarray:
  if count == 0:
    return np.zeros(0, dtype)
  return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,))


def read_index(idx_path, bin_path=None) -> BinidxIndex:
  """Reads and checks a ``.idx`` (and, given ``bin_path``, the ``.bin``'s length).
  Raises BinidxError naming the file and what is wrong."""
  idx_path = Path(idx_path)
  size = idx_path.stat().st_size
  with open(idx_path, "rb") as f:
    head = f.read(HEADER.size)
  if head[:len(_OLD_MAGIC)] == _OLD_MAGIC:
    raise BinidxError(f"{idx_path}: an older, not memory-mapped IndexedDataset index "
                      f"(magic {_OLD_MAGIC!r}); rebuild it as mmap binidx (GPT-NeoX "
                      f"--dataset-impl mmap, or rwkv-jax data pack)")
  if head[:len(MAGIC)] != MAGIC and not MAGIC.startswith(head):
    raise BinidxError(f"{idx_path}: not a binidx index: it starts with {head[:9]!r}, "
                      f"expected the magic {MAGIC!r}")
  if len(head) < HEADER.size:
    raise BinidxError(f"{idx_path}: truncated index ({size} bytes, shorter than the "
                      f"{HEADER.size}-byte header)")
  _, version, code, n_items, n_doc = HEADER.unpack(head)
  if version != VERSION:
    raise BinidxError(f"{idx_path}: binidx version {version}; only version {VERSION} "
                      f"(MMapIndexedDataset) is known")
  if code not in DTYPES:
    raise BinidxError(f"{idx_path}: unknown dtype code {code} (known: "
                      + ", ".join(f"{c} {np.dtype(t).name}" for c, t in DTYPES.items()) + ")")
  dtype = np.dtype(DTYPES[code])
  if dtype.kind == "f":
    raise BinidxError(f"{idx_path}: dtype code {code} is a float type ({dtype.name}); token "
                      f"ids must be integers")
  expected = HEADER.size + 4 * n_items + 8 * n_items + 8 * n_doc
  if size != expected:
    raise BinidxError(
        f"{idx_path}: the header counts {n_items} items and {n_doc} document-index entries, "
        f"which take {expected} bytes, but the file has {size} bytes ("
        + ("truncated" if size < expected else "trailing bytes") + "; a corrupt index)")
  sizes = _array(idx_path, np.int32, HEADER.size, n_items)
  pointers = _array(idx_path, np.int64, HEADER.size + 4 * n_items, n_items)
  doc_idx = _array(idx_path, np.int64, HEADER.size + 12 * n_items, n_doc)
  n_tokens = 0
  for a in range(0, n_items, _CHUNK):  # sizes >= 0, items back to back from byte 0
    s = np.asarray(sizes[a:a + _CHUNK], np.int64)
    if (s < 0).any():
      i = a + int(np.argmax(s < 0))
      raise BinidxError(f"{idx_path}: item {i} has a negative size ({int(sizes[i])})")
    ends = n_tokens + np.cumsum(s)
    want = (ends - s) * dtype.itemsize
    bad = np.flatnonzero(np.asarray(pointers[a:a + _CHUNK]) != want)
    if bad.size:
      i = a + int(bad[0])
      raise BinidxError(f"{idx_path}: item {i} starts at byte {int(pointers[i])} of the .bin, "
                        f"but the items before it end at byte {int(want[bad[0]])}: a "
                        f"corrupt index, or items not stored back to back")
    n_tokens = int(ends[-1])
  if n_doc == 0 or doc_idx[0] != 0:
    raise BinidxError(f"{idx_path}: the document index must start with item 0 (has "
                      + (f"{int(doc_idx[0])})" if n_doc else "no entries)"))
  for a in range(0, n_doc, _CHUNK):
    d = np.asarray(doc_idx[max(a - 1, 0):a + _CHUNK])
    bad = np.flatnonzero((np.diff(d) < 0) | (d[1:] > n_items))
    if bad.size or d[0] > n_items:
      raise BinidxError(f"{idx_path}: the document index is corrupt (entries must rise from "
                        f"0 to at most the {n_items} items)")
  if bin_path is not None:
    bin_path = Path(bin_path)
    have, need = bin_path.stat().st_size, n_tokens * dtype.itemsize
    if have < need:
      raise BinidxError(f"{bin_path} is truncated: its index describes {n_tokens:,} "
                        f"{dtype.name} tokens ({need:,} bytes), the file has {have:,} bytes")
    if have > need:
      raise BinidxError(f"{bin_path} has {have:,} bytes, more than the {n_tokens:,} "
                        f"{dtype.name} tokens ({need:,} bytes) its index {idx_path} "
                        f"describes: the .bin and .idx do not belong together")
  return BinidxIndex(idx_path, dtype, sizes, pointers, doc_idx, n_tokens)


def open_binidx(path) -> tuple[np.ndarray, BinidxIndex, Path]:
  """(the flat token stream, memory-mapped read-only; the checked index; the prefix)."""
  prefix = find_binidx(path)
  if prefix is None:
    raise FileNotFoundError(f"no binidx dataset at {path} (PREFIX.bin + PREFIX.idx)")
  bin_path, idx_path = binidx_paths(prefix)
  index = read_index(idx_path, bin_path)
  return _array(bin_path, index.dtype, 0, index.n_tokens), index, prefix


def read_documents(path) -> list[np.ndarray]:
  """Every document of a binidx dataset (views of the memory-mapped stream)."""
  tokens, index, _ = open_binidx(path)
  return [tokens[slice(*index.document_bounds(i))] for i in range(index.n_documents)]


def fingerprint(prefix) -> str:
  """Identifies a binidx dataset's content, wherever it lies: a hash of the whole .idx, the
  .bin's length and 64 evenly spaced 4 KiB blocks of the .bin."""
  bin_path, idx_path = binidx_paths(prefix)
  h = hashlib.sha256(b"binidx-v1\n")
  with open(idx_path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  size = bin_path.stat().st_size
  h.update(f"\n{size}\n".encode())
  with open(bin_path, "rb") as f:
    for k in range(_SAMPLE_BLOCKS):
      f.seek(size * k // _SAMPLE_BLOCKS)
      h.update(f.read(_SAMPLE_BYTES))
  return hashlib.sha256(h.digest()).hexdigest()[:16]


class BinidxWriter:
  """Writes ``PREFIX.bin`` + ``PREFIX.idx``, each ``add``ed array one item and one document.

  Both files are written under temporary names beside the target and renamed on ``close``
  (the .bin, then the .idx); an error inside ``with BinidxWriter(...)`` removes them and
  leaves any earlier dataset untouched."""

  def __init__(self, prefix, dtype):
    self.prefix = Path(prefix)
    self.dtype = np.dtype(dtype)
    self.code = dtype_code(self.dtype)
    self.bin_path, self.idx_path = binidx_paths(self.prefix)
    self._tmp = [p.with_name(f".{p.name}.tmp{os.getpid()}")
                 for p in (self.bin_path, self.idx_path)]
    self._sizes = array("i")
    self.n_tokens = 0
    self._bin = open(self._tmp[0], "wb")

  @property
  def n_documents(self) -> int:
    return len(self._sizes)

  def add(self, ids) -> None:
    """Appends one document (its ids, already in range of the dtype)."""
    ids = np.asarray(ids)
    if ids.size >= 1 << 31:
      raise ValueError(f"a document of {ids.size} tokens is beyond binidx's int32 sizes")
    self._bin.write(np.ascontiguousarray(ids, self.dtype).tobytes())
    self._sizes.append(int(ids.size))
    self.n_tokens += int(ids.size)

  def close(self) -> None:
    self._bin.flush()
    os.fsync(self._bin.fileno())
    self._bin.close()
    n = len(self._sizes)
    sizes = np.frombuffer(self._sizes, np.int32) if n else np.zeros(0, np.int32)
    with open(self._tmp[1], "wb") as f:
      f.write(HEADER.pack(MAGIC, VERSION, self.code, n, n + 1))
      f.write(sizes.astype("<i4").tobytes())
      offset = 0
      for a in range(0, n, _CHUNK):
        s = sizes[a:a + _CHUNK].astype(np.int64)
        ends = offset + np.cumsum(s)
        f.write(((ends - s) * self.dtype.itemsize).astype("<i8").tobytes())
        offset = int(ends[-1])
      f.write(np.arange(n + 1, dtype="<i8").tobytes())
      f.flush()
      os.fsync(f.fileno())
    os.replace(self._tmp[0], self.bin_path)
    os.replace(self._tmp[1], self.idx_path)

  def abort(self) -> None:
    self._bin.close()
    for tmp in self._tmp:
      tmp.unlink(missing_ok=True)

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    if exc_type is None:
      try:
        self.close()
      except BaseException:
        self.abort()
        raise
    else:
      self.abort()


def write_binidx(prefix, documents, dtype=np.uint16) -> None:
  """Writes ``documents`` (arrays of ids, stored as given) as ``PREFIX.bin/.idx``."""
  with BinidxWriter(prefix, dtype) as w:
    for ids in documents:
      w.add(ids)


def output_prefix(out) -> Path:
  """OUT_PREFIX, with a trailing .bin / .idx dropped."""
  out = Path(out).expanduser()
  return out.with_suffix("") if out.suffix in (".bin", ".idx") else out


def pack(inputs, out, tokenizer, *, encoding: str = "utf-8",
         jsonl_field: str = DEFAULT_JSONL_FIELD, progress: bool = True,
         force: bool = False) -> dict:
  """Tokenizes text files, folders (every non-hidden file below them) and ``.jsonl`` files
  (one document per line) into the binidx dataset ``out`` (a prefix): every non-blank
  document is one item, terminated by the tokenizer's ``eot_id``; uint16 when the
  vocabulary fits, else int32. Only ``OUT.bin`` / ``OUT.idx`` are written (atomically;
  an existing pair only with ``force``). Returns the counts."""
  from rwkv_jax.training.metrics import progress_bar_class

  prefix = output_prefix(out)
  bin_path, idx_path = binidx_paths(prefix)
  if not force and (bin_path.exists() or idx_path.exists()):
    raise FileExistsError(f"{bin_path if bin_path.exists() else idx_path} exists; pass "
                          f"--force to replace it")
  if tokenizer.eot_id is None:
    raise ValueError("the tokenizer has no end-of-document token; documents cannot be "
                     "terminated (use a tokenizer.json with <|endoftext|>, </s> or <eos>)")
  if not inputs:
    raise ValueError("nothing to pack: name at least one input file or folder")
  try:
    if not getattr(codecs.lookup(encoding), "_is_text_encoding", True):
      raise LookupError
  except LookupError:
    raise ValueError(f"unknown text encoding {encoding!r}") from None
  outputs = {bin_path.resolve(), idx_path.resolve()}
  files, seen = [], set()
  for name in inputs:
    for f in source_files(Path(name).expanduser()):
      key = f.resolve()
      if key not in outputs and key not in seen:  # never read our own output back
        seen.add(key)
        files.append(f)
  if not files:
    raise ValueError(f"nothing to pack in {', '.join(map(str, inputs))}")
  dtype = token_dtype(tokenizer.vocab_size)
  eot = np.asarray([tokenizer.eot_id], np.int64)
  prefix.parent.mkdir(parents=True, exist_ok=True)
  n_bytes = 0
  bar = progress_bar_class()(total=sum(f.stat().st_size for f in files), unit="B",
                             unit_scale=True, disable=not progress, desc="pack",
                             dynamic_ncols=True)
  try:
    with BinidxWriter(prefix, dtype) as w:
      for size, ids in iter_documents(files, tokenizer, encoding=encoding,
                                      jsonl_field=jsonl_field, consumed=bar.update):
        w.add(np.concatenate([ids, eot]).astype(dtype))
        n_bytes += size
      if w.n_documents == 0:
        raise ValueError(f"nothing to pack: {', '.join(map(str, inputs))} hold no "
                         f"non-whitespace text")
  finally:
    bar.close()
  return {"prefix": str(prefix), "bin": str(bin_path), "idx": str(idx_path),
          "n_files": len(files), "n_documents": w.n_documents, "n_tokens": w.n_tokens,
          "n_bytes": n_bytes, "dtype": dtype.name, "vocab_size": int(tokenizer.vocab_size),
          "eot_id": int(tokenizer.eot_id)}


class BinidxData(TokenWindows):
  """Train / validation windows over a binidx dataset's flat token stream (memory-mapped,
  read-only; the stored stream as it is, its documents already ending with their
  end-of-document ids). ``path`` is PREFIX, PREFIX.bin or PREFIX.idx; ``vocab_size`` None
  means the largest id + 1."""

  def __init__(self, path, ctx_len: int, *, val_fraction: float = 0.05, seed: int = 0,
               vocab_size: int | None = None):
    tokens, self.index, self.prefix = open_binidx(path)
    if self.index.n_tokens == 0:
      raise ValueError(f"binidx data {self.prefix} holds no tokens")
    super().__init__(tokens, ctx_len, val_fraction=val_fraction, seed=seed,
                     vocab_size=vocab_size, source=f"{self.prefix}.bin")
    self.fingerprint = fingerprint(self.prefix)
    self.meta = {"source": str(self.prefix), "format": "binidx", "dtype": self.index.dtype.name,
                 "n_tokens": self.index.n_tokens, "n_documents": self.index.n_documents,
                 "fingerprint": self.fingerprint}

  def describe(self) -> str:
    return (f"{self.prefix}.bin/.idx (binidx, {self.index.dtype.name}, memory-mapped): "
            f"{self.index.n_documents:,} documents, {self.index.n_tokens:,} tokens, "
            f"{self.train_tokens.size:,} train / {self.val_tokens.size:,} validation; "
            f"vocabulary {self.vocab_size}")

  def summarize(self, loss_sum: float, correct: float, count: float) -> dict[str, float]:
    """Loss, accuracy, bits per token and perplexity (no bits per byte: binidx holds no
    raw bytes)."""
    out = super().summarize(loss_sum, correct, count)
    out["perplexity"] = math.exp(min(out["loss"], 700.0))
    return out
