"""Inference: ragged parallel prefill, on-device decode, sampling, streaming, state I/O, chat."""

from rwkv_jax.inference.chat import ChatSession
from rwkv_jax.inference.generate import GenerateOutput, TokenStream, generate, prefill, stream
from rwkv_jax.inference.sampling import SamplingConfig, apply_penalties, filter_logits, sample
from rwkv_jax.inference.state_io import load_state, read_state_metadata, save_state

__all__ = [
    "ChatSession", "GenerateOutput", "SamplingConfig", "TokenStream", "apply_penalties",
    "filter_logits", "generate", "load_state", "prefill", "read_state_metadata", "sample",
    "save_state", "stream",
]
