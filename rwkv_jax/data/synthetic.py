"""The built-in synthetic task: next-token prediction on noisy repeating patterns.

The seeds' benchmark (``shared/seeds/benchmark-rwkv-transformer-lstm.txt``) names only the
outline: vocabulary 64, sequences of 32 to 256 tokens, "repeating patterns that require
both short-term and long-term memory". This generator fills it in, deterministically from a
seed:

  * Token 0 is BOS (position 0 of every sequence, never a target); 1..63 are content.
  * The seed fixes R = 4 *regimes*: sparse Markov chains over the content tokens. In each
    regime every token has 2 successors, taken with probability 0.75 / 0.25.
  * A sequence draws its length L in [min_len, max_len] (BOS included), a regime r and a
    period p in [4, min(32, (L - 1) // 2)]. The first p tokens (the *motif*) are a walk of
    chain r from a uniform start. The motif then repeats until L tokens, and each repeated
    token is, with probability 0.1, replaced by a fresh successor (in chain r) of the token
    before it (noise that does not shift the period).

What is learnable: short-range, the successor table of a token (a bigram model that
ignores the regime is ambiguous among up to 8 successors); medium-range, the regime,
inferred from the tokens seen so far (then about 0.75 of motif tokens are predictable);
long-range, copying the token p positions back (about 0.9 of repeated tokens). The first
token after BOS is uniform (1/63), so no model reaches 100%.

Held-out split: a sequence belongs to the test split iff a hash of its (regime, motif) is
0 mod 10, so no test motif is ever a training motif; the test set is a fixed list of
sequences drawn from its own stream. Training batches are deterministic in (seed, step).

Batches are ``(inputs, targets, mask)``: int32 (B, T) inputs (BOS, x_1 .. x_{L-2}, then 0
padding), int32 (B, T) targets (x_1 .. x_{L-1}), float32 (B, T) mask (1 on the L - 1 real
targets, 0 on padding). Accuracy reported by the trainer is over every mask = 1 position
(all real targets, including the unpredictable ones); ``phases`` tells motif from repeat.
"""

from __future__ import annotations

import hashlib

import numpy as np

BOS = 0
N_REGIMES = 4
N_SUCCESSORS = 2
SUCCESSOR_PROBS = (0.75, 0.25)
MIN_PERIOD, MAX_PERIOD = 4, 32
NOISE = 0.1
TEST_BUCKETS = 10

_TRAIN, _TEST = 0, 1
# phases: 0 padding, 1 the first target (after BOS), 2 motif, 3 repeat
PAD, FIRST, MOTIF, REPEAT = 0, 1, 2, 3


class SyntheticTask:
  """Noisy repeating Markov motifs; see the module docstring for the generator.

  Args:
    seed: fixes the regimes, the training stream and the test set.
    vocab_size: V >= 8 (token 0 is BOS).
    min_len, max_len: sequence lengths L (BOS included) are uniform in [min_len, max_len].
  """

  def __init__(self, seed: int = 0, vocab_size: int = 64, min_len: int = 32,
               max_len: int = 256):
    if vocab_size < 8:
      raise ValueError(f"synthetic task needs vocab_size >= 8, got {vocab_size}")
    if not 2 * MIN_PERIOD + 1 <= min_len <= max_len:
      raise ValueError(
          f"synthetic task needs {2 * MIN_PERIOD + 1} <= min_len <= max_len, "
          f"got min_len={min_len}, max_len={max_len}")
    self.seed, self.vocab_size = int(seed), int(vocab_size)
    self.min_len, self.max_len = int(min_len), int(max_len)
    rng = np.random.default_rng([self.seed, 7919])
    n = vocab_size - 1  # content tokens 1..V-1
    # succ[r, a] = the successors of token a + 1 in regime r (distinct content tokens)
    self._succ = np.stack([
        np.stack([1 + rng.choice(n, N_SUCCESSORS, replace=False) for _ in range(n)])
        for _ in range(N_REGIMES)])
    self._probs = np.asarray(SUCCESSOR_PROBS)
    self._test_cache: dict[int, tuple[np.ndarray, ...]] = {}

  # -- one sequence ---------------------------------------------------------------------

  def _next(self, rng, regime: int, token: int) -> int:
    return int(self._succ[regime, token - 1, rng.choice(N_SUCCESSORS, p=self._probs)])

  def _sequence(self, rng, split: int):
    """Draws one sequence of the given split (rejection on the motif hash).

    Returns (tokens (L,) int32, phases (L,) int8, (regime, motif))."""
    while True:
      length = int(rng.integers(self.min_len, self.max_len + 1))
      regime = int(rng.integers(N_REGIMES))
      period = int(rng.integers(MIN_PERIOD, min(MAX_PERIOD, (length - 1) // 2) + 1))
      motif = [int(rng.integers(1, self.vocab_size))]
      while len(motif) < period:
        motif.append(self._next(rng, regime, motif[-1]))
      if (_motif_bucket(regime, motif) == 0) == (split == _TEST):
        break
    seq = [BOS] + motif
    phase = [PAD, FIRST] + [MOTIF] * (period - 1)
    while len(seq) < length:
      tok = motif[(len(seq) - 1) % period]
      if rng.random() < NOISE:
        tok = self._next(rng, regime, seq[-1])
      seq.append(tok)
      phase.append(REPEAT)
    return np.asarray(seq, np.int32), np.asarray(phase, np.int8), (regime, tuple(motif))

  def _batch(self, rng, split: int, batch_size: int, seq_len: int):
    inputs = np.zeros((batch_size, seq_len), np.int32)
    targets = np.zeros((batch_size, seq_len), np.int32)
    phases = np.zeros((batch_size, seq_len), np.int8)
    for b in range(batch_size):
      seq, phase, _ = self._sequence(rng, split)
      seq, phase = seq[:seq_len + 1], phase[:seq_len + 1]
      n = len(seq) - 1
      inputs[b, :n], targets[b, :n], phases[b, :n] = seq[:-1], seq[1:], phase[1:]
    return inputs, targets, (phases != PAD).astype(np.float32), phases

  # -- public API -----------------------------------------------------------------------

  def batch(self, step: int, batch_size: int, seq_len: int | None = None):
    """Training batch number ``step``: (inputs, targets, mask), each (B, T), T = seq_len
    (default max_len - 1; longer sequences are cut). Deterministic in (seed, step)."""
    seq_len = self._check(batch_size, seq_len)
    rng = np.random.default_rng([self.seed, _TRAIN, int(step)])
    return self._batch(rng, _TRAIN, batch_size, seq_len)[:3]

  def test_set(self, n: int, seq_len: int | None = None):
    """The fixed held-out set of n sequences: (inputs, targets, mask), each (n, T)."""
    return self.test_set_with_phases(n, seq_len)[:3]

  def test_set_with_phases(self, n: int, seq_len: int | None = None):
    """``test_set`` plus int8 phases (n, T): 0 pad, 1 first target, 2 motif, 3 repeat."""
    seq_len = self._check(n, seq_len)
    key = (n, seq_len)
    if key not in self._test_cache:
      rng = np.random.default_rng([self.seed, _TEST])
      self._test_cache[key] = self._batch(rng, _TEST, n, seq_len)
    return self._test_cache[key]

  def motifs(self, step: int | None, batch_size: int) -> list[tuple[int, tuple[int, ...]]]:
    """The (regime, motif) of each sequence of training batch ``step`` (or of the test set
    of ``batch_size`` sequences when step is None): lets tests check the split."""
    split = _TEST if step is None else _TRAIN
    key = [self.seed, split] if step is None else [self.seed, split, int(step)]
    rng = np.random.default_rng(key)
    return [self._sequence(rng, split)[2] for _ in range(batch_size)]

  @staticmethod
  def in_test_split(regime: int, motif) -> bool:
    return _motif_bucket(regime, motif) == 0

  def _check(self, batch_size: int, seq_len: int | None) -> int:
    seq_len = self.max_len - 1 if seq_len is None else int(seq_len)
    if batch_size < 1 or seq_len < 1:
      raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
    return seq_len


def _motif_bucket(regime: int, motif) -> int:
  key = np.asarray([regime, *motif], np.int32).tobytes()
  return int.from_bytes(hashlib.blake2b(key, digest_size=4).digest(), "little") % TEST_BUCKETS
