"""Run metrics: ``metrics.jsonl`` lines, optional TensorBoard, FLOP / MFU accounting, and
the loss-curve PNG."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

# Dense peak FLOP/s of one accelerator by (device kind substring, compute dtype). For
# float32 GPUs run matmuls as TF32 (JAX's default precision), so that peak is used. These
# are the vendors' spec sheets (no sparsity); a measured matmul peak is lower (about
# 800 TFLOP/s bf16 on H100), so MFU against the spec is the conservative number.
PEAK_FLOPS = {
    ("h100", "bfloat16"): 989e12, ("h100", "float16"): 989e12, ("h100", "float32"): 494.5e12,
    ("h200", "bfloat16"): 989e12, ("h200", "float16"): 989e12, ("h200", "float32"): 494.5e12,
    ("a100", "bfloat16"): 312e12, ("a100", "float16"): 312e12, ("a100", "float32"): 156e12,
    ("tpu v4", "bfloat16"): 275e12, ("tpu v5 lite", "bfloat16"): 197e12,
    ("tpu v5p", "bfloat16"): 459e12, ("tpu v6", "bfloat16"): 918e12,
}


def peak_flops(device_kind: str, dtype: str, override_tflops: float | None = None):
  """Peak FLOP/s of one device, or None when unknown (e.g. a CPU: MFU is then null)."""
  if override_tflops is not None:
    return override_tflops * 1e12
  kind = device_kind.lower()
  for (name, dt), value in PEAK_FLOPS.items():
    if name in kind and dt == dtype:
      return value
  return None


def train_flops_per_token(cfg) -> float:
  """6·N: forward 2·N, backward 4·N, with N = ``cfg.matmul_params()`` (every parameter
  but the embedding table, a gather). WKV and norm FLOPs are left out."""
  return 6.0 * cfg.matmul_params()


class MetricsLog:
  """Appends one JSON object per line to ``out/metrics.jsonl``; mirrors scalars to
  TensorBoard when asked (needs ``tensorboardX`` or ``torch.utils.tensorboard``)."""

  def __init__(self, out_dir, *, resume_step: int | None = None, tensorboard: bool = False):
    self.path = Path(out_dir) / "metrics.jsonl"
    if resume_step is not None and self.path.exists():
      # Drop lines a killed run wrote after its last checkpoint: they will be redone.
      kept = [line for line in self.path.read_text().splitlines()
              if line.strip() and json.loads(line).get("step", 0) <= resume_step]
      tmp = self.path.with_suffix(".tmp")
      tmp.write_text("".join(line + "\n" for line in kept))
      os.replace(tmp, self.path)
    elif resume_step is None and self.path.exists():
      self.path.unlink()
    self._file = open(self.path, "a")
    self._tb = _tensorboard_writer(Path(out_dir) / "tensorboard") if tensorboard else None

  def write(self, record: dict[str, Any]) -> None:
    # NaN / Inf become strings ("nan"): strict JSON readers reject bare NaN.
    record = {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v)
              for k, v in record.items()}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      for key, value in record.items():
        if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
          self._tb.add_scalar(key, value, record["step"])

  def close(self) -> None:
    self._file.close()
    if self._tb is not None:
      self._tb.close()


TENSORBOARD_MISSING = ("--tensorboard needs tensorboardX: pip install 'rwkv-jax[tensorboard]' "
                       "(or pip install tensorboardX)")


def tensorboard_writer_class():
  """tensorboardX's SummaryWriter (else torch's, which needs the tensorboard package);
  ImportError with TENSORBOARD_MISSING when neither imports. TrainConfig.validate calls
  this for --tensorboard, so a missing package stops a run before it makes its folder."""
  try:
    from tensorboardX import SummaryWriter
  except ImportError:
    try:
      from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
      raise ImportError(TENSORBOARD_MISSING) from e
  return SummaryWriter


def _tensorboard_writer(logdir: Path):
  return tensorboard_writer_class()(str(logdir))


def progress_bar_class():
  """``tqdm.auto.tqdm``: a widget in Jupyter with ipywidgets, else the text bar, without
  tqdm's "IProgress not found" TqdmWarning when ipywidgets is missing (the text bar is
  the intended fallback)."""
  import warnings

  from tqdm import TqdmWarning

  with warnings.catch_warnings():
    warnings.simplefilter("ignore", TqdmWarning)
    from tqdm.auto import tqdm
  return tqdm


def read_metrics(out_dir) -> list[dict[str, Any]]:
  path = Path(out_dir) / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss_curve(out_dir, title: str = "") -> Path | None:
  """Writes ``out/loss_curve.png``: training loss per step and evaluation loss."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  records = read_metrics(out_dir)
  def series(key):
    return [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]

  train, evals = series("loss"), series("eval_loss")
  if not train and not evals:
    return None
  fig, ax = plt.subplots(figsize=(7, 4))
  if train:  # a marker too when there is one point (a 1-step run): a line needs two
    ax.plot(*zip(*train), lw=0.8, label="train loss", marker="o" if len(train) == 1 else None)
  if evals:
    ax.plot(*zip(*evals), "o-", label="eval loss (held out)")
  ax.set_xlabel("optimizer step")
  ax.set_ylabel("cross entropy (nats / token)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  path = Path(out_dir) / "loss_curve.png"
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path
