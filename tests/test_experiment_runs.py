"""The GPU presets and command lines of experiments/scaling.py and experiments/char_lm.py:
the grid's shape, the sweep's time budget and separate runs folder, the char-LM's time
budget (stop, score, resume), each on tiny CPU settings."""

import json
import time
from pathlib import Path

import numpy as np
import pytest

from experiments import char_lm, scaling

TINYSHAKESPEARE_TRAIN_TOKENS = 1_003_855  # 90% of its 1,115,394 bytes


@pytest.fixture
def corpus(tmp_path):
  path = tmp_path / "corpus.txt"
  rng = np.random.default_rng(0)
  words = ["to", "be", "or", "not", "that", "is", "the", "question", "whether", "tis"]
  path.write_text(" ".join(rng.choice(words, 6000)) + "\n")
  return path


def test_full_grid_fits_one_gpu_and_the_corpus(tmp_path):

  runs = scaling.grid(scaling.FULL)
  assert len(runs) == 20
  cfgs = [scaling.train_config(r, scaling.FULL, tmp_path / "c.txt", tmp_path / r.name)
          for r in runs]
  n = {(c.n_layer, c.n_embd): c.model_config(256).matmul_params() for c in cfgs}
  assert max(n.values()) / min(n.values()) > 100  # the sizes span two decades
  for run, cfg in zip(runs, cfgs):
    cfg.validate()
    assert cfg.dtype == "bfloat16" and cfg.wkv_impl is None  # bf16, Pallas on a GPU
    assert cfg.steps >= 128  # no run is mostly warmup
    assert cfg.save_every >= cfg.steps  # one checkpoint per run: the last
    assert run.tokens <= 4.2 * TINYSHAKESPEARE_TRAIN_TOKENS  # at most ~4 epochs
  lr = {c.n_embd: c.lr for c in cfgs}
  widths = sorted(lr)
  assert all(lr[a] >= lr[b] for a, b in zip(widths, widths[1:])) and lr[512] < lr[64]
  # Quick mode keeps its old configs, so its finished runs are still recognised as done.
  quick = scaling.train_config(scaling.grid(scaling.QUICK)[0], scaling.QUICK, "d", "o")
  assert quick.dtype == "float32" and quick.lr == scaling.QUICK.lr
  assert quick.save_every == max(50, quick.steps // 4)


def test_sweep_time_budget_and_runs_folder(tmp_path, corpus):
  settings = scaling.SweepSettings(sizes=((1, 8), (2, 8)), tokens=(2048, 4096), ctx_len=16,
                                   batch_size=4)
  runs = scaling.longest_first(scaling.grid(settings))
  assert [r.tokens for r in runs] == [4096, 4096, 2048, 2048]
  calls, seen = [], []

  def fake_train(cfg):
    calls.append(Path(cfg.out).name)
    time.sleep(0.6)
    n = cfg.n_layer * 13 * cfg.n_embd ** 2
    return {"final_eval": {"loss": 5.0 - cfg.n_layer - cfg.steps / 1000},
            "params": n, "flops_per_token": 6.0 * n, "train_loss": 3.0, "tokens_per_s": 1.0}

  out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
  scaling.train_config(runs[0], settings, corpus, out)  # imports done before the clock runs
  records = scaling.run_sweep(runs, settings, corpus, out, train_fn=fake_train,
                              log=lambda s: None, runs_dir=elsewhere, max_seconds=0.5,
                              on_record=lambda recs: seen.append(len(recs)))
  # The budget was spent by the first run: the others did not start.
  assert calls == [runs[0].name] and [r["name"] for r in records] == calls and seen == [1]
  assert (elsewhere / runs[0].name / scaling.DONE).is_file() and not out.exists()
  calls.clear()
  records = scaling.run_sweep(runs, settings, corpus, out, train_fn=fake_train,
                              log=lambda s: None, runs_dir=elsewhere)
  assert calls == [r.name for r in runs[1:]] and len(records) == 4


@pytest.mark.slow
def test_scaling_cli_writes_results_plot_and_table_only_under_out(tmp_path, corpus):
  out, runs_dir = tmp_path / "out", tmp_path / "runs"
  argv = ["--full", "--sizes", "1x8", "--tokens", "512", "--ctx-len", "16",
          "--batch-size", "4", "--wkv-impl", "scan", "--data", str(corpus), "--out", str(out),
          "--runs-dir", str(runs_dir)]
  assert scaling.main(argv) == 0
  assert sorted(p.name for p in out.iterdir()) == ["results.json", "scaling.png", "table.md"]
  result = json.loads((out / "results.json").read_text())
  assert [r["name"] for r in result["runs"]] == ["L1-D8-tok512"]
  assert result["not_run"] == [] and result["analysis"]["frontier"]
  for r in result["runs"]:
    assert r["train_config"]["dtype"] == "bfloat16" and np.isfinite(r["loss"])
    assert r["train_config"]["lr"] == scaling.FULL.lr  # width 8 <= the reference width
    assert r["first_step_s"] > 0
    assert (runs_dir / r["name"] / scaling.DONE).is_file()
  assert "L1-D8-tok512" in (out / "table.md").read_text()
  # A rerun with no time left still reports the finished runs (they are skipped, not run).
  assert scaling.main(argv + ["--max-minutes", "0"]) == 0
  again = json.loads((out / "results.json").read_text())
  assert [r["loss"] for r in again["runs"]] == [r["loss"] for r in result["runs"]]
  with pytest.raises(SystemExit):
    scaling.main(argv[:1] + ["--sizes", "2x"])


@pytest.mark.slow
def test_char_lm_time_budget_stops_scores_and_resumes(tmp_path, corpus):
  out, run_dir = tmp_path / "out", tmp_path / "run"
  tiny = dict(n_layer=1, n_embd=16, ctx_len=32, batch_size=2, warmup=2, eval_every=1000,
              eval_size=8, wkv_impl="scan")
  result = char_lm.run("paper-short", out, data=corpus, run_dir=run_dir,
                       overrides=dict(tiny, steps=10**6), max_minutes=0.01)
  done = result["steps_done"]
  assert result["stopped_by_time_budget"] and 1 <= done < 10**6
  assert result["val_bpc"] is None and result["dropout"] == 0.1
  assert result["train_config"]["dtype"] == "bfloat16"
  held = result["heldout"]
  assert held["bytes"] == int(0.1 * corpus.stat().st_size) - 1 and 0 < held["bpc"] < 9
  assert sorted(p.name for p in out.iterdir()) == ["loss_curve.png", "results.json"]
  # The same run, continued to a few more steps without a budget, resumes and finishes.
  result = char_lm.run("paper-short", out, data=corpus, run_dir=run_dir,
                       overrides=dict(tiny, steps=done + 3))
  assert not result["stopped_by_time_budget"] and result["steps_done"] == done + 3
  assert result["val_bpc"] is not None and result["best_val_bpc"] <= result["val_bpc"]
