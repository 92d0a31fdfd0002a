"""JAX's persistent compilation cache for the command line.

``rwkv-jax`` turns it on by default (``--no-compile-cache`` or ``RWKV_JAX_COMPILE_CACHE=0``
turn it off), in ``<cache dir>/jax-compilation`` (the cache directory of
``rwkv_jax.data.text.default_cache_dir``: ``$RWKV_JAX_CACHE``, ``$XDG_CACHE_HOME/rwkv-jax``
or ``~/.cache/rwkv-jax``), so a second run of the same shapes loads its compiled steps
instead of compiling them again. Library users opt in with ``enable()``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENV = "RWKV_JAX_COMPILE_CACHE"


def default_directory() -> Path:
  from rwkv_jax.data.text import default_cache_dir

  return default_cache_dir() / "jax-compilation"


def enable(directory=None) -> Path | None:
  """Points JAX's persistent compilation cache at ``directory`` (default
  ``default_directory()``) for programs that take at least a second to compile. Returns the
  directory, or None (with a one-line warning) when it cannot be created."""
  import jax

  path = Path(directory).expanduser() if directory is not None else default_directory()
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    print(f"rwkv-jax: warning: no compilation cache ({path}: {e.strerror})", file=sys.stderr)
    return None
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  return path


def wanted(flag_off: bool, environ=None) -> bool:
  """Whether the CLI should enable the cache: not with --no-compile-cache, not with
  RWKV_JAX_COMPILE_CACHE=0."""
  env = os.environ if environ is None else environ
  return not flag_off and env.get(ENV, "1") != "0"
