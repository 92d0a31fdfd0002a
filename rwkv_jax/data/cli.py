"""``rwkv-jax data``: dataset tools. ``data pack`` tokenizes text files, folders and jsonl
into a binidx dataset (``rwkv_jax.data.binidx.pack``)."""

from __future__ import annotations

import argparse
import sys

_PACK_EPILOG = """\
Each input file is one document, a folder every non-hidden file below it (sorted), and a
.jsonl file one document per line (its --jsonl-field string). Every document ends with
the tokenizer's end-of-document id (bytes: 0), as RWKV-LM's make_data.py writes them; the
ids are uint16 when the vocabulary fits (<= 65536), else int32. Writes only OUT.bin and
OUT.idx (temporary names, then renamed). Train on it with `rwkv-jax train --data OUT`.
"""


def run_pack(args) -> int:
  from rwkv_jax.data.binidx import pack
  from rwkv_jax.tokenizers import load_tokenizer

  try:
    tokenizer = load_tokenizer(args.tokenizer)
    info = pack(args.inputs, args.out, tokenizer, encoding=args.encoding,
                jsonl_field=args.jsonl_field, progress=args.progress, force=args.force)
  except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
    print(f"rwkv-jax data pack: error: {e}", file=sys.stderr)
    return 1
  print(f"packed {info['n_files']} files: {info['n_documents']:,} documents, "
        f"{info['n_tokens']:,} tokens ({info['dtype']}, vocab {info['vocab_size']}, "
        f"end-of-document id {info['eot_id']}) into {info['bin']} + .idx")
  return 0


def register(subparsers) -> None:
  p = subparsers.add_parser("data", help="dataset tools: pack text / jsonl into binidx",
                            description="Dataset tools.")
  sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
  p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
  pack = sub.add_parser(
      "pack", help="tokenize text files, folders and jsonl into binidx (PREFIX.bin/.idx)",
      description="Tokenize text files, folders and jsonl into a binidx dataset "
                  "(Megatron / GPT-NeoX MMapIndexedDataset, as RWKV-LM trains on).",
      epilog=_PACK_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
  pack.add_argument("inputs", nargs="+", metavar="IN",
                    help="text files, folders of them, or .jsonl files")
  pack.add_argument("out", metavar="OUT_PREFIX",
                    help="output prefix: writes OUT_PREFIX.bin and OUT_PREFIX.idx")
  pack.add_argument("--tokenizer", default="bytes", metavar="T",
                    help="'bytes' (vocab 256, id 0 ends a document), a HF tokenizer.json "
                         "or a World vocabulary .txt (%(default)s)")
  pack.add_argument("--jsonl-field", default="text", metavar="NAME",
                    help="the text field of each .jsonl object (%(default)s)")
  pack.add_argument("--encoding", default="utf-8",
                    help="how a text tokenizer decodes plain text files (%(default)s)")
  pack.add_argument("--force", action="store_true",
                    help="replace an existing OUT_PREFIX.bin/.idx")
  pack.add_argument("--no-progress", dest="progress", action="store_false",
                    help="no progress bar")
  pack.set_defaults(func=run_pack)
