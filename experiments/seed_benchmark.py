"""The seeds' RWKV vs Transformer vs LSTM comparison, re-run.

Source: shared/seeds/benchmark-rwkv-transformer-lstm.txt. Synthetic next-token prediction
(``rwkv_jax.data.SyntheticTask``: vocabulary 64, sequences of 32..256 tokens, noisy
repeating motifs), 4 layers at width 128 (RWKV dim_ffn 512; Transformer 4 heads, FFN 512;
LSTM hidden 128), AdamW b=(0.9, 0.95) with weight decay 0.01 (torch's default; the seed
names none) on matrices, lr 1e-3 with cosine decay to 0, batch 32, global-norm clip 1.0,
one training loop for all three (``experiments._common.train_lm``).

Measures: final train/test loss and test accuracy; per-token greedy decode latency at
context lengths 32 .. 16K with each model's own decode (RWKV recurrent state, Transformer
KV cache, LSTM (h, c)), as an on-device jitted loop, median over repeats; decode memory
(state bytes from the arrays, the compiled loop's memory analysis, device bytes in use on
GPU); true parameter counts against the claimed ~50K. Writes results.json and a 4-panel
figure.

Latency at length N: the time of K greedy steps at positions N-K .. N-1, divided by K.
The Transformer's cache has capacity N (filled with random keys/values up to N-K), and each
step attends over it, so its cost is the cost at context N. RWKV and LSTM steps cost the same
at every position (fixed-size state); they are measured at every N anyway.

  python experiments/seed_benchmark.py            # quick: CPU, <= 10 min
  python experiments/seed_benchmark.py --full     # GPU: the seed's sequence lengths
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments import _common
from experiments.baselines import (LSTMConfig, LSTMLM, TransformerConfig, TransformerLM,
                                   count_params, state_nbytes)
from rwkv_jax import RWKV, RWKVConfig
from rwkv_jax.data import SyntheticTask

CLAIMED = {  # the seed's tables
    "params": 50_000,
    "test_acc": {"rwkv": 0.873, "transformer": 0.889, "lstm": 0.821},
    "test_loss": {"rwkv": 0.289, "transformer": 0.267, "lstm": 0.378},
    "ms_at_256": {"rwkv": 0.45, "transformer": 1.43, "lstm": 0.58},
    "mb_at_256": {"rwkv": 12.8, "transformer": 67.5, "lstm": 13.7},
}
MODELS = ("rwkv", "transformer", "lstm")
MODES = {
    # seq_len: training/test sequence length (the task draws lengths in [32, seq_len + 1]).
    # wkv_impl: quick mode takes the lax.scan WKV (it compiles ~3x faster on CPU than
    # associative_scan, same numbers); full mode associative_scan (training speed is not
    # what this benchmark measures; decode always takes the recurrent step).
    "quick": dict(steps=100, seq_len=64, eval_every=20, n_test=128, decode_steps=32,
                  repeats=7, lengths=[32, 64, 128, 256, 1024, 4096, 16384], wkv_impl="scan"),
    "full": dict(steps=1500, seq_len=255, eval_every=100, n_test=512, decode_steps=64,
                 repeats=10, lengths=[32, 64, 128, 256, 1024, 4096, 16384],
                 wkv_impl="associative_scan"),
}


def model_configs(n_layer=4, width=128, vocab=64, n_head=4, ffn_mult=4, wkv_impl=None):
  """The seed's three shapes at one width."""
  return {
      "rwkv": RWKVConfig(n_layer=n_layer, n_embd=width, vocab_size=vocab,
                         dim_ffn=ffn_mult * width, ctx_len=256, wkv_impl=wkv_impl),
      "transformer": TransformerConfig(n_layer=n_layer, n_embd=width, n_head=n_head,
                                       dim_ffn=ffn_mult * width, vocab_size=vocab),
      "lstm": LSTMConfig(n_layer=n_layer, n_embd=width, hidden=width, vocab_size=vocab),
  }


def build(name: str, cfg, seed: int):
  cls = {"rwkv": RWKV, "transformer": TransformerLM, "lstm": LSTMLM}[name]
  return cls(cfg, rngs=nnx.Rngs(seed))


def decode_state(name: str, model, length: int, n_steps: int, seed: int):
  """The state to time K = n_steps steps that end at position ``length`` (batch 1)."""
  if name != "transformer":
    return model.init_state(1)  # fixed size: the same at every position
  cache = model.init_state(1, length)
  keys = jax.random.split(jax.random.key(seed), 2)
  filled = jnp.arange(length)[:, None] < length - n_steps  # S 1: positions already seen
  k, v = (jnp.where(filled, jax.random.normal(kk, cache.k.shape), 0.0) for kk in keys)
  return cache._replace(k=k, v=v, pos=jnp.asarray(length - n_steps, jnp.int32))


def measure_decode(name, model, lengths, n_steps, repeats, seed=0) -> list[dict]:
  rows = []
  for length in lengths:
    k = min(n_steps, length)
    before = _common.device_bytes_in_use()
    state = jax.block_until_ready(decode_state(name, model, length, k, seed))
    after = _common.device_bytes_in_use()
    timing = _common.time_decode(model, state, k, repeats, seed)
    rows.append({"length": length, "ms_per_token": 1e3 * timing["s_per_token"],
                 "state_bytes": state_nbytes(state), "compiled_memory":
                 timing["compiled_memory"], "device_state_bytes":
                 None if before is None else after - before, "n_steps": k,
                 "repeats": repeats})
    del state
  return rows


def run(mode: str, out: Path, *, steps=None, models=MODELS, seed=0, lengths=None,
        log=print) -> dict:
  settings = dict(MODES[mode])
  if steps is not None:
    settings["steps"] = steps
  if lengths is not None:
    settings["lengths"] = lengths
  t_start = time.perf_counter()
  task = SyntheticTask(seed=seed, vocab_size=64, min_len=32, max_len=settings["seq_len"] + 1)
  test = task.test_set_with_phases(settings["n_test"], settings["seq_len"])
  repeat_mask = (test[3] == 3).astype(np.float32)  # phase 3: a repeat of the motif
  log(f"generating {settings['steps']} training batches")
  batches = _common.precompute_batches(task.batch, settings["steps"], 32, settings["seq_len"])
  cfgs = model_configs(wkv_impl=settings["wkv_impl"])
  small = model_configs(width=32)
  result = {"mode": mode, "settings": settings, "machine": _common.machine(),
            "date": _common.RUN_DATE, "claimed": CLAIMED, "models": {}}
  for name in models:
    model = build(name, cfgs[name], seed)
    n_params = count_params(model)
    log(f"== {name}: {n_params:,} parameters (formula {cfgs[name].param_count():,})")
    hist, params, evaluate = _common.train_lm(
        model, batches.__getitem__, settings["steps"],
        lr=1e-3, b1=0.9, b2=0.95, clip=1.0, eval_set=test, eval_every=settings["eval_every"],
        log=log)
    nnx.update(model, params)
    final = hist["eval"][-1]
    repeat = evaluate(params, repeat_mask)
    n_tail = max(1, settings["steps"] // 20)  # the last 5% of steps
    log(f"  decode latency at {settings['lengths']}")
    decode = measure_decode(name, model, settings["lengths"], settings["decode_steps"],
                            settings["repeats"], seed)
    result["models"][name] = {
        "config": cfgs[name].__dict__, "params": n_params,
        "params_formula": cfgs[name].param_count(),
        "params_at_width_32": small[name].param_count(),
        "final_train_loss": float(np.mean(hist["train_loss"][-n_tail:])),
        "final_test_loss": final["loss"], "test_acc": final["acc"],
        "test_acc_repeats": repeat["acc"], "train_wall_s": hist["wall_s"],
        "first_step_s": hist["first_step_s"], "history": hist, "decode": decode}
    _common.write_json(out / "results.json", result)
  result["wall_s"] = time.perf_counter() - t_start
  _common.write_json(out / "results.json", result)
  try:
    plot(result, out / "seed_benchmark.png")
  except ImportError as e:  # a bare GPU image may lack matplotlib: --replot it elsewhere
    log(f"no figure ({e}); run --replot {out / 'results.json'}")
  return result


def tables(result: dict) -> str:
  """The Markdown tables of a results.json."""
  ms = result["models"]
  out = [_common.print_table(
      ["model", "params (counted)", "params (formula)", "claimed", "at width 32",
       "final train loss", "final test loss", "test acc", "acc on repeats"],
      [[n, f"{m['params']:,}", f"{m['params_formula']:,}", "~50K",
        f"{m['params_at_width_32']:,}", m["final_train_loss"], m["final_test_loss"],
        f"{100 * m['test_acc']:.1f}%", f"{100 * m['test_acc_repeats']:.1f}%"]
       for n, m in ms.items()])]
  lengths = [r["length"] for r in next(iter(ms.values()))["decode"]]
  out.append(_common.print_table(
      ["length"] + [f"{n} ms/token" for n in ms],
      [[length] + [m["decode"][i]["ms_per_token"] for m in ms.values()]
       for i, length in enumerate(lengths)]))
  gpu = any(r["device_state_bytes"] is not None for m in ms.values() for r in m["decode"])
  header = ["length"] + [f"{n} state MB" for n in ms] + [f"{n} loop MB" for n in ms]
  header += [f"{n} device MB" for n in ms] if gpu else []

  def loop_mb(r):  # what the compiled decode loop holds: params + state + temporaries
    mem = r["compiled_memory"]
    return (mem.get("argument_size_in_bytes", 0) + mem.get("temp_size_in_bytes", 0)) / 2**20

  rows = []
  for i, length in enumerate(lengths):
    row = [length] + [m["decode"][i]["state_bytes"] / 2**20 for m in ms.values()]
    row += [loop_mb(m["decode"][i]) for m in ms.values()]
    if gpu:
      row += [(m["decode"][i]["device_state_bytes"] or 0) / 2**20 for m in ms.values()]
    rows.append(row)
  out.append(_common.print_table(header, rows))
  return "\n\n".join(out)


def plot(result: dict, path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(2, 2, figsize=(11, 8))
  for name, m in result["models"].items():
    loss = np.asarray(m["history"]["train_loss"])
    w = max(1, len(loss) // 50)
    smooth = np.convolve(loss, np.ones(w) / w, mode="valid")
    ax[0, 0].plot(np.arange(len(smooth)) + w, smooth, label=name)
    ev = m["history"]["eval"]
    ax[0, 1].plot([e["step"] for e in ev], [e["loss"] for e in ev], "o-", label=name)
    dec = m["decode"]
    ax[1, 0].loglog([r["length"] for r in dec], [r["ms_per_token"] for r in dec], "o-",
                    label=name)
  names = list(result["models"])
  ax[1, 1].bar(names, [100 * result["models"][n]["test_acc"] for n in names])
  titles = [("train loss", "step", "nats"), ("test loss", "step", "nats"),
            ("decode latency (batch 1)", "context length", "ms / token"),
            ("test accuracy", "", "%")]
  for a, (t, xl, yl) in zip(ax.flat, titles):
    a.set_title(t)
    a.set_xlabel(xl)
    a.set_ylabel(yl)
  for a in ax.flat[:3]:
    a.legend()
  fig.suptitle(f"seed benchmark ({result['mode']}): {result['machine']}", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--full", action="store_true", help="GPU settings (seq 255, 1500 steps)")
  p.add_argument("--out", default=str(_common.REPO / "experiments/out/seed_benchmark"))
  p.add_argument("--steps", type=int, default=None, help="override the mode's step count")
  p.add_argument("--models", default=",".join(MODELS))
  p.add_argument("--lengths", default=None, help="comma-separated decode lengths")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--replot", metavar="RESULTS_JSON",
                 help="only redraw the figure and print the tables of a results.json")
  args = p.parse_args(argv)
  if args.replot:
    result = json.loads(Path(args.replot).read_text())
    Path(args.out).mkdir(parents=True, exist_ok=True)
    plot(result, Path(args.out) / "seed_benchmark.png")
    print(f"{result['machine']} ({result['mode']} mode)\n")
    tables(result)
    return 0
  models = tuple(args.models.split(","))
  if not set(models) <= set(MODELS):
    raise ValueError(f"--models must be a subset of {MODELS}, got {models}")
  lengths = None if args.lengths is None else [int(x) for x in args.lengths.split(",")]
  result = run("full" if args.full else "quick", Path(args.out), steps=args.steps,
               models=models, seed=args.seed, lengths=lengths)
  print(f"\n{result['machine']}; wall {result['wall_s']:.0f} s\n")
  tables(result)
  return 0


if __name__ == "__main__":
  sys.exit(main())
