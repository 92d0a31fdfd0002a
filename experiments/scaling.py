"""Scaling-law sweep: a grid of RWKV sizes (n_layer x n_embd) x token budgets on a text corpus.

Each grid point is an ordinary training run (``rwkv_jax.training.trainer.run_training``, the
function behind ``rwkv-jax train``) in its own folder ``OUT/runs/<name>``. A finished run
leaves ``sweep_done.json`` (its config, N, D, C and final validation loss); a rerun of the
sweep skips those, so a killed sweep continues where it stopped (a half-finished run
resumes from its last checkpoint).

Per run: N = the trainer's matmul parameter count (all parameters but the embedding table,
whose lookup is a gather; ``cfg.matmul_params()``), D = tokens trained
(steps x batch x ctx_len), C = 6 N D. Analysis:

  * Pareto frontier: runs with a lower loss than every run of smaller or equal compute;
  * log L = a + b log C fitted on the frontier; r^2 (the paper reports 0.994 on its 45-model
    frontier), and the frontier's last point predicted from a fit to the others;
  * L(N, D) = E + A / N^alpha + B / D^beta over all runs, by least squares: a grid over
    (alpha, beta) with (E, A, B) >= 0 solved linearly at each point, then a continuous
    polish from several of its cells (numpy only).

  python experiments/scaling.py            # quick: CPU, 20 small runs, <= 15 min
  python experiments/scaling.py --full --runs-dir /tmp/runs --max-minutes 7   # GPU, ~6 min

OUT receives results.json (rewritten after every run), scaling.png and table.md;
``--runs-dir`` keeps the run folders (checkpoints) elsewhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # run as a file: make the repository root importable
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from experiments import _common

DONE = "sweep_done.json"
PAPER_R2 = 0.994


def default_data() -> Path | None:
  """``../shared/data/tinyshakespeare.txt`` relative to the repository root, if present."""
  path = _common.REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
  return path if path.is_file() else None


@dataclasses.dataclass(frozen=True)
class SweepSettings:
  sizes: tuple[tuple[int, int], ...]  # (n_layer, n_embd)
  tokens: tuple[int, ...]             # token budgets D
  ctx_len: int = 64
  batch_size: int = 16
  lr: float = 3e-3
  warmup_fraction: float = 0.1
  eval_size: int = 128                # validation windows
  val_fraction: float = 0.1
  seed: int = 0
  wkv_impl: str | None = None
  dtype: str = "float32"
  # lr of a run = lr * min(1, lr_width_ref / n_embd): wider models take smaller steps
  # (AdamW's update per weight is ~lr whatever the width). None: the same lr for all.
  lr_width_ref: int | None = None
  saves_per_run: int = 4              # checkpoints per run (>= 50 steps apart), the last included

  def run_lr(self, n_embd: int) -> float:
    if self.lr_width_ref is None:
      return self.lr
    return self.lr * min(1.0, self.lr_width_ref / n_embd)


# Quick: the lax.scan WKV, which compiles ~3x faster than associative_scan on CPU (the
# compile dominates runs this small); the numbers are the same either way.
QUICK = SweepSettings(sizes=((1, 16), (1, 32), (2, 48), (2, 96)),
                      tokens=(2**15, 2**16, 2**17, 2**18, 2**19), wkv_impl="scan")
# GPU (one H100, ~6 min): 5 sizes, N = 0.12M .. 20.6M matmul parameters (x170), x 4 budgets
# of 0.5M .. 4M tokens (128 .. 1024 steps of 16 x 256; tinyshakespeare has ~1M training
# tokens, so at most ~4 epochs: more would let the large models overfit). At these sizes a
# step is bound by per-step overhead, not FLOPs, and each run compiles its own step (the lr
# schedule's step counts are constants of the program), so the grid is kept to 20 runs and
# a run keeps one checkpoint (its last). bf16 matmuls, the default (Pallas) WKV.
FULL = SweepSettings(sizes=((2, 64), (2, 128), (4, 192), (4, 384), (6, 512)),
                     tokens=(2**19, 2**20, 2**21, 2**22), ctx_len=256, batch_size=16, lr=3e-3,
                     lr_width_ref=128, eval_size=512, dtype="bfloat16", saves_per_run=1)


@dataclasses.dataclass(frozen=True)
class SweepRun:
  n_layer: int
  n_embd: int
  tokens: int

  @property
  def name(self) -> str:
    return f"L{self.n_layer}-D{self.n_embd}-tok{self.tokens}"


def grid(settings: SweepSettings) -> list[SweepRun]:
  """Every (size, budget) pair: the sweep is a plain list of runs."""
  return [SweepRun(l, d, t) for (l, d), t in itertools.product(settings.sizes, settings.tokens)]


def longest_first(runs: list[SweepRun]) -> list[SweepRun]:
  """The order in which the CLI trains: largest token budget first (every size), then the
  next. When ``--max-minutes`` stops a sweep, what is left out are the shortest runs,
  which matter least to the fits (they sit on the steep start of training)."""
  return sorted(runs, key=lambda r: -r.tokens)  # stable: sizes stay in grid order


def train_config(run: SweepRun, settings: SweepSettings, data: Path, out: Path):
  """The TrainConfig of one grid point: steps = D / (batch x ctx_len), rounded up."""
  from rwkv_jax.training.config import TrainConfig

  steps = max(1, math.ceil(run.tokens / (settings.batch_size * settings.ctx_len)))
  return TrainConfig(
      out=str(out), steps=steps, batch_size=settings.batch_size, ctx_len=settings.ctx_len,
      n_layer=run.n_layer, n_embd=run.n_embd, lr=settings.run_lr(run.n_embd),
      warmup=min(steps, max(1, round(settings.warmup_fraction * steps))),
      data=str(data), val_fraction=settings.val_fraction, seed=settings.seed,
      eval_every=0, eval_size=settings.eval_size,
      save_every=max(50, steps // max(1, settings.saves_per_run)),
      resume=True, progress=False, wkv_impl=settings.wkv_impl, dtype=settings.dtype)


def run_sweep(runs: list[SweepRun], settings: SweepSettings, data: Path, out: Path, *,
              train_fn: Callable | None = None, log=print, runs_dir: Path | None = None,
              max_seconds: float | None = None,
              on_record: Callable[[list[dict]], None] | None = None) -> list[dict]:
  """Trains every run that has no done-marker; returns one record per finished run (grid
  order). Run folders go under ``runs_dir`` (default ``out/runs``). With ``max_seconds``,
  no new run starts once that much wall time has passed (the rest are logged as not run;
  rerunning continues with them). ``on_record(records so far)`` follows every new run."""
  if train_fn is None:
    from rwkv_jax.training.trainer import run_training as train_fn
  runs_dir = out / "runs" if runs_dir is None else Path(runs_dir)
  start = time.perf_counter()
  records = []
  for i, run in enumerate(runs):
    folder = runs_dir / run.name
    cfg = train_config(run, settings, data, folder)
    marker = folder / DONE
    if marker.is_file():
      record = json.loads(marker.read_text())
      if record.get("train_config") == cfg.to_dict():
        log(f"[{i + 1}/{len(runs)}] {run.name}: done, skipped (loss {record['loss']:.4f})")
        records.append(record)
        continue
      raise ValueError(f"{marker} was written by a different config; move {folder} away or "
                       f"choose another --out")
    if max_seconds is not None and time.perf_counter() - start >= max_seconds:
      log(f"[{i + 1}/{len(runs)}] {run.name}: not run (the {max_seconds:.0f} s budget is spent)")
      continue
    log(f"[{i + 1}/{len(runs)}] {run.name}: {cfg.steps} steps, lr {cfg.lr:.3g}")
    t0 = time.perf_counter()
    summary = train_fn(cfg)
    if summary.get("interrupted") or summary.get("final_eval") is None:
      raise KeyboardInterrupt(f"{run.name} was interrupted; rerun the sweep to resume it")
    n = summary["flops_per_token"] / 6.0  # the trainer's 6N rule: N = matmul parameters
    d = cfg.steps * cfg.batch_size * cfg.ctx_len
    record = {"name": run.name, "n_layer": run.n_layer, "n_embd": run.n_embd,
              "params": summary["params"], "N": int(round(n)), "D": d, "C": 6.0 * n * d,
              "loss": float(summary["final_eval"]["loss"]),
              "bits_per_byte": summary["final_eval"].get("bits_per_byte"),
              "train_loss": summary.get("train_loss"), "wall_s": time.perf_counter() - t0,
              "tokens_per_s": summary.get("tokens_per_s"),
              "first_step_s": _first_step_seconds(folder), "train_config": cfg.to_dict()}
    _common.write_json(marker, record)
    records.append(record)
    log(f"    loss {record['loss']:.4f} in {record['wall_s']:.1f} s (first step, with its "
        f"compile: {record['first_step_s'] or float('nan'):.1f} s)")
    if on_record is not None:
      on_record(records)
  return records


def _first_step_seconds(folder: Path) -> float | None:
  """The wall time of the run's last compiling step (the first after a start or resume),
  from the trainer's metrics.jsonl; None where it is not there."""
  path = folder / "metrics.jsonl"
  if not path.is_file():
    return None
  times = [rec.get("step_time_s") for rec in map(json.loads, path.read_text().splitlines())
           if rec.get("includes_compile")]
  return times[-1] if times else None


# ---------------------------------------------------------------- analysis


def pareto_frontier(compute, loss) -> np.ndarray:
  """Indices, by increasing compute, of runs that beat every run of smaller or equal compute."""
  compute, loss = np.asarray(compute, float), np.asarray(loss, float)
  order = np.lexsort((loss, compute))
  best, keep = np.inf, []
  for i in order:
    if loss[i] < best:
      keep.append(int(i))
      best = loss[i]
  return np.asarray(keep, int)


def fit_power_law(compute, loss) -> dict:
  """log L = a + b log C by least squares; L = exp(a) C^b. r^2 in log space."""
  x, y = np.log(np.asarray(compute, float)), np.log(np.asarray(loss, float))
  if x.size < 2:
    raise ValueError(f"a power-law fit needs at least 2 points, got {x.size}")
  b, a = np.polyfit(x, y, 1)
  return {"a": float(a), "b": float(b), "r2": r_squared(y, a + b * x), "n_points": int(x.size)}


def r_squared(y, pred) -> float:
  y, pred = np.asarray(y, float), np.asarray(pred, float)
  ss_tot = float(np.square(y - y.mean()).sum())
  return 1.0 - float(np.square(y - pred).sum()) / ss_tot if ss_tot > 0 else float("nan")


# Every support of (E, A, B) that a non-negative solution can have, the empty one included.
_SUPPORTS = [cols for k in range(4) for cols in itertools.combinations(range(3), k)]


def _chinchilla_profile(u, v, y, alpha, beta):
  """The exact non-negative least-squares (E, A, B) for each of G exponent pairs.

  u, v, y: (M,) scaled N, scaled D, loss; alpha, beta: (G,). The model is linear in
  c = (E, A, B) for fixed exponents: X = [1, u^-alpha, v^-beta] (G M 3). The optimum over
  c >= 0 is the unconstrained fit on its support with every coefficient >= 0, so the best
  feasible fit over the 8 supports is exact (no iterative NNLS). Returns sse (G,), c (G 3),
  X (G M 3).
  """
  x = np.stack(np.broadcast_arrays(np.ones((alpha.size, y.size)),
                                   u[None, :] ** -alpha[:, None],
                                   v[None, :] ** -beta[:, None]), axis=-1)
  best_sse, best_c = np.full(alpha.size, np.inf), np.zeros((alpha.size, 3))
  for cols in _SUPPORTS:
    c = np.zeros((alpha.size, 3))
    if cols:
      c[:, cols] = (np.linalg.pinv(x[:, :, cols]) @ y[None, :, None])[..., 0]  # G k
    sse = np.square(np.einsum("gmk,gk->gm", x, c) - y).sum(-1)
    better = (c >= 0).all(-1) & (sse < best_sse)
    best_sse[better], best_c[better] = sse[better], c[better]
  return best_sse, best_c, x


def _grid_starts(sse, count):
  """Flat indices of up to ``count`` cells of a 2-d SSE grid to start the polish from.

  First the local minima (one per basin the grid resolves), then the valley floor (the best
  cell of every row and every column: a narrow valley that runs obliquely has its floor
  between cells, so its true minimum can lie in a basin the grid does not show), each
  best first. Cells of equal SSE (a plateau where a coefficient is 0 and its exponent does
  nothing) count once.
  """
  padded = np.pad(sse, 1, constant_values=np.inf)
  h, w = sse.shape
  neighbours = np.stack([padded[1 + i:1 + i + h, 1 + j:1 + j + w]
                         for i in (-1, 0, 1) for j in (-1, 0, 1) if i or j])
  flat = sse.ravel()
  minima = np.flatnonzero(sse <= neighbours.min(0))
  floor = np.concatenate([np.arange(h) * w + sse.argmin(1), sse.argmin(0) * w + np.arange(w)])
  picked, seen = [], []
  for group in (minima, floor):
    for i in sorted(set(group.tolist()), key=lambda i: (flat[i], i)):
      if len(picked) < count and not np.isclose(flat[i], seen, rtol=1e-12, atol=0).any():
        picked.append(i)
        seen.append(flat[i])
  return np.asarray(picked, int)


def _sse_gradient(u, v, y, theta):
  """Profiled SSE and its exact gradient in theta = log(alpha, beta) (S 2), for S points.

  With c the exact non-negative fit, d SSE / d theta = 2 r . (dX/dtheta c) (the envelope
  theorem: c is optimal, so its own change does not count), r = X c - y. Returns sse (S,),
  grad (S 2).
  """
  exps = np.exp(theta)
  sse, c, x = _chinchilla_profile(u, v, y, exps[:, 0], exps[:, 1])
  r = np.einsum("smk,sk->sm", x, c) - y
  # d(u^-alpha)/d(log alpha) = -alpha log(u) u^-alpha
  dx = -np.stack([np.log(u), np.log(v)])[None] * x[:, :, 1:].transpose(0, 2, 1)  # S 2 M
  return sse, 2 * np.einsum("sim,sm->si", dx, r) * c[:, 1:] * exps


def _polish_exponents(u, v, y, exps, sse, bounds, iters=100, h=1e-5):
  """Damped Newton over theta = log(alpha, beta) on the profiled SSE, all starts at once.

  exps (S 2), sse (S,): the starts' exponents and profiled SSE. Exact gradient
  (``_sse_gradient``), Hessian by central differences of it (the residuals of noisy data
  are not small, so Gauss-Newton's J^T J alone converges slowly along the curved valley).
  The Hessian is shifted to be positive definite and damped Levenberg-Marquardt style; a
  step is kept only where it lowers the SSE, so every start ends no worse than it began.
  Log exponents: a step toward 0 shrinks an exponent by a factor instead of clipping it to
  the bound, where its coefficient would go to 0 and leave it on a flat plateau. Returns
  exps (S 2), sse (S,).
  """
  theta, lo, hi = np.log(exps), np.log(bounds[0]), np.log(bounds[1])
  lam = np.full(len(theta), 1e-3)
  live = np.ones(len(theta), bool)
  offsets = np.array([[h, 0], [-h, 0], [0, h], [0, -h]])
  for _ in range(iters):
    if not live.any():
      break
    idx = np.flatnonzero(live)
    t = theta[idx]
    _, grad = _sse_gradient(u, v, y, t)
    _, g_off = _sse_gradient(u, v, y, (t[:, None] + offsets).reshape(-1, 2))
    g_off = g_off.reshape(-1, 4, 2)
    hess = np.stack([g_off[:, 0] - g_off[:, 1], g_off[:, 2] - g_off[:, 3]], 1) / (2 * h)
    hess = (hess + hess.transpose(0, 2, 1)) / 2
    # an exponent at a bound that the gradient pushes outward is held there (projected
    # step), so the other one still moves
    free = ~(((t <= lo) & (grad > 0)) | ((t >= hi) & (grad < 0)))
    grad = grad * free
    hess = hess * (free[:, :, None] & free[:, None, :]) + np.eye(2) * ~free[:, None, :]
    scale = np.abs(hess).max((1, 2)) + 1e-300
    shift = np.maximum(0.0, -np.linalg.eigvalsh(hess)[:, 0]) + (lam[idx] + 1e-12) * scale
    step = -np.linalg.solve(hess + shift[:, None, None] * np.eye(2), grad[..., None])[..., 0]
    # at most a factor e per exponent and step: where the SSE barely depends on one
    # exponent the step along it is huge and would jump over its basin
    step = np.clip(step, -1.0, 1.0)
    trial = np.clip(t + step, lo, hi)
    trial_sse, _, _ = _chinchilla_profile(u, v, y, *np.exp(trial).T)
    better = trial_sse < sse[idx]
    theta[idx[better]], sse[idx[better]] = trial[better], trial_sse[better]
    lam[idx] = np.where(better, lam[idx] / 3, lam[idx] * 4)
    # done: steps keep failing, or the step no longer moves the exponents
    live[idx] = (lam[idx] < 1e8) & ~(better & (np.abs(trial - t).max(-1) < 1e-12))
  return np.exp(theta), sse


def fit_chinchilla(n, d, loss, alphas=None, betas=None, starts: int = 12) -> dict:
  """L(N, D) = E + A / N^alpha + B / D^beta with E, A, B >= 0 (least squares in L).

  For fixed exponents the model is linear in (E, A, B), so the fit is a search over
  (alpha, beta) alone, each point solved exactly for (E, A, B) >= 0. A coarse grid
  (``alphas`` x ``betas``, default 40 x 40 over [0.05, 2]) finds the basins; the SSE
  valley is long and narrow, so the best grid cell can lie in the wrong one: up to
  ``starts`` cells (``_grid_starts``) are each polished by a damped Newton iteration
  (continuous, exponents kept in [1e-3, 5]) and the best result wins. N and D are scaled
  by their geometric means inside the solve for conditioning (A and B are reported for
  the raw N, D). ``sse`` is in the returned dict so a caller can compare fits.
  """
  n, d, loss = (np.asarray(v, float) for v in (n, d, loss))
  if not (n.size == d.size == loss.size) or n.size < 4:
    raise ValueError(f"L(N, D) has 5 parameters; need >= 4 runs of equal-length N, D, L, "
                     f"got {n.size}, {d.size}, {loss.size}")
  if not ((n > 0).all() and (d > 0).all() and np.isfinite(loss).all()):
    raise ValueError("L(N, D) fit: N and D must be > 0 and every loss finite")
  n0, d0 = np.exp(np.log(n).mean()), np.exp(np.log(d).mean())
  u, v = n / n0, d / d0
  alphas = np.linspace(0.05, 2.0, 40) if alphas is None else np.asarray(alphas, float)
  betas = np.linspace(0.05, 2.0, 40) if betas is None else np.asarray(betas, float)
  ga, gb = (g.ravel() for g in np.meshgrid(alphas, betas, indexing="ij"))
  sse, _, _ = _chinchilla_profile(u, v, loss, ga, gb)
  cells = _grid_starts(sse.reshape(alphas.size, betas.size), max(1, starts))
  bounds = (1e-3, 5.0)
  exps = np.clip(np.stack([ga[cells], gb[cells]], 1), *bounds)
  exps, sse = _polish_exponents(u, v, loss, exps, _chinchilla_profile(u, v, loss, *exps.T)[0],
                                bounds)
  alpha, beta = exps[np.argmin(sse)]
  sse, c, x = _chinchilla_profile(u, v, loss, np.array([alpha]), np.array([beta]))
  (e, a_s, b_s), pred = c[0], x[0] @ c[0]
  return {"E": float(e), "A": float(a_s * n0**alpha), "B": float(b_s * d0**beta),
          "alpha": float(alpha), "beta": float(beta), "r2": r_squared(loss, pred),
          "rmse": float(np.sqrt(sse[0] / loss.size)), "sse": float(sse[0]),
          "n_points": int(loss.size)}


def chinchilla_predict(fit: dict, n, d):
  return fit["E"] + fit["A"] / np.asarray(n, float)**fit["alpha"] \
      + fit["B"] / np.asarray(d, float)**fit["beta"]


def analyse(records: list[dict]) -> dict:
  c = np.asarray([r["C"] for r in records])
  loss = np.asarray([r["loss"] for r in records])
  front = pareto_frontier(c, loss)
  out = {"frontier": [records[i]["name"] for i in front]}
  if front.size >= 2:
    out["compute_fit"] = fit_power_law(c[front], loss[front])
  if front.size >= 3:  # extrapolation: fit without the largest-compute frontier point
    held = fit_power_law(c[front[:-1]], loss[front[:-1]])
    pred = math.exp(held["a"]) * c[front[-1]] ** held["b"]
    out["extrapolation"] = {"fit_without_last": held, "predicted_loss": pred,
                            "actual_loss": float(loss[front[-1]]),
                            "rel_error": float(pred / loss[front[-1]] - 1)}
  if len(records) >= 4:
    out["nd_fit"] = fit_chinchilla([r["N"] for r in records], [r["D"] for r in records], loss)
  return out


def plot(records: list[dict], analysis: dict, path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(1, 2, figsize=(12, 4.8))
  sizes = sorted({(r["n_layer"], r["n_embd"], r["N"]) for r in records}, key=lambda s: s[2])
  colors = plt.cm.viridis(np.linspace(0, 0.9, len(sizes)))
  for (nl, ne, n), col in zip(sizes, colors):
    rs = sorted((r for r in records if r["N"] == n), key=lambda r: r["D"])
    label = f"{nl}x{ne} (N={n:,})"
    ax[0].loglog([r["C"] for r in rs], [r["loss"] for r in rs], "o", color=col, label=label)
    ax[1].semilogx([r["D"] for r in rs], [r["loss"] for r in rs], "o", color=col, label=label)
    if "nd_fit" in analysis:
      dd = np.geomspace(min(r["D"] for r in records), max(r["D"] for r in records), 50)
      ax[1].semilogx(dd, chinchilla_predict(analysis["nd_fit"], n, dd), "-", color=col)
  by_name = {r["name"]: r for r in records}
  front = [by_name[n] for n in analysis["frontier"]]
  ax[0].loglog([r["C"] for r in front], [r["loss"] for r in front], "k--", lw=1,
               label="Pareto frontier")
  if "compute_fit" in analysis:
    f = analysis["compute_fit"]
    cc = np.geomspace(min(r["C"] for r in records), max(r["C"] for r in records), 50)
    ax[0].loglog(cc, np.exp(f["a"]) * cc ** f["b"], "r-",
                 label=f"fit L ∝ C^{f['b']:.3f}, r²={f['r2']:.3f}")
  ax[0].set(xlabel="compute C = 6ND (FLOPs)", ylabel="validation loss (nats/token)",
            title="runs, frontier and compute fit")
  title = "L(N, D) fit"
  if "nd_fit" in analysis:
    f = analysis["nd_fit"]
    title = (f"L = {f['E']:.2f} + A/N^{f['alpha']:.2f} + B/D^{f['beta']:.2f}  "
             f"(r²={f['r2']:.3f})")
  ax[1].set(xlabel="tokens D", ylabel="validation loss (nats/token)", title=title)
  for a in ax:
    a.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def tables(records: list[dict], analysis: dict) -> str:
  front = set(analysis["frontier"])
  parts = [_common.print_table(
      ["run", "N (matmul)", "D tokens", "C = 6ND", "val loss", "bits/byte", "frontier"],
      [[r["name"], f"{r['N']:,}", f"{r['D']:,}", f"{r['C']:.3g}", r["loss"],
        r["bits_per_byte"] if r["bits_per_byte"] is not None else "-",
        "yes" if r["name"] in front else ""] for r in records])]
  rows = []
  if "compute_fit" in analysis:
    f = analysis["compute_fit"]
    rows.append(["log L vs log C on the frontier", f"L = {math.exp(f['a']):.3g} C^{f['b']:.4f}",
                 f"{f['r2']:.4f} ({f['n_points']} points; paper {PAPER_R2})"])
  if "extrapolation" in analysis:
    e = analysis["extrapolation"]
    rows.append(["last frontier point from the others", f"predicted {e['predicted_loss']:.4f}"
                 f", actual {e['actual_loss']:.4f}", f"rel. error {100 * e['rel_error']:+.1f}%"])
  if "nd_fit" in analysis:
    f = analysis["nd_fit"]
    rows.append(["L(N, D) over all runs", f"E={f['E']:.3f} A={f['A']:.4g} alpha={f['alpha']:.3f}"
                 f" B={f['B']:.4g} beta={f['beta']:.3f}",
                 f"{f['r2']:.4f} (rmse {f['rmse']:.4f})"])
  parts.append(_common.print_table(["fit", "result", "r^2"], rows))
  return "\n\n".join(parts)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--full", action="store_true", help="the GPU grid (FULL)")
  p.add_argument("--data", help="text corpus (default ../shared/data/tinyshakespeare.txt)")
  p.add_argument("--out", default=str(_common.REPO / "experiments/out/scaling"),
                 help="results.json, scaling.png, table.md (and the runs, unless --runs-dir)")
  p.add_argument("--runs-dir", help="where the run folders go (default OUT/runs)")
  p.add_argument("--sizes", help="comma-separated LxD, e.g. 1x16,2x64")
  p.add_argument("--tokens", help="comma-separated token budgets, e.g. 32768,131072")
  p.add_argument("--ctx-len", type=int)
  p.add_argument("--batch-size", type=int)
  p.add_argument("--lr", type=float)
  p.add_argument("--wkv-impl", choices=["scan", "associative_scan", "pallas"])
  p.add_argument("--max-minutes", type=float,
                 help="start no new run after this many minutes; report the finished ones")
  args = p.parse_args(argv)
  settings = FULL if args.full else QUICK
  changes = {}
  try:
    if args.sizes:
      changes["sizes"] = tuple(tuple(int(v) for v in s.lower().split("x", 1))
                               for s in args.sizes.split(","))
    if args.tokens:
      changes["tokens"] = tuple(int(float(t)) for t in args.tokens.split(","))
  except ValueError:
    p.error(f"--sizes takes LxD pairs (1x16,2x64), --tokens integers; got {args.sizes!r}, "
            f"{args.tokens!r}")
  for key in ("ctx_len", "batch_size", "lr", "wkv_impl"):
    if getattr(args, key) is not None:
      changes[key] = getattr(args, key)
  settings = dataclasses.replace(settings, **changes)
  data = Path(args.data) if args.data else default_data()
  if data is None:
    raise SystemExit("no corpus: ../shared/data/tinyshakespeare.txt is absent; pass --data")
  if not data.is_file():
    raise SystemExit(f"--data {data}: no such file")
  data, out = data.absolute(), Path(args.out).absolute()  # the done-markers record them
  runs_dir = Path(args.runs_dir).absolute() if args.runs_dir else out / "runs"
  runs = grid(settings)
  steps = [math.ceil(r.tokens / (settings.batch_size * settings.ctx_len)) for r in runs]
  print(f"{len(runs)} runs, {sum(steps):,} steps of {settings.batch_size} x "
        f"{settings.ctx_len} tokens, {sum(r.tokens for r in runs):,} tokens in all; "
        f"{settings.dtype}, wkv {settings.wkv_impl or 'default'}; runs in {runs_dir}")
  t0 = time.perf_counter()

  def report(records: list[dict], final: bool) -> None:
    """results.json after every run, without the fits (a killed sweep leaves the runs it
    finished; ``analyse`` them later); the fits, plot and tables at the end."""
    order = {r.name: i for i, r in enumerate(runs)}
    records = sorted(records, key=lambda rec: order.get(rec["name"], len(order)))
    analysis = analyse(records) if final else None
    done = {r["name"] for r in records}
    result = {"settings": dataclasses.asdict(settings), "data": str(data),
              "machine": _common.machine(), "date": _common.RUN_DATE, "runs": records,
              "not_run": [r.name for r in runs if r.name not in done], "analysis": analysis,
              "paper_r2": PAPER_R2, "wall_s": time.perf_counter() - t0}
    _common.write_json(out / "results.json", result)
    if not final:
      return
    plot(records, analysis, out / "scaling.png")
    print(f"\n{result['machine']}; sweep wall {result['wall_s']:.0f} s (skipped runs count 0)"
          + (f"; NOT RUN: {', '.join(result['not_run'])}" if result["not_run"] else "") + "\n")
    (out / "table.md").write_text(tables(records, analysis) + "\n")

  records = run_sweep(longest_first(runs), settings, data, out, runs_dir=runs_dir,
                      max_seconds=None if args.max_minutes is None else 60 * args.max_minutes,
                      on_record=lambda recs: report(recs, final=False))
  if not records:
    raise SystemExit("no run finished: nothing to analyse")
  report(records, final=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
