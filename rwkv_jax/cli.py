"""The ``rwkv-jax`` command. Each sub-command lives in its own module, which exposes
``register(subparsers)``; modules import JAX lazily so ``--help`` stays fast."""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that register sub-commands (train, generate, chat, convert, ...).
COMMAND_MODULES = [
    "rwkv_jax.training.cli",
    "rwkv_jax.inference.cli",
    "rwkv_jax.interop.cli",
    "rwkv_jax.data.cli",
    "rwkv_jax.lora_cli",
]


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="rwkv-jax", description="RWKV-4 and RWKV-7 in JAX / Flax NNX.")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  for name in COMMAND_MODULES:
    try:
      module = importlib.import_module(name)
    except ModuleNotFoundError as e:
      if e.name != name:
        raise
      continue
    module.register(sub)
  for command in sub.choices.values():  # one switch for every sub-command
    command.add_argument(
        "--no-compile-cache", dest="no_compile_cache", action="store_true",
        help="do not use JAX's persistent compilation cache (default: on, in the rwkv-jax "
             "cache directory, so a second run of the same shapes starts in seconds)")
  return parser


def main(argv: list[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  if not getattr(args, "func", None):
    parser.print_help()
    return 2
  from rwkv_jax import compile_cache

  if compile_cache.wanted(args.no_compile_cache):
    compile_cache.enable()
  return int(args.func(args) or 0)


if __name__ == "__main__":
  sys.exit(main())
