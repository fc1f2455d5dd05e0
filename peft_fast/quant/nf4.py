"""NF4 (4-bit NormalFloat) weights in the bitsandbytes storage format, in pure PyTorch.

QLoRA: Dettmers, Pagnoni, Holtzman, Zettlemoyer, "QLoRA: Efficient Finetuning of Quantized
LLMs", 2023 (arXiv:2305.14314). NF4 is a 16-entry table of normal-distribution quantiles
scaled to [-1, 1]; a weight is stored as a table index per element and one absmax scale per
block of `blocksize` consecutive elements, optionally with the scales themselves quantized to
8 bits ("double quantization", see `blockwise8.py`).

Storage (identical to bitsandbytes, so a `bnb.nn.Params4bit` can be wrapped without a copy):
    W[out, in] row-major, flattened to n = out * in elements;
    packed  uint8 [ceil(n / 2)]: element 2j in the high nibble of byte j, 2j + 1 in the low;
            an odd n pads the last low nibble with the code of 0.0 (7), as bitsandbytes does;
    absmax  fp32 [ceil(n / blocksize)], or with double quantization uint8 codes plus
            offset (fp32 scalar), absmax2 (fp32 [ceil(n_blocks / 256)]), code2 (fp32 [256]):
            absmax[i] = fp32(fp32(code2[q[i]] * absmax2[i // 256]) + offset).
    w[e] = fp32(code[nibble(e)] * absmax[e // blocksize]) converted to the weight dtype.

Quantization reproduces bitsandbytes 0.50 on CPU bit for bit (its default-backend
`quantize_4bit` and native 8-bit `quantize_blockwise`):
    * the absmax of a full block is max |w| over the block, stored as is (0 for an all-zero
      block); elements are scaled by the fp32 reciprocal  w * (1 / max(absmax, 1e-38));
    * the trailing partial block (n % blocksize != 0) is scaled by true division
      w / max(absmax, 1e-38) and stores the clamped absmax (1e-38 for an all-zero tail);
    * scaled values are clamped to [-1, 1] and mapped to the code whose fp32 midpoints
      (code[j] + code[j+1]) / 2 bracket them; a value exactly on a midpoint takes the LOWER
      code (searchsorted/bucketize with right=False);
    * double quantization: offset = mean(absmax) (torch's fp32 mean), then the 8-bit
      quantizer of `blockwise8.py` on absmax - offset with blocks of 256.
bitsandbytes' CUDA quantizer follows the same rules with other arithmetic (every block scaled
by the reciprocal, a decision tree on fp32-rounded decimal thresholds for NF4, a search of the
8-bit map, and 0 * inf for all-zero blocks), so GPU-quantized checkpoints can differ by one
code in rare cases (not checked here: no GPU). Dequantization is the same formula everywhere.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch

from ..triton_kernels.nf4 import NF4Operand, nf4_dequantize_ref
from .blockwise8 import create_dynamic_map, dequantize_blockwise8, quantize_blockwise8
from .bnb_state import bnb_4bit_operand, four_bit_state

Tensor = torch.Tensor

# The NF4 table of bitsandbytes (`get_4bit_type("nf4")`), in its order: index = 4-bit code.
NF4_CODE: Tensor = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)

# Block sizes bitsandbytes accepts for 4-bit quantization.
NF4_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# bitsandbytes quantizes the NF4 absmax in blocks of this many values.
NESTED_BLOCKSIZE = 256
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Smallest divisor bitsandbytes uses when scaling a block (avoids 0 / 0 on all-zero blocks).
_MIN_ABSMAX = 1e-38


def _check_blocksize(blocksize: Any, who: str) -> None:
    if not isinstance(blocksize, int) or isinstance(blocksize, bool) or blocksize not in NF4_BLOCKSIZES:
        raise ValueError(f"{who}: unsupported blocksize {blocksize!r}; expected one of {NF4_BLOCKSIZES}")


def _check_dtype(dtype: Any, who: str) -> None:
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{who}: unsupported dtype {dtype}; expected torch.float32, torch.float16 or torch.bfloat16")


@dataclass
class NF4Weight:
    """An NF4-quantized 2-D weight in bitsandbytes' layout (see the module docstring).

    packed:     uint8 [ceil(numel / 2)], two codes a byte, first element in the high nibble,
                row-major W[out, in]. Built by `nf4_from_bnb` it shares storage with the
                Params4bit data.
    absmax:     fp32 [n_blocks]; uint8 [n_blocks] codes when double-quantized.
    shape:      torch.Size([out, in]) of the dequantized weight.
    dtype:      dtype of the dequantized weight (bnb's quant_state.dtype).
    blocksize:  elements per absmax block (one of NF4_BLOCKSIZES; 64 by default).
    code:       fp32 [16], the NF4 table.
    offset:     fp32 scalar tensor (double quant only).
    absmax2:    fp32 [ceil(n_blocks / blocksize2)] (double quant only).
    code2:      fp32 [256], the 8-bit dynamic map (double quant only).
    blocksize2: absmax values per absmax2 block (256).
    """

    packed: Tensor
    absmax: Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    code: Tensor
    offset: Optional[Tensor] = None
    absmax2: Optional[Tensor] = None
    code2: Optional[Tensor] = None
    blocksize2: int = NESTED_BLOCKSIZE

    def __post_init__(self) -> None:
        # cheap metadata checks only (no data reads, no device syncs)
        self.shape = torch.Size(self.shape)
        if len(self.shape) != 2:
            raise ValueError(f"NF4Weight: shape must be 2-D [out, in], got {tuple(self.shape)}")
        _check_blocksize(self.blocksize, "NF4Weight")
        _check_dtype(self.dtype, "NF4Weight")
        if self.packed.dtype != torch.uint8:
            raise ValueError(f"NF4Weight: packed must be uint8, got {self.packed.dtype}")
        n = self.shape.numel()
        if self.packed.numel() != (n + 1) // 2:
            raise ValueError(f"NF4Weight: shape {tuple(self.shape)} needs {(n + 1) // 2} packed bytes, "
                             f"got {self.packed.numel()}")
        if self.absmax.numel() != self.n_blocks:
            raise ValueError(f"NF4Weight: {n} elements in blocks of {self.blocksize} need {self.n_blocks} absmax, "
                             f"got {self.absmax.numel()}")
        if self.code.numel() != 16:
            raise ValueError(f"NF4Weight: code must have 16 entries, got {self.code.numel()}")
        nested = (self.offset is not None, self.absmax2 is not None, self.code2 is not None)
        if any(nested) and not all(nested):
            raise ValueError("NF4Weight: double quantization needs offset, absmax2 and code2 together; got "
                             f"offset={'set' if nested[0] else None}, absmax2={'set' if nested[1] else None}, "
                             f"code2={'set' if nested[2] else None}")
        if self.double_quant:
            if self.absmax.dtype != torch.uint8:
                raise ValueError(f"NF4Weight: double-quantized absmax must be uint8 codes, got {self.absmax.dtype}")
            if self.blocksize2 <= 0:
                raise ValueError(f"NF4Weight: blocksize2 must be positive, got {self.blocksize2}")
            n2 = math.ceil(self.n_blocks / self.blocksize2)
            if self.absmax2.numel() != n2:
                raise ValueError(f"NF4Weight: {self.n_blocks} absmax codes in blocks of {self.blocksize2} need "
                                 f"{n2} absmax2, got {self.absmax2.numel()}")
            if self.code2.numel() != 256:
                raise ValueError(f"NF4Weight: code2 must have 256 entries, got {self.code2.numel()}")
        elif self.absmax.dtype == torch.uint8:
            raise ValueError("NF4Weight: uint8 absmax codes need offset, absmax2 and code2 (double quantization)")

    @property
    def double_quant(self) -> bool:
        """True when the absmax are 8-bit codes (QLoRA double quantization)."""
        return self.absmax2 is not None

    @property
    def numel(self) -> int:
        """Elements of the dequantized weight (out * in)."""
        return self.shape.numel()

    @property
    def n_blocks(self) -> int:
        """Number of absmax blocks, ceil(numel / blocksize)."""
        return math.ceil(self.numel / self.blocksize)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def true_absmax(self) -> Tensor:
        """fp32 [n_blocks]: the per-block scales. With double quantization
        fp32(fp32(code2[q] * absmax2[i // blocksize2]) + offset), exactly as bitsandbytes'
        `dequantize_blockwise(absmax, state2) + offset`; otherwise `absmax` itself (not a copy
        when it is already fp32)."""
        if not self.double_quant:
            return self.absmax.float()
        scales = dequantize_blockwise8(self.absmax.reshape(-1), self.absmax2.float(), self.code2,
                                       self.blocksize2, torch.float32)
        return scales + self.offset.float().reshape(())

    def operand(self) -> NF4Operand:
        """The kernel-level view (triton_kernels.nf4.NF4Operand) of the same tensors."""
        return NF4Operand(self.packed, self.absmax, self.code, tuple(self.shape), self.dtype, self.blocksize,
                          self.offset, self.absmax2, self.code2, self.blocksize2)

    def dequantize(self) -> Tensor:
        """[out, in] in `dtype`; = `dequantize_nf4_ref(self)`."""
        return dequantize_nf4_ref(self)

    def to(self, device: torch.device | str) -> "NF4Weight":
        """A copy with every tensor on `device` (tensors already there are shared, not copied)."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, packed=move(self.packed), absmax=move(self.absmax), code=move(self.code),
                       offset=move(self.offset), absmax2=move(self.absmax2), code2=move(self.code2))


def quantize_nf4(weight: Tensor, blocksize: int = 64, compress_statistics: bool = False) -> NF4Weight:
    """Quantize a 2-D weight [out, in] to NF4, bit-identical to bitsandbytes on CPU:
    `bitsandbytes.functional.quantize_4bit(weight, blocksize, compress_statistics,
    quant_type="nf4")` gives the same packed bytes, absmax (and absmax codes, offset, absmax2,
    code2). Runs on the weight's device; `weight` is not modified.

    weight: fp32/fp16/bf16 [out, in]. compress_statistics: double-quantize the absmax.
    Returns an NF4Weight with packed uint8 [ceil(out*in / 2)] and dtype = weight.dtype.
    """
    who = "quantize_nf4"
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{who}: weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"{who}: weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    _check_dtype(weight.dtype, who)
    _check_blocksize(blocksize, who)
    if weight.numel() == 0:
        raise ValueError(f"{who}: weight of shape {tuple(weight.shape)} has no elements")
    device = weight.device
    x = weight.detach().reshape(-1).float()  # [n]; widening fp16/bf16 is exact
    n = x.numel()
    n_full = n // blocksize
    full = x[: n_full * blocksize].view(n_full, blocksize)  # [n_full, bs]
    absmax = full.abs().amax(dim=1)  # [n_full]
    recip = torch.ones_like(absmax) / absmax.clamp(min=_MIN_ABSMAX)
    parts = [(full * recip[:, None]).clamp(-1.0, 1.0).reshape(-1)]
    if n_full * blocksize < n:
        # the trailing partial block: true division, and the clamped absmax is what is stored
        tail = x[n_full * blocksize:]
        tail_absmax = tail.abs().amax().clamp(min=_MIN_ABSMAX)
        parts.append((tail / tail_absmax).clamp(-1.0, 1.0))
        absmax = torch.cat([absmax, tail_absmax.reshape(1)])
    if n % 2:
        parts.append(torch.zeros(1, device=device))  # pad nibble: the code of 0.0
    scaled = torch.cat(parts)  # [n rounded up to even]
    code = NF4_CODE.to(device, copy=True)
    midpoints = (code[:-1] + code[1:]) / 2  # [15]; NF4_CODE is sorted
    q = torch.searchsorted(midpoints, scaled, right=False, out_int32=True).to(torch.uint8)
    packed = (q[0::2] << 4) | q[1::2]  # [ceil(n / 2)]

    if not compress_statistics:
        return NF4Weight(packed=packed, absmax=absmax, shape=weight.shape, dtype=weight.dtype,
                         blocksize=blocksize, code=code)
    offset = absmax.mean()
    code2 = create_dynamic_map(device)
    qabsmax, absmax2 = quantize_blockwise8(absmax - offset, code2, NESTED_BLOCKSIZE)
    return NF4Weight(packed=packed, absmax=qabsmax, shape=weight.shape, dtype=weight.dtype, blocksize=blocksize,
                     code=code, offset=offset, absmax2=absmax2, code2=code2, blocksize2=NESTED_BLOCKSIZE)


def dequantize_nf4_ref(w: NF4Weight, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """[out, in] in `out_dtype` (default w.dtype): fp32 code[q] * true_absmax[block], then one
    cast; bit-identical to `bitsandbytes.functional.dequantize_4bit(packed, quant_state)`.
    Pure PyTorch on w's device (the reference of the Triton dequant kernel, triton_kernels/nf4.py)."""
    dtype = w.dtype if out_dtype is None else out_dtype
    _check_dtype(dtype, "dequantize_nf4_ref")
    return nf4_dequantize_ref(w.operand()._replace(dtype=dtype))


def _bnb_param_and_state(obj: Any) -> tuple[Any, Any]:
    """(Params4bit, QuantState or None) of a bnb Linear4bit, its weight, or anything shaped alike."""
    if isinstance(obj, torch.nn.Module):
        param = getattr(obj, "weight", None)
        if param is None or not hasattr(param, "quant_type"):
            raise ValueError(f"nf4_from_bnb: expected a bitsandbytes Linear4bit or Params4bit, got module "
                             f"{type(obj).__name__} whose weight is {type(param).__name__}")
        return four_bit_state(obj)
    if isinstance(obj, torch.Tensor) and hasattr(obj, "quant_type"):
        return four_bit_state(obj)
    raise ValueError(f"nf4_from_bnb: expected a bitsandbytes Linear4bit or Params4bit, got {type(obj).__name__}")


def nf4_from_bnb(obj: Any) -> NF4Weight:
    """The NF4 weight of a quantized `bnb.nn.Linear4bit` (or its `Params4bit`) in the canonical
    layout, whichever layout bitsandbytes holds it in (see `bnb_state`):
      * canonical (the usual case): no copy. `packed` is a flat uint8 view of the parameter's
        storage and the absmax / nested tensors are the QuantState's own;
      * repacked by bitsandbytes for its AVX512-bf16 CPU kernel (an eval-mode no-grad forward on
        such a CPU): a canonical copy of the same codes with fp32 absmax holding the bf16-rounded
        scales bitsandbytes computes with since (its fp32 / double-quantized scales are gone).
    The module is never modified.

    Raises ValueError when the quant_type is not 'nf4' (e.g. 'fp4'), when the weight is not
    quantized yet (bitsandbytes quantizes when the Params4bit is moved to a device), or when it
    is not 2-D. bitsandbytes itself is not imported.
    """
    who = "nf4_from_bnb"
    param, state = _bnb_param_and_state(obj)
    quant_type = getattr(state, "quant_type", None) or getattr(param, "quant_type", None)
    if quant_type != "nf4":
        raise ValueError(f"{who}: quant_type {quant_type!r} is not supported; only 'nf4' weights can be wrapped "
                         "(quantize the model with bnb_4bit_quant_type='nf4')")
    if state is None or not getattr(param, "bnb_quantized", True):
        raise ValueError(f"{who}: the weight is not quantized yet (bnb_quantized="
                         f"{getattr(param, 'bnb_quantized', None)}, quant_state={state!r}); bitsandbytes "
                         "quantizes a Params4bit when it is moved to a device, e.g. layer.to('cpu') or .cuda()")
    try:
        op, _, _ = bnb_4bit_operand(obj)
    except ValueError as e:
        raise ValueError(f"{who}: {e}") from None
    code = op.code if op.code is not None else NF4_CODE.to(op.packed.device, copy=True)
    return NF4Weight(packed=op.packed, absmax=op.absmax, shape=torch.Size(op.shape), dtype=op.dtype,
                     blocksize=op.blocksize, code=code, offset=op.offset, absmax2=op.absmax2, code2=op.code2,
                     blocksize2=op.blocksize2)


def to_bnb_params(w: NF4Weight, requires_grad: bool = False):
    """A `bnb.nn.Params4bit` (already quantized) holding `w`, with a matching QuantState, so
    bitsandbytes (Linear4bit forward, dequantize_4bit, merge_and_unload requantization) can use
    it. The data is w.packed viewed as [ceil(n / 2), 1] (shared, not copied), quant_type
    'nf4', quant_storage uint8. Imports bitsandbytes (ImportError with a hint if missing).
    `requires_grad=True` is rejected by torch for uint8 data, as for any Params4bit."""
    try:
        import bitsandbytes as bnb
        from bitsandbytes.functional import QuantState
    except ImportError as e:  # pragma: no cover - exercised only without bitsandbytes
        raise ImportError("to_bnb_params needs bitsandbytes (pip install bitsandbytes)") from e
    state2 = None
    if w.double_quant:
        state2 = QuantState(absmax=w.absmax2, code=w.code2, blocksize=w.blocksize2, dtype=torch.float32)
    state = QuantState(absmax=w.absmax, shape=torch.Size(w.shape), code=w.code, blocksize=w.blocksize,
                       quant_type="nf4", dtype=w.dtype, offset=w.offset, state2=state2)
    return bnb.nn.Params4bit(data=w.packed.view(-1, 1), requires_grad=requires_grad, quant_state=state,
                             blocksize=w.blocksize, compress_statistics=w.double_quant, quant_type="nf4",
                             quant_storage=torch.uint8, bnb_quantized=True)
