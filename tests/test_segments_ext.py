"""The mixed-batch segment ops (peft_fast/_segments.py) and the C++ extension peft_fast._C.

Every behaviour test runs twice: on the C++ ops (`cpp`, skipped only when the extension is
not built; `make test` builds it) and with PEFT_FAST_DISABLE_CPP=1 (`ref`). Results must be
bit-identical to the pure-torch references, error messages identical too. The install
tests build wheels from a copy of the sources: with PEFT_FAST_SKIP_CPP=1, and with a
compiler that fails, neither of which may fail the install.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

from peft_fast import _segments as S

ROOT = Path(__file__).resolve().parents[1]
NOT_BUILT = ("peft_fast._C is not built (installed with PEFT_FAST_SKIP_CPP=1, or its compile failed); "
             "`make test` builds it")
needs_cpp = pytest.mark.skipif(not S.HAS_CPP, reason=NOT_BUILT)

# The references, captured before any test patches the module.
META_REF, GATHER_REF, SCATTER_REF = S.segment_metadata_ref, S.gather_rows_ref, S.scatter_add_rows_ref
FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _forbidden(*args, **kwargs):
    raise AssertionError("the torch fallback ran although the C++ extension should have")


@pytest.fixture(params=["cpp", "ref"])
def backend(request, monkeypatch):
    """'cpp': the dispatching functions must take the C++ ops (the references are booby-trapped);
    'ref': PEFT_FAST_DISABLE_CPP=1 sends them to the references."""
    if request.param == "cpp":
        if not S.HAS_CPP:
            pytest.skip(NOT_BUILT)
        monkeypatch.delenv(S.DISABLE_ENV, raising=False)
        for name in ("segment_metadata_ref", "gather_rows_ref", "scatter_add_rows_ref"):
            monkeypatch.setattr(S, name, _forbidden)
        assert S.cpp_enabled()
    else:
        monkeypatch.setenv(S.DISABLE_ENV, "1")
        assert not S.cpp_enabled()
    return request.param


def _adapter_idx(T: int, n_adapters: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random adapter indices with -1 rows and (for n_adapters > 2) some adapters left empty."""
    g = torch.Generator().manual_seed(seed)
    used = torch.randperm(n_adapters, generator=g)[: max(1, (n_adapters + 1) // 2)]
    choices = torch.cat([torch.tensor([-1]), used])
    return choices[torch.randint(0, len(choices), (T,), generator=g)].to(dtype)


def _check_metadata_semantics(adapter_idx, n_adapters, order, counts, starts, active):
    """The definition, independently of both implementations."""
    T = adapter_idx.shape[0]
    a = adapter_idx.long()
    for t in (order, counts, starts, active):
        assert t.dtype == torch.int64 and t.dim() == 1
    assert torch.equal(order.sort().values, torch.arange(T))  # a permutation
    key = a[order]
    assert torch.all(key[1:] >= key[:-1])  # grouped, -1 first
    for v in range(-1, n_adapters):  # stable: positions increase inside a group
        pos = order[key == v]
        assert torch.all(pos[1:] > pos[:-1])
    expected_counts = torch.bincount(a + 1, minlength=n_adapters + 1)
    assert torch.equal(counts, expected_counts[1:])
    n_base = int(expected_counts[0])
    assert torch.equal(starts, n_base + torch.cumsum(counts, 0) - counts)
    assert torch.equal(active, torch.nonzero(counts).flatten())
    for ad in active.tolist():
        assert torch.all(a[order[starts[ad]: starts[ad] + counts[ad]]] == ad)


# ------------------------------------------------------------------------------ segment_metadata
@pytest.mark.parametrize("n_adapters", [1, 3, 17, 64])
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("T", [0, 1, 37, 1000])
def test_segment_metadata_matches_ref(backend, n_adapters, idx_dtype, T):
    adapter_idx = _adapter_idx(T, n_adapters, idx_dtype, seed=T * 100 + n_adapters)
    got = S.segment_metadata(adapter_idx, n_adapters)
    want = META_REF(adapter_idx, n_adapters)
    assert len(got) == 4
    for name, g, w in zip(("order", "counts", "starts", "active"), got, want):
        assert g.dtype == w.dtype == torch.int64, name
        assert torch.equal(g, w), f"{name}: {g} != {w}"
    _check_metadata_semantics(adapter_idx, n_adapters, *got)


@pytest.mark.parametrize("case", ["all_base", "no_base", "one_adapter_used", "no_adapters", "strided"])
def test_segment_metadata_edge_cases(backend, case):
    n = 5
    if case == "all_base":
        adapter_idx = torch.full((9,), -1, dtype=torch.int64)
    elif case == "no_base":
        adapter_idx = torch.tensor([4, 0, 4, 2, 0, 0], dtype=torch.int32)
    elif case == "one_adapter_used":
        adapter_idx = torch.tensor([-1, 3, 3, -1, 3], dtype=torch.int64)
    elif case == "no_adapters":  # n_adapters=0: only base tokens are valid
        n, adapter_idx = 0, torch.full((4,), -1, dtype=torch.int64)
    else:  # a strided view
        adapter_idx = _adapter_idx(40, n, torch.int64, seed=3)[::3]
        assert not adapter_idx.is_contiguous()
    got = S.segment_metadata(adapter_idx, n)
    for g, w in zip(got, META_REF(adapter_idx, n)):
        assert torch.equal(g, w)
    _check_metadata_semantics(adapter_idx, n, *got)


def test_segment_metadata_known_answer(backend):
    adapter_idx = torch.tensor([1, -1, 0, 1, -1, 2, 0], dtype=torch.int32)
    order, counts, starts, active = S.segment_metadata(adapter_idx, 4)
    assert order.tolist() == [1, 4, 2, 6, 0, 3, 5]
    assert counts.tolist() == [2, 2, 1, 0]
    assert starts.tolist() == [2, 4, 6, 7]
    assert active.tolist() == [0, 1, 2]


# ------------------------------------------------------------------------------ gather_rows
def _layouts(T: int, K: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(T, K, generator=g).to(dtype)
    yield "contiguous", base
    yield "transposed", torch.randn(K, T, generator=g).to(dtype).t()
    yield "column_slice", torch.randn(T, 2 * K + 3, generator=g).to(dtype)[:, 1: 2 * K + 1: 2]
    yield "row_slice", torch.randn(2 * T, K, generator=g).to(dtype)[::2]
    yield "broadcast_row", torch.randn(1, K, generator=g).to(dtype).expand(T, K)


@pytest.mark.parametrize("dtype", FLOATS + (torch.float64,))
@pytest.mark.parametrize("T,n,K", [(1, 1, 1), (37, 37, 19), (50, 130, 64), (64, 0, 8), (0, 0, 5), (9, 4, 0)])
def test_gather_rows_matches_ref(backend, dtype, T, n, K):
    g = torch.Generator().manual_seed(T + n + K)
    index = torch.randint(0, max(T, 1), (n,), generator=g) if T else torch.empty(0, dtype=torch.int64)
    for layout, x in _layouts(T, K, dtype, seed=n):
        got = S.gather_rows(x, index)
        assert got.shape == (n, K) and got.dtype == dtype and got.is_contiguous(), layout
        assert torch.equal(got, GATHER_REF(x, index)), layout
        assert torch.equal(got, x[index]), layout


def test_gather_rows_grouped_by_metadata(backend):
    adapter_idx = _adapter_idx(77, 17, torch.int64, seed=5)
    x = torch.randn(77, 24, dtype=torch.bfloat16)
    order, counts, starts, _ = S.segment_metadata(adapter_idx, 17)
    xs = S.gather_rows(x, order)
    for a in range(17):
        rows = (adapter_idx == a).nonzero().flatten()
        assert torch.equal(xs[starts[a]: starts[a] + counts[a]], x[rows])


# ------------------------------------------------------------------------------ scatter_add_rows
@pytest.mark.parametrize("dtype", FLOATS + (torch.float64,))
@pytest.mark.parametrize("T,n,N", [(1, 1, 1), (5, 400, 8), (37, 37, 19), (50, 130, 3000), (64, 0, 8), (0, 0, 5),
                                   (9, 4, 0)])
def test_scatter_add_rows_matches_ref(backend, dtype, T, n, N):
    g = torch.Generator().manual_seed(T * 7 + n + N)
    index = torch.randint(0, max(T, 1), (n,), generator=g) if T else torch.empty(0, dtype=torch.int64)
    outs = dict(_layouts(T, N, dtype, seed=1))
    srcs = dict(_layouts(n, N, dtype, seed=2))
    for layout in ("contiguous", "transposed", "column_slice"):
        out, src = outs[layout], srcs[layout]
        out_before = out.clone()
        got = S.scatter_add_rows(out, src, index)
        assert torch.equal(out, out_before), "scatter_add_rows must not modify out"
        assert got.shape == (T, N) and got.dtype == dtype and got.is_contiguous(), layout
        assert torch.equal(got, SCATTER_REF(out, src, index)), layout
        # Against an fp64 loop: one rounding of an fp32 sum for fp16/bf16.
        want = out.double().clone()
        for i, j in enumerate(index.tolist()):
            want[j] += src[i].double()
        tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
        torch.testing.assert_close(got.double(), want, atol=tol * max(1.0, n / max(T, 1)), rtol=tol)


def test_scatter_add_rows_duplicates_accumulate_in_fp32(backend):
    # 2048 + 1 + 1 in fp16: rounding after each step stays at 2048, one rounding gives 2050.
    out = torch.full((2, 4), 2048.0, dtype=torch.float16)
    src = torch.ones(2, 4, dtype=torch.float16)
    got = S.scatter_add_rows(out, src, torch.tensor([1, 1]))
    assert got[0].tolist() == [2048.0] * 4 and got[1].tolist() == [2050.0] * 4


def test_gather_scatter_round_trip(backend):
    adapter_idx = _adapter_idx(101, 3, torch.int32, seed=11)
    x = torch.randn(101, 33)
    order, *_ = S.segment_metadata(adapter_idx, 3)
    back = S.scatter_add_rows(torch.zeros_like(x), S.gather_rows(x, order), order)
    assert torch.equal(back, x)


# ------------------------------------------------------------------------------ autograd
def test_autograd_gradcheck(backend):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, dtype=torch.float64, generator=g, requires_grad=True)
    out = torch.randn(4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    src = torch.randn(7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    index_x = torch.tensor([5, 0, 0, 3, 2, 5, 1])
    index_out = torch.tensor([3, 3, 0, 1, 3, 2, 0])
    assert torch.autograd.gradcheck(lambda x: S.gather_rows(x, index_x), (x,))
    assert torch.autograd.gradcheck(lambda o, s: S.scatter_add_rows(o, s, index_out), (out, src))
    assert torch.autograd.gradgradcheck(lambda x: S.gather_rows(x, index_x), (x,))


# ------------------------------------------------------------------------------ errors
def _error_cases():
    x, out = torch.randn(5, 4), torch.randn(6, 4)
    i64 = torch.tensor([0, 1, 2])
    return [
        ("meta_high", "segment_metadata", (torch.tensor([0, 2, 3, 1]), 3), ValueError,
         "segment_metadata: adapter index 3 at position 2 is out of range [-1, 3) for n_adapters=3 "
         "(-1 means no adapter)"),
        ("meta_low", "segment_metadata", (torch.tensor([-1, -2], dtype=torch.int32), 4), ValueError,
         "segment_metadata: adapter index -2 at position 1 is out of range [-1, 4) for n_adapters=4 "
         "(-1 means no adapter)"),
        ("meta_float", "segment_metadata", (torch.tensor([0.0, 1.0]), 3), TypeError,
         "segment_metadata: adapter_idx must be int32 or int64, got torch.float32"),
        ("meta_2d", "segment_metadata", (torch.zeros(2, 3, dtype=torch.int64), 3), ValueError,
         "segment_metadata: adapter_idx must be 1-D [T], got shape [2, 3]"),
        ("meta_negative_n", "segment_metadata", (torch.zeros(2, dtype=torch.int64), -1), ValueError,
         "segment_metadata: n_adapters must be >= 0, got -1"),
        ("gather_float_index", "gather_rows", (x, torch.tensor([0.0, 1.0])), TypeError,
         "gather_rows: index must be int64, got torch.float32"),
        ("gather_int32_index", "gather_rows", (x, torch.tensor([0, 1], dtype=torch.int32)), TypeError,
         "gather_rows: index must be int64, got torch.int32"),
        ("gather_2d_index", "gather_rows", (x, torch.zeros(2, 2, dtype=torch.int64)), ValueError,
         "gather_rows: index must be 1-D, got shape [2, 2]"),
        ("gather_1d_x", "gather_rows", (torch.randn(5), i64), ValueError,
         "gather_rows: x must be 2-D [T, K], got shape [5]"),
        ("gather_int_x", "gather_rows", (torch.zeros(5, 4, dtype=torch.int64), i64), TypeError,
         "gather_rows: x must be float16, bfloat16, float32 or float64, got torch.int64"),
        ("gather_out_of_range", "gather_rows", (x, torch.tensor([4, 5, 0])), IndexError,
         "gather_rows: index 5 at position 1 is out of range for x with 5 rows"),
        ("gather_negative", "gather_rows", (x, torch.tensor([-1])), IndexError,
         "gather_rows: index -1 at position 0 is out of range for x with 5 rows"),
        ("gather_device", "gather_rows", (x, torch.tensor([0, 1], device="meta")), ValueError,
         "gather_rows: index is on meta but x is on cpu"),
        ("scatter_k_mismatch", "scatter_add_rows", (out, torch.randn(3, 5), i64), ValueError,
         "scatter_add_rows: src has 5 columns but out has 4"),
        ("scatter_len_mismatch", "scatter_add_rows", (out, torch.randn(2, 4), i64), ValueError,
         "scatter_add_rows: index has 3 entries but src has 2 rows"),
        ("scatter_dtype_mismatch", "scatter_add_rows", (out, torch.randn(3, 4, dtype=torch.float16), i64), TypeError,
         "scatter_add_rows: src dtype torch.float16 does not match out dtype torch.float32"),
        ("scatter_float_index", "scatter_add_rows", (out, torch.randn(3, 4), i64.float()), TypeError,
         "scatter_add_rows: index must be int64, got torch.float32"),
        ("scatter_1d_src", "scatter_add_rows", (out, torch.randn(3), i64), ValueError,
         "scatter_add_rows: src must be 2-D [T', N], got shape [3]"),
        ("scatter_device", "scatter_add_rows", (out, torch.randn(3, 4, device="meta"), i64), ValueError,
         "scatter_add_rows: src is on meta but out is on cpu"),
        ("scatter_index_device", "scatter_add_rows", (out, torch.randn(3, 4), i64.to("meta")), ValueError,
         "scatter_add_rows: index is on meta but out is on cpu"),
        ("scatter_out_of_range", "scatter_add_rows", (out, torch.randn(3, 4), torch.tensor([0, 6, 1])), IndexError,
         "scatter_add_rows: index 6 at position 1 is out of range for out with 6 rows"),
    ]


@pytest.mark.parametrize("case", _error_cases(), ids=lambda c: c[0])
def test_errors(backend, monkeypatch, case):
    _, op, args, exc, message = case
    # Mixed devices go to the reference by design: call the C++ op itself for the 'cpp' run.
    fn = getattr(torch.ops.peft_fast_C, op) if backend == "cpp" else getattr(S, op)
    with pytest.raises(exc) as info:
        fn(*args)
    assert str(info.value).splitlines()[0] == message


@needs_cpp
@pytest.mark.parametrize("case", _error_cases(), ids=lambda c: c[0])
def test_errors_via_dispatch_and_identical(case):
    _, op, args, exc, message = case
    for fn in (getattr(S, op), getattr(S, op + "_ref")):
        with pytest.raises(exc) as info:
            fn(*args)
        assert str(info.value).splitlines()[0] == message


# ------------------------------------------------------------------------------ torch.compile
def _mixed_step(x, adapter_idx, weights):
    """x [T, K], adapter_idx [T], weights [n, K, N]: y[t] = x[t] @ weights[adapter_idx[t]] (0 for -1),
    with the shapes kept static: every token is multiplied by its adapter's weight via a gather."""
    n = weights.shape[0]
    order, counts, starts, active = S.segment_metadata(adapter_idx, n)
    xs = S.gather_rows(x, order)                                   # [T, K], grouped
    key = S.gather_rows(adapter_idx.to(x.dtype).unsqueeze(1), order).squeeze(1).long()
    w = weights[key.clamp(min=0)] * (key >= 0).to(x.dtype)[:, None, None]  # [T, K, N]
    ys = torch.bmm(xs.unsqueeze(1), w).squeeze(1)                  # [T, N]
    y = S.scatter_add_rows(x.new_zeros(x.shape[0], weights.shape[2]), ys, order)
    return y, counts, starts, active


@needs_cpp
def test_compile_fullgraph_aot_eager(monkeypatch):
    monkeypatch.delenv(S.DISABLE_ENV, raising=False)
    torch._dynamo.reset()
    graphs = []

    def recording_aot_eager(gm, example_inputs):
        graphs.append(str(gm.graph))
        from torch._dynamo.backends.common import aot_autograd
        from torch._dynamo.backends.debugging import boxed_nop  # what backend="aot_eager" uses
        return aot_autograd(fw_compiler=boxed_nop)(gm, example_inputs)

    compiled = torch.compile(_mixed_step, fullgraph=True, backend=recording_aot_eager)
    for T, seed in ((37, 0), (50, 1), (64, 2)):  # a second and third T: dynamic shapes
        g = torch.Generator().manual_seed(seed)
        weights = torch.randn(3, 8, 5, generator=g, requires_grad=True)
        x = torch.randn(T, 8, generator=g, requires_grad=True)
        adapter_idx = _adapter_idx(T, 3, torch.int64, seed)
        y, counts, starts, active = compiled(x, adapter_idx, weights)
        y.square().sum().backward()
        gx, gw = x.grad.clone(), weights.grad.clone()
        x.grad = weights.grad = None
        y_ref, c_ref, s_ref, a_ref = _mixed_step(x, adapter_idx, weights)
        y_ref.square().sum().backward()
        torch.testing.assert_close(y, y_ref)
        torch.testing.assert_close(gx, x.grad)
        torch.testing.assert_close(gw, weights.grad)
        assert torch.equal(counts, c_ref) and torch.equal(starts, s_ref) and torch.equal(active, a_ref)
    assert graphs and all("peft_fast_C.segment_metadata" in g and "peft_fast_C.gather_rows" in g
                          and "peft_fast_C.scatter_add_rows" in g for g in graphs)
    # And the stock backend string.
    torch._dynamo.reset()
    y, *_ = torch.compile(_mixed_step, fullgraph=True, backend="aot_eager")(x, adapter_idx, weights)
    torch.testing.assert_close(y, y_ref)


@needs_cpp
def test_opcheck():
    x = torch.randn(6, 5)
    cases = [
        (torch.ops.peft_fast_C.segment_metadata.default, (torch.tensor([2, -1, 0, 2], dtype=torch.int32), 3)),
        (torch.ops.peft_fast_C.gather_rows.default, (x.requires_grad_(), torch.tensor([5, 0, 0, 3]))),
        (torch.ops.peft_fast_C.scatter_add_rows.default,
         (torch.randn(4, 5, requires_grad=True), torch.randn(3, 5, requires_grad=True), torch.tensor([3, 3, 0]))),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


# ------------------------------------------------------------------------------ install paths
def _run(*snippets: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the snippets (each dedented) as one script in a fresh interpreter."""
    code = "\n".join(textwrap.dedent(snippet) for snippet in snippets)
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=full_env, cwd=cwd or ROOT, timeout=300)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


_FALLBACK_CHECK = """
    import torch
    from peft_fast import _segments as S
    idx = torch.tensor([2, -1, 0, 2, 1], dtype=torch.int32)
    order, counts, starts, active = S.segment_metadata(idx, 4)
    assert order.tolist() == [1, 2, 4, 0, 3] and counts.tolist() == [1, 1, 2, 0]
    assert starts.tolist() == [1, 2, 3, 5] and active.tolist() == [0, 1, 2]
    x = torch.randn(5, 3)
    assert torch.equal(S.gather_rows(x, order), x[order])
    assert torch.equal(S.scatter_add_rows(torch.zeros(5, 3), x[order], order), x)
"""


def test_works_with_extension_hidden():
    """What PEFT_FAST_SKIP_CPP=1 installs: no peft_fast._C at all."""
    _run("""
        import sys, warnings
        import torch
        sys.modules["peft_fast._C"] = None  # importing peft_fast._C now fails like a missing module
        warnings.simplefilter("error")      # and nothing warns about it
        import peft_fast
        from peft_fast import _segments as S
        assert not S.HAS_CPP and not S.HAS_CPP_CUDA and not S.cpp_enabled()
        assert not hasattr(torch.ops.peft_fast_C, "gather_rows")
    """, _FALLBACK_CHECK)


@needs_cpp
def test_disable_env_in_fresh_process():
    _run("""
        from peft_fast import _segments as S
        assert S.HAS_CPP and not S.cpp_enabled()
    """, _FALLBACK_CHECK, env={S.DISABLE_ENV: "1"})


def _source_copy(tmp_path: Path) -> Path:
    """What an sdist holds: the sources without build outputs."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "_C_BUILD_FAILED")
    for name in ("peft_fast", "triton_kernels", "csrc"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    return src


def _build_wheel(src: Path, out: Path, env: dict) -> tuple[Path, str]:
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation",
                           "--no-index", "-w", str(out), str(src)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=600)
    assert proc.returncode == 0, f"the install must not fail:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    wheels = list(out.glob("peft_fast-*.whl"))
    assert len(wheels) == 1
    return wheels[0], proc.stdout + proc.stderr


def _import_from_wheel(wheel: Path, target: Path, *snippets: str) -> subprocess.CompletedProcess:
    with zipfile.ZipFile(wheel) as zf:  # a wheel is a zip of the site-packages tree
        zf.extractall(target)
    return _run(f"""
        import sys
        # An editable install of this checkout finds peft_fast.* submodules in the checkout
        # (its finder ignores the parent package's path): only the extracted wheel may answer.
        sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
        import peft_fast
        assert peft_fast.__file__.startswith({str(target)!r}), peft_fast.__file__
    """, *snippets, env={"PYTHONPATH": str(target)}, cwd=target)


@pytest.mark.slow
def test_install_with_skip_cpp(tmp_path):
    src = _source_copy(tmp_path)
    wheel, log = _build_wheel(src, tmp_path / "wheels", {"PEFT_FAST_SKIP_CPP": "1"})
    assert "PEFT_FAST_SKIP_CPP=1, not building" in log
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.startswith("peft_fast/_C") or n.endswith(".so")], names
    proc = _import_from_wheel(wheel, tmp_path / "site", """
        import warnings
        warnings.simplefilter("error")
        from peft_fast import _segments as S
        assert not S.HAS_CPP
    """, _FALLBACK_CHECK)
    assert "Warning" not in proc.stderr


@pytest.mark.slow
def test_failed_compile_does_not_fail_install(tmp_path):
    # A compiler that answers version probes but fails every compile, like a broken toolchain.
    fake_cxx = tmp_path / "broken-c++"
    real_cxx = shutil.which("c++") or shutil.which("g++") or "/usr/bin/c++"
    fake_cxx.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = "-c" ] && {{ echo "error: simulated compile '
                        f'failure" >&2; exit 1; }}; done\nexec {real_cxx} "$@"\n')
    fake_cxx.chmod(0o755)
    src = _source_copy(tmp_path)
    wheel, log = _build_wheel(src, tmp_path / "wheels", {"CXX": str(fake_cxx), "PEFT_FAST_SKIP_CPP": "0"})
    assert "building the C++ extension peft_fast._C failed; installing WITHOUT it" in log
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.endswith(".so")], names
    assert "peft_fast/_C_BUILD_FAILED" in names
    _import_from_wheel(wheel, tmp_path / "site", """
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            from peft_fast import _segments as S
        assert not S.HAS_CPP
        assert any("failed to compile" in str(w.message) for w in caught), [str(w.message) for w in caught]
    """, _FALLBACK_CHECK)
