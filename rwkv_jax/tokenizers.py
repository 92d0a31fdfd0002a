"""Tokenizers behind one small interface: ``encode(str) -> list[int]``, ``decode(list[int])
-> str``, ``vocab_size``, and ``eot_id`` (the end-of-document id, or None)."""

from __future__ import annotations

import os
from typing import Protocol


class Tokenizer(Protocol):
  vocab_size: int
  eot_id: int | None

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
  """UTF-8 bytes, ids 0..255; id 0 (NUL, absent from text) separates documents."""

  vocab_size = 256
  eot_id = 0

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids: list[int]) -> str:
    bad = [i for i in ids if not 0 <= int(i) < 256]
    if bad:
      raise ValueError(f"byte tokenizer: ids {bad[:5]} are outside [0, 256)")
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class HFTokenizer:
  """Any Hugging Face ``tokenizer.json`` through the tokenizers library."""

  def __init__(self, path: str | os.PathLike):
    from tokenizers import Tokenizer as _Tok  # optional dependency, imported on use

    if not os.path.isfile(path):
      raise FileNotFoundError(f"tokenizer file not found: {path}")
    self._tok = _Tok.from_file(str(path))
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    self.eot_id = next((self._tok.token_to_id(t) for t in ("<|endoftext|>", "</s>", "<eos>")
                        if self._tok.token_to_id(t) is not None), None)

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: list[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(spec: str | os.PathLike | None = None) -> Tokenizer:
  """None or "bytes" -> ByteTokenizer; a ``*.json`` path -> HFTokenizer."""
  if spec is None or str(spec) == "bytes":
    return ByteTokenizer()
  path = str(spec)
  if path.endswith(".json"):
    return HFTokenizer(path)
  raise ValueError(f"unknown tokenizer {spec!r}: use 'bytes' or a tokenizer.json path")
