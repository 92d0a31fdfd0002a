"""Run metrics: the loss-curve plot and the optional TensorBoard mirror (no training here)."""

import json
import sys
import types

import pytest

from rwkv_jax.cli import main as cli_main
from rwkv_jax.training import metrics as M
from rwkv_jax.training.config import TrainConfig


def _plotted_figure(out_dir, monkeypatch):
  """Runs plot_loss_curve and hands back its figure (kept open) for inspection."""
  import matplotlib.pyplot as plt

  figures, close = [], plt.close
  monkeypatch.setattr(plt, "close", figures.append)
  assert M.plot_loss_curve(out_dir).is_file()
  monkeypatch.setattr(plt, "close", close)
  return figures[0]


def _visible(line) -> bool:
  """A line of two or more points, or a point drawn with a marker."""
  return len(line.get_xdata()) >= 2 or line.get_marker() not in (None, "", " ", "None")


@pytest.mark.parametrize("evals", [False, True])
def test_loss_plot_of_a_one_step_run_shows_its_point(tmp_path, monkeypatch, evals):
  records = [{"step": 1, "loss": 4.2, "accuracy": 0.1}]
  if evals:
    records.append({"step": 1, "eval_loss": 4.3})
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  fig = _plotted_figure(tmp_path, monkeypatch)
  lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
  assert set(lines) == {"train loss"} | ({"eval loss (held out)"} if evals else set())
  assert all(_visible(line) for line in lines.values())
  import matplotlib.pyplot as plt

  plt.close(fig)


def test_loss_plot_of_a_longer_run_is_a_line(tmp_path, monkeypatch):
  (tmp_path / "metrics.jsonl").write_text(
      "".join(json.dumps({"step": s, "loss": 5.0 - s / 10}) + "\n" for s in range(1, 6)))
  fig = _plotted_figure(tmp_path, monkeypatch)
  (line,) = fig.axes[0].get_lines()
  assert len(line.get_xdata()) == 5 and line.get_marker() in (None, "", "None")
  import matplotlib.pyplot as plt

  plt.close(fig)


def _without_tensorboard(monkeypatch):
  """Neither tensorboardX nor torch importable (torch's writer is the fallback)."""
  monkeypatch.setitem(sys.modules, "tensorboardX", None)
  monkeypatch.setitem(sys.modules, "torch", None)


def test_tensorboard_without_tensorboardx_is_a_one_line_error_before_the_run(
    tmp_path, monkeypatch, capsys):
  _without_tensorboard(monkeypatch)
  with pytest.raises(ValueError, match=r"pip install 'rwkv-jax\[tensorboard\]'"):
    TrainConfig(tensorboard=True).validate()
  out = tmp_path / "run"
  assert cli_main(["train", "--tensorboard", "--out", str(out), "--steps", "1"]) == 1
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "Traceback" not in err, err
  assert err.startswith("rwkv-jax train: error: --tensorboard needs tensorboardX")
  assert not out.exists()  # stopped before the run folder was made


def test_tensorboard_with_tensorboardx_validates_and_writes_scalars(tmp_path, monkeypatch):
  scalars = []

  class SummaryWriter:
    def __init__(self, logdir):
      self.logdir = logdir

    def add_scalar(self, key, value, step):
      scalars.append((key, value, step))

    def close(self):
      pass

  monkeypatch.setitem(sys.modules, "tensorboardX",
                      types.SimpleNamespace(SummaryWriter=SummaryWriter))
  TrainConfig(tensorboard=True).validate()
  log = M.MetricsLog(tmp_path, tensorboard=True)
  log.write({"step": 3, "loss": 2.5, "mfu": None})
  log.close()
  assert scalars == [("loss", 2.5, 3)]
