"""RWKV-4 configuration: a frozen dataclass with the paper's Table 2 presets."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from rwkv_jax.models.base import FamilyConfig, check_positive_ints

# Table 2 of arXiv 2305.13048: name -> (n_layer, n_embd). Vocabulary 50277 (GPT-NeoX).
PILE_VOCAB = 50277
_PAPER_SIZES = {
    "169m": (12, 768),
    "430m": (24, 1024),
    "1.5b": (24, 2048),
    "3b": (32, 2560),
    "7b": (32, 4096),
    "14b": (40, 5120),
}
WKV_IMPLEMENTATIONS = (None, "scan", "associative_scan", "pallas")


@dataclasses.dataclass(frozen=True)
class RWKVConfig(FamilyConfig):
  """RWKV-4 hyper-parameters.

  Attributes:
    n_layer: number of residual blocks L.
    n_embd: model width D (also the WKV channel count).
    vocab_size: V, the embedding and head size.
    ctx_len: training context length T (the model itself has no length limit).
    dim_ffn: channel-mix hidden size; ``None`` means 4 * n_embd (the paper's d = 4s).
    dtype: compute dtype of the matmuls ("float32" or "bfloat16"); parameters,
      LayerNorm, WKV and the recurrent state are always float32.
    layer_norm_eps: LayerNorm epsilon (1e-5 as in the reference implementation).
    wkv_impl: WKV path for parallel mode, see ``rwkv_jax.ops.wkv``; ``None`` picks by
      platform.
    dropout: residual dropout rate on each time-mix and channel-mix output, applied only
      when a forward is given a ``dropout_key`` (training); 0 disables it.
  """

  n_layer: int = 4
  n_embd: int = 128
  vocab_size: int = PILE_VOCAB
  ctx_len: int = 1024
  dim_ffn: int | None = None
  dtype: str = "float32"
  layer_norm_eps: float = 1e-5
  wkv_impl: str | None = None
  dropout: float = 0.0
  scan_layers: bool = False
  remat: str = "none"

  family: ClassVar[str] = "rwkv4"
  SHAPE_FIELDS: ClassVar[tuple[str, ...]] = ("n_layer", "n_embd", "vocab_size", "dim_ffn")
  WKV_IMPLEMENTATIONS: ClassVar[tuple] = WKV_IMPLEMENTATIONS

  def __post_init__(self):
    self._check_common()
    if self.dim_ffn is None:
      object.__setattr__(self, "dim_ffn", 4 * self.n_embd)
    check_positive_ints(self, ("dim_ffn",))
    if not (isinstance(self.layer_norm_eps, (int, float)) and self.layer_norm_eps > 0):
      raise ValueError(
          f"RWKVConfig.layer_norm_eps must be a positive number, got {self.layer_norm_eps!r}")

  @classmethod
  def presets(cls) -> dict[str, dict[str, Any]]:
    """The paper's Table 2 sizes ("169m" ... "14b", vocab 50277) and "tiny" for tests."""
    table = {"tiny": dict(n_layer=2, n_embd=32, vocab_size=64, ctx_len=64)}
    for key, (n_layer, n_embd) in _PAPER_SIZES.items():
      table[key] = dict(n_layer=n_layer, n_embd=n_embd, vocab_size=PILE_VOCAB, ctx_len=1024)
    return table

  def param_count(self) -> int:
    """Parameters of the model: the paper's 2VD + 13D^2 L + D(11L + 4) at dim_ffn = 4D."""
    d, l, v, f = self.n_embd, self.n_layer, self.vocab_size, self.dim_ffn
    per_layer = 4 * d * d + 2 * d * f + d * d + 11 * d
    return 2 * v * d + l * per_layer + 4 * d

  def shape_key(self) -> list:
    # Without the family name: the hash state files written before RWKV-7 carry.
    return [self.n_layer, self.n_embd, self.vocab_size, self.dim_ffn]
