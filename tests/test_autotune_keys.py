"""Autotune keys, the per-target pruner and PEFT_FAST_AUTOTUNE (issue #13 review).

A kernel's autotune key must hold every launch argument its config getter reads: the
autotuner caches one config per key and prunes only on a cache miss, so a launch whose pruned
list differs from the cached launch's (same key) would run a config that was pruned for it.
Kernel tests run with TRITON_INTERPRET=1 (marker `interp`); the others need no interpreter.
"""
from __future__ import annotations

import importlib

import pytest
import torch

KERNEL_MODULES = ("colsum", "dora", "fused_linear", "lora", "multi_lora", "nf4", "ia3")


def _autotuned_kernels():
    """(module name, kernel name, Autotuner) of every autotuned kernel in triton_kernels."""
    from triton.runtime.autotuner import Autotuner

    found, seen = [], set()
    for mod_name in KERNEL_MODULES:
        mod = importlib.import_module(f"peft_fast.triton_kernels.{mod_name}")
        for name, obj in vars(mod).items():
            if isinstance(obj, Autotuner) and id(obj) not in seen:
                seen.add(id(obj))
                found.append((mod_name, name, obj))
    return found


# ------------------------------------------------------------------ every getter input is in the key
class _Arg:
    """A tensor argument stand-in: only its dtype may be read (the autotuner adds every tensor
    argument's dtype to the key); anything else is recorded as a read of the argument itself."""

    def __init__(self, name, reads, dtype):
        self._name, self._reads, self.dtype = name, reads, dtype

    def __getattr__(self, attr):
        self._reads.add(self._name)
        raise AttributeError(attr)


class _RecordingArgs(dict):
    """The launch's named arguments: records every name a config getter reads."""

    def __init__(self, values, reads):
        super().__init__(values)
        self.reads = reads

    def _read(self, k):
        if not isinstance(dict.get(self, k), _Arg):  # a tensor records its own reads
            self.reads.add(k)

    def __getitem__(self, k):
        self._read(k)
        return super().__getitem__(k)

    def get(self, k, default=None):
        self._read(k)
        return super().get(k, default)

    def __contains__(self, k):
        self.reads.add(k)
        return super().__contains__(k)


# plausible values of every launch argument a getter may read, several per name so that the
# getters take each of their branches
_VARIANTS = [
    {"F32_DOT": False, "DOT_PREC": "ieee", "LR_PREC": "ieee", "W_NF4": False, "HAS_LR": True, "LR_F32": True,
     "LR_MASK": True, "DOT16": True},
    {"F32_DOT": True, "DOT_PREC": "tf32", "LR_PREC": "tf32", "W_NF4": True, "W_T": True, "q_bs": 32},
    {"F32_DOT": False, "DOT_PREC": "ieee", "W_NF4": True, "W_T": False, "q_bs": 64, "DOT16": False},
    {"F32_DOT": False, "DOT_PREC": "tf32", "HAS_LR": True, "LR_F32": False, "sxm": 3, "K": 3},
]
_Q_TENSORS = ("q_packed", "q_absmax", "q_code", "q_offset", "q_absmax2", "q_code2")
_SCALARS = {"M": 100, "N": 256, "K": 512, "M_BUCKET": 128, "T_BUCKET": 128, "BR": 16, "N_SEG": 1, "SPLIT": 1,
            "q_bs": 64, "sxm": 512, "sxk": 1, "swk": 1, "swn": 512, "n": 4096}


def _named_args(kernel, variant, reads, dtype):
    vals = {}
    for name in kernel.arg_names:
        if name in variant:
            vals[name] = variant[name]
        elif name.endswith("_ptr") or name in _Q_TENSORS:
            vals[name] = _Arg(name, reads, dtype)
        else:
            vals[name] = _SCALARS.get(name, 8)
    return vals


def test_every_autotuned_kernel_keys_on_what_its_config_getter_reads(monkeypatch):
    """For every autotuned kernel with a target pruner: each launch argument its config getter
    reads (other than a tensor's dtype, which the autotuner keys on by itself) is in the key,
    and the getter reads no name the kernel does not have (a typo would read a default)."""
    from peft_fast.triton_kernels import _triton

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    kernels = _autotuned_kernels()
    names = {n for _, n, _ in kernels}
    assert {"_fused_linear_kernel", "_lora_shrink_kernel", "_lora_grad_a_kernel", "_dora_norm_kernel",
            "_colsum_mul_kernel", "_sgmv_shrink_kernel", "_sgmv_expand_kernel", "_bgmv_kernel"} <= names, names
    checked = 0
    for mod_name, name, kernel in kernels:
        prune = kernel.early_config_prune
        get = getattr(prune, "get_configs", None)
        if get is None:  # not pruned per launch: the config list is the same for every launch
            assert prune is None, (mod_name, name)
            continue
        reads: set = set()
        for variant in _VARIANTS:
            for dtype in (torch.float32, torch.float16):
                for cc in (80, 86, 89, 90, 120):
                    get(cc, _RecordingArgs(_named_args(kernel, variant, reads, dtype), reads))
        assert reads <= set(kernel.arg_names), (name, sorted(reads - set(kernel.arg_names)))
        missing = sorted(reads - set(kernel.keys))
        assert not missing, f"{mod_name}.{name}: its config getter reads {missing}, not in the autotune key"
        checked += 1
    assert checked >= 8


def test_recording_args_sees_what_a_getter_reads():
    """The recorder above catches reads by [], get, `in` and tensor attributes other than dtype."""
    reads: set = set()
    a = _RecordingArgs({"A": 1, "x_ptr": _Arg("x_ptr", reads, torch.float16)}, reads)
    assert a["A"] == 1 and a.get("B") is None and "C" not in a
    assert reads == {"A", "B", "C"}
    reads.clear()
    x = a.get("x_ptr")
    assert x.dtype == torch.float16 and not reads  # the dtype alone is keyed by the autotuner
    with pytest.raises(AttributeError):
        x.shape
    assert reads == {"x_ptr"}


# ------------------------------------------------------------------ NF4 blocksize through the real autotuner
def _nf4_weight(N, K, blocksize, seed):
    from peft_fast.triton_kernels.nf4 import NF4Operand

    g = torch.Generator().manual_seed(seed)
    code = torch.sort(torch.randn(16, generator=g))[0]
    packed = torch.randint(0, 256, (N * K // 2,), dtype=torch.uint8, generator=g)
    # absmax far apart between neighbouring blocks: reading one absmax for two blocks is visible
    absmax = torch.rand(N * K // blocksize, generator=g) * 4 + 0.25
    absmax[1::2] *= 8
    return NF4Operand(packed, absmax, code, (N, K), torch.float32, blocksize)


@pytest.mark.interp
def test_nf4_blocksizes_of_one_shape_do_not_share_a_tuned_config(monkeypatch):
    """Weights of one (N, K) with NF4 blocksize 64 and then 32, through the real Triton
    autotuner (three configs, one with BK = 64, which spans two 32-blocks and is pruned for
    blocksize 32): the blocksize-32 launch must prune and tune again, not reuse the BK = 64
    winner of the blocksize-64 launch (one absmax per tile: wrong results)."""
    import triton

    from peft_fast.triton_kernels import _triton
    from peft_fast.triton_kernels import fused_linear as fl

    if not _triton.interpreting():
        pytest.skip("runs the kernel under TRITON_INTERPRET=1")
    k = fl._fused_linear_kernel
    tuples = [(16, 32, 32, 1, 4, 1), (32, 32, 32, 1, 4, 1), (16, 32, 64, 1, 4, 1)]  # BK = 64 last
    configs = [triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": g}, num_warps=w, num_stages=s)
               for bm, bn, bk, g, w, s in tuples]
    benched = []

    def do_bench(kernel_call, quantiles):
        kernel_call()
        benched.append(len(benched))
        return [1.0 / len(benched)] * 3  # the last config benchmarked wins (BK = 64 for blocksize 64)

    # the getter as on a GPU (not its interpreter config), with the three configs as the target's list
    monkeypatch.setattr(fl, "interpreting", lambda: False)
    monkeypatch.setitem(fl._CONFIGS, ("nf4f32", "any"), tuples)
    monkeypatch.setattr(_triton, "device_capability", lambda device=None: 86)
    monkeypatch.delenv("PEFT_FAST_AUTOTUNE", raising=False)  # =0 would keep one config
    saved = (k.configs, dict(k.cache), k._do_bench, k.__dict__.pop("do_bench", None))
    try:
        k.configs, k._do_bench = configs, do_bench
        k.cache.clear()
        torch.manual_seed(0)
        M, N, K = 5, 40, 128
        x = torch.randn(M, K)
        for bs, n_benched in ((64, 3), (32, 2)):
            w = fl.NF4KN(_nf4_weight(N, K, bs, seed=bs), True)
            assert fl.nf4_decodes_in_gemm(w.op)
            before = len(benched)
            got, _, _ = fl.fused_linear(x, w)
            ref = x.double() @ w.dequantize().double()
            torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)
            assert len(benched) - before == n_benched, (bs, len(benched) - before)
        chosen = {c.kwargs["BK"] for c in k.cache.values()}
        assert chosen == {64, 32}  # one entry per blocksize
    finally:
        k.configs, cache, k._do_bench, cached = saved
        k.__dict__.pop("do_bench", None)
        if cached is not None:
            k.__dict__["do_bench"] = cached
        k.cache.clear()
        k.cache.update(cache)


# ------------------------------------------------------------------ target_pruner: unknown GPUs, PEFT_FAST_AUTOTUNE
def _cfgs(*blocks):
    import triton

    return [triton.Config({"B": b}, num_warps=4, num_stages=3) for b in blocks]


def _getter(table):
    """A get_configs(cc, args) over {cc: block sizes}; args["BIG"] adds block 256 on sm_90."""
    def get(cc=None, args=None):
        if cc is None:
            return _cfgs(*sorted({b for bs in table.values() for b in bs} | {256}))
        blocks = list(table.get(cc, ()))
        if cc == 90 and args and args.get("BIG"):
            blocks.append(256)
        return _cfgs(*blocks)
    return get


def _blocks(cfgs):
    return [c.kwargs["B"] for c in cfgs]


def test_pruner_keeps_the_targets_list_in_its_order(monkeypatch):
    from peft_fast.triton_kernels import _triton

    monkeypatch.delenv("PEFT_FAST_AUTOTUNE", raising=False)
    get = _getter({80: [128, 32], 86: [64, 32], 90: [128, 64]})
    prune = _triton.target_pruner(get)
    everything = get()
    monkeypatch.setattr(_triton, "device_capability", lambda device=None: 80)
    kept = prune(everything, {"BIG": False})
    assert _blocks(kept) == [128, 32] and all(any(k is c for c in everything) for k in kept)
    monkeypatch.setattr(_triton, "device_capability", lambda device=None: 90)
    assert _blocks(prune(everything, {}, BIG=True)) == [128, 64, 256]  # kwargs are launch args too
    monkeypatch.setattr(_triton, "device_capability", lambda device=None: None)  # no CUDA: all of them
    assert _blocks(prune(everything, {})) == _blocks(everything)


@pytest.mark.parametrize("cc", [100, 103, 121, 130])
def test_pruner_falls_back_to_the_most_conservative_target_on_an_unknown_gpu(monkeypatch, cc):
    """A capability whose list keeps nothing gets sm_86's list (99 KB) for the same launch, not
    every config (which would include ones that do not fit or spill)."""
    from peft_fast.triton_kernels import _triton

    monkeypatch.delenv("PEFT_FAST_AUTOTUNE", raising=False)
    assert _triton.FALLBACK_CC == 86 and _triton.SMEM_PER_BLOCK[86] == min(_triton.SMEM_PER_BLOCK.values())
    get = _getter({80: [128, 32], 86: [64, 16], 90: [128, 64]})
    everything = get()
    monkeypatch.setattr(_triton, "device_capability", lambda device=None: cc)
    kept = _triton.target_pruner(get)(everything, {"BIG": True})
    assert _blocks(kept) == [64, 16]
    # sm_86's list empty for this launch too: then every config (the autotuner needs one)
    get0 = _getter({80: [128]})
    assert _blocks(_triton.target_pruner(get0)(get0(), {})) == _blocks(get0())
    # a known target whose list is empty for a launch also falls back to sm_86's
    monkeypatch.setattr(_triton, "device_capability", lambda device=None: 89)
    assert _blocks(_triton.target_pruner(get)(everything, {})) == [64, 16]


@pytest.mark.parametrize("value,first_only", [("0", True), ("false", True), ("off", True), ("1", False),
                                              (None, False)])
def test_peft_fast_autotune_0_keeps_the_first_config_of_the_targets_list(monkeypatch, value, first_only):
    from peft_fast.triton_kernels import _triton

    if value is None:
        monkeypatch.delenv("PEFT_FAST_AUTOTUNE", raising=False)
    else:
        monkeypatch.setenv("PEFT_FAST_AUTOTUNE", value)
    assert _triton.autotune_enabled() is not first_only
    get = _getter({80: [128, 32], 86: [64, 16], 90: [128, 64]})
    everything = get()  # [16, 32, 64, 128, 256]: the target's first is not the autotune list's first
    for cc, full in ((80, [128, 32]), (86, [64, 16]), (120, [64, 16]), (None, [16, 32, 64, 128, 256])):
        monkeypatch.setattr(_triton, "device_capability", lambda device=None, cc=cc: cc)
        kept = _triton.target_pruner(get)(everything, {})
        assert _blocks(kept) == (full[:1] if first_only else full), (cc, value)


def test_peft_fast_autotune_0_with_a_real_kernels_pruner(monkeypatch):
    """fused_linear on sm_86 with 16-bit operands: one config, the first of sm_86's list."""
    from peft_fast.triton_kernels import _triton
    from peft_fast.triton_kernels import fused_linear as fl

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(_triton, "device_capability", lambda device=None: 86)
    args = {"K": 512, "N": 256, "sxm": 512, "sxk": 1, "swk": 1, "swn": 512, "F32_DOT": False, "W_NF4": False}
    prune = _triton.target_pruner(fl.get_fused_linear_configs)
    everything = fl.get_fused_linear_configs()
    monkeypatch.setenv("PEFT_FAST_AUTOTUNE", "1")
    full = prune(everything, args)
    assert len(full) >= 2
    monkeypatch.setenv("PEFT_FAST_AUTOTUNE", "0")
    (one,) = prune(everything, args)
    first = fl.get_fused_linear_configs(86, args)[0]
    assert _triton.config_key(one) == _triton.config_key(first) == _triton.config_key(full[0])
