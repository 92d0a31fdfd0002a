"""HF transformers ``RwkvForCausalLM`` directories: config.json + weights.

``rescale_every``: in eval mode HF divides block i's ``attention.output`` and
``feed_forward.value`` by 2**(i // R) and halves the hidden state after every R blocks, so
the residual stream entering block i is 2**-(i // R) times ours. LayerNorm is scale-free
except for its epsilon: LN(s x; eps) == LN(x; eps / s^2). So HF's eval model equals ours
with LayerNorm epsilons eps * 4**(i // R) in block i and 1e-5 * 4**(L // R) in ln_out
(HF's ln_out always uses torch's default 1e-5, not ``layer_norm_epsilon``). Loading sets
exactly these epsilons (``hf_eval_rescale=True``, the default), which reproduces HF's
eval-mode logits to float32 rounding; ``hf_eval_rescale=False`` gives the un-rescaled
model (HF's train mode, and BlinkDL's). With real checkpoints the residual stream is large
and the two differ by far less than bfloat16 rounding; with tiny random models they differ
visibly. Saving writes the ``rescale_every`` the model's epsilons encode (0 for a model
with uniform epsilons), so a round trip keeps the logits.
"""

from __future__ import annotations

import json
import math
import os
import warnings

from rwkv_jax.interop import _build, safe_load
from rwkv_jax.models.rwkv4 import weights as _names
from rwkv_jax.models.rwkv4.config import RWKVConfig
from rwkv_jax.models.rwkv4.model import RWKV

HF_LN_OUT_EPS = 1e-5  # torch.nn.LayerNorm's default, which HF's RwkvModel.ln_out uses
HF_DEFAULT_RESCALE = 6  # RwkvConfig.rescale_every when config.json leaves it out
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def is_hf_dir(path: str | os.PathLike) -> bool:
  return os.path.isfile(os.path.join(path, "config.json"))


def hf_layer_norm_eps(n_layer: int, eps: float, rescale_every: int) -> dict[str, float]:
  """The epsilon of each of our LayerNorms that reproduces HF's eval mode."""
  def scale(i):
    return 4.0 ** (i // rescale_every) if rescale_every > 0 else 1.0

  table = {"ln0": eps}
  for i in range(n_layer):
    table[f"blocks.{i}.ln1"] = table[f"blocks.{i}.ln2"] = eps * scale(i)
  table["ln_out"] = HF_LN_OUT_EPS * scale(n_layer)
  return table


def layer_norms(model: RWKV) -> dict[str, object]:
  """Our LayerNorm modules by path: ln0, blocks.i.ln1, blocks.i.ln2, ln_out."""
  norms = {"ln0": model.ln0}
  for i, block in enumerate(model.blocks):
    norms[f"blocks.{i}.ln1"] = block.ln1
    norms[f"blocks.{i}.ln2"] = block.ln2
  norms["ln_out"] = model.ln_out
  return norms


def set_layer_norm_eps(model: RWKV, table: dict[str, float]) -> None:
  for name, norm in layer_norms(model).items():
    norm.eps = table[name]


def infer_rescale_every(model: RWKV) -> int | None:
  """The HF rescale_every whose eval mode this model's LayerNorm epsilons match (0 for
  none), or None if no setting matches."""
  current = {k: n.eps for k, n in layer_norms(model).items()}
  for r in range(model.cfg.n_layer + 1):
    want = hf_layer_norm_eps(model.cfg.n_layer, current["ln0"], r)
    if all(math.isclose(current[k], want[k], rel_tol=1e-9) for k in want):
      return r
  return None


def read_hf_config(path: str) -> dict:
  with open(os.path.join(path, "config.json")) as f:
    hf = json.load(f)
  model_type = hf.get("model_type", "rwkv")
  if model_type != "rwkv":
    raise ValueError(f"{path} holds a {model_type!r} model; only RWKV-4 ('rwkv') is supported")
  missing = [k for k in ("hidden_size", "num_hidden_layers", "vocab_size") if k not in hf]
  if missing:
    raise ValueError(f"{path}/config.json lacks {missing}")
  hidden = hf["hidden_size"]
  att = hf.get("attention_hidden_size") or hidden
  if att != hidden:
    raise ValueError(f"{path}: attention_hidden_size {att} != hidden_size {hidden} is not "
                     "supported (RWKV-4 releases use equal sizes)")
  return hf


def _read_weights(path: str):
  for name in _WEIGHT_FILES:
    file = os.path.join(path, name)
    if os.path.isfile(file):
      if name.endswith(".index.json"):
        return safe_load.load_sharded(file)
      return safe_load.load_tensors(file)
  raise FileNotFoundError(f"{path} has a config.json but none of {list(_WEIGHT_FILES)}")


def load_hf(path: str | os.PathLike, *, hf_eval_rescale: bool = True,
            **config_overrides) -> RWKV:
  """An HF ``RwkvForCausalLM`` directory -> RWKV; see the module docstring for
  ``hf_eval_rescale``. ``config_overrides``: non-shape RWKVConfig fields."""
  path = os.fspath(path)
  hf = read_hf_config(path)
  tensors = _read_weights(path)
  if not any(k.startswith("rwkv.") for k in tensors):  # saved from a bare RwkvModel
    tensors = {k if k == "head.weight" else "rwkv." + k: v for k, v in tensors.items()}
  if hf.get("tie_word_embeddings", False) and "rwkv.embeddings.weight" in tensors:
    tensors["head.weight"] = tensors["rwkv.embeddings.weight"]
  hidden, n_layer = hf["hidden_size"], hf["num_hidden_layers"]
  eps = float(hf.get("layer_norm_epsilon", 1e-5))
  fields = dict(n_layer=n_layer, n_embd=hidden, vocab_size=hf["vocab_size"],
                dim_ffn=hf.get("intermediate_size") or 4 * hidden, layer_norm_eps=eps)
  if "context_length" in hf:
    fields["ctx_len"] = hf["context_length"]
  cfg = _build.make_config(RWKVConfig, path, config_overrides, **fields)
  model = _build.build_model(cfg, tensors, path, _names.blinkdl_to_hf)
  rescale = hf.get("rescale_every", HF_DEFAULT_RESCALE) if hf_eval_rescale else 0
  set_layer_norm_eps(model, hf_layer_norm_eps(n_layer, eps, rescale))
  return model


def save_hf(model: RWKV, path: str | os.PathLike, *, dtype: str = "float32",
            rescale_every: int | None = None, overwrite: bool = False) -> str:
  """Writes ``config.json`` + ``model.safetensors`` loadable by
  ``transformers.RwkvForCausalLM.from_pretrained``. ``rescale_every=None`` writes the value
  the model's LayerNorm epsilons encode, so HF's eval logits equal ours."""
  from safetensors.numpy import save_file

  path = os.fspath(path)
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f"{path} exists and is not a directory")
  cfg = model.cfg
  base_eps = model.ln0.eps
  if rescale_every is None:
    rescale_every = infer_rescale_every(model)
    if rescale_every is None:
      warnings.warn(
          f"the model's LayerNorm epsilons match no HF rescale_every (HF's ln_out always "
          f"uses {HF_LN_OUT_EPS}); writing rescale_every=0, HF's logits will differ slightly")
      rescale_every = 0
  tensors = _build.export_tensors(model, dtype, _names.blinkdl_to_hf)
  config = {
      "architectures": ["RwkvForCausalLM"], "model_type": "rwkv",
      "vocab_size": cfg.vocab_size, "context_length": cfg.ctx_len,
      "hidden_size": cfg.n_embd, "num_hidden_layers": cfg.n_layer,
      "attention_hidden_size": cfg.n_embd, "intermediate_size": cfg.dim_ffn,
      "layer_norm_epsilon": base_eps, "rescale_every": int(rescale_every),
      "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 0,
      "use_cache": True, "torch_dtype": dtype,
  }
  targets = [os.path.join(path, n) for n in ("model.safetensors", "config.json")]
  existing = [t for t in targets if os.path.exists(t)]
  if existing and not overwrite:
    raise FileExistsError(f"{existing} exist; pass overwrite=True (--overwrite) to replace")
  os.makedirs(path, exist_ok=True)
  # Weights first, config last: a directory with a config.json is a complete checkpoint.
  _build.write_atomic(targets[0],
                      lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}), True)

  def write_config(tmp):
    with open(tmp, "w") as f:
      json.dump(config, f, indent=2)

  _build.write_atomic(targets[1], write_config, True)
  return path
