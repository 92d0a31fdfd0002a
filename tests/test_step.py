"""The chunked head + cross entropy of the train step against the full (B, T, V) logits:
forward and gradients, float32, 1e-5 relative (measured up to ~1.2e-6: only summation
order)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rwkv_jax import models
from rwkv_jax.testing import perturb_params
from rwkv_jax.training.step import head_losses
from tests.conftest import rel_err


@pytest.mark.parametrize("family", ["tiny", "rwkv7-tiny"])
@pytest.mark.parametrize("chunk_elements", [64 * 5, 64 * 1000])  # 5 tokens (padded) / all
def test_chunked_head_equals_full_logits(rng, family, chunk_elements):
  model = perturb_params(models.build_model(models.preset(family, n_layer=1)), 1, 0.2)
  graphdef, params = nnx.split(model, nnx.Param)
  x = jnp.asarray(rng.standard_normal((3, 7, model.cfg.n_embd)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, model.cfg.vocab_size, (3, 7)), jnp.int32)
  weights = jnp.asarray(rng.standard_normal((3, 7)), jnp.float32)

  def chunked(params, x):
    out = head_losses(nnx.merge(graphdef, params), x, targets, chunk_elements)
    return (out.ce * weights).sum() + 1e-2 * (out.lse ** 2).sum(), out

  def full(params, x):
    logits = nnx.merge(graphdef, params).logits(x)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    lse = jax.nn.logsumexp(logits, -1)
    hit = (logits.argmax(-1) == targets).astype(jnp.float32)
    return (ce * weights).sum() + 1e-2 * (lse ** 2).sum(), (ce, lse, hit)

  (v1, got), g1 = jax.value_and_grad(chunked, (0, 1), has_aux=True)(params, x)
  (v2, want), g2 = jax.value_and_grad(full, (0, 1), has_aux=True)(params, x)
  assert rel_err(v1, v2) <= 1e-5
  for a, b in zip(got[:2], want[:2]):
    assert rel_err(a, b) <= 1e-5
  np.testing.assert_array_equal(got[2], want[2])
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    assert rel_err(a, b) <= 1e-5
