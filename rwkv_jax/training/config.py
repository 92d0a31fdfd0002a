"""``TrainConfig``: every knob of a training run, validated, JSON round-trippable."""

from __future__ import annotations

import codecs
import dataclasses
import math
from typing import Any

from rwkv_jax.models import DEFAULT_FAMILY, FAMILIES, config_class, split_preset
from rwkv_jax._dataclasses import dataclass_from_dict

SCHEDULES = ("cosine", "exponential", "constant")

# The default model when neither --preset nor --n-layer/--n-embd is given: small enough
# that the no-argument run (synthetic task) finishes in a few CPU minutes.
DEFAULT_N_LAYER = 2
DEFAULT_N_EMBD = 64

# Fields that fix the trajectory of a run: resuming with any of them changed is an error.
TRAJECTORY_FIELDS = (
    "batch_size", "ctx_len", "lr", "warmup", "schedule", "final_lr_ratio", "weight_decay",
    "b1", "b2", "eps", "clip", "grad_accum", "z_loss", "seed", "data", "tokenizer",
    "val_fraction", "dropout", "encoding", "jsonl_field", "vocab_size",
    "tune", "lora_rank", "lora_alpha", "lora_parts",
)

# Fields of one invocation that a resumed run does not take from the saved config (the
# wall-time budget too: the run it stopped is continued, not budgeted again).
_NOT_RESUMED = ("out", "resume", "progress", "max_minutes")


def _lora_part_names() -> set[str]:
  """Every LoRA part name a family declares (``RecurrentLM.LORA_PARTS``)."""
  from rwkv_jax.models import FAMILIES, family_module
  from rwkv_jax.models.base import RecurrentLM

  names = set(RecurrentLM.LORA_PARTS)
  for family in FAMILIES:
    try:
      names |= set(family_module(family).MODEL.LORA_PARTS)
    except ImportError:  # a family whose package is not importable here
      continue
  return names


def _known_encoding(name: str) -> bool:
  """A codec that decodes bytes to str (not, e.g., rot13 or base64)."""
  try:
    return getattr(codecs.lookup(name), "_is_text_encoding", True)
  except LookupError:
    return False


@dataclasses.dataclass
class TrainConfig:
  """A training run. ``data=None`` trains on the built-in synthetic task.

  Counting: ``steps`` optimizer updates, each of ``grad_accum`` micro-batches of
  ``batch_size`` windows of ``ctx_len`` tokens. ``eval_every`` / ``save_every`` are in
  optimizer steps; 0 means only at the end. ``warmup=None`` means min(20, steps // 10).
  """

  out: str | None = None
  steps: int = 400
  batch_size: int = 16
  ctx_len: int = 256
  # Model family ("rwkv4", "rwkv7"); None: the preset's family, else RWKV-4.
  family: str | None = None
  preset: str | None = None
  n_layer: int | None = None
  n_embd: int | None = None
  dtype: str = "float32"
  wkv_impl: str | None = None
  dropout: float = 0.0
  # Blocks as one lax.scan (compile time flat in depth) and its rematerialisation policy
  # (rwkv_jax.models.base.RecurrentLM.run_layers). Not trajectory fields.
  scan_layers: bool = False
  remat: str = "none"
  lr: float = 3e-3
  final_lr_ratio: float = 0.1
  warmup: int | None = None
  schedule: str = "cosine"
  weight_decay: float = 0.01
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  clip: float = 1.0
  grad_accum: int = 1
  z_loss: float = 0.0
  data: str | None = None
  tokenizer: str | None = None
  # How a text tokenizer (--tokenizer) decodes the data files (strictly); the byte
  # tokenizer reads raw bytes. A trajectory field: it changes the tokens.
  encoding: str = "utf-8"
  # The text field of each object of .jsonl data (one document per line). A trajectory
  # field: it changes the tokens.
  jsonl_field: str = "text"
  # The model's vocabulary size; None: the tokenizer's, else (binidx data without a
  # tokenizer) the data's largest id + 1.
  vocab_size: int | None = None
  # Token cache directory (None: rwkv_jax.data.text.default_cache_dir()). Not a
  # trajectory field: a run may resume with another cache directory.
  cache_dir: str | None = None
  val_fraction: float = 0.05
  seed: int = 0
  eval_every: int = 100
  eval_size: int = 256
  save_every: int = 100
  max_to_keep: int = 3
  resume: bool = False
  init_from: str | None = None
  tensorboard: bool = False
  progress: bool = True
  peak_tflops: float | None = None
  # Device mesh, e.g. "data=2,fsdp=2,tensor=2" (rwkv_jax.sharding.make_mesh). Not a
  # trajectory field: a run may resume on another mesh (the checkpoint is resharded).
  mesh: str | None = None
  # Wall-time budget of this invocation: once spent, the run saves after the current step
  # and stops as if interrupted (--resume continues it). Not a trajectory field.
  max_minutes: float | None = None
  # What is trained (rwkv_jax.training.tuning): "full" (every weight), "lora" (low-rank
  # adapters on the lora_parts matrices of the --init-from base, which stays frozen and out
  # of the optimizer state; a lora_rank implies it) or "state" (only a learned initial
  # recurrent state of the frozen base). Trajectory fields.
  tune: str = "full"
  lora_rank: int | None = None
  lora_alpha: float | None = None  # None: alpha = rank (the update scaled by 1)
  lora_parts: str = "att,ffn"      # comma-separated names of the model's LORA_PARTS

  def validate(self, family: str | None = None) -> "TrainConfig":
    """Raises ValueError naming the first invalid field. ``family``: the family of the
    model when this config does not choose it (a resumed run's saved model); default
    ``model_family()``."""
    def need(ok: bool, name: str, what: str):
      if not ok:
        raise ValueError(f"invalid {name}={getattr(self, name)!r}: {what}")

    def is_int(v):
      return isinstance(v, int) and not isinstance(v, bool)

    for name in ("steps", "batch_size", "ctx_len", "grad_accum", "eval_size", "max_to_keep"):
      need(is_int(getattr(self, name)) and getattr(self, name) >= 1, name,
           "must be a positive integer")
    if self.warmup is None:  # auto: 20 steps, or a tenth of a shorter run
      self.warmup = min(20, self.steps // 10) if is_int(self.steps) else 0
    for name in ("warmup", "eval_every", "save_every", "seed"):
      need(is_int(getattr(self, name)) and getattr(self, name) >= 0, name,
           "must be a non-negative integer")
    for name in ("n_layer", "n_embd", "vocab_size"):
      v = getattr(self, name)
      need(v is None or (is_int(v) and v >= 1), name, "must be a positive integer")
    need(self.warmup <= self.steps, "warmup", f"must be <= steps ({self.steps})")
    need(isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1, "dropout",
         "must be in [0, 1)")

    def finite(v):
      return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    need(finite(self.lr) and self.lr > 0, "lr", "must be a positive number")
    need(finite(self.final_lr_ratio) and 0 <= self.final_lr_ratio <= 1, "final_lr_ratio",
         "must be in [0, 1]")
    need(finite(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "must be >= 0")
    need(finite(self.b1) and 0 <= self.b1 < 1, "b1", "must be in [0, 1)")
    need(finite(self.b2) and 0 <= self.b2 < 1, "b2", "must be in [0, 1)")
    need(finite(self.eps) and self.eps > 0, "eps", "must be > 0")
    need(finite(self.clip) and self.clip >= 0, "clip", "must be >= 0 (0 disables clipping)")
    need(finite(self.z_loss) and self.z_loss >= 0, "z_loss", "must be >= 0")
    need(finite(self.val_fraction) and 0 < self.val_fraction < 1, "val_fraction",
         "must be in (0, 1)")
    need(self.peak_tflops is None or (finite(self.peak_tflops) and self.peak_tflops > 0),
         "peak_tflops", "must be a positive number")
    need(self.max_minutes is None or (finite(self.max_minutes) and self.max_minutes > 0),
         "max_minutes", "must be a positive number")
    need(self.schedule in SCHEDULES, "schedule", f"must be one of {SCHEDULES}")
    need(self.dtype in ("float32", "bfloat16", "float16"), "dtype",
         "must be float32, bfloat16 or float16")
    need(self.family is None or self.family in FAMILIES, "family",
         f"must be one of {sorted(FAMILIES)}")
    if self.preset is not None:
      preset_family, size = split_preset(self.preset)
      need(self.family is None or self.family == preset_family, "preset",
           f"is a {preset_family} preset but --family is {self.family}")
      names = config_class(preset_family).preset_names()
      need(size in names, "preset", f"must be one of {names} for {preset_family}")
    family = family or self.model_family()
    impls = config_class(family).WKV_IMPLEMENTATIONS
    need(self.wkv_impl in impls, "wkv_impl", f"must be one of {impls[1:]} for {family}")
    need(not self.resume or self.out is not None, "resume", "needs --out DIR")
    need(self.mesh is None or isinstance(self.mesh, str), "mesh",
         'must be a mesh spec such as "data=2,fsdp=2,tensor=2"')
    need(isinstance(self.encoding, str) and _known_encoding(self.encoding), "encoding",
         "must be a Python codec name such as utf-8 or latin-1")
    need(self.cache_dir is None or isinstance(self.cache_dir, str), "cache_dir",
         "must be a directory path")
    need(isinstance(self.jsonl_field, str) and self.jsonl_field != "", "jsonl_field",
         "must be a field name")
    self._validate_tuning(need, is_int, finite)
    if self.data is None and self.tokenizer is not None:
      raise ValueError("--tokenizer needs --data (the synthetic task has its own vocabulary)")
    if self.data is None and self.vocab_size is not None:
      raise ValueError("--vocab-size needs --data (the synthetic task has its own vocabulary)")
    if self.tensorboard:  # checked here, before the run makes its folder
      from rwkv_jax.training.metrics import tensorboard_writer_class

      try:
        tensorboard_writer_class()
      except ImportError as e:
        raise ValueError(str(e)) from None
    return self

  def _validate_tuning(self, need, is_int, finite) -> None:
    from rwkv_jax.tuning import KINDS

    if self.lora_rank is not None and self.tune == "full":
      self.tune = "lora"  # --lora-rank R alone asks for LoRA
    need(self.tune in KINDS, "tune", f"must be one of {KINDS}")
    if self.tune == "lora":
      need(is_int(self.lora_rank) and self.lora_rank >= 1, "lora_rank",
           "must be a positive integer (the rank of every adapter)")
      need(self.lora_alpha is None or (finite(self.lora_alpha) and self.lora_alpha > 0),
           "lora_alpha", "must be a positive number")
      parts = [p.strip() for p in str(self.lora_parts).split(",")]
      known = _lora_part_names()
      need(isinstance(self.lora_parts, str) and all(parts) and len(set(parts)) == len(parts)
           and set(parts) <= known, "lora_parts",
           f"must be comma-separated part names from {sorted(known)} (the embedding is a "
           "lookup, not a matmul, so it takes no LoRA)")
    else:
      need(self.lora_rank is None and self.lora_alpha is None,
           "lora_rank" if self.lora_rank is not None else "lora_alpha",
           f"applies to LoRA only, not --tune {self.tune}")
    if self.tune != "full":
      need(self.init_from is not None, "tune",
           "needs --init-from BASE: the frozen model whose adapters / state are trained")

  def model_family(self) -> str:
    """The family of a fresh model: --family, else the preset's, else RWKV-4."""
    if self.family is not None:
      return self.family
    return split_preset(self.preset)[0] if self.preset else DEFAULT_FAMILY

  def runtime_fields(self) -> dict:
    """The model-config fields this run sets on any model, fresh, loaded or resumed: how
    it computes, not what it is."""
    return dict(dtype=self.dtype, wkv_impl=self.wkv_impl, scan_layers=self.scan_layers,
                remat=self.remat)

  def model_config(self, vocab_size: int):
    """The family config of a fresh model: the preset (its vocabulary replaced by the
    data's) or DEFAULT_N_LAYER x DEFAULT_N_EMBD, overridden by n_layer / n_embd."""
    overrides = dict(vocab_size=vocab_size, ctx_len=self.ctx_len, **self.runtime_fields(),
                     dropout=self.dropout)
    if self.n_layer is not None:
      overrides["n_layer"] = self.n_layer
    if self.n_embd is not None:
      overrides["n_embd"] = self.n_embd
    cls = config_class(self.model_family())
    if self.preset is not None:
      return cls.preset(split_preset(self.preset)[1], **overrides)
    overrides.setdefault("n_layer", DEFAULT_N_LAYER)
    overrides.setdefault("n_embd", DEFAULT_N_EMBD)
    return cls(**overrides)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
    return dataclass_from_dict(cls, data)

  @classmethod
  def for_resume(cls, saved: "TrainConfig", given: dict[str, Any],
                 model_family: str | None = None) -> "TrainConfig":
    """The config of ``--resume``: the saved run's config (``saved``, from its
    config.json) with the fields the user gave (``given``: field -> value, only those
    given) on top. Given trajectory fields that differ from the saved ones are kept, so
    that the trainer's check names them; other given fields (steps, mesh, max_minutes,
    eval_every, cache_dir, ...) override. ``out``, ``resume``, ``progress`` and
    ``max_minutes`` belong to this invocation and are never taken from ``saved``.
    ``model_family``: the family of the saved model (config.json "model"), recorded when
    ``saved`` names none (a run started --init-from another family's weights)."""
    unknown = sorted(set(given) - set(cls.__dataclass_fields__))
    if unknown:
      raise ValueError(f"unknown TrainConfig fields {unknown}")
    fields = {k: v for k, v in dataclasses.asdict(saved).items() if k not in _NOT_RESUMED}
    fields.update(given)
    cfg = cls(**fields)
    if "family" not in given and model_family is not None:
      cfg.family = model_family
    return cfg

  def incompatibilities(self, saved: "TrainConfig") -> list[str]:
    """The trajectory fields where self differs from a saved run's config."""
    return [f"{name}: saved {getattr(saved, name)!r}, now {getattr(self, name)!r}"
            for name in TRAJECTORY_FIELDS if getattr(saved, name) != getattr(self, name)]
