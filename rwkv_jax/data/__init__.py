"""Data sources for training: the built-in synthetic task and tokenized text files."""

from rwkv_jax.data.sample import SAMPLE_TEXT_SOURCE, sample_text_path
from rwkv_jax.data.synthetic import SyntheticTask

__all__ = ["SAMPLE_TEXT_SOURCE", "SyntheticTask", "sample_text_path"]
