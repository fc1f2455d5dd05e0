"""8-bit blockwise "dynamic" quantization, as bitsandbytes uses it for the nested (double)
quantization of NF4 block scales.

QLoRA (Dettmers et al., 2023, arXiv:2305.14314) quantizes the fp32 absmax of every NF4 block a
second time: subtract their mean (`offset`), then quantize blocks of 256 values to 8 bits with
the signed dynamic map of Dettmers, "8-Bit Approximations for Parallelism in Deep Learning"
(arXiv:1511.04561). This module reproduces that second stage bit-for-bit as bitsandbytes'
native CPU library (0.50) computes it, in pure PyTorch:

* per block, absmax = max |x| (an all-zero block stores absmax 0 and codes 0);
* x is normalised by multiplying with the fp32 reciprocal 1/absmax and clamped to [-1, 1];
* the normalised value v is not searched in the 256-entry map: it is discretised into one of
  65536 bins, idx = trunc(fma((v + 1) * 0.5, 65535, 0.5)), and a precomputed table maps each
  bin to the code whose midpoints bracket the bin centre  -1 + 2 * idx / 65535  (a bin centre
  exactly on a midpoint takes the lower code). This is an approximation of "nearest code":
  values closer to a midpoint than half a bin (1.5e-5) may take the farther code, and codes
  narrower than a bin (|code| < ~1.5e-5) are never produced. We reproduce the approximation,
  not the ideal.
* dequantization is fp32  code[q] * absmax[block]  (one rounding), then the target dtype.

bitsandbytes on CUDA quantizes with a different (exact nearest) search, so codes can differ
from the CUDA path on near-ties; the formats are the same.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

Tensor = torch.Tensor

# Resolution of the CPU quantizer's lookup table (bins over [-1, 1]).
LUT_SIZE = 65536


def create_dynamic_map(device: Optional[torch.device | str] = None) -> Tensor:
    """The signed 8-bit dynamic quantization map: fp32 [256], sorted ascending.

    Same values as `bitsandbytes.functional.create_dynamic_map()` (signed, 7 exponent bits):
    for each decade 10^-6 .. 10^0 the midpoints of an evenly spaced grid on [0.1, 1] with
    2^i + 1 points (both signs), plus 0 and 1. Values are computed in fp32 the same way so
    that they are bit-identical.
    """
    parts = [torch.tensor([0.0, 1.0], dtype=torch.float32)]
    for i in range(7):
        grid = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        mids = (grid[:-1] + grid[1:]) / 2.0
        # python scalar times an fp32 tensor: computed in fp32, as bitsandbytes builds it
        scaled = (10 ** (i - 6)) * mids
        parts += [scaled, -scaled]
    code = torch.sort(torch.cat(parts)).values
    assert code.numel() == 256
    return code.to(device) if device is not None else code


def _bin_to_code_table(code: Tensor) -> Tensor:
    """int64 [LUT_SIZE] on code's device: lut[k] = index of the code chosen for bin k.

    Bin k has centre c_k = fp32(fp32(2k / 65535) - 1); the chosen code is the number of code
    midpoints fp32((code[j] + code[j+1]) * 0.5) strictly below c_k.
    """
    k = torch.arange(LUT_SIZE, dtype=torch.float32, device=code.device)
    centre = (k + k) / torch.tensor(float(LUT_SIZE - 1), device=code.device) - 1.0
    c = code.float()
    mids = (c[:-1] + c[1:]) * 0.5
    return torch.searchsorted(mids.contiguous(), centre, right=False)


def _normalised_to_bin(v: Tensor) -> Tensor:
    """int64 bins of normalised fp32 values v in [-1, 1].

    bitsandbytes computes trunc(fma(t, 65535, 0.5)) with t = fp32((v + 1) * 0.5). The fma has
    a single rounding to fp32: t * 65535 is exact in fp64 (24 + 16 bits) and so is the + 0.5
    whenever the result can reach 1, hence fp64 arithmetic followed by one rounding to fp32
    reproduces the fused result exactly.
    """
    t = (v + 1.0) * 0.5
    f = (t.double() * float(LUT_SIZE - 1) + 0.5).float()
    return f.trunc().long()


def quantize_blockwise8(A: Tensor, code: Optional[Tensor] = None, blocksize: int = 256) -> tuple[Tensor, Tensor]:
    """Blockwise 8-bit quantization, bit-identical to bitsandbytes' CPU `quantize_blockwise`.

    A:    float tensor, any shape (numel n); fp16/bf16 are widened to fp32 exactly.
    code: fp32 [256] sorted map (default: `create_dynamic_map()`).
    Returns (q, absmax): q uint8 with A's shape, absmax fp32 [ceil(n / blocksize)].
    """
    if blocksize <= 0:
        raise ValueError(f"quantize_blockwise8: blocksize must be positive, got {blocksize}")
    if A.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"quantize_blockwise8: unsupported dtype {A.dtype}; expected float32, float16 or bfloat16")
    if code is None:
        code = create_dynamic_map(A.device)
    if code.numel() != 256:
        raise ValueError(f"quantize_blockwise8: code must have 256 entries, got {code.numel()}")
    x = A.detach().reshape(-1).float()
    n = x.numel()
    n_blocks = math.ceil(n / blocksize)
    if n == 0:
        return torch.empty(A.shape, dtype=torch.uint8, device=A.device), \
            torch.empty(0, dtype=torch.float32, device=A.device)
    padded = torch.nn.functional.pad(x, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)  # [B, bs]
    absmax = padded.abs().amax(dim=1)  # [B]; zero padding cannot raise a max of |x|
    zero = absmax == 0
    inv = torch.ones_like(absmax) / torch.where(zero, torch.ones_like(absmax), absmax)  # [B]
    v = (padded * inv[:, None]).clamp(-1.0, 1.0)
    lut = _bin_to_code_table(code.to(A.device))
    q = lut[_normalised_to_bin(v)]  # [B, bs]
    q = q.masked_fill(zero[:, None], 0)
    return q.reshape(-1)[:n].to(torch.uint8).view(A.shape), absmax


def dequantize_blockwise8(q: Tensor, absmax: Tensor, code: Tensor, blocksize: int = 256,
                          dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of `quantize_blockwise8`: fp32 code[q] * absmax[i // blocksize], then `dtype`.

    q: uint8, any shape (numel n); absmax: fp32 [ceil(n / blocksize)]; code: fp32 [256].
    Returns a tensor of q's shape and `dtype`; bit-identical to bitsandbytes' CPU
    `dequantize_blockwise`.
    """
    if q.dtype != torch.uint8:
        raise ValueError(f"dequantize_blockwise8: q must be uint8, got {q.dtype}")
    n = q.numel()
    n_blocks = math.ceil(n / blocksize)
    if absmax.numel() != n_blocks:
        raise ValueError(f"dequantize_blockwise8: {n} codes in blocks of {blocksize} need {n_blocks} absmax, "
                         f"got {absmax.numel()}")
    vals = code.float()[q.reshape(-1).long()]
    vals = torch.nn.functional.pad(vals, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)
    out = (vals * absmax.float().reshape(n_blocks, 1)).reshape(-1)[:n]
    return out.to(dtype).view(q.shape)
