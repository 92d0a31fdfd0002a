"""``rwkv-jax convert SRC DST``: between HF directories and BlinkDL .pth/.safetensors files."""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
  p = subparsers.add_parser(
      "convert", help="convert RWKV-4 weights between HF transformers and BlinkDL formats",
      description="SRC: an HF RwkvForCausalLM directory or a BlinkDL .pth/.safetensors file. "
                  "DST: a path ending in .pth/.pt/.safetensors gets a BlinkDL state dict, "
                  "any other path an HF directory (config.json + model.safetensors).")
  p.add_argument("src")
  p.add_argument("dst")
  p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                 help="dtype of the written tensors (default float32)")
  p.add_argument("--rescale-every", type=int, default=None,
                 help="HF DST only: config rescale_every (default: keep the source's HF "
                      "value; 0 for a BlinkDL source, which makes HF's logits equal ours)")
  p.add_argument("--overwrite", action="store_true", help="replace existing DST files")
  p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
  from rwkv_jax import interop  # imports JAX: only when the command runs

  try:
    model = interop.from_pretrained(args.src)
    dst = interop.save_pretrained(model, args.dst, dtype=args.dtype,
                                  rescale_every=args.rescale_every, overwrite=args.overwrite)
  except (ValueError, ImportError, FileNotFoundError, FileExistsError) as e:
    print(f"rwkv-jax convert: error: {e}", file=sys.stderr)
    return 1
  cfg = model.cfg
  print(f"{args.src} -> {dst}: n_layer={cfg.n_layer} n_embd={cfg.n_embd} "
        f"vocab_size={cfg.vocab_size} dim_ffn={cfg.dim_ffn} ({args.dtype})")
  return 0
