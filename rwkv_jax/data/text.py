"""Text files -> a memory-mapped token cache -> deterministic training windows.

``TextData(path, tokenizer, ctx_len, val_fraction, seed, cache_dir=None, encoding="utf-8")``:

  * ``path`` is a text file or a folder (every non-hidden file below it, sorted); each file
    is one document and documents are joined with the tokenizer's end-of-document id
    (``eot_id``; the byte tokenizer uses 0). A file ending in ``.jsonl`` holds one JSON
    object per line, each a document: its ``jsonl_field`` (default ``"text"``) string.
    Blank lines are skipped; a line that is not a JSON object or lacks the field is a
    ValueError naming the file and line number. Its documents' bytes (for bits per byte)
    are the texts' UTF-8 bytes. Blank documents (files or texts) are skipped.
  * Reading: the byte tokenizer (any tokenizer with ``encode_bytes``) takes each file's raw
    bytes, with no decoding, so every file round-trips exactly and bits per byte count the
    file's real bytes. Text tokenizers get the file decoded strictly with ``encoding``;
    undecodable input is a ValueError naming the file and byte offset. A file that looks
    binary (a NUL among its first 8 KiB: a NUL byte for the byte tokenizer, a decoded NUL
    character for a text tokenizer) is refused with a ValueError naming it by a text
    tokenizer, and tokenized with a one-line warning by the byte tokenizer (its NUL bytes
    are id 0, the same id that separates documents).
  * The token stream is cached in a cache directory, never beside the data: ``cache_dir``,
    default ``default_cache_dir()`` (``$RWKV_JAX_CACHE``, else ``$XDG_CACHE_HOME/rwkv-jax``,
    else ``~/.cache/rwkv-jax``), as ``tokens/<name>-<source hash>.<key>.tokens`` (raw
    uint16 or uint32, memory-mapped) plus ``.json`` metadata. The source hash is of the
    resolved absolute data path; the key hashes that path, the tokenizer (and its file),
    the encoding and every source file's (resolved path, size, mtime), so a changed source
    or tokenizer gets a fresh cache, and stale caches of the same source are removed (only
    files this module wrote). Both files are written to a temporary name and renamed, so a
    crash never leaves a half-written cache in use. If the cache directory cannot be
    written, the data is tokenized in memory with a one-line warning (a ValueError naming
    the directory if the data exceeds ``MAX_IN_MEMORY_BYTES``). Nothing is ever written
    into the data's folders.
  * ``TextData.fingerprint`` (checked when a run resumes) hashes the tokenizer, a text
    tokenizer's encoding (when not UTF-8) and the sources' names (relative to a data
    folder), sizes and mtimes, as in earlier versions; not the data's or the cache's
    location: a run may resume with another cache directory.
  * The last ``val_fraction`` of the stream is validation, the rest training.
  * Training window b of step s starts at a position drawn from
    ``default_rng([seed, s])``: the batch is a pure function of (seed, step), so the
    data position of a checkpoint is its step. Validation uses fixed, evenly spaced,
    non-overlapping windows of the validation part only. This sampling over a token array
    is ``TokenWindows``, which ``rwkv_jax.data.binidx.BinidxData`` shares.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import math
import os
import re
import sys
from pathlib import Path

import numpy as np

CACHE_ENV = "RWKV_JAX_CACHE"  # overrides the default cache directory
MAX_IN_MEMORY_BYTES = 2 << 30  # data larger than this needs a writable cache directory
BINARY_SNIFF_BYTES = 8192  # a NUL among the first this many bytes: the file looks binary
_FORMAT = "tokens-v2"  # part of the cache key: bump when the cache layout changes
_SUFFIX = ".tokens"
JSONL_SUFFIX = ".jsonl"  # files read as one JSON document per line
DEFAULT_JSONL_FIELD = "text"


def default_cache_dir() -> Path:
  """Where token caches go by default: ``$RWKV_JAX_CACHE`` if set, else
  ``$XDG_CACHE_HOME/rwkv-jax``, else ``~/.cache/rwkv-jax``."""
  if os.environ.get(CACHE_ENV):
    return Path(os.environ[CACHE_ENV]).expanduser()
  xdg = os.environ.get("XDG_CACHE_HOME")
  return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "rwkv-jax"


def resolve_cache_dir(cache_dir=None) -> Path:
  """The token cache directory: ``cache_dir`` if given, else ``default_cache_dir()``."""
  return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def _warn(message: str) -> None:
  print(f"rwkv-jax: warning: {message}", file=sys.stderr, flush=True)


def source_files(path) -> list[Path]:
  """``path`` itself if a file, else every non-hidden file below the folder, sorted."""
  return _source_files(Path(path))


def _source_files(path: Path) -> list[Path]:
  if not path.exists():
    raise FileNotFoundError(f"data path not found: {path}")
  if path.is_file():
    return [path]
  files = sorted(p for p in path.rglob("*") if p.is_file()
                 and not any(part.startswith(".") for part in p.relative_to(path).parts))
  if not files:
    raise ValueError(f"data folder {path} holds no files")
  return files


def _tokenizer_id(tokenizer) -> str:
  """Identifies a tokenizer for the cache key: its class, vocabulary and (for HF) file."""
  parts = [type(tokenizer).__name__, str(tokenizer.vocab_size), str(tokenizer.eot_id)]
  for probe in ("abc 123 ÿ\n", "The quick brown fox."):
    parts.append(",".join(map(str, tokenizer.encode(probe))))
  return "|".join(parts)


def _reads_bytes(tokenizer) -> bool:
  return callable(getattr(tokenizer, "encode_bytes", None))


def _encode_file(f: Path, raw: bytes, tokenizer, encoding: str) -> np.ndarray:
  """One document's ids (int64): raw bytes for a byte tokenizer, else strict decoding."""
  if _reads_bytes(tokenizer):
    nul = raw.find(b"\x00", 0, BINARY_SNIFF_BYTES)
    if nul >= 0:
      _warn(f"{f} looks binary (a NUL byte at offset {nul}); training on its raw bytes, "
            "where id 0 also ends a document")
    return np.asarray(tokenizer.encode_bytes(raw), np.int64)
  head = codecs.getincrementaldecoder(encoding)(errors="replace").decode(
      raw[:BINARY_SNIFF_BYTES])
  if "\x00" in head:
    raise ValueError(f"{f} looks binary (a NUL among its first {BINARY_SNIFF_BYTES} bytes "
                     f"as {encoding}); remove it from the data")
  try:
    text = raw.decode(encoding)
  except UnicodeDecodeError as e:
    raise ValueError(f"{f}: not valid {encoding} at byte offset {e.start} "
                     f"({raw[e.start:e.start + 4]!r}...: {e.reason}); pass the file's "
                     f"encoding, e.g. --encoding latin-1") from None
  return np.asarray(tokenizer.encode(text), np.int64)


def _jsonl_texts(f: Path, field: str, consumed=None):
  """Yields (line number, text) per non-blank line of a jsonl file; ``consumed(n)`` (if
  given) is called with each line's size in bytes."""
  with open(f, "rb") as stream:
    for number, line in enumerate(stream, 1):
      if consumed is not None:
        consumed(len(line))
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{f}, line {number}: not valid JSON ({e})") from None
      if not isinstance(obj, dict):
        raise ValueError(f"{f}, line {number}: a JSON {type(obj).__name__}, not an object "
                         f"with a {field!r} field")
      if field not in obj:
        keys = ", ".join(map(repr, list(obj)[:8])) or "none"
        raise ValueError(f"{f}, line {number}: no {field!r} field (its keys: {keys}); "
                         f"--jsonl-field names the text field")
      text = obj[field]
      if not isinstance(text, str):
        raise ValueError(f"{f}, line {number}: the {field!r} field is a "
                         f"{type(text).__name__}, not a string")
      yield number, text


def iter_documents(files, tokenizer, *, encoding: str = "utf-8",
                   jsonl_field: str = DEFAULT_JSONL_FIELD, consumed=None):
  """Yields (n_bytes, ids as int64) per non-blank document of ``files``, without
  separators: a plain file is one document (read as ``_encode_file`` does), a ``.jsonl``
  file one document per line. Ids outside the tokenizer's vocabulary are a ValueError.
  ``consumed(n)`` (if given) is called with the source bytes read, for progress bars."""
  for f in files:
    f = Path(f)
    if f.name.endswith(JSONL_SUFFIX):
      docs = _jsonl_documents(f, jsonl_field, consumed)
    else:
      raw = f.read_bytes()
      if consumed is not None:
        consumed(len(raw))
      docs = [(str(f), raw, None)]
    for where, raw, text in docs:
      if not raw.strip():
        continue
      if text is None:
        ids = _encode_file(f, raw, tokenizer, encoding)
      elif _reads_bytes(tokenizer):
        ids = np.asarray(tokenizer.encode_bytes(raw), np.int64)
      else:
        ids = np.asarray(tokenizer.encode(text), np.int64)
      if ids.size and (ids.min() < 0 or ids.max() >= tokenizer.vocab_size):
        raise ValueError(f"tokenizer produced ids outside [0, {tokenizer.vocab_size}) for "
                         f"{where}")
      yield len(raw), ids


def _jsonl_documents(f: Path, field: str, consumed):
  """(where, UTF-8 bytes, text) per non-blank jsonl line."""
  for number, text in _jsonl_texts(f, field, consumed):
    try:
      raw = text.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate escape such as "\ud800"
      raise ValueError(f"{f}, line {number}: the {field!r} text is not encodable as "
                       f"UTF-8 ({e.reason} at character {e.start})") from None
    yield f"{f}, line {number}", raw, text


def _documents(path: Path, files: list[Path], tokenizer, encoding: str, dtype,
               jsonl_field: str = DEFAULT_JSONL_FIELD):
  """Yields (n_bytes, ids as dtype) per non-blank document, EOT-separated: the EOT id is
  prepended to every document but the first."""
  n_docs = 0
  for size, ids in iter_documents(files, tokenizer, encoding=encoding,
                                  jsonl_field=jsonl_field):
    if n_docs:
      ids = np.concatenate([[tokenizer.eot_id], ids])
    n_docs += 1
    yield size, ids.astype(dtype)
  if n_docs == 0:
    raise ValueError(f"data at {path} is empty (no non-whitespace text)")


def _safe_name(path: Path) -> str:
  return re.sub(r"[^A-Za-z0-9._-]", "_", path.name)[:48] or "data"


def _tmp_name(target: Path) -> Path:
  return target.with_name(f".{target.name}.tmp{os.getpid()}")


def _atomic_write(target: Path, write) -> None:
  tmp = _tmp_name(target)
  try:
    with open(tmp, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, target)
  finally:
    if tmp.exists():
      tmp.unlink()


class _CacheUnwritable(Exception):
  def __init__(self, folder: Path, error: OSError):
    super().__init__(f"{folder}: {error.strerror or error}")
    self.folder, self.error = folder, error


def _write_cache(tokens_path: Path, meta_path: Path, docs, meta: dict) -> dict:
  """Streams the documents' tokens into ``tokens_path`` (atomically); returns the counts.
  Errors writing the cache raise _CacheUnwritable; the tokenizer's errors pass through."""
  folder = tokens_path.parent
  tmp = _tmp_name(tokens_path)
  n_tokens = n_bytes = n_docs = 0
  try:
    try:
      folder.mkdir(parents=True, exist_ok=True)
      out = open(tmp, "wb")
    except OSError as e:
      raise _CacheUnwritable(folder, e) from None
    with out:
      for size, ids in docs:
        try:
          out.write(ids.tobytes())
        except OSError as e:
          raise _CacheUnwritable(folder, e) from None
        n_tokens, n_bytes, n_docs = n_tokens + ids.size, n_bytes + size, n_docs + 1
      try:
        out.flush()
        os.fsync(out.fileno())
      except OSError as e:
        raise _CacheUnwritable(folder, e) from None
    meta.update(n_tokens=n_tokens, n_bytes=n_bytes, n_documents=n_docs)
    try:
      os.replace(tmp, tokens_path)
      _atomic_write(meta_path, lambda f: f.write(json.dumps(meta, indent=1).encode()))
    except OSError as e:
      tokens_path.unlink(missing_ok=True)
      raise _CacheUnwritable(folder, e) from None
  finally:
    try:
      tmp.unlink(missing_ok=True)
    except OSError:
      pass
  return meta


def build_token_cache(path, tokenizer, tokenizer_file=None, *, cache_dir=None,
                      encoding: str = "utf-8",
                      jsonl_field: str = DEFAULT_JSONL_FIELD) -> tuple[np.ndarray, dict]:
  """Tokenizes ``path`` once and returns (memory-mapped token array, metadata).

  ``tokenizer_file`` (the tokenizer's vocabulary file, if any) is hashed into the cache
  key, so editing it invalidates the cache too. ``cache_dir`` defaults to
  ``default_cache_dir()``; ``encoding`` is how text tokenizers decode the files (the byte
  tokenizer reads raw bytes); ``jsonl_field`` is the text field of ``.jsonl`` files (part
  of the fingerprint when there are any). Where the cache directory cannot be written, the
  tokens are returned in memory (a plain array; ``meta["cache"]`` is then None)."""
  path = Path(path).expanduser().absolute()
  files = _source_files(path)
  if tokenizer.eot_id is None:
    raise ValueError("the tokenizer has no end-of-document token; documents cannot be "
                     "separated (use a tokenizer.json with <|endoftext|>, </s> or <eos>)")
  try:
    if not getattr(codecs.lookup(encoding), "_is_text_encoding", True):
      raise LookupError
  except LookupError:
    raise ValueError(f"unknown text encoding {encoding!r}") from None
  fingerprint = [_tokenizer_id(tokenizer)]
  if tokenizer_file is not None:
    fingerprint.append(hashlib.sha256(Path(tokenizer_file).read_bytes()).hexdigest())
  identity, total = [_FORMAT, str(path.resolve())], 0
  for f in files:
    st = f.stat()
    total += st.st_size
    fingerprint.append(f"{f.relative_to(path) if path.is_dir() else f.name}:{st.st_size}:"
                       f"{st.st_mtime_ns}")
    identity.append(str(f.resolve()))
  if not _reads_bytes(tokenizer) and codecs.lookup(encoding).name != "utf-8":
    fingerprint.append(f"encoding:{codecs.lookup(encoding).name}")
  if any(f.name.endswith(JSONL_SUFFIX) for f in files):  # jsonl: one document per line
    fingerprint.append(f"jsonl-field:{jsonl_field}")
  data_fingerprint = hashlib.sha256("\n".join(fingerprint).encode()).hexdigest()[:16]
  key = hashlib.sha256("\n".join(fingerprint + identity).encode()).hexdigest()[:16]
  root = resolve_cache_dir(cache_dir)
  stem = f"{_safe_name(path)}-{hashlib.sha256(identity[1].encode()).hexdigest()[:12]}."
  tokens_path = root / "tokens" / f"{stem}{key}{_SUFFIX}"
  meta_path = tokens_path.with_suffix(".json")
  try:
    meta = json.loads(meta_path.read_text())
    dtype = np.dtype(meta["dtype"])
    if tokens_path.stat().st_size == meta["n_tokens"] * dtype.itemsize:
      return np.memmap(tokens_path, dtype=dtype, mode="r"), dict(meta, cache=str(tokens_path))
  except (OSError, ValueError, KeyError, TypeError):
    pass  # no cache (or an unreadable one): build it

  dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32)
  meta = {"source": str(path), "key": key, "fingerprint": data_fingerprint,
          "dtype": dtype.name,
          "encoding": None if _reads_bytes(tokenizer) else encoding,  # None: raw bytes
          "vocab_size": int(tokenizer.vocab_size), "eot_id": int(tokenizer.eot_id)}
  try:
    meta = _write_cache(tokens_path, meta_path,
                        _documents(path, files, tokenizer, encoding, dtype, jsonl_field),
                        meta)
  except _CacheUnwritable as e:
    if total > MAX_IN_MEMORY_BYTES:
      raise ValueError(
          f"cannot write the token cache in {e.folder} ({e.error.strerror or e.error}) and "
          f"the data ({total / 2**30:.1f} GiB) is too large to tokenize in memory; pass "
          f"--cache-dir (or set {CACHE_ENV}) to a writable directory") from None
    _warn(f"cannot write the token cache in {e.folder} ({e.error.strerror or e.error}); "
          f"tokenizing in memory for this run (--cache-dir or {CACHE_ENV} sets the cache)")
    docs = list(_documents(path, files, tokenizer, encoding, dtype, jsonl_field))
    tokens = np.concatenate([ids for _, ids in docs])
    meta.update(n_tokens=int(tokens.size), n_bytes=sum(n for n, _ in docs),
                n_documents=len(docs))
    return tokens, dict(meta, cache=None)
  for old in tokens_path.parent.glob(f"{stem}*{_SUFFIX}"):  # stale caches of this source
    if old != tokens_path and len(old.name) == len(tokens_path.name):
      try:
        old.unlink(missing_ok=True)
        old.with_suffix(".json").unlink(missing_ok=True)
      except OSError:
        pass
  return np.memmap(tokens_path, dtype=dtype, mode="r"), dict(meta, cache=str(tokens_path))


class TokenWindows:
  """Train / validation windows of ``ctx_len + 1`` tokens over one token array.

  The last ``val_fraction`` of ``tokens`` is validation, the rest training. Training window
  b of step s starts at a position drawn from ``default_rng([seed, s])`` (a batch is a pure
  function of (seed, step)); validation uses fixed, evenly spaced, non-overlapping windows
  of the validation part. ``vocab_size`` None means the largest id + 1. Subclasses set
  ``fingerprint`` and ``describe``; ``bytes_per_token`` (None when unknown) gives bits per
  byte in ``summarize``."""

  bytes_per_token: float | None = None

  def __init__(self, tokens: np.ndarray, ctx_len: int, *, val_fraction: float, seed: int,
               vocab_size: int | None, source):
    self.tokens = tokens
    self.ctx_len, self.seed = int(ctx_len), int(seed)
    n = self.tokens.size
    if n and np.issubdtype(self.tokens.dtype, np.signedinteger):
      low = int(self.tokens.min())
      if low < 0:
        raise ValueError(f"data at {source} holds a negative token id ({low})")
    top = int(self.tokens.max()) if n else -1
    self.vocab_size = int(vocab_size) if vocab_size else top + 1
    if top >= self.vocab_size:
      raise ValueError(f"data at {source} holds token id {top} >= the model's vocabulary "
                       f"size {self.vocab_size}")
    n_val = int(n * val_fraction)
    need = self.ctx_len + 1
    if n - n_val < need or n_val < need:
      raise ValueError(
          f"data at {source} has {n} tokens: too short for windows of ctx_len + 1 = {need} "
          f"tokens in both the training ({n - n_val}) and validation ({n_val}) parts; "
          f"use more data or a smaller --ctx-len")
    self.train_tokens = self.tokens[:n - n_val]
    self.val_tokens = self.tokens[n - n_val:]

  def _windows(self, source: np.ndarray, starts: np.ndarray):
    idx = starts[:, None] + np.arange(self.ctx_len + 1)[None]
    win = np.asarray(source[idx], np.int32)  # B T+1
    return win[:, :-1], win[:, 1:], np.ones(win[:, 1:].shape, np.float32)

  def batch(self, step: int, batch_size: int):
    """Training batch ``step``: (inputs, targets, mask), each (B, ctx_len)."""
    rng = np.random.default_rng([self.seed, int(step)])
    starts = rng.integers(0, self.train_tokens.size - self.ctx_len, size=batch_size)
    return self._windows(self.train_tokens, starts)

  def eval_batches(self, batch_size: int, max_windows: int):
    """Fixed validation batches: evenly spaced non-overlapping windows (at most
    max_windows, rounded down to whole batches, at least one batch)."""
    n_fit = (self.val_tokens.size - 1) // self.ctx_len
    n = max(min(n_fit, max_windows) // batch_size, 1) * batch_size
    starts = np.linspace(0, self.val_tokens.size - self.ctx_len - 1, n).astype(np.int64)
    for i in range(0, n, batch_size):
      yield self._windows(self.val_tokens, starts[i:i + batch_size])

  def summarize(self, loss_sum: float, correct: float, count: float) -> dict[str, float]:
    """Validation metrics from summed token losses (nats): loss, accuracy, bits per token,
    and bits per byte (using the corpus's mean bytes per token) where bytes are known."""
    loss = loss_sum / count
    out = {"loss": loss, "accuracy": correct / count, "bits_per_token": loss / math.log(2)}
    if self.bytes_per_token is not None:
      out["bits_per_byte"] = loss / math.log(2) / self.bytes_per_token
    return out


class TextData(TokenWindows):
  """Train / validation windows of ``ctx_len + 1`` tokens over a cached token stream."""

  def __init__(self, path, tokenizer, ctx_len: int, *, val_fraction: float = 0.05,
               seed: int = 0, vocab_size: int | None = None, tokenizer_file=None,
               cache_dir=None, encoding: str = "utf-8",
               jsonl_field: str = DEFAULT_JSONL_FIELD):
    tokens, self.meta = build_token_cache(path, tokenizer, tokenizer_file,
                                          cache_dir=cache_dir, encoding=encoding,
                                          jsonl_field=jsonl_field)
    super().__init__(tokens, ctx_len, val_fraction=val_fraction, seed=seed,
                     vocab_size=vocab_size or tokenizer.vocab_size, source=path)
    self.bytes_per_token = self.meta["n_bytes"] / self.tokens.size
    self.fingerprint = self.meta["fingerprint"]  # independent of the cache location

  def describe(self) -> str:
    m = self.meta
    return (f"{m['source']}: {m['n_documents']} documents, {m['n_tokens']:,} tokens "
            f"({m['n_bytes']:,} bytes), {self.train_tokens.size:,} train / "
            f"{self.val_tokens.size:,} validation; "
            + (f"token cache {m['cache']}" if m["cache"] else "tokenized in memory"))
