"""NF4 (4-bit NormalFloat) dequantization, bitsandbytes storage format.

QLoRA: Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", 2023 (arXiv:2305.14314).

Storage (bitsandbytes): W[out, in] row-major, flattened, two 4-bit codes a byte with the first
element in the high nibble; one absmax per `blocksize` consecutive elements. With double
quantization the absmax are uint8 codes of an 8-bit blockwise quantization (code2, absmax2 per
`blocksize2` absmax) plus an fp32 offset:  absmax = code2[q] * absmax2[i // blocksize2] + offset.
    w[e] = fp32(code[nibble(e)] * absmax[e // blocksize]) -> dtype      (as bitsandbytes)

`NF4Operand` bundles those tensors so that fused_linear can read a 4-bit weight directly
(dequantizing tiles in registers: the decode path) and `nf4_dequantize` can expand it into a
reused buffer (the training path).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ._triton import HAS_TRITON, interpreting, tl, triton

Tensor = torch.Tensor


class NF4Operand(NamedTuple):
    packed: Tensor  # uint8 [ceil(numel / 2)]
    absmax: Tensor  # fp32 [n_blocks], or uint8 [n_blocks] with double quantization
    code: Tensor  # fp32 [16]
    shape: tuple  # (out, in) of the dequantized weight
    dtype: torch.dtype  # dtype of the dequantized weight
    blocksize: int
    offset: Optional[Tensor] = None  # fp32 [] or [1]
    absmax2: Optional[Tensor] = None  # fp32 [n_blocks2]
    code2: Optional[Tensor] = None  # fp32 [256]
    blocksize2: int = 256

    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None


def nf4_absmax_ref(w: NF4Operand) -> Tensor:
    """fp32 [n_blocks]: the per-block absmax, decoding the nested 8-bit quantization if any
    (code2[q] * absmax2 rounded to fp32, then + offset: two roundings, as bitsandbytes)."""
    if not w.double_quant:
        return w.absmax.float()
    nb = w.absmax.numel()
    scale = w.absmax2.float().repeat_interleave(w.blocksize2)[:nb]
    return torch.mul(w.code2.float()[w.absmax.long()], scale).add_(w.offset.reshape(()).float())


_PAIR_TABLES: dict = {}


def _pair_table(code: Tensor) -> Tensor:
    """[256, 2] fp32: the two code values of every byte (high nibble first)."""
    key = (code.data_ptr(), code._version, str(code.device))
    hit = _PAIR_TABLES.get(key)
    if hit is None:
        b = torch.arange(256, device=code.device)
        hit = torch.stack((code.float()[b >> 4], code.float()[b & 0xF]), dim=1)
        if len(_PAIR_TABLES) > 16:
            _PAIR_TABLES.clear()
        _PAIR_TABLES[key] = hit
    return hit


def nf4_dequantize_ref(w: NF4Operand, out: Optional[Tensor] = None) -> Tensor:
    """[out, in] in w.dtype (into `out` if given); bit-identical to bitsandbytes' dequantize_4bit.
    One gather per byte from a 256-entry pair table, then one multiply per block."""
    n = w.shape[0] * w.shape[1]
    nb = w.absmax.numel()
    vals = _pair_table(w.code).index_select(0, w.packed.reshape(-1).int()).reshape(-1)  # [2 * bytes]
    full = nb * w.blocksize
    if vals.numel() < full:
        vals = torch.nn.functional.pad(vals, (0, full - vals.numel()))
    vals = vals[:full].view(nb, w.blocksize).mul_(nf4_absmax_ref(w)[:, None]).view(-1)[:n]
    res = vals.view(w.shape).to(w.dtype)
    if out is not None:
        return out.copy_(res)
    return res


def get_nf4_configs():
    if interpreting():
        return [triton.Config({"BLOCK": 256}, num_warps=4)]
    return [triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((1024, 4), (2048, 8), (4096, 8))]


if HAS_TRITON:

    @triton.jit
    def nf4_decode(packed_ptr, absmax_ptr, code_ptr, offset_ptr, absmax2_ptr, code2_ptr, e, ok,
                   blocksize, blocksize2, DOUBLE_QUANT: tl.constexpr):
        """fp32 weights of the flat element indices `e` (any shape) of an NF4 tensor."""
        byte = tl.load(packed_ptr + (e >> 1), mask=ok, other=0).to(tl.int32)
        nib = tl.where((e & 1) == 0, byte >> 4, byte & 0xF)
        blk = e // blocksize
        if DOUBLE_QUANT:
            qa = tl.load(absmax_ptr + blk, mask=ok, other=0).to(tl.int32)
            absmax = tl.load(code2_ptr + qa, mask=ok, other=0.0) * tl.load(absmax2_ptr + blk // blocksize2, mask=ok,
                                                                             other=0.0)
            absmax = absmax + tl.load(offset_ptr)
        else:
            absmax = tl.load(absmax_ptr + blk, mask=ok, other=0.0)
        return tl.load(code_ptr + nib, mask=ok, other=0.0) * absmax

    @triton.jit
    def nf4_code_select(nib, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15):
        """code[nib] for int32 nibbles `nib` (any shape) from the 16 code values held as scalars:
        a 4-level select tree in registers, so a GEMM tile needs no per-element table gather
        (which Triton's pipeliner would stage as an fp32 tile in shared memory)."""
        b = (nib & 1) != 0
        v0, v1, v2, v3 = tl.where(b, c1, c0), tl.where(b, c3, c2), tl.where(b, c5, c4), tl.where(b, c7, c6)
        v4, v5, v6, v7 = tl.where(b, c9, c8), tl.where(b, c11, c10), tl.where(b, c13, c12), tl.where(b, c15, c14)
        b = (nib & 2) != 0
        u0, u1, u2, u3 = tl.where(b, v1, v0), tl.where(b, v3, v2), tl.where(b, v5, v4), tl.where(b, v7, v6)
        b = (nib & 4) != 0
        t0, t1 = tl.where(b, u1, u0), tl.where(b, u3, u2)
        return tl.where((nib & 8) != 0, t1, t0)

    @triton.jit
    def nf4_block_absmax(absmax_ptr, offset, absmax2_ptr, code2_ptr, blk, ok, blocksize2,
                         DOUBLE_QUANT: tl.constexpr):
        """fp32 absmax of the int64 block indices `blk` (a vector: one per block, not per
        element). Double quantization: code2[q] * absmax2 rounded to fp32, then + offset (the
        kernel is compiled without fused multiply-add, as bitsandbytes rounds twice)."""
        if DOUBLE_QUANT:
            qa = tl.load(absmax_ptr + blk, mask=ok, other=0).to(tl.int32)
            am = tl.load(code2_ptr + qa, mask=ok, other=0.0) * tl.load(absmax2_ptr + blk // blocksize2, mask=ok,
                                                                       other=0.0)
            return am + offset
        else:
            return tl.load(absmax_ptr + blk, mask=ok, other=0.0)

    @triton.autotune(configs=get_nf4_configs(), key=["n", "DOUBLE_QUANT"])
    @triton.jit
    def _nf4_dequant_kernel(
        # pointers
        packed_ptr, absmax_ptr, code_ptr, offset_ptr, absmax2_ptr, code2_ptr, out_ptr,
        # sizes
        n, blocksize, blocksize2,
        # meta
        DOUBLE_QUANT: tl.constexpr, BLOCK: tl.constexpr,
    ):
        e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = e < n
        w = nf4_decode(packed_ptr, absmax_ptr, code_ptr, offset_ptr, absmax2_ptr, code2_ptr, e, ok,
                       blocksize, blocksize2, DOUBLE_QUANT)
        tl.store(out_ptr + e, w.to(out_ptr.dtype.element_ty), mask=ok)


def nf4_kernel_args(w: NF4Operand) -> tuple:
    """Pointer arguments of `nf4_decode` (unused slots get a harmless tensor)."""
    dq = w.double_quant
    return (w.packed, w.absmax, w.code, w.offset if dq else w.code, w.absmax2 if dq else w.code,
            w.code2 if dq else w.code)


def nf4_dequantize(w: NF4Operand, out: Optional[Tensor] = None) -> Tensor:
    """Triton launcher with the signature of `nf4_dequantize_ref`. `out` ([out, in], w.dtype,
    contiguous) lets the caller reuse one buffer per device instead of allocating."""
    if not HAS_TRITON:
        raise RuntimeError("nf4_dequantize needs triton; install it or set PEFT_FAST_BACKEND=torch")
    n = w.shape[0] * w.shape[1]
    if w.packed.numel() * 2 < n:
        raise ValueError(f"nf4_dequantize: {w.packed.numel()} packed bytes cannot hold shape {tuple(w.shape)}")
    if out is None:
        out = torch.empty(w.shape, dtype=w.dtype, device=w.packed.device)
    elif tuple(out.shape) != tuple(w.shape) or not out.is_contiguous():
        raise ValueError(f"nf4_dequantize: out must be contiguous {tuple(w.shape)}, got {tuple(out.shape)}")
    if n == 0:
        return out
    # the interpreter rounds fp32 -> bf16 by truncation: store fp32 there and let torch round
    dst = torch.empty(w.shape, dtype=torch.float32, device=out.device) \
        if interpreting() and out.dtype == torch.bfloat16 else out
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK"]),)  # noqa: E731
    # no fused multiply-add: bitsandbytes rounds code2 * absmax2 before adding the offset
    _nf4_dequant_kernel[grid](*nf4_kernel_args(w), dst, n, w.blocksize, w.blocksize2, DOUBLE_QUANT=w.double_quant,
                              enable_fp_fusion=False)
    return out.copy_(dst) if dst is not out else out
