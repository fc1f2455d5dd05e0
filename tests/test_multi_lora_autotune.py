"""Multi-LoRA kernels on paths the fixed-config interpreter tests do not take: the real
Triton autotuner benchmarking several configs (in-place `y` updates must happen once),
adapter indices outside [0, n) (no update, no out-of-bounds read), and offsets past 2^31
elements (int64 index math). Kernel tests run with TRITON_INTERPRET=1."""
from __future__ import annotations

import gc

import pytest
import torch

from peft_fast.triton_kernels.multi_lora import lora_mixed_ref, segments_ref

TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}


def loop_ref(x, A, B, s, idx, out):
    """fp64 per-token loop; tokens whose index is outside [0, n) get nothing."""
    out = out.clone().double()
    for t in range(x.shape[0]):
        i = int(idx[t])
        if 0 <= i < A.shape[0]:
            out[t] += float(s[i]) * (x[t].double() @ A[i].double().t() @ B[i].double().t())
    return out


def _check_close(got, x, A, B, s, idx, out):
    """The matmul-kernel rule: error vs fp64 <= 2x the same-dtype reference's error + atol."""
    expected = loop_ref(x, A, B, s, idx, out)
    same = lora_mixed_ref(x, A, B, s, idx, out.clone())
    tol = TOL[got.dtype]
    torch.testing.assert_close(same.double(), expected, rtol=tol, atol=tol)
    torch.testing.assert_close(got.double(), expected, rtol=tol, atol=tol)
    assert (got.double() - expected).abs().max() <= 2 * (same.double() - expected).abs().max() + tol


# ------------------------------------------------------------------ references, out-of-range indices
def test_segments_ref_puts_out_of_range_tokens_in_no_segment():
    idx = torch.tensor([2, -1, 5, 0, 3, -4, 1, 0, 9])
    order, starts, counts = segments_ref(idx, 3)
    assert order.tolist() == [5, 1, 3, 7, 6, 0, 4, 2, 8]  # negative first, >= n last, stable
    assert counts.tolist() == [2, 1, 1] and starts.tolist() == [2, 4, 5]
    order, starts, counts = segments_ref(torch.tensor([10**9, 4]), 2)  # no bincount of the huge index
    assert counts.tolist() == [0, 0] and starts.tolist() == [0, 0]


@pytest.mark.parametrize("T,n", [(9, 3), (40, 1), (33, 4)])
def test_lora_mixed_ref_ignores_out_of_range_indices(T, n):
    torch.manual_seed(T + n)
    K, N, R = 24, 20, 5
    x, A, B = torch.randn(T, K), torch.randn(n, R, K), torch.randn(n, N, R)
    s = torch.rand(n) + 0.5
    idx = torch.randint(-3, n + 3, (T,))
    idx[0], idx[-1] = n, n + 7  # tokens past the last adapter sort to the end of `order`
    out = torch.randn(T, N)
    got = lora_mixed_ref(x, A, B, s, idx, out.clone())
    torch.testing.assert_close(got.double(), loop_ref(x, A, B, s, idx, out), rtol=1e-5, atol=1e-5)
    ok = (idx >= 0) & (idx < n)
    assert torch.equal(got[~ok], out[~ok]) and not torch.equal(got[ok], out[ok])
    # the whole in-range batch on one adapter, but some tokens out of range: the grouped path
    idx1 = torch.where(torch.arange(T) % 3 == 0, torch.full((T,), n), torch.zeros(T, dtype=torch.long))
    got = lora_mixed_ref(x, A, B, s, idx1, out.clone())
    torch.testing.assert_close(got.double(), loop_ref(x, A, B, s, idx1, out), rtol=1e-5, atol=1e-5)


def _poisoned_stacks(n, R, K, N, dtype, pad=3):
    """A [n, R, K], B [n, N, R] as views into NaN-filled stacks with `pad` NaN adapters on each
    side: reading any adapter outside [0, n) puts NaN into the output."""
    A_all = torch.full((n + 2 * pad, R, K), float("nan"), dtype=dtype)
    B_all = torch.full((n + 2 * pad, N, R), float("nan"), dtype=dtype)
    A_all[pad:pad + n] = (torch.randn(n, R, K) * 0.2).to(dtype)
    B_all[pad:pad + n] = (torch.randn(n, N, R) * 0.2).to(dtype)
    return A_all[pad:pad + n], B_all[pad:pad + n]


@pytest.mark.interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T", [9, 100])  # per-token kernel, segmented kernels
def test_kernels_ignore_out_of_range_indices(dtype, T):
    from peft_fast.triton_kernels.multi_lora import DECODE_TOKENS, lora_mixed

    torch.manual_seed(T)
    n, R, K, N = 3, 8, 40, 36
    A, B = _poisoned_stacks(n, R, K, N, dtype)
    x = torch.randn(T, K).to(dtype)
    s = torch.rand(n) + 0.5
    idx = torch.randint(-3, n + 3, (T,))
    idx[:4] = torch.tensor([-2, n, n + 2, 0])
    out = torch.randn(T, N).to(dtype)
    got = lora_mixed(x, A, B, s, idx, out.clone())
    assert not got.isnan().any()
    ok = (idx >= 0) & (idx < n)
    assert torch.equal(got[~ok], out[~ok]) and not torch.equal(got[ok], out[ok])
    _check_close(got, x, A, B, s, idx, out)
    assert (T <= DECODE_TOKENS) == (T == 9)


# ------------------------------------------------------------------ the real autotuner
def _interp_configs(kernel_name):
    import triton

    metas = {
        "_bgmv_kernel": [{"BK": 16, "BN": 16}, {"BK": 32, "BN": 64}, {"BK": 64, "BN": 32}],
        "_sgmv_shrink_kernel": [{"BM": 16, "BK": 16, "BRN": 16}, {"BM": 32, "BK": 32, "BRN": 32},
                                {"BM": 64, "BK": 16, "BRN": 16}],
        "_sgmv_expand_kernel": [{"BM": 16, "BN": 16, "BK": 16}, {"BM": 32, "BN": 64, "BK": 32},
                                {"BM": 64, "BN": 32, "BK": 16}],
    }[kernel_name]
    return [triton.Config(m, num_warps=4) for m in metas]


@pytest.fixture
def autotuning(monkeypatch):
    """The real Autotuner objects of the three kernels with 3 interpreter-friendly configs each
    and a do_bench that runs every config 3 times (as triton.testing.do_bench runs a kernel
    many times). Yields {kernel name: number of configs benchmarked}; restores everything."""
    from peft_fast.triton_kernels import multi_lora as ml

    monkeypatch.delenv("PEFT_FAST_AUTOTUNE", raising=False)  # =0 would keep one config
    names = ["_bgmv_kernel", "_sgmv_shrink_kernel", "_sgmv_expand_kernel"]
    benched = {nm: 0 for nm in names}
    saved = []
    try:
        for nm in names:
            k = getattr(ml, nm)
            saved.append((k, k.configs, dict(k.cache), k._do_bench, k.__dict__.pop("do_bench", None)))

            def do_bench(kernel_call, quantiles, nm=nm):
                benched[nm] += 1
                for _ in range(3):
                    kernel_call()
                t = 10.0 - benched[nm]  # the last config benchmarked wins: not simply the first
                return [t, t, t]

            k.configs = _interp_configs(nm)
            k._do_bench = do_bench
            k.cache.clear()
        yield benched
    finally:
        for k, configs, cache, bench, cached in saved:
            k.configs, k._do_bench = configs, bench
            k.__dict__.pop("do_bench", None)
            if cached is not None:
                k.__dict__["do_bench"] = cached
            k.cache.clear()
            k.cache.update(cache)


@pytest.mark.interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("T", [12, 90])  # per-token kernel (bgmv), segmented kernels (sgmv)
def test_autotuning_several_configs_updates_once(autotuning, dtype, T):
    from peft_fast.triton_kernels import multi_lora as ml

    torch.manual_seed(T)
    n, R, K, N = 3, 8, 40, 72
    x = torch.randn(T, K).to(dtype)
    A, B = (torch.randn(n, R, K) * 0.3).to(dtype), (torch.randn(n, N, R) * 0.3).to(dtype)
    s = torch.rand(n) + 0.5
    idx = torch.randint(-1, n, (T,))
    idx[:3] = torch.tensor([0, 1, 2])
    for call in range(2):  # the first call benchmarks every config, the second uses the cached winner
        out = torch.randn(T, N).to(dtype)
        got = ml.lora_mixed(x, A, B, s, idx, out.clone())
        _check_close(got, x, A, B, s, idx, out)
    used = ["_bgmv_kernel"] if T <= ml.DECODE_TOKENS else ["_sgmv_shrink_kernel", "_sgmv_expand_kernel"]
    for nm, count in autotuning.items():
        assert count == (3 if nm in used else 0), (nm, count)  # the autotuner really ran 3 configs
        k = getattr(ml, nm)
        if nm in used:
            (best,) = k.cache.values()
            assert best.kwargs == _interp_configs(nm)[-1].kwargs


# ------------------------------------------------------------------ offsets past 2^31 elements
GIB_ELEMS = 2**30


def _huge_view(shape, dtype, fill_rows):
    """A [d0, ...] view with stride(0) = 2^30 elements, starting at element 2^31 of a lazily
    committed 2^32-element storage (8 GB virtual in 16 bits, only touched pages are real):
    index 2 sits at element 2^32, and its int32-wrapped offset lands on the storage's first
    elements, which hold a poison value (wrong results, not a crash, without int64 offsets)."""
    inner = 1
    for d in shape[1:]:
        inner *= d
    assert inner <= 4096 and shape[0] <= 3
    storage = torch.empty(2**32 + inner, dtype=dtype)
    storage[:2 * inner] = 7.0
    inner_strides = torch.empty(shape[1:]).stride()
    view = storage.as_strided(shape, (GIB_ELEMS, *inner_strides), 2 * GIB_ELEMS)
    for i in range(shape[0]):
        view[i] = fill_rows[i]
    return storage, view


@pytest.mark.interp
@pytest.mark.parametrize("path", ["bgmv", "sgmv"])
@pytest.mark.parametrize("which", ["x", "out", "A", "B"])
def test_offsets_past_2_31_elements(which, path):
    from peft_fast.triton_kernels.multi_lora import lora_mixed

    torch.manual_seed(0)
    dtype = torch.float16
    T, n, R, K, N = 3, 3, 4, 40, 24
    x = torch.randn(T, K).to(dtype)
    A, B = (torch.randn(n, R, K) * 0.3).to(dtype), (torch.randn(n, N, R) * 0.3).to(dtype)
    s = torch.rand(n) + 0.5
    idx = torch.tensor([1, 0, 2], dtype=torch.int32)  # token 2 uses adapter 2: both at index 2
    out = torch.randn(T, N).to(dtype)
    compact = dict(x=x, out=out, A=A, B=B)
    storage, big = _huge_view(compact[which].shape, dtype, compact[which])
    try:
        args = dict(compact, **{which: big})
        if which == "out":
            target = big
        else:
            target = out.clone()
        meta = segments_ref(idx, n) if path == "sgmv" else ()
        got = lora_mixed(args["x"], args["A"], args["B"], s, idx, target, *meta)
        assert got is target
        got = got.clone()
        assert (storage[:2 * big[0].numel()] == 7.0).all()  # nothing written at a wrapped offset
    finally:
        del storage, big, args
        gc.collect()
    _check_close(got, x, A, B, s, idx, out)


# ------------------------------------------------------------------ launch configs per target
@pytest.mark.parametrize("getter", ["get_sgmv_shrink_configs", "get_sgmv_expand_configs", "get_bgmv_configs"])
def test_every_launch_keeps_two_configs_on_every_target(monkeypatch, getter):
    from peft_fast.triton_kernels import _triton
    from peft_fast.triton_kernels import multi_lora as ml

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    get = getattr(ml, getter)
    union = {_triton.config_key(c) for c in get()}
    assert len(union) == len(get())  # no duplicates in the autotune list
    for cc in (80, 86, 89, 90, 120):
        for br in (16, 32, 64, 128, 256):
            for f32, prec in ((False, "ieee"), (True, "ieee"), (True, "tf32")):
                args = {"BR": br, "F32_DOT": f32, "DOT_PREC": prec}
                cfgs = get(cc, args)
                assert len(cfgs) >= 2, (cc, args)
                assert {_triton.config_key(c) for c in cfgs} <= union  # the pruner can keep them
                for c in cfgs:
                    kw = c.kwargs
                    assert all(kw.get(k, 16) >= 16 for k in ("BM", "BN", "BK", "BRN"))  # tl.dot minimum
                    if getter != "get_bgmv_configs":
                        assert kw.get("BRN", 0) <= br and (getter == "get_sgmv_shrink_configs" or kw["BK"] <= br)
    # the pruner narrows the autotune list to the launch's configs on a known device
    monkeypatch.setattr(_triton, "device_capability", lambda device=None: 86)
    monkeypatch.delenv("PEFT_FAST_AUTOTUNE", raising=False)
    prune = _triton.target_pruner(get)
    kept = prune(get(), {"BR": 256}, F32_DOT=True, DOT_PREC="ieee")
    assert {_triton.config_key(c) for c in kept} == {_triton.config_key(c) for c in get(86, {
        "BR": 256, "F32_DOT": True, "DOT_PREC": "ieee"})}
    assert len(kept) < len(get())
