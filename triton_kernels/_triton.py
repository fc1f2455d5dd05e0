"""Shared pieces of the Triton kernels: optional import, interpreter detection, dropout masks.

Dropout masks on the Triton path are never stored: each kernel regenerates the keep mask of
element (row, col) from a seed with Philox-4x32-10 (Salmon et al., "Parallel random numbers:
as easy as 1, 2, 3", SC 2011), counter (c0, c1, c2, c3) = (col, row, 0, 0), key = seed.
The first output word w keeps the element when (w >> 1) >= threshold, threshold = round(p 2^31):
P(keep) = 1 - threshold / 2^31 exactly, which `keep_scale` inverts.
`philox_keep_mask_ref` recomputes the same bits with int64 torch ops (tests, references).

Launch configs: each autotuned kernel lists its configs per GPU target (`get_<op>_configs`,
below) and `target_pruner` keeps the running GPU's list for a launch. Environment:
  PEFT_FAST_AUTOTUNE=0  no autotuning: every launch keeps only the first config of its target's
                        list (nothing is benchmarked; older Triton, e.g. 3.6, still times that
                        one config once). For short GPU test runs on a cold Triton cache, where benchmarking
                        several configs per new shape costs more than the tests; the first
                        config of every list fits its target without spills (compile-checked by
                        benchmarks/aot_compile.py), so results are the same, only slower.
"""
from __future__ import annotations

import os

import torch

try:  # Triton is optional: CPU installs run the torch references
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised on installs without triton
    triton = tl = None
    HAS_TRITON = False

Tensor = torch.Tensor

_BITS = 31
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_U32 = 0xFFFFFFFF


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def keep_threshold(p: float) -> int:
    """Integer threshold of the 31-bit uniform; at least one level is always kept."""
    return min(round(p * 2**_BITS), 2**_BITS - 1)


def keep_scale(p: float) -> float:
    """1 / P(keep), exact for the quantised p."""
    return 2**_BITS / (2**_BITS - keep_threshold(p))


def new_seed(device: torch.device) -> Tensor:
    """An int64 [1] seed drawn from torch's generator of `device` (honours torch.manual_seed);
    it stays on the device so no host sync is needed."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


def _mul_hi_lo(a: int, x: Tensor) -> tuple[Tensor, Tensor]:
    # 32x32 -> 64-bit product of a constant and uint32 values held in int64, split in 16-bit
    # halves so nothing overflows int64
    xh, xl = x >> 16, x & 0xFFFF
    t = a * xl
    hi = ((a * xh) + (t >> 16)) >> 16
    lo = ((((a * xh) & 0xFFFF) << 16) + t) & _U32
    return hi & _U32, lo


def philox_keep_mask_ref(seed: int, rows: int, cols: int, p: float, device=None, row0: int = 0) -> Tensor:
    """bool [rows, cols] keep mask of rows row0.. identical to the kernels' in-register mask."""
    r = torch.arange(row0, row0 + rows, dtype=torch.int64, device=device)[:, None].expand(rows, cols)
    c = torch.arange(cols, dtype=torch.int64, device=device)[None, :].expand(rows, cols)
    c0, c1 = c & _U32, r & _U32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    k0, k1 = seed & _U32, (seed >> 32) & _U32
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_PHILOX_ROUND_A, c0)
        c0, c2 = hi_b ^ c1 ^ k0, hi_a ^ c3 ^ k1
        c1, c3 = lo_b, lo_a
        k0, k1 = (k0 + _PHILOX_KEY_A) & _U32, (k1 + _PHILOX_KEY_B) & _U32
    return (c0 >> 1) >= keep_threshold(p)


def next_pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << (max(int(n), 1) - 1).bit_length())


if HAS_TRITON:

    @triton.jit
    def keep_mask(seed, rows, cols, threshold):
        """Keep mask of the [BM, BN] tile at rows [BM, 1] x cols [1, BN] (see module doc)."""
        zero = (rows * 0 + cols * 0).to(tl.uint32)
        c0 = (cols + rows * 0).to(tl.uint32)
        c1 = (rows + cols * 0).to(tl.uint32)
        w, _, _, _ = tl.philox(seed, c0, c1, zero, zero)
        return (w >> 1).to(tl.int32) >= threshold


# ----------------------------------------------------------------------------------------------
# Per-target launch configs. A kernel's `get_<op>_configs(cc=None, args=None)` returns
#   - under the interpreter: one small fixed config;
#   - cc=None: every config any target may use (the list given to triton.autotune);
#   - cc=80, 86, 89, 90, 120, ...: the configs that fit that target (shared memory per block,
#     no register spills), optionally narrowed by the launch's named arguments `args`.
# `target_pruner(get_configs)` is the autotuner's early_config_prune: it keeps the configs of
# the running GPU, so the compile-only check (benchmarks/aot_compile.py) and the autotuner on a
# real GPU consider the same list.
# ----------------------------------------------------------------------------------------------
# shared memory per block (bytes) of each compute capability
SMEM_PER_BLOCK = {80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024,
                  100: 227 * 1024, 120: 99 * 1024}

_CAPABILITY: dict = {}


def device_capability(device=None):
    """major * 10 + minor of the current (or given) CUDA device, e.g. 90; None without CUDA."""
    if not torch.cuda.is_available():
        return None
    idx = torch.cuda.current_device() if device is None else torch.device(device).index or 0
    cc = _CAPABILITY.get(idx)
    if cc is None:
        major, minor = torch.cuda.get_device_capability(idx)
        cc = _CAPABILITY[idx] = major * 10 + minor
    return cc


def config_key(cfg) -> tuple:
    """Hashable identity of a triton.Config (its meta-parameters, warps and stages)."""
    return (tuple(sorted(cfg.kwargs.items())), cfg.num_warps, cfg.num_stages)


# the most conservative known target (99 KB of shared memory per block, consumer register
# budget): its configs are the fallback for a GPU none of the lists knows
FALLBACK_CC = 86


def autotune_enabled() -> bool:
    """False when PEFT_FAST_AUTOTUNE is 0 / false / no / off (see the module doc)."""
    return os.environ.get("PEFT_FAST_AUTOTUNE", "1").strip().lower() not in ("0", "false", "no", "off")


def _listed(configs, listed) -> list:
    """The members of `configs` that `listed` names, in the order of `listed`."""
    by_key = {config_key(c): c for c in configs}
    out, seen = [], set()
    for c in listed:
        k = config_key(c)
        if k in by_key and k not in seen:
            seen.add(k)
            out.append(by_key[k])
    return out


def target_pruner(get_configs):
    """early_config_prune for triton.autotune: keep the configs `get_configs(cc, args)` lists
    for the running device, in that list's order. A device whose list keeps none of them (a
    capability no table knows) gets the list of FALLBACK_CC (sm_86: 99 KB) for the same launch,
    and only if that is empty too every config. Without a CUDA device (the interpreter) every
    config is kept. PEFT_FAST_AUTOTUNE=0 keeps only the first of the kept configs."""
    def prune(configs, named_args, **kwargs):
        cc = device_capability()
        kept = list(configs)
        if cc is not None:
            args = dict(named_args, **kwargs)
            kept = _listed(configs, get_configs(cc, args))
            if not kept and cc != FALLBACK_CC:
                kept = _listed(configs, get_configs(FALLBACK_CC, args))
            kept = kept or list(configs)
        return kept if autotune_enabled() else kept[:1]
    prune.get_configs = get_configs  # read by benchmarks/aot_compile.py
    return prune
