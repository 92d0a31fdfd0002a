"""Reading tensor files without running code from them.

safetensors files are read with the safetensors library (no torch needed). PyTorch files
(``.pth``, ``.pt``, ``.bin``) are pickles, and unpickling can run arbitrary code, so:

1. the pickle's imports are listed first (``pickletools``, which only parses) and a file
   that imports anything outside ``torch`` / ``collections`` / ``_codecs`` is refused
   before any unpickler touches it;
2. what passes is read with ``torch.load(..., weights_only=True)``, torch's restricted
   unpickler, which enforces the real allow-list.

torch is imported only here, and only when a torch file is read.
"""

from __future__ import annotations

import io
import json
import os
import pickletools
import zipfile

import numpy as np

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
_SAFE_MODULES = ("torch", "collections", "_codecs")  # module roots a state dict may import
_STRING_OPS = ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8", "STRING",
               "BINSTRING", "SHORT_BINSTRING")


class UnsafeCheckpointError(ValueError):
  """A checkpoint file that holds pickled code (or objects other than tensors)."""


def load_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """One tensor file -> {name: float32 array}, in the file's own layout and naming."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint file not found: {path}")
  if path.endswith(".safetensors"):
    return _load_safetensors(path)
  if path.endswith(TORCH_SUFFIXES):
    return _load_torch(path)
  raise ValueError(
      f"unknown tensor file type {path!r}: expected .safetensors or one of {TORCH_SUFFIXES}")


def load_sharded(index_path: str) -> dict[str, np.ndarray]:
  """An HF ``*.index.json`` (``weight_map``: name -> shard file) -> all tensors."""
  with open(index_path) as f:
    weight_map = json.load(f).get("weight_map")
  if not isinstance(weight_map, dict):
    raise ValueError(f"{index_path}: no 'weight_map' in the shard index")
  folder = os.path.dirname(index_path)
  tensors: dict[str, np.ndarray] = {}
  for shard in sorted(set(weight_map.values())):
    tensors.update(load_tensors(os.path.join(folder, shard)))
  return tensors


def _as_float32(name: str, array, path: str) -> np.ndarray:
  array = np.asarray(array)
  if not (np.issubdtype(array.dtype, np.floating) or array.dtype.name == "bfloat16"):
    raise ValueError(f"{path}: tensor {name!r} has dtype {array.dtype}, expected a float")
  return array.astype(np.float32)


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors import SafetensorError, safe_open

  try:
    with safe_open(path, framework="numpy") as f:
      return {k: _as_float32(k, f.get_tensor(k), path) for k in f.keys()}
  except SafetensorError as e:  # truncated or not a safetensors file at all
    raise ValueError(f"{path} is not a readable .safetensors file (truncated or corrupt?): "
                     f"{e}") from None


def _one_pickle_globals(stream) -> list[str]:
  """GLOBAL names its import in the opcode; STACK_GLOBAL takes the two values pushed just
  before it, which are strings or memo fetches of strings (tracked through the memo).
  Anything else there is reported as ``<unknown>`` and so refused."""
  found, pushed, memo = [], [], {}
  for op, arg, _ in pickletools.genops(stream):
    name = op.name
    if name in _STRING_OPS:
      pushed.append(arg if isinstance(arg, str) else bytes(arg).decode("latin-1"))
    elif name == "MEMOIZE":
      memo[len(memo)] = pushed[-1] if pushed else None
    elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
      memo[int(arg)] = pushed[-1] if pushed else None
    elif name in ("GET", "BINGET", "LONG_BINGET"):
      pushed.append(memo.get(int(arg)))
    elif name == "GLOBAL":
      found.append(arg.replace(" ", "."))
      pushed.append(None)
    elif name == "STACK_GLOBAL":
      parts = pushed[-2:]
      ok = len(parts) == 2 and all(isinstance(x, str) for x in parts)
      found.append(".".join(parts) if ok else "<unknown>")
      pushed.append(None)
    else:
      pushed.append(None)
  return found


def pickle_globals(data: bytes, max_pickles: int = 1) -> list[str]:
  """The ``module.name`` globals that up to ``max_pickles`` consecutive pickles at the
  start of ``data`` import, found without unpickling anything. Raises if the first one
  does not parse; stops quietly where later bytes are no pickle (raw tensor data)."""
  stream, found = io.BytesIO(data), []
  for index in range(max_pickles):
    if stream.tell() >= len(data):
      break
    try:
      found += _one_pickle_globals(stream)
    except Exception:
      if index == 0:
        raise
      break
  return found


def _pickle_streams(path: str) -> list[tuple[bytes, int]]:
  """(bytes, how many pickles) of a torch file: each ``*.pkl`` of a zip archive, or a
  legacy file's leading pickles (magic, protocol, sys info, the object, storage keys;
  raw tensor bytes follow), or a bare pickle."""
  if zipfile.is_zipfile(path):
    with zipfile.ZipFile(path) as z:
      return [(z.read(n), 1) for n in z.namelist() if n.endswith(".pkl")]
  with open(path, "rb") as f:
    return [(f.read(), 5)]


def _check_pickle_imports(path: str) -> None:
  bad = []
  for data, count in _pickle_streams(path):
    try:
      names = pickle_globals(data, count)
    except Exception as e:
      raise ValueError(f"{path} is not a PyTorch checkpoint: no readable pickle "
                       f"({type(e).__name__}: {e})") from None
    bad += [n for n in names if n.split(".")[0] not in _SAFE_MODULES]
  if bad:
    raise UnsafeCheckpointError(
        f"refusing to load {path}: it is not a plain tensor state dict; its pickle imports "
        f"{sorted(set(bad))}, which would run code when unpickled. Only tensors saved with "
        f"torch.save(state_dict) are read.")


def import_torch():
  try:
    import torch
  except ImportError as e:
    raise ImportError(
        "reading a PyTorch checkpoint needs torch: pip install 'rwkv-jax[torch]' "
        "(safetensors files need no torch)") from e
  return torch


def _torch_reason(message: str) -> str:
  """The informative line of torch's long weights-only error message."""
  lines = [x.strip() for x in message.splitlines() if x.strip()]
  for i, line in enumerate(lines):
    if line.endswith("error:") and i + 1 < len(lines):
      return lines[i + 1][:300]
  return next((x for x in lines if "nsupported" in x), lines[-1] if lines else "")[:300]


def _load_torch(path: str) -> dict[str, np.ndarray]:
  _check_pickle_imports(path)
  torch = import_torch()
  import pickle

  try:
    obj = torch.load(path, map_location="cpu", weights_only=True,
                     mmap=zipfile.is_zipfile(path))
  except pickle.UnpicklingError as e:
    raise UnsafeCheckpointError(
        f"refusing to load {path}: torch.load(weights_only=True) could not read it as plain "
        f"tensors: {_torch_reason(str(e))}") from e
  if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
    obj = obj["state_dict"]  # a Lightning-style wrapper around the weights
  if not isinstance(obj, dict):
    raise ValueError(f"{path}: expected a state dict (name -> tensor), got {type(obj).__name__}")
  not_tensors = sorted(k for k, v in obj.items() if not isinstance(v, torch.Tensor))
  if not_tensors:
    raise ValueError(f"{path}: entries {not_tensors[:10]} are not tensors")
  # .float() first: numpy has no bfloat16, and every parameter is float32 in the model.
  return {k: _as_float32(k, v.detach().float().numpy(), path) if v.is_floating_point()
          else _as_float32(k, v.numpy(), path) for k, v in obj.items()}
