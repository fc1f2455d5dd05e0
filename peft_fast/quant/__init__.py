"""Quantized weight formats (pure PyTorch; bitsandbytes optional at run time).

`NF4Weight` holds a QLoRA NF4 weight (Dettmers et al., 2023, arXiv:2305.14314) in
bitsandbytes' exact storage format: `quantize_nf4` and `dequantize_nf4_ref` are bit-identical
to bitsandbytes on CPU, `nf4_from_bnb` wraps a `bnb.nn.Linear4bit` without a copy (or decodes
bitsandbytes' CPU repacking) and `to_bnb_params` goes back. `bnb_state.dequantize_bnb_weight` is
the one reader of a bitsandbytes layer's weight in any quantization state (4-bit canonical or
repacked, 8-bit before or after the first forward).
"""
from .blockwise8 import create_dynamic_map, dequantize_blockwise8, quantize_blockwise8
from .bnb_state import dequantize_bnb_weight
from .nf4 import (
    NF4_BLOCKSIZES,
    NF4_CODE,
    NF4Weight,
    dequantize_nf4_ref,
    nf4_from_bnb,
    quantize_nf4,
    to_bnb_params,
)

__all__ = [
    "NF4_BLOCKSIZES",
    "NF4_CODE",
    "NF4Weight",
    "create_dynamic_map",
    "dequantize_blockwise8",
    "dequantize_bnb_weight",
    "dequantize_nf4_ref",
    "nf4_from_bnb",
    "quantize_blockwise8",
    "quantize_nf4",
    "to_bnb_params",
]
