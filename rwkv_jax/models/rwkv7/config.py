"""RWKV-7 "Goose" (x070) configuration: a frozen dataclass with the released sizes."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

from rwkv_jax.models.base import FamilyConfig, check_positive_ints

WORLD_VOCAB = 65536  # the RWKV World tokenizer (rwkv_vocab_v20230424)
WKV_IMPLEMENTATIONS = (None, "scan", "chunked", "pallas")
LORA_FIELDS = ("d_decay", "d_aaa", "d_mv", "d_gate")

# Released x070 models: name -> (n_layer, n_embd, (d_decay, d_aaa, d_mv, d_gate)). The LoRA
# dims are the checkpoints' w1/a1/v1/g1 widths, which differ from train_temp's suggestion
# formula (``lora_dims_formula``) at every size but 0.1B:
#   0.1b  RWKV-v7/rwkv_v7_demo.py ("for 0.1B": 64/64/32/128)
#   0.4b  README.md's param formula "2*D*(64+32+64+128)" for V65536-L24-D1024, and
#         fla-hub/rwkv7-0.4B-world config.json (decay 64, a 64, v 32, gate 128)
#   1.5b  RWKV-v7/train_temp/README.md's weight table for L24-D2048 (w1 [2048, 96],
#         a1 [2048, 96], v1 [2048, 64], g1 [2048, 256]); fla-hub/rwkv7-1.5B-world agrees
#   2.9b  96/96/64/320: third-party converters of the released RWKV7-World3-2.9B
#         checkpoint (its HF config: decay/a 96, v 64, gate 320); not in RWKV-LM itself
#   7.2b  128/128/96/480: third-party loaders of the released RWKV7-G 7.2B checkpoint
#         (D_DECAY_LORA 128, D_AAA_LORA 128, D_MV_LORA 96, D_GATE_LORA 480); not in
#         RWKV-LM itself. A loaded checkpoint's own shapes always win (weights.infer_config).
_RELEASED = {
    "0.1b": (12, 768, (64, 64, 32, 128)),
    "0.4b": (24, 1024, (64, 64, 32, 128)),
    "1.5b": (24, 2048, (96, 96, 64, 256)),
    "2.9b": (32, 2560, (96, 96, 64, 320)),
    "7.2b": (32, 4096, (128, 128, 96, 480)),
}
_TINY = dict(n_layer=2, n_embd=64, head_size=16, vocab_size=64, ctx_len=64,
             d_decay=8, d_aaa=8, d_mv=8, d_gate=16)


def _suggested(factor: float, n_embd: int) -> int:
  # train_temp/src/model.py: max(32, int(round((factor * C**0.5) / 32) * 32)); Python's
  # round (ties to even) as there: C = 1024 gives round(2.5) = 2 for the decay LoRA.
  return max(32, int(round((factor * math.sqrt(n_embd)) / 32) * 32))


def lora_dims_formula(n_embd: int) -> tuple[int, int, int, int]:
  """train_temp's suggested LoRA dims (d_decay, d_aaa, d_mv, d_gate) for width C: 2.5, 2.5,
  1.7 and 5 sqrt(C), rounded to a multiple of 32, at least 32."""
  return (_suggested(2.5, n_embd), _suggested(2.5, n_embd), _suggested(1.7, n_embd),
          _suggested(5.0, n_embd))


@dataclasses.dataclass(frozen=True)
class RWKV7Config(FamilyConfig):
  """RWKV-7 x070 hyper-parameters.

  Attributes:
    n_layer: number of residual blocks L.
    n_embd: model width C (also the time-mix width H * N).
    vocab_size: V, the embedding and head size (65536: the World tokenizer).
    ctx_len: training context length T (the model itself has no length limit).
    head_size: N, the WKV head size (64 in every released model); H = C / N heads.
    dim_ffn: channel-mix hidden size; ``None`` means 4C (the released models; train_temp's
      own default is 3.5C rounded down to a multiple of 32).
    d_decay, d_aaa, d_mv, d_gate: inner dims of the decay (w1/w2), in-context learning
      rate (a1/a2), value-residual (v1/v2) and output-gate (g1/g2) LoRAs; ``None`` means
      train_temp's suggestion (``lora_dims_formula``). The presets use the released dims.
    dtype: compute dtype of every matmul ("float32", "bfloat16" or "float16"); parameters,
      LayerNorm / GroupNorm, the decay and the WKV state are always float32.
    layer_norm_eps: LayerNorm epsilon (1e-5, torch's default). ln_x, the per-head
      GroupNorm, always uses BlinkDL's 64e-5.
    wkv_impl: WKV-7 path for parallel mode (``rwkv_jax.ops.wkv7``); ``None`` picks by
      platform. T = 1 always runs the recurrent step.
    dropout: residual dropout rate on each time-mix and channel-mix output, applied only
      when a forward is given a ``dropout_key`` (training); 0 disables it.

  ``param_count()`` is exact; at dim_ffn = 4C it equals RWKV-LM README's
  ``2VD + 4D + L(19D + 12D^2 + 2D(d_w + d_a + d_v + d_g))`` term by term:
    2VD          emb and head;
    4D           ln0 and ln_out (weight and bias);
    19D / layer  ln1, ln2 (4D), the six token-shift mixes x_r..x_g (6D), w0, a0, v0 (3D),
                 k_k, k_a (2D), r_k (H x N = D), ln_x weight and bias (2D), ffn.x_k (D);
    12D^2        receptance, key, value, output (4D^2) and the channel-mix key and value
                 (2 x 4D^2);
    2D(...)      the four LoRA pairs (C x d and d x C each).
  The formula (and this count) includes layer 0's v0/v1/v2, which x070 files store but
  layer 0 never uses (it sets v_first instead); without them the count is
  D + 2 D d_v smaller (README: 450.834432 M vs "actually 450.767872 M" at 0.4B). There are
  no biases besides the LayerNorm/GroupNorm ones.
  """

  n_layer: int = 4
  n_embd: int = 128
  vocab_size: int = WORLD_VOCAB
  ctx_len: int = 1024
  head_size: int = 64
  dim_ffn: int | None = None
  d_decay: int | None = None
  d_aaa: int | None = None
  d_mv: int | None = None
  d_gate: int | None = None
  dtype: str = "float32"
  layer_norm_eps: float = 1e-5
  wkv_impl: str | None = None
  dropout: float = 0.0
  scan_layers: bool = False
  remat: str = "none"

  family: ClassVar[str] = "rwkv7"
  SHAPE_FIELDS: ClassVar[tuple[str, ...]] = (
      "n_layer", "n_embd", "vocab_size", "head_size", "dim_ffn", *LORA_FIELDS)
  WKV_IMPLEMENTATIONS: ClassVar[tuple] = WKV_IMPLEMENTATIONS

  def __post_init__(self):
    check_positive_ints(self, ("n_layer", "n_embd", "head_size"))
    if self.dim_ffn is None:
      object.__setattr__(self, "dim_ffn", 4 * self.n_embd)
    for name, value in zip(LORA_FIELDS, lora_dims_formula(self.n_embd)):
      if getattr(self, name) is None:
        object.__setattr__(self, name, value)
    check_positive_ints(self, ("dim_ffn", *LORA_FIELDS))
    self._check_common()
    if self.n_embd % self.head_size:
      raise ValueError(f"RWKV7Config.n_embd ({self.n_embd}) must be a multiple of "
                       f"RWKV7Config.head_size ({self.head_size}): H = n_embd / head_size heads")
    if not (isinstance(self.layer_norm_eps, (int, float)) and self.layer_norm_eps > 0):
      raise ValueError(
          f"RWKV7Config.layer_norm_eps must be a positive number, got {self.layer_norm_eps!r}")

  @property
  def n_head(self) -> int:
    return self.n_embd // self.head_size

  @classmethod
  def presets(cls) -> dict[str, dict[str, Any]]:
    """The released sizes ("0.1b" ... "7.2b", vocab 65536, their LoRA dims) and "tiny"
    (2 layers, C 64, 4 heads of 16, vocab 64) for tests."""
    table = {"tiny": dict(_TINY)}
    for key, (n_layer, n_embd, dims) in _RELEASED.items():
      table[key] = dict(n_layer=n_layer, n_embd=n_embd, vocab_size=WORLD_VOCAB, ctx_len=4096,
                        head_size=64, **dict(zip(LORA_FIELDS, dims)))
    return table

  def param_count(self) -> int:
    """Exact parameter count (see the class docstring for the README formula's terms)."""
    d, l, v, f = self.n_embd, self.n_layer, self.vocab_size, self.dim_ffn
    lora = self.d_decay + self.d_aaa + self.d_mv + self.d_gate
    per_layer = 19 * d + 4 * d * d + 2 * d * f + 2 * d * lora
    return 2 * v * d + 4 * d + l * per_layer

  def describe(self) -> str:
    return f"{self.family} {self.n_layer} layers x {self.n_embd} ({self.n_head} heads)"
