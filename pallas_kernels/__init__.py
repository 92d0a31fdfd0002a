"""Pallas GPU kernels for rwkv-jax (WKV-4 lives in ``pallas_kernels.wkv4``)."""
