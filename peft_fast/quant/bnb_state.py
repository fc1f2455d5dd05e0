"""One reader for bitsandbytes' quantized linear weights, in every state bitsandbytes leaves them.

The LoRA / DoRA layers on `bnb.nn.Linear4bit` and `bnb.nn.Linear8bitLt` read their frozen
weight only through this module (`dequantize_bnb_weight`, `bnb_4bit_operand`), for merge,
unmerge, merge_and_unload, DoRA's norm and the fused QLoRA op. Reading never changes the module
(bitsandbytes' own inverse, `_convert_weight_packed_for_cpu_inverse`, rewrites the QuantState in
place; this one works on copies). The one writer is `restore_canonical_layout`, which the LoRA
and IA3 layers call before a training forward on a repacked weight. bitsandbytes itself is
imported only to call its dequantizers and build a QuantState.

States of a 4-bit weight (`Params4bit`, NF4 or FP4), bitsandbytes 0.50:
  * canonical: uint8 codes of W[N, K] row-major, two a byte, first element in the high nibble;
    absmax fp32 [n_blocks] (or uint8 codes + offset + state2 with double quantization).
  * CPU layout: on a CPU with avx512_bf16 an eval-mode forward whose input does not require grad
    repacks the weight for bitsandbytes' bf16 gemm (`functional._convert_weight_packed_for_cpu`,
    flag `quant_state.packing_format_for_cpu`): data [N, K/2] uint8 in tiles of 32 rows (see
    `unpack_cpu_layout`), absmax decoded from double quantization, rounded to bf16 and stored
    transposed [K / blocksize, N], `quant_state.dtype` = bf16 (the real one in `original_dtype`).
    Reading it back gives the same codes and the bf16-rounded scales bitsandbytes computes with
    from then on (the fp32 / double-quantized originals are gone). Only shapes with N % 32 == 0
    and K % blocksize == 0 can be repacked; bitsandbytes asserts on others.
  * after bitsandbytes' own inverse (`_convert_weight_packed_for_cpu_inverse`, run in place by
    `Linear4bit._save_to_state_dict`, i.e. by any `model.state_dict()`, and by `.cuda()`):
    canonical codes, but without double quantization it leaves absmax transposed, bf16
    [K / blocksize, N], which bitsandbytes' kernels then read in the wrong order. Read here as
    the transpose back (`transposed_absmax`).
  * not quantized yet (`bnb_quantized=False`): the dense weight itself.
bitsandbytes 0.50's CPU dequant kernel (seen on an AVX512 CPU) reads absmax as if every row
held whole blocks (block = row * (K // blocksize) + col // blocksize), which is wrong when
K % blocksize != 0; on CPU such weights are dequantized here by the bit-exact PyTorch reference.

States of an 8-bit weight (`Int8Params` of `Linear8bitLt`): int8 codes [N, K] with fp32 row
scales SCB, w = code * SCB / 127. Until the first forward the scales are `weight.SCB`; the
first forward moves them to `module.state.SCB` and sets `weight.SCB = None`. With
has_fp16_weights the weight stays a dense float tensor.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from ..triton_kernels.nf4 import NF4Operand, nf4_dequantize_ref

Tensor = torch.Tensor

# Rows per tile of bitsandbytes' CPU layout (`block_n` of _convert_weight_packed_for_cpu).
CPU_TILE_ROWS = 32


# ---------------------------------------------------------------------------------------------- kinds
def _param_kind(param: Any) -> Optional[str]:
    name = type(param).__name__
    return {"Params4bit": "4bit", "Int8Params": "8bit"}.get(name)


def is_cpu_packed(state: Any) -> bool:
    """True when a 4-bit QuantState is in bitsandbytes' AVX512-bf16 CPU layout."""
    return bool(getattr(state, "packing_format_for_cpu", False))


def transposed_absmax(state: Any) -> bool:
    """True for the absmax bitsandbytes' inverse leaves behind: 2-D [K / blocksize, N] (a
    canonical absmax is 1-D; only the CPU layout makes it 2-D)."""
    absmax = getattr(state, "absmax", None)
    return not is_cpu_packed(state) and not getattr(state, "nested", False) and absmax is not None \
        and absmax.dim() == 2


def four_bit_state(obj: Any) -> tuple[Any, Any]:
    """(Params4bit, QuantState or None) of a Linear4bit or its weight. FSDP-like conversions can
    drop the state from the parameter while the module keeps it."""
    if isinstance(obj, torch.nn.Module):
        param = obj.weight
        return param, getattr(param, "quant_state", None) or getattr(obj, "quant_state", None)
    return obj, getattr(obj, "quant_state", None)


# ---------------------------------------------------------------------------------------------- 4-bit
def unpack_cpu_layout(data: Tensor, state: Any) -> tuple[Tensor, Tensor]:
    """The canonical (packed uint8 [N*K/2], absmax fp32 [N * K/blocksize]) of a weight in
    bitsandbytes' CPU layout; new tensors, `data` and `state` are not modified.

    The layout (bitsandbytes 0.50, `_convert_weight_packed_for_cpu` with block_n = 32): codes
    q[N, K] viewed as [N/32, 32, K/2, 2], transposed to [N/32, K/2, 32, 2] and flattened in
    groups of 64; each group is stored as 32 bytes, byte i = (code 32 + i) << 4 | code i.
    absmax is bf16 [K / blocksize, N] (the transpose of the row-major block scales)."""
    N, K = (int(s) for s in state.shape)
    d = data if data.dtype == torch.uint8 else data.view(torch.uint8)
    if N % CPU_TILE_ROWS or K % 2 or d.numel() * 2 != N * K:
        raise ValueError(f"weight data of {d.numel()} bytes is not bitsandbytes' CPU layout of a [{N}, {K}] weight "
                         f"(needs N % {CPU_TILE_ROWS} == 0, even K and N*K/2 bytes)")
    groups = d.reshape(-1, CPU_TILE_ROWS)  # [N/32 * K/2, 32]
    codes = torch.cat([groups & 0xF, groups >> 4], dim=1)  # [N/32 * K/2, 64]: the group's 64 codes in order
    codes = codes.view(N // CPU_TILE_ROWS, K // 2, CPU_TILE_ROWS, 2).transpose(1, 2).reshape(-1)  # row-major [N*K]
    packed = (codes[0::2] << 4) | codes[1::2]
    absmax = state.absmax
    if absmax.dim() != 2 or tuple(absmax.shape) != (K // state.blocksize, N):
        raise ValueError(f"CPU-layout absmax of shape {tuple(absmax.shape)} does not match a [{N}, {K}] weight in "
                         f"blocks of {state.blocksize} (expected {(K // state.blocksize, N)})")
    return packed, absmax.t().reshape(-1).float()


def _row_major_absmax(state: Any) -> Tensor:
    """fp32 [N * K/blocksize] from a transposed [K / blocksize, N] absmax."""
    N, K = (int(s) for s in state.shape)
    if tuple(state.absmax.shape) != (K // state.blocksize, N):
        raise ValueError(f"2-D absmax of shape {tuple(state.absmax.shape)} does not match a [{N}, {K}] weight in "
                         f"blocks of {state.blocksize} (expected {(K // state.blocksize, N)})")
    return state.absmax.t().reshape(-1).float()


def bnb_4bit_operand(obj: Any) -> tuple[NF4Operand, str, bool]:
    """(operand, quant_type, is_copy): the 4-bit weight of a quantized Linear4bit / Params4bit as
    a kernel operand in the canonical layout (the code table is the QuantState's, so FP4 works
    alike). `is_copy` is False when the operand shares the parameter's storage and QuantState
    tensors, True when it was decoded from bitsandbytes' CPU layout or its inverse's leftover
    (then non-nested, fp32 absmax holding the bf16-rounded scales of the CPU layout)."""
    param, state = four_bit_state(obj)
    if state is None or not getattr(param, "bnb_quantized", True):
        raise ValueError(f"the {type(param).__name__} weight is not quantized yet (bnb_quantized="
                         f"{getattr(param, 'bnb_quantized', None)}, quant_state={state!r})")
    shape = tuple(int(s) for s in state.shape)
    if len(shape) != 2:
        raise ValueError(f"only 2-D [out, in] 4-bit weights are supported, got shape {shape}")
    quant_type = state.quant_type
    if is_cpu_packed(state):
        packed, absmax = unpack_cpu_layout(param.data, state)
        dtype = getattr(state, "original_dtype", None) or state.dtype
        return NF4Operand(packed, absmax, state.code.float(), shape, dtype, int(state.blocksize)), quant_type, True
    data = param.data if param.data.dtype == torch.uint8 else param.data.view(torch.uint8)
    if not data.is_contiguous():
        raise ValueError(f"the packed 4-bit weight must be contiguous, got strides {data.stride()}")
    if transposed_absmax(state):
        dtype = getattr(state, "original_dtype", None) or state.dtype
        return NF4Operand(data.view(-1), _row_major_absmax(state), state.code.float(), shape, dtype,
                          int(state.blocksize)), quant_type, True
    nested = {}
    if getattr(state, "nested", False):
        offset = state.offset
        if not isinstance(offset, torch.Tensor):
            offset = torch.tensor(float(offset), dtype=torch.float32, device=data.device)
        nested = dict(offset=offset.reshape(()), absmax2=state.state2.absmax, code2=state.state2.code,
                      blocksize2=int(state.state2.blocksize))
    return NF4Operand(data.view(-1), state.absmax, state.code, shape, state.dtype, int(state.blocksize),
                      **nested), quant_type, False


def needs_canonical_layout(module: torch.nn.Module, x: Tensor) -> bool:
    """True when `module` (a Linear4bit) is about to run a forward bitsandbytes gets wrong in the
    weight's current state: the CPU layout in training (its kernel for that layout has no
    backward; bitsandbytes only repacks for eval-mode inference), or a transposed absmax left by
    bitsandbytes' inverse (read in the wrong order in any mode)."""
    state = four_bit_state(module)[1]
    return transposed_absmax(state) or (
        is_cpu_packed(state) and (module.training or (torch.is_grad_enabled() and x.requires_grad)))


def restore_canonical_layout(module: torch.nn.Module) -> bool:
    """Put a Linear4bit weight that bitsandbytes repacked for its CPU kernel (or left with a
    transposed absmax, see the module docstring) back in the canonical layout, in place; False
    if it already was. The codes are unchanged; the scales become the bf16-rounded values
    bitsandbytes computed with since, stored exactly as fp32 absmax (not double-quantized
    again). bitsandbytes repacks again on its next eval-mode no-grad forward."""
    param, state = four_bit_state(module)
    if not (is_cpu_packed(state) or transposed_absmax(state)):
        return False
    import bitsandbytes.functional as BF

    if is_cpu_packed(state):
        packed, absmax = unpack_cpu_layout(param.data, state)
        data = packed.reshape(getattr(state, "original_qshape", (-1, 1)))
        storage = getattr(state, "original_storage_type", None)
        param.data = data.view(storage) if storage is not None else data
    else:
        absmax = _row_major_absmax(state)
    new_state = BF.QuantState(absmax=absmax, shape=state.shape, code=state.code, blocksize=state.blocksize,
                              quant_type=state.quant_type, dtype=getattr(state, "original_dtype", None) or state.dtype)
    param.quant_state = new_state
    if getattr(module, "quant_state", None) is not None:
        module.quant_state = new_state
    return True


def cpu_shape_problem(shape, blocksize: int, repack: bool) -> Optional[str]:
    """Why bitsandbytes 0.50's CPU 4-bit kernels cannot compute with W [N, K] (with `repack`:
    after repacking it for the AVX512-bf16 kernel), or None when they can."""
    N, K = (int(s) for s in shape)
    if K % blocksize:
        return (f"in_features {K} is not a multiple of the 4-bit block size {blocksize} (bitsandbytes' CPU "
                "dequant kernel assumes whole blocks per row)")
    if repack and N % CPU_TILE_ROWS:
        return (f"out_features {N} is not a multiple of {CPU_TILE_ROWS} (bitsandbytes' AVX512-bf16 CPU repacking "
                f"asserts N % {CPU_TILE_ROWS} == 0)")
    return None


def cpu_forward_problem(module: torch.nn.Module, x: Tensor) -> Optional[str]:
    """Why `module(x)` (a bitsandbytes Linear4bit, x on CPU) would fail or compute with a
    misread weight, or None when bitsandbytes handles it. Mirrors Linear4bit.forward: it
    repacks when `support_avx512bf16_for_cpu` is set, the module is in eval mode and x does not
    require grad; a repacked weight needs that kernel (registered only on such CPUs)."""
    param, state = four_bit_state(module)
    if state is None:
        return "the weight is not quantized"
    has_kernel = bool(getattr(module, "support_avx512bf16_for_cpu", False))
    if is_cpu_packed(state):
        return None if has_kernel else "the weight is in the AVX512-bf16 CPU layout but that kernel is unavailable"
    repack = has_kernel and not module.training and not x.requires_grad
    return cpu_shape_problem(state.shape, int(state.blocksize), repack)


def _dequantize_4bit(obj: Any) -> Tensor:
    op, quant_type, is_copy = bnb_4bit_operand(obj)
    if op.packed.device.type == "cpu" and op.shape[1] % op.blocksize:
        return nf4_dequantize_ref(op)  # bitsandbytes' CPU kernel misreads blocks that cross rows
    import bitsandbytes.functional as BF

    if not is_copy:
        return BF.dequantize_4bit(op.packed, four_bit_state(obj)[1])
    state = BF.QuantState(absmax=op.absmax, shape=torch.Size(op.shape), code=op.code, blocksize=op.blocksize,
                          quant_type=quant_type, dtype=op.dtype)
    return BF.dequantize_4bit(op.packed, state)


# ---------------------------------------------------------------------------------------------- 8-bit
def int8_scales(module: torch.nn.Module) -> Optional[Tensor]:
    """fp32 [N] row scales of a Linear8bitLt's int8 weight: `weight.SCB` before the first
    forward (or after the weight was replaced), `state.SCB` after it; None if neither is set."""
    scb = getattr(module.weight, "SCB", None)
    if scb is None:
        scb = getattr(getattr(module, "state", None), "SCB", None)
    return scb


def _dequantize_8bit(module: torch.nn.Module) -> Tensor:
    data = module.weight.data
    if data.dtype != torch.int8:  # has_fp16_weights, or not quantized yet
        return data
    scb = int8_scales(module)
    if scb is None:
        raise ValueError(f"the int8 weight {tuple(data.shape)} of {type(module).__name__} has no scales: weight.SCB "
                         "and state.SCB are both None")
    try:
        from bitsandbytes.functional import int8_vectorwise_dequant
    except ImportError:  # pragma: no cover - older bitsandbytes: its formula
        return data * scb.to(data.device).view(-1, 1) * 7.874015718698502e-3
    return int8_vectorwise_dequant(data, scb.to(data.device))


# ---------------------------------------------------------------------------------------------- accessor
def dequantize_bnb_weight(module: torch.nn.Module) -> Tensor:
    """The dense weight [out, in] of a bitsandbytes Linear4bit / Linear8bitLt in any state (4-bit
    canonical or CPU layout, 8-bit before or after the first forward), or of any other layer
    (its weight as is). 4-bit: in the QuantState's dtype (the original one if repacked), equal to
    bitsandbytes' `dequantize_4bit` of the canonical layout; 8-bit: fp32 (code * SCB / 127, as
    PEFT's `dequantize_bnb_weight`). Detached; the module is not modified."""
    kind = _param_kind(module.weight)
    if kind == "4bit" and getattr(module.weight, "bnb_quantized", True):
        w = _dequantize_4bit(module)
    elif kind == "8bit":
        w = _dequantize_8bit(module)
    else:
        w = module.weight.data
    return w.detach()
