"""``rwkv-jax convert SRC DST``: between rwkv-jax runs, HF directories and BlinkDL
.pth/.safetensors files (RWKV-4 and RWKV-7)."""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
  p = subparsers.add_parser(
      "convert", help="convert weights: rwkv-jax run dirs, HF transformers, BlinkDL files",
      description="SRC: an rwkv-jax training directory (its latest checkpoint), an HF "
                  "RwkvForCausalLM directory (RWKV-4) or a BlinkDL .pth/.safetensors file "
                  "(RWKV-4 or RWKV-7 x070, detected from the tensor names). DST: a path "
                  "ending in .pth/.pt/.safetensors gets a BlinkDL state dict, any other "
                  "path an HF directory (config.json + model.safetensors; RWKV-4 only).")
  p.add_argument("src")
  p.add_argument("dst")
  p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                 help="dtype of the written tensors (default float32)")
  p.add_argument("--rescale-every", type=int, default=None,
                 help="HF DST only: config rescale_every (default: keep the source's HF "
                      "value; 0 for a BlinkDL source, which makes HF's logits equal ours)")
  p.add_argument("--overwrite", action="store_true", help="replace existing DST files")
  p.add_argument("--quantize", choices=("int8",), default=None,
                 help="DST *.safetensors only: int8 matrices + float32 per-channel scales "
                      "in rwkv-jax's own layout (rwkv_jax.quantize; read back by rwkv-jax, "
                      "not by BlinkDL or HF tools)")
  p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
  from rwkv_jax import interop  # imports JAX: only when the command runs

  try:
    model = interop.from_pretrained(args.src)
    dst = interop.save_pretrained(model, args.dst, dtype=args.dtype,
                                  rescale_every=args.rescale_every, overwrite=args.overwrite,
                                  quantize=getattr(args, "quantize", None))
  except (ValueError, ImportError, FileNotFoundError, FileExistsError) as e:
    print(f"rwkv-jax convert: error: {e}", file=sys.stderr)
    return 1
  what = getattr(args, "quantize", None) or args.dtype
  print(f"{args.src} -> {dst}: {model.cfg.describe_shape()} ({what})")
  return 0
