"""RWKVConfig validation and presets."""

import pytest

from rwkv_jax import RWKVConfig


def test_presets_are_table_2():
  sizes = {n: (RWKVConfig.preset(n).n_layer, RWKVConfig.preset(n).n_embd)
           for n in ["169m", "430m", "1.5b", "3b", "7b", "14b"]}
  assert sizes == {"169m": (12, 768), "430m": (24, 1024), "1.5b": (24, 2048),
                   "3b": (32, 2560), "7b": (32, 4096), "14b": (40, 5120)}
  assert RWKVConfig.preset("7b").vocab_size == 50277
  assert RWKVConfig.preset("tiny").dim_ffn == 4 * RWKVConfig.preset("tiny").n_embd


@pytest.mark.parametrize("field,value", [
    ("n_layer", 0), ("n_embd", -3), ("vocab_size", 1.5), ("ctx_len", True),
    ("dtype", "float8"), ("layer_norm_eps", 0.0), ("wkv_impl", "cuda"), ("dim_ffn", 0)])
def test_bad_values_name_the_field(field, value):
  with pytest.raises(ValueError, match=f"RWKVConfig.{field}"):
    RWKVConfig(**{field: value})


def test_unknown_preset_and_round_trip():
  with pytest.raises(ValueError, match="unknown RWKVConfig preset 'huge'"):
    RWKVConfig.preset("huge")
  cfg = RWKVConfig.preset("169m", dtype="bfloat16")
  assert RWKVConfig.from_dict(cfg.to_dict()) == cfg
  with pytest.raises(ValueError, match="unknown RWKVConfig fields"):
    RWKVConfig.from_dict({**cfg.to_dict(), "n_head": 4})
  assert cfg.shape_hash() == cfg.replace(dtype="float32", ctx_len=4).shape_hash()
  assert cfg.shape_hash() != cfg.replace(n_layer=2).shape_hash()
