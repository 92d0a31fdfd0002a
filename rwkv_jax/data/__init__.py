"""Data sources for training: the built-in synthetic task and tokenized text files."""

from rwkv_jax.data.synthetic import SyntheticTask

__all__ = ["SyntheticTask"]
