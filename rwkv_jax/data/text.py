"""Text files -> a memory-mapped token cache -> deterministic training windows.

``TextData(path, tokenizer, ctx_len, val_fraction, seed)``:

  * ``path`` is a text file or a folder (every non-hidden file below it, sorted, read as
    UTF-8); each file is one document and documents are joined with the tokenizer's
    end-of-document id (``eot_id``; the byte tokenizer uses 0).
  * The token stream is cached beside the data as ``<file>.<key>.tokens`` (raw uint16 or
    uint32) plus ``.json`` metadata, or ``<folder>/.rwkv-jax-cache/<key>.tokens`` for a
    folder. The key hashes the tokenizer (and its file) and every source file's (path,
    size, mtime), so a changed source or tokenizer gets a fresh cache; stale caches of
    the same source are removed (only files this module wrote). Both files are written to a temporary name and
    renamed, so a crash never leaves a half-written cache in use.
  * The last ``val_fraction`` of the stream is validation, the rest training.
  * Training window b of step s starts at a position drawn from
    ``default_rng([seed, s])``: the batch is a pure function of (seed, step), so the
    data position of a checkpoint is its step. Validation uses fixed, evenly spaced,
    non-overlapping windows of the validation part only.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np

CACHE_DIR = ".rwkv-jax-cache"
_SUFFIX = ".tokens"


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


def _cache_paths(path: Path, key: str) -> tuple[Path, Path, str]:
  if path.is_file():
    stem = path.name + "."
    folder = path.parent
  else:
    stem = ""
    folder = path / CACHE_DIR
  return folder / f"{stem}{key}{_SUFFIX}", folder / f"{stem}{key}.json", stem


def _atomic_write(target: Path, write) -> None:
  tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
  try:
    with open(tmp, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, target)
  finally:
    if tmp.exists():
      tmp.unlink()


def build_token_cache(path, tokenizer, tokenizer_file=None) -> tuple[np.ndarray, dict]:
  """Tokenizes ``path`` once and returns (memory-mapped token array, metadata).

  ``tokenizer_file`` (the tokenizer's vocabulary file, if any) is hashed into the cache
  key, so editing it invalidates the cache too."""
  path = Path(path).absolute()
  files = _source_files(path)
  if tokenizer.eot_id is None:
    raise ValueError("the tokenizer has no end-of-document token; documents cannot be "
                     "separated (use a tokenizer.json with <|endoftext|>, </s> or <eos>)")
  fingerprint = [_tokenizer_id(tokenizer)]
  if tokenizer_file is not None:
    fingerprint.append(hashlib.sha256(Path(tokenizer_file).read_bytes()).hexdigest())
  for f in files:
    st = f.stat()
    fingerprint.append(f"{f.relative_to(path) if path.is_dir() else f.name}:{st.st_size}:"
                       f"{st.st_mtime_ns}")
  key = hashlib.sha256("\n".join(fingerprint).encode()).hexdigest()[:16]
  tokens_path, meta_path, stem = _cache_paths(path, key)
  if tokens_path.exists() and meta_path.exists():
    meta = json.loads(meta_path.read_text())
    dtype = np.dtype(meta["dtype"])
    if tokens_path.stat().st_size == meta["n_tokens"] * dtype.itemsize:
      return np.memmap(tokens_path, dtype=dtype, mode="r"), meta

  dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32)
  pieces, n_bytes, n_docs = [], 0, 0
  for f in files:
    raw = f.read_bytes()
    if not raw.strip():
      continue
    text = raw.decode("utf-8", errors="replace")
    ids = np.asarray(tokenizer.encode(text), np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= tokenizer.vocab_size):
      raise ValueError(f"tokenizer produced ids outside [0, {tokenizer.vocab_size}) for {f}")
    if n_docs:
      pieces.append(np.asarray([tokenizer.eot_id], np.int64))
    pieces.append(ids)
    n_bytes += len(raw)
    n_docs += 1
  if n_docs == 0:
    raise ValueError(f"data at {path} is empty (no non-whitespace text)")
  tokens = np.concatenate(pieces).astype(dtype)
  meta = {"source": str(path), "key": key, "dtype": dtype.name, "n_tokens": int(tokens.size),
          "n_bytes": int(n_bytes), "n_documents": n_docs,
          "vocab_size": int(tokenizer.vocab_size), "eot_id": int(tokenizer.eot_id)}
  tokens_path.parent.mkdir(parents=True, exist_ok=True)
  _atomic_write(tokens_path, lambda f: f.write(tokens.tobytes()))
  _atomic_write(meta_path, lambda f: f.write(json.dumps(meta, indent=1).encode()))
  for old in tokens_path.parent.glob(f"{stem}*{_SUFFIX}"):  # stale caches of this source
    if old != tokens_path and len(old.name) == len(tokens_path.name):
      old.unlink(missing_ok=True)
      old.with_suffix(".json").unlink(missing_ok=True)
  return np.memmap(tokens_path, dtype=dtype, mode="r"), meta


class TextData:
  """Train / validation windows of ``ctx_len + 1`` tokens over a cached token stream."""

  def __init__(self, path, tokenizer, ctx_len: int, *, val_fraction: float = 0.05,
               seed: int = 0, vocab_size: int | None = None, tokenizer_file=None):
    self.tokens, self.meta = build_token_cache(path, tokenizer, tokenizer_file)
    self.ctx_len, self.seed = int(ctx_len), int(seed)
    self.vocab_size = int(vocab_size or tokenizer.vocab_size)
    top = int(self.tokens.max())
    if top >= self.vocab_size:
      raise ValueError(f"data at {path} holds token id {top} >= the model's vocabulary "
                       f"size {self.vocab_size}")
    n = self.tokens.size
    n_val = int(n * val_fraction)
    need = self.ctx_len + 1
    if n - n_val < need or n_val < need:
      raise ValueError(
          f"data at {path} has {n} tokens: too short for windows of ctx_len + 1 = {need} "
          f"tokens in both the training ({n - n_val}) and validation ({n_val}) parts; "
          f"use more data or a smaller --ctx-len")
    self.train_tokens = self.tokens[:n - n_val]
    self.val_tokens = self.tokens[n - n_val:]
    self.bytes_per_token = self.meta["n_bytes"] / n
    self.fingerprint = self.meta["key"]

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

  def describe(self) -> str:
    m = self.meta
    return (f"{m['source']}: {m['n_documents']} documents, {m['n_tokens']:,} tokens "
            f"({m['n_bytes']:,} bytes), {self.train_tokens.size:,} train / "
            f"{self.val_tokens.size:,} validation")

  def summarize(self, loss_sum: float, correct: float, count: float) -> dict[str, float]:
    """Validation metrics from summed token losses (nats): loss, accuracy, bits per token,
    bits per byte (using the corpus's mean bytes per token)."""
    loss = loss_sum / count
    return {"loss": loss, "accuracy": correct / count, "bits_per_token": loss / math.log(2),
            "bits_per_byte": loss / math.log(2) / self.bytes_per_token}
