"""Test helpers for bitsandbytes weights that do not depend on the CPU the tests run on.

bitsandbytes 0.50 behaves differently on CPUs with avx512_bf16 (Intel Sapphire Rapids and
later): an eval-mode no-grad forward of a Linear4bit repacks its weight into a CPU layout and
computes in bf16, and its CPU dequant kernel misreads absmax when a row is not a whole number of
blocks. So the tests here never take bitsandbytes' CPU kernels as the oracle:
  * `nf4_dequant_fp64` decodes packed NF4 bytes in fp64 from the QuantState's own tensors;
  * `repack_for_cpu` applies bitsandbytes' repacking explicitly (pure torch, any CPU);
  * `simulate_cpu` makes Linear4bit layers built afterwards act as on a CPU with or without
    avx512_bf16 (bitsandbytes reads `has_avx512bf16()` once, in Linear4bit.__init__).
"""
from __future__ import annotations

import torch

NF4_TABLE = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]


def nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """int64 [n] codes of canonical packed bytes (first element in the high nibble)."""
    b = packed.reshape(-1).view(torch.uint8).long()
    return torch.stack([b >> 4, b & 0xF], dim=1).reshape(-1)[:n]


def true_absmax(state) -> torch.Tensor:
    """fp32 [n_blocks] scales of a canonical QuantState, by bitsandbytes' definition: with double
    quantization fp32(fp32(code2[q] * absmax2[i // 256]) + offset)."""
    if not state.nested:
        return state.absmax.float()
    s2 = state.state2
    q = state.absmax.long()
    blk = torch.arange(q.numel()) // s2.blocksize
    return (s2.code[q] * s2.absmax[blk]).float() + torch.as_tensor(state.offset, dtype=torch.float32)


def nf4_dequant_fp64(codes: torch.Tensor, absmax: torch.Tensor, shape, blocksize: int, table=None) -> torch.Tensor:
    """fp64 [N, K]: table[code] * absmax[element // blocksize] (both exact in fp64, so rounding
    the result to fp32 gives bitsandbytes' fp32 dequantization exactly). table: NF4 by default."""
    n = shape[0] * shape[1]
    table = torch.tensor(NF4_TABLE if table is None else table, dtype=torch.float64)
    scale = absmax.double()[torch.arange(n) // blocksize]
    return (table[codes[:n]] * scale).reshape(shape)


def layer_dequant_fp64(layer) -> torch.Tensor:
    """fp64 [N, K] of a Linear4bit whose weight is still in the canonical layout."""
    st = layer.weight.quant_state
    shape = tuple(st.shape)
    return nf4_dequant_fp64(nibbles(layer.weight.data, shape[0] * shape[1]), true_absmax(st), shape, st.blocksize,
                            st.code.tolist())


def repack_for_cpu(layer) -> None:
    """What Linear4bit.forward does on an avx512_bf16 CPU in eval mode: bitsandbytes' own
    repacking (pure torch, so it runs on any CPU)."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    w = layer.weight
    w.data, w.quant_state = _convert_weight_packed_for_cpu(w.data, w.quant_state)
    assert w.quant_state.packing_format_for_cpu


def simulate_cpu(monkeypatch, avx512_bf16: bool) -> None:
    """Linear4bit layers built after this call act as on a CPU with / without avx512_bf16."""
    import bitsandbytes.nn.modules as modules

    monkeypatch.setattr(modules, "has_avx512bf16", lambda: avx512_bf16)


def set_cpu_repack(model: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """Turn bitsandbytes' CPU repacking on or off on every Linear4bit of an existing model."""
    for m in model.modules():
        if type(m).__name__ == "Linear4bit" and type(m).__module__.startswith("bitsandbytes"):
            m.support_avx512bf16_for_cpu = enabled
    return model
