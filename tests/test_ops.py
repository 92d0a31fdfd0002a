"""WKV: the scan reference against the paper's formula, and associative_scan against scan."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rwkv_jax.ops import WKVState, wkv, wkv_associative_scan, wkv_scan_reference
from tests.conftest import rel_err
from tests.wkv_cases import WKVAgainstScan, random_wkv_inputs


def _wkv_direct(w, u, k, v):
  """Paper eq. 16 term by term in float64 (no state, no stabilisation needed for small k)."""
  w, u, k, v = (np.asarray(x, np.float64) for x in (w, u, k, v))
  b, t, c = k.shape
  y = np.zeros((b, t, c))
  for i in range(t):
    past = np.exp(-(i - 1 - np.arange(i))[:, None] * w + k[:, :i])  # B i C
    cur = np.exp(u + k[:, i])
    y[:, i] = ((past * v[:, :i]).sum(1) + cur * v[:, i]) / (past.sum(1) + cur)
  return y


def test_scan_reference_matches_paper_equation_16(rng):
  w, u, k, v, _ = random_wkv_inputs(rng, 2, 25, 6, with_state=False)
  y, _ = wkv_scan_reference(w, u, k, v)
  assert rel_err(y, _wkv_direct(w, u, k, v)) <= 1e-6


def test_scan_state_is_the_represented_sums(rng):
  w, u, k, v, _ = random_wkv_inputs(rng, 1, 12, 4, with_state=False)
  _, s = wkv_scan_reference(w, u, k, v)
  w64, k64, v64 = (np.asarray(x, np.float64) for x in (w, k, v))
  decay = np.exp(-(11 - np.arange(12))[:, None] * w64 + k64[0])  # T C
  assert rel_err(np.exp(s.max[0]) * s.num[0], (decay * v64[0]).sum(0)) <= 1e-6
  assert rel_err(np.exp(s.max[0]) * s.den[0], decay.sum(0)) <= 1e-6


class TestAssociativeScan(WKVAgainstScan):
  GRAD_TOL = 1e-5  # measured worst case ~1e-6 (w), ~4e-7 (u, k, v, state)
  wkv_fn = staticmethod(jax.jit(wkv_associative_scan))


def test_dispatch_names_and_errors(rng):
  w, u, k, v, s = random_wkv_inputs(rng, 1, 5, 4)
  for impl in (None, "scan", "associative_scan"):
    y, new_state = wkv(w, u, k, v, s, implementation=impl)
    chex.assert_equal_shape([y, k])
    chex.assert_trees_all_equal_shapes_and_dtypes(new_state, s)
    chex.assert_tree_all_finite((y, new_state))
  with pytest.raises(ValueError, match="unknown WKV implementation 'cuda'"):
    wkv(w, u, k, v, implementation="cuda")
  with pytest.raises(ValueError, match="k and v must both be"):
    wkv(w, u, k[0], v[0])
  with pytest.raises(ValueError, match="w and u must be"):
    wkv(w[:2], u, k, v)
  with pytest.raises(ValueError, match="state.num must be"):
    wkv(w, u, k, v, WKVState(s.num[:, :2], s.den, s.max))
