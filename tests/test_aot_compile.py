"""Compile-only GPU readiness (benchmarks/aot_compile.py), no GPU needed.

1. The checker itself: small kernels with a known defect are reported (compile error, shared
   memory over the target's limit, register spills, a 16-bit dot without 16-bit tensor cores,
   an fp32 dot on tf32 tensor cores while TF32 is off), a sound kernel is not.
2. The CI subset: every distinct launch of every peft_fast kernel (real launch signatures,
   fp32/fp16/bf16, 16-bit activations with fp32 adapters), the config the autotuner keeps
   first on each target, compiled for sm_80, sm_86, sm_89, sm_90 and sm_120 with the pinned
   triton, and for sm_90 (the lent H200) with the GPU image's triton (requirements-gpu-image.txt).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import aot_compile  # noqa: E402
from aot_compile_core import compile_launch, mma_kinds  # noqa: E402
from aot_launches import Launch, record_launches  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                reason="compiles for GPUs: runs in make test's non-interpreter pass")


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, K, WIDEN: tl.constexpr, PREC: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rm, rn = tl.arange(0, BM), tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        a = tl.load(a_ptr + rm[:, None] * K + rk[None, :])
        b = tl.load(b_ptr + rk[:, None] * BN + rn[None, :])
        if WIDEN:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc=acc, input_precision=PREC)
    tl.store(c_ptr + rm[:, None] * BN + rn[None, :], acc)


@triton.jit
def _two_dots_kernel(a_ptr, c_ptr, BM: tl.constexpr):
    # two 16-bit dots, the second widened to fp32 (tf32): the fused_linear low-rank regression class
    r = tl.arange(0, BM)
    a = tl.load(a_ptr + r[:, None] * BM + r[None, :])
    acc = tl.dot(a, a)
    acc = tl.dot(a.to(tl.float32), a.to(tl.float32), acc=acc, input_precision="tf32")
    tl.store(c_ptr + r[:, None] * BM + r[None, :], acc)


@triton.jit
def _loop_bound_from_pointer_kernel(seg_ptr, out_ptr, BR: tl.constexpr):
    # the IA3 defect of issue #13: a loop bound loaded through a pointer that is not int
    rank = tl.load(seg_ptr)
    acc = 0.0
    for r0 in range(0, rank, BR):
        acc += r0
    tl.store(out_ptr, acc)


@triton.jit
def _register_hog_kernel(x_ptr, out_ptr, N: tl.constexpr):
    r = tl.arange(0, N)
    x = tl.load(x_ptr + r[:, None] * N + r[None, :])
    y = tl.dot(x, x)  # [N, N] fp32 accumulator in one warp: far more than 255 registers a thread
    tl.store(out_ptr + r[:, None] * N + r[None, :], y)


def _launch(fn, dtype, expect, **kw) -> Launch:
    a = torch.empty(16, dtype=dtype)
    args = {p.name: kw.pop(p.name) for p in fn.params if p.name in kw}
    launch = Launch(kernel=fn.fn.__name__, fn=fn, args=args, kwargs=kw, scenario="test", dtype=str(dtype))
    launch.expect_dots = expect
    del a
    return launch


def _cfg(warps=4, stages=2):
    return triton.Config({}, num_warps=warps, num_stages=stages)


def _dot(dtype, widen, prec, BM=64, BN=64, BK=32):
    t = torch.empty(16, dtype=dtype)
    return _launch(_dot_kernel, dtype, ["fp16" if dtype == torch.float16 else "fp32"],
                   a_ptr=t, b_ptr=t, c_ptr=torch.empty(16), K=4096, WIDEN=widen, PREC=prec, BM=BM, BN=BN, BK=BK)


def test_sound_16bit_dot_is_clean_and_uses_16bit_tensor_cores():
    r = compile_launch(_dot(torch.float16, False, "tf32"), 86, _cfg())
    assert r.ok and r.problems == "", r
    assert "mma.f16" in r.mma and r.shared > 0 and r.regs > 0 and r.spill == 0


def test_sm90_uses_wgmma():
    r = compile_launch(_dot(torch.float16, False, "tf32", BM=128, BN=128, BK=64), 90, _cfg(4, 3))
    assert r.ok and "wgmma.f16" in r.mma, r


def test_widened_16bit_dot_is_reported():
    r = compile_launch(_dot(torch.float16, True, "tf32"), 86, _cfg())
    assert r.ok and r.problems == "no-16bit-mma" and "tf32" in r.mma, r


def test_a_widened_second_16bit_dot_is_reported_beside_a_sound_one():
    launch = _launch(_two_dots_kernel, torch.float16, ["fp16", "fp16"], a_ptr=torch.empty(16, dtype=torch.float16),
                     c_ptr=torch.empty(16), BM=64)
    r = compile_launch(launch, 86, _cfg())
    assert r.ok and "mma.f16" in r.mma and "mma.tf32" in r.mma and r.problems == "no-16bit-mma", r


def test_tf32_dot_on_fp32_operands_is_reported_while_tf32_is_off():
    assert not torch.backends.cuda.matmul.allow_tf32
    r = compile_launch(_dot(torch.float32, False, "tf32"), 86, _cfg())
    assert r.problems == "tf32-not-allowed", r
    r = compile_launch(_dot(torch.float32, False, "ieee"), 86, _cfg())
    assert r.ok and r.problems == "" and r.mma == "", r  # exact fp32 FMA dot


def test_shared_memory_over_the_consumer_gpu_limit_is_reported():
    big = _dot(torch.float16, False, "tf32", BM=128, BN=128, BK=128)
    r86 = compile_launch(big, 86, _cfg(8, 3))
    assert r86.ok and r86.shared > 99 * 1024 and "smem" in r86.problems, r86
    r90 = compile_launch(big, 90, _cfg(8, 3))
    assert r90.shared <= 227 * 1024 and "smem" not in r90.problems, r90


def test_loop_bound_loaded_as_float_is_a_compile_failure():
    launch = _launch(_loop_bound_from_pointer_kernel, torch.float16, [], seg_ptr=torch.empty(16, dtype=torch.float16),
                     out_ptr=torch.empty(16), BR=16)
    r = compile_launch(launch, 80, _cfg())
    assert not r.ok and r.problems == "compile" and "int" in r.error, r
    launch.args["seg_ptr"] = torch.empty(16, dtype=torch.int32)
    assert compile_launch(launch, 80, _cfg()).ok


def test_register_spills_are_reported():
    launch = _launch(_register_hog_kernel, torch.float16, ["fp16"], x_ptr=torch.empty(16, dtype=torch.float16),
                     out_ptr=torch.empty(16), N=128)
    r = compile_launch(launch, 86, _cfg(1, 1))
    assert r.ok and r.spill > 0 and "spill" in r.problems, r


def test_a_compiler_abort_does_not_hang_or_lose_the_sweep(monkeypatch):
    """An LLVM/ptxas abort kills its worker process: the sweep goes on and reports that compile."""
    launch = _launch(_loop_bound_from_pointer_kernel, torch.float16, [], seg_ptr=torch.empty(16, dtype=torch.int32),
                     out_ptr=torch.empty(16), BR=16)
    monkeypatch.setattr(aot_compile, "_LAUNCHES", [launch])

    def work(item):
        if item[3] == 1:
            os.abort()
        return {"rank": item[3]}

    monkeypatch.setattr(aot_compile, "_work", work)
    rows = []
    aot_compile._compile_all([(0, 86, None, r) for r in range(4)], 2, rows.append)
    crashed = [r for r in rows if "problems" in r]
    assert len(rows) == 4 and len(crashed) == 1 and crashed[0]["config_rank"] == 1, rows
    assert crashed[0]["problems"] == "compile" and "died" in crashed[0]["error"]


@pytest.mark.parametrize("argv, says", [
    (["--targets", "75"], "unknown target [75]"),
    (["--targets", "86,"], "--targets '86,'"),
    (["--dtypes", "fp8"], "unknown dtype ['fp8']"),
    (["--kernels", "_colsum_mul_kernal", "--targets", "86"], "unknown kernel(s) ['_colsum_mul_kernal']"),
    (["--triton-path", "/nonexistent"], "--triton-path '/nonexistent'"),
])
def test_cli_names_the_bad_value(argv, says, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        aot_compile.main([*argv, "--out", str(tmp_path), "--no-progress", "--jobs", "1"])
    assert e.value.code == 2 and says in capsys.readouterr().err
    assert not list(tmp_path.glob("*.csv"))


def test_mma_kinds_reads_ptx():
    ptx = ("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {..};\n"
           "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {..};\n"
           "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {..};")
    assert mma_kinds(ptx) == "mma.bf16,mma.tf32,wgmma.f16"


def test_launches_are_recorded_as_on_a_gpu():
    launches = record_launches(dtypes=("fp16",), shapes=("real",), mixed_adapters=False)
    names = {launch.kernel for launch in launches}
    assert names == KERNELS, names
    assert not torch.Tensor([0]).is_cuda  # the recorder put Tensor.is_cuda back
    fused = [launch for launch in launches if launch.kernel == "_fused_linear_kernel"]
    # GPU-mode recording: 16-bit launches are not forced to fp32 dots as under the interpreter
    assert all(launch.kwargs.get("F32_DOT") is not True for launch in fused)
    assert any(launch.kwargs.get("W_NF4") for launch in fused)  # the in-GEMM 4-bit decode path
    assert any(not launch.kwargs.get("HAS_LR", launch.args.get("N_SEG")) for launch in fused)  # IA3: no low rank


KERNELS = {"_fused_linear_kernel", "_lora_shrink_kernel", "_lora_grad_a_kernel", "_colsum_mul_kernel",
           "_dora_norm_kernel", "_nf4_dequant_kernel", "_bgmv_kernel", "_sgmv_shrink_kernel", "_sgmv_expand_kernel"}


def test_every_autotuned_kernel_is_in_the_check():
    """A kernel added to triton_kernels/ without a recorded launch would escape the compile check."""
    import importlib
    import pkgutil

    from triton.runtime.autotuner import Autotuner

    import peft_fast.triton_kernels as pkg

    found = set()
    for mod in pkgutil.iter_modules(pkg.__path__):
        m = importlib.import_module(f"{pkg.__name__}.{mod.name}")
        found |= {name for name, obj in vars(m).items() if isinstance(obj, Autotuner)}
    assert found == KERNELS


def _check(rows, fail_on_spill):
    bad = aot_compile.failures(rows, fail_on_spill=fail_on_spill)
    msg = "\n".join(f"{r['kernel']} sm_{r['target']} {r['config']} [{r['scenario']}]: {r['problems']} {r['error'][:300]}"
                    for r in bad[:40])
    assert not bad, f"{len(bad)} of {len(rows)} compiles have problems:\n{msg}"


@pytest.mark.parametrize("cc", [80, 86, 89, 90, 120])
def test_every_kernel_compiles_and_fits_on(cc):
    """CI subset: every distinct launch x the autotuner's first config for sm_<cc>: compiles, fits
    shared memory, 16-bit dots on 16-bit tensor cores, no tf32 while TF32 is off; no spills on
    sm_80..sm_90 (the full sweep, benchmarks/aot_compile.py, checks every config)."""
    rows = aot_compile.run_sweep(targets=(cc,), configs="first", shapes=("real",), jobs=2, progress=False,
                                 dedupe="variant")
    assert {r["kernel"] for r in rows} == KERNELS and all(r["target"] == cc for r in rows)
    _check(rows, fail_on_spill=cc <= 90)


GPU_IMAGE_TRITON = os.path.join(ROOT, ".venv", "triton-gpu-image")


def test_every_kernel_compiles_for_the_h200_with_the_gpu_images_triton(tmp_path):
    """The lent GPU machine runs triton 3.6 (requirements-gpu-image.txt), installed by `make install`
    into .venv/triton-gpu-image; the same check for sm_90 with it."""
    assert os.path.isdir(os.path.join(GPU_IMAGE_TRITON, "triton")), \
        f"{GPU_IMAGE_TRITON} is missing: `make install` puts the GPU image's triton there"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "aot_compile.py"), "--triton-path",
                           GPU_IMAGE_TRITON, "--targets", "90", "--configs", "first", "--shapes", "real", "--jobs", "1",
                           "--dedupe", "variant",
                           "--check", "--fail-on-spill", "--no-progress", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    with open(next(tmp_path.glob("aot_*.md"))) as f:
        head = f.readline()
    with open(os.path.join(ROOT, "requirements-gpu-image.txt")) as f:
        want = [ln.split("==")[1].strip() for ln in f if ln.startswith("triton==")][0]
    assert f"triton {want}" in head, head
