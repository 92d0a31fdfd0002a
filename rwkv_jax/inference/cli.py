"""``rwkv-jax generate`` and ``rwkv-jax chat``: streaming text generation from a checkpoint.

JAX and the model code are imported inside the handlers so ``rwkv-jax --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys

CHAT_TEMPLATE = "User: {message}\n\nAssistant:"


def _add_common(p: argparse.ArgumentParser) -> None:
  p.add_argument("--checkpoint", required=True,
                 help="a training output dir, an HF model dir or a BlinkDL .pth")
  p.add_argument("--tokenizer", default=None,
                 help="'bytes', 'ids' (token ids as integers, e.g. '1 2 3'), a "
                      "tokenizer.json or a World vocab .txt (default: the checkpoint's: "
                      "a training run's, 'ids' for the synthetic task, else bytes)")
  p.add_argument("--max-new-tokens", type=int, default=200,
                 help="tokens generated at most (%(default)s)")
  p.add_argument("--temperature", type=float, default=1.0,
                 help="sampling temperature, 0 = greedy (%(default)s)")
  p.add_argument("--top-p", type=float, default=0.85,
                 help="nucleus sampling: the smallest set of tokens of this total "
                      "probability (%(default)s)")
  p.add_argument("--top-k", type=int, default=0,
                 help="sample among the k likeliest tokens, 0 = off (%(default)s)")
  p.add_argument("--presence-penalty", type=float, default=0.0,
                 help="subtracted from the logit of every token seen (%(default)s)")
  p.add_argument("--frequency-penalty", type=float, default=0.0,
                 help="subtracted from a token's logit per time seen (%(default)s)")
  p.add_argument("--seed", type=int, default=0, help="sampling seed (%(default)s)")
  p.add_argument("--stop-token", type=int, action="append", default=None,
                 help="token id that ends a reply (repeatable; default: the tokenizer's "
                      "end-of-text id)")
  p.add_argument("--chunk-size", type=int, default=16,
                 help="decode steps per device call (%(default)s)")
  p.add_argument("--decode-step", choices=("model", "pallas"), default=None,
                 help="the model's one-token forward or the fused Pallas step (default: "
                      "fused on a GPU)")
  p.add_argument("--lora", metavar="RUN",
                 help="a LoRA run (rwkv-jax train --lora-rank): its adapters, unmerged, on "
                      "--checkpoint, which must be the run's base (checked)")
  p.add_argument("--state", metavar="FILE",
                 help="start from this state file (.safetensors/.npz), e.g. a tuned state "
                      "(rwkv-jax train --tune state writes OUT/state.safetensors; the "
                      "default for --checkpoint of such a run)")
  p.add_argument("--quantize", choices=("int8",), default=None,
                 help="int8 weight-only matrices and head (per-output-channel scales), "
                      "dequantized inside each matmul")


def register(subparsers) -> None:
  g = subparsers.add_parser("generate", help="stream a continuation of a prompt",
                            description="Generate text after --prompt, streamed as decoded.")
  _add_common(g)
  g.add_argument("--prompt", required=True)
  g.set_defaults(func=_reporting_errors("generate", run_generate))
  c = subparsers.add_parser(
      "chat", help="interactive chat that keeps the state between turns",
      description="Reads one message per line from stdin (EOF or /exit ends); each turn "
                  f"is formatted as {CHAT_TEMPLATE!r}.")
  _add_common(c)
  c.set_defaults(func=_reporting_errors("chat", run_chat))


def _reporting_errors(name, fn):
  """Bad input (a missing checkpoint, a wrong tokenizer, ...) -> one line and exit code 1."""
  def run(args):
    try:
      return fn(args)
    except (ValueError, FileNotFoundError) as e:
      print(f"rwkv-jax {name}: error: {e}", file=sys.stderr)
      return 1
    except KeyboardInterrupt:  # Ctrl-C: end the line, no traceback, the shell's code
      sys.stdout.write("\n")
      sys.stdout.flush()
      return 130
  return run


class IncrementalDecoder:
  """Turns a growing token list into text pieces; holds back a trailing U+FFFD, which is
  usually a multi-byte character whose remaining bytes have not been generated yet.
  ``context``: ids already shown (the prompt), decoded with the new ones but not emitted,
  so a piece is what the new ids add after them (a separating space of the 'ids'
  tokenizer, a word-initial space of a sentencepiece-like vocabulary)."""

  def __init__(self, tokenizer, context=()):
    self.tokenizer = tokenizer
    self.ids: list[int] = [int(t) for t in context]
    self.emitted = len(tokenizer.decode(self.ids).rstrip("\ufffd")) if self.ids else 0

  def push(self, token: int) -> str:
    self.ids.append(int(token))
    text = self.tokenizer.decode(self.ids)
    stable = len(text.rstrip("\ufffd"))
    piece, self.emitted = text[self.emitted:stable], max(self.emitted, stable)
    return piece

  def flush(self) -> str:
    text = self.tokenizer.decode(self.ids)
    piece, self.emitted = text[self.emitted:], len(text)
    return piece


def _load(args):
  """(model, tokenizer, SamplingConfig, stop tokens, initial state or None) from the
  command-line arguments."""
  from rwkv_jax.checkpoint import load_model
  from rwkv_jax.inference.sampling import SamplingConfig
  from rwkv_jax.tokenizers import load_tokenizer
  from rwkv_jax.tuning import adapt_for_inference

  model, cfg = load_model(args.checkpoint)
  model, state = adapt_for_inference(model, checkpoint=args.checkpoint,
                                     lora=getattr(args, "lora", None),
                                     state=getattr(args, "state", None),
                                     quantize=getattr(args, "quantize", None))
  spec = args.tokenizer if args.tokenizer is not None else _checkpoint_tokenizer(args.checkpoint)
  tokenizer = load_tokenizer(spec)
  if tokenizer.vocab_size > cfg.vocab_size:
    raise ValueError(
        f"the tokenizer ({type(tokenizer).__name__}) has {tokenizer.vocab_size} ids but the "
        f"model only {cfg.vocab_size}: pass the model's tokenizer with --tokenizer")
  sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            presence_penalty=args.presence_penalty,
                            frequency_penalty=args.frequency_penalty)
  if args.stop_token is not None:
    stops = tuple(args.stop_token)
  else:
    stops = () if tokenizer.eot_id is None else (tokenizer.eot_id,)
  return model, tokenizer, sampling, stops, state


def _checkpoint_tokenizer(path):
  """The tokenizer a checkpoint names: a training dir's ``train.tokenizer`` (None = bytes;
  "ids", the token ids as integers, for a run on the synthetic task: ``train.data`` None),
  else a ``tokenizer.json`` beside the weights, else None (bytes)."""
  from pathlib import Path

  from rwkv_jax.checkpoint import RUN_CONFIG, read_run_config

  path = Path(path)
  folder = path if path.is_dir() else path.parent
  if path.is_dir() and (path / RUN_CONFIG).is_file():
    try:
      _, train = read_run_config(path)
    except ValueError:  # an HF config.json, not ours
      train = None
    else:
      if train is not None and train.data is None:
        return "ids"  # the synthetic task: its tokens are ids, not text
      return None if train is None else train.tokenizer
  candidate = folder / "tokenizer.json"
  return str(candidate) if candidate.is_file() else None


def _write(out, text: str) -> None:
  if text:
    out.write(text)
    out.flush()


def run_generate(args, out=None) -> int:
  from rwkv_jax.inference.generation import stream

  out = out or sys.stdout
  model, tokenizer, sampling, stops, state = _load(args)
  prompt = tokenizer.encode(args.prompt)
  if not prompt:
    raise ValueError("--prompt encodes to no tokens")
  # Set up (and so validate: --max-new-tokens, --chunk-size, the prompt's ids) before
  # anything is printed.
  tokens = stream(model, prompt, max_new_tokens=args.max_new_tokens, sampling=sampling,
                  key=args.seed, stop_tokens=stops, chunk_size=args.chunk_size,
                  decode_step=args.decode_step, state=state)
  decoder = IncrementalDecoder(tokenizer, prompt)
  _write(out, args.prompt)
  for token in tokens:
    _write(out, decoder.push(token))
  _write(out, decoder.flush() + "\n")
  return 0


def run_chat(args, inp=None, out=None) -> int:
  from rwkv_jax.inference.chat import ChatSession

  inp, out = inp or sys.stdin, out or sys.stdout
  model, tokenizer, sampling, stops, state = _load(args)
  session = ChatSession(model, tokenizer, sampling=sampling, key=args.seed, stop_tokens=stops,
                        chunk_size=args.chunk_size, max_conversations=1,
                        decode_step=args.decode_step, initial_state=state)
  interactive, first = inp.isatty(), True
  while True:
    if interactive:
      _write(out, "User: ")
    line = inp.readline()
    if not line or line.strip() == "/exit":
      return 0
    message = line.rstrip("\n")
    if not message.strip():
      continue
    decoder = IncrementalDecoder(tokenizer)
    _write(out, "Assistant:")
    # Turns after the first start on a blank line, as the template's own turns are split.
    text = ("" if first else "\n\n") + CHAT_TEMPLATE.format(message=message)
    first = False
    for token in session.stream(text, max_new_tokens=args.max_new_tokens):
      _write(out, decoder.push(token))
    _write(out, decoder.flush() + "\n")
