"""Reusable scratch tensors for the reference ops.

On CPU, a fresh multi-MB temporary costs page faults on every call (glibc hands large
blocks back to the OS); the references keep transient [M, K] products in per-thread,
per-(slot, device, dtype) buffers instead. A buffer is never returned to the caller or
saved for backward: it only lives inside one op.
"""
from __future__ import annotations

import threading

import torch

_local = threading.local()


def scratch(slot: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor of `shape`, reused across calls with the same slot."""
    cache = getattr(_local, "cache", None)
    if cache is None:
        cache = _local.cache = {}
    key = (slot, str(device), dtype)
    n = 1
    for d in shape:
        n *= d
    buf = cache.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.empty(n, dtype=dtype, device=device)
        cache[key] = buf
    return buf[:n].view(shape)


def clear() -> None:
    """Free every cached buffer of this thread."""
    _local.cache = {}
