"""Tokenizers behind one small interface: ``encode(str) -> list[int]``, ``decode(list[int])
-> str``, ``vocab_size``, and ``eot_id`` (the end-of-document id, or None). A tokenizer
that also has ``encode_bytes(bytes)`` (the byte tokenizer) is given training files' raw
bytes, undecoded (``rwkv_jax.data.text``); the others get text decoded strictly."""

from __future__ import annotations

import ast
import os
from typing import Protocol


class Tokenizer(Protocol):
  vocab_size: int
  eot_id: int | None

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
  """Bytes, ids 0..255; id 0 (NUL, absent from text) separates documents. ``encode`` takes
  a str as UTF-8; ``encode_bytes`` takes any bytes as they are (training data is read so,
  whatever its encoding)."""

  vocab_size = 256
  eot_id = 0

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def encode_bytes(self, data: bytes):
    """The bytes themselves as ids (a uint8 array), no decoding."""
    import numpy as np

    return np.frombuffer(data, np.uint8)

  def decode(self, ids: list[int]) -> str:
    bad = [i for i in ids if not 0 <= int(i) < 256]
    if bad:
      raise ValueError(f"byte tokenizer: ids {bad[:5]} are outside [0, 256)")
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class IntTokenizer:
  """Token ids written as decimal integers separated by white space, ids 0..vocab_size-1
  (default 64): the "tokenizer" of the built-in synthetic task, whose tokens are not text.
  ``encode("3 5 7") == [3, 5, 7]``, ``decode([3, 5, 7]) == "3 5 7"``."""

  eot_id = None

  def __init__(self, vocab_size: int = 64):
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
      raise ValueError(f"ids tokenizer: vocab_size must be a positive integer, got "
                       f"{vocab_size!r}")
    self.vocab_size = vocab_size

  def encode(self, text: str) -> list[int]:
    ids = []
    for word in text.split():
      try:
        i = int(word)
      except ValueError:
        raise ValueError(f"ids tokenizer: {word!r} is not a token id (write ids as "
                         f"integers separated by spaces, e.g. '1 2 3')") from None
      if not 0 <= i < self.vocab_size:
        raise ValueError(f"ids tokenizer: id {i} is outside [0, {self.vocab_size})")
      ids.append(i)
    return ids

  def decode(self, ids: list[int]) -> str:
    bad = [int(i) for i in ids if not 0 <= int(i) < self.vocab_size]
    if bad:
      raise ValueError(f"ids tokenizer: ids {bad[:5]} are outside [0, {self.vocab_size})")
    return " ".join(str(int(i)) for i in ids)


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


class WorldTokenizer:
  """The RWKV "World" vocabulary (``rwkv_vocab_v20230424.txt``), greedy longest match.

  Each line is ``id repr(token) byte_length``; the repr is a Python str literal (stored as
  its UTF-8 bytes) or a bytes literal, and may itself contain spaces. Encoding walks a
  byte trie and always takes the longest vocabulary entry at the current position, as the
  reference tokenizer does. Id 0 is not in the file: it is the end-of-text id and decodes
  to nothing.
  """

  eot_id = 0

  def __init__(self, path: str | os.PathLike):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"vocabulary file not found: {path}")
    self._tokens: dict[int, bytes] = {}
    self._trie: dict = {}  # byte -> child node; the key None holds the id ending there
    with open(path, encoding="utf-8") as f:
      for number, line in enumerate(f, 1):
        if line.strip():
          self._add(*self._parse(line.rstrip("\r\n"), path, number), path, number)
    if not self._tokens:
      raise ValueError(f"{path}: no tokens")
    self.vocab_size = max(self._tokens) + 1

  @staticmethod
  def _parse(line: str, path, number: int) -> tuple[int, bytes]:
    first, last = line.find(" "), line.rfind(" ")
    try:
      if first < 0 or last <= first:
        raise ValueError("expected 'id repr(token) byte_length'")
      idx, length = int(line[:first]), int(line[last + 1:])
      token = ast.literal_eval(line[first + 1:last])
      if isinstance(token, str):
        token = token.encode("utf-8")
      if not isinstance(token, bytes):
        raise ValueError(f"token must be a str or bytes literal, got {type(token).__name__}")
    except (ValueError, SyntaxError) as e:
      raise ValueError(f"{path}:{number}: cannot parse {line[:80]!r}: {e}") from None
    if len(token) != length or not token:
      raise ValueError(f"{path}:{number}: token {token!r} has {len(token)} bytes, the line "
                       f"says {length}")
    return idx, token

  def _add(self, idx: int, token: bytes, path, number: int) -> None:
    if idx < 1 or idx in self._tokens:
      raise ValueError(f"{path}:{number}: id {idx} is {'repeated' if idx >= 1 else 'not >= 1'}")
    node = self._trie
    for byte in token:
      node = node.setdefault(byte, {})
    if None in node:
      raise ValueError(f"{path}:{number}: token {token!r} repeats id {node[None]}")
    node[None] = idx
    self._tokens[idx] = token

  def encode(self, text: str) -> list[int]:
    data, ids, pos = text.encode("utf-8"), [], 0
    while pos < len(data):
      node, best, end = self._trie, None, pos
      for i in range(pos, len(data)):
        node = node.get(data[i])
        if node is None:
          break
        if None in node:
          best, end = node[None], i + 1
      if best is None:
        raise ValueError(f"world tokenizer: byte {data[pos]:#04x} at offset {pos} is not in "
                         "the vocabulary")
      ids.append(best)
      pos = end
    return ids

  def decode(self, ids: list[int]) -> str:
    bad = [i for i in ids if int(i) != self.eot_id and int(i) not in self._tokens]
    if bad:
      raise ValueError(f"world tokenizer: ids {bad[:5]} are not in the vocabulary")
    data = b"".join(self._tokens.get(int(i), b"") for i in ids)
    return data.decode("utf-8", errors="replace")


def load_tokenizer(spec: str | os.PathLike | None = None) -> Tokenizer:
  """None or "bytes" -> ByteTokenizer; "ids" or "ids:N" -> IntTokenizer (vocabulary 64 or
  N); a ``*.json`` path -> HFTokenizer; a ``*.txt`` World vocabulary -> WorldTokenizer."""
  if spec is None or str(spec) == "bytes":
    return ByteTokenizer()
  path = str(spec)
  if path == "ids" or path.startswith("ids:"):
    size = path[4:] or "64"
    if not size.isdigit():
      raise ValueError(f"unknown tokenizer {spec!r}: 'ids:N' takes a vocabulary size N")
    return IntTokenizer(int(size))
  if path.endswith(".json"):
    return HFTokenizer(path)
  if path.endswith(".txt"):
    return WorldTokenizer(path)
  raise ValueError(
      f"unknown tokenizer {spec!r}: use 'bytes', 'ids', a tokenizer.json or a World vocab "
      ".txt path")
