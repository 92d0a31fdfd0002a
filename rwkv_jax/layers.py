"""Small NNX building blocks shared by the families: logically annotated parameters,
Dense, LayerNorm, token shift, residual dropout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def param(value, axes: tuple[str | None, ...]) -> nnx.Param:
  """A float32 parameter annotated with logical axis names (mapped to mesh axes by
  ``rwkv_jax.sharding``). Eager sharding is off so a model can be built without a mesh."""
  value = jnp.asarray(value, jnp.float32)
  if value.ndim != len(axes):
    raise ValueError(f"param of shape {value.shape} needs {value.ndim} axis names, got {axes}")
  return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


def matmul(x, kernel, dtype):
  """x (..., I) @ kernel (I, O) in the compute dtype, accumulated and returned in float32.

  ``kernel`` may also be a wrapped matrix with its own ``matmul(x, dtype)`` (an int8
  ``rwkv_jax.quantize.QuantizedMatrix``, a ``rwkv_jax.lora.LoraKernel``), which a model
  reads in place of an array without any change to the model's code."""
  if is_wrapped_matrix(kernel):
    return kernel.matmul(x, dtype)
  return jnp.einsum("...i,io->...o", x.astype(dtype), kernel.astype(dtype),
                    preferred_element_type=jnp.float32)


def is_wrapped_matrix(x) -> bool:
  """True for a matrix object with its own ``matmul`` (not an array)."""
  return hasattr(x, "matmul") and not hasattr(x, "dtype")


class Dense(nnx.Module):
  """Bias-free linear layer; kernel (in, out) (PyTorch stores (out, in))."""

  def __init__(self, kernel, axes: tuple[str, str], dtype):
    self.kernel = param(kernel, axes)
    self.dtype = dtype

  def __call__(self, x):  # ... I -> ... O (float32)
    return matmul(x, self.kernel[...], self.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis, computed in float32; weight 1 and bias 0 at init."""

  def __init__(self, dim: int, eps: float):
    self.weight = param(jnp.ones((dim,)), ("norm",))
    self.bias = param(jnp.zeros((dim,)), ("norm",))
    self.eps = eps

  def __call__(self, x):  # ... C -> ... C float32
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + self.eps) * self.weight[...] + self.bias[...]


def token_shift(x, last):
  """x (B, T, C), last (B, C) -> the previous token's x at every position (B, T, C)."""
  return jnp.concatenate([last[:, None].astype(x.dtype), x[:, :-1]], axis=1)


def dropout(x, rate: float, key):
  """Inverted dropout of x; the identity without a key or at rate 0."""
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0)
