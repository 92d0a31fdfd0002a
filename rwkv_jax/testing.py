"""Helpers for tests and benchmarks."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx


def perturb_params(model: nnx.Module, seed: int, scale: float) -> nnx.Module:
  """Adds scale * N(0, 1) noise to every parameter of ``model`` in place and returns it.

  The Appendix E init has zero matrices (W_k, W_v, W_r) and zero LayerNorm biases; moving
  every parameter off its init keeps those paths from passing a comparison trivially.
  NumPy noise: no per-shape eager compiles.
  """
  noise = np.random.default_rng(seed)
  params = nnx.state(model, nnx.Param)
  nnx.update(model, jax.tree.map(
      lambda x: x + scale * noise.standard_normal(x.shape).astype(np.float32), params))
  return model
