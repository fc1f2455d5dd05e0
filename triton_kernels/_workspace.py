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


_FP16_ROWS = 2048  # rows per fp32 chunk of colsum_mul: bounds the temporary to 2048 x N x 4 bytes


def colsum_mul(a: torch.Tensor, b: torch.Tensor, slot: str) -> torch.Tensor:
    """sum over rows of a * b: [M, N] x [M, N] -> [N] (the gradients of per-column scales, IA3's l
    and DoRA's m). fp16 products of small gradients underflow (2^-24 is fp16's smallest step; PEFT
    computes these products in fp32 because its scales are fp32 parameters), so fp16 inputs are
    multiplied and summed in fp32, in row chunks, and the result is fp32; other dtypes use one
    product in their own dtype (scratch buffer `slot`) and a sum with fp32 accumulation."""
    if a.dtype != torch.float16:
        return torch.mul(a, b, out=scratch(slot, a.shape, a.dtype, a.device)).sum(0)
    out = torch.zeros(a.shape[1], dtype=torch.float32, device=a.device)
    for i in range(0, a.shape[0], _FP16_ROWS):
        ac, bc = a[i:i + _FP16_ROWS], b[i:i + _FP16_ROWS]
        prod = scratch(slot + "_fp32", ac.shape, torch.float32, a.device).copy_(ac)
        out.add_(prod.mul_(bc).sum(0))
    return out
