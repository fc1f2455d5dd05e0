"""fused_linear / NF4 GPU readiness without a GPU (issue #13).

- Compile-only: the launches the launcher really makes (recorded from `fused_linear`, not
  written by hand) compile for real targets with `triton.compile(ASTSource, GPUTarget)`; in
  particular every launch without a low-rank term (IA3, bias/pro_scale/reduce-only), which used
  to fail on every target ("For loop bounds must be ints"); the in-GEMM NF4 decode fits 99 KB
  of shared memory; dot precision follows the operands' dtypes and the TF32 setting (the PTX
  holds 16-bit mma for 16-bit operands, tf32 mma only with TF32 allowed). The compiles run in a
  subprocess without TRITON_INTERPRET (kernels must be real JITFunctions).
- Interpreter: 64-bit offsets (row x stride products past 2^31 elements, with huge strides over
  a lazily committed buffer: no real memory is used), and a bit-exact NF4 decode in the GEMM.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.interp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs without TRITON_INTERPRET: records fused_linear's kernel launches for the given cases and
# compiles each for the given targets with the first config its per-target list keeps. Prints
# one JSON line per compile.
_COMPILE_SCRIPT = textwrap.dedent(r'''
    import json, sys
    import torch
    import triton
    from triton.compiler import ASTSource
    from triton.backends.compiler import GPUTarget
    from peft_fast.triton_kernels import fused_linear as fl
    from peft_fast.triton_kernels.nf4 import NF4Operand

    TY = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32",
          torch.int64: "i64", torch.uint8: "u8"}
    DT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

    def record(fn):
        calls = []
        kernel = fl._fused_linear_kernel
        kernel.run = lambda *a, **k: calls.append((a, {n: v for n, v in k.items() if n not in ("grid", "warmup")}))
        try:
            fn()
        finally:
            del kernel.run
        return calls

    def compile_one(args, kwargs, cc):
        jit = fl._fused_linear_kernel.fn
        named = dict(zip(jit.arg_names, args))
        cfg = fl.get_fused_linear_configs(cc, dict(named, **kwargs))[0]
        consts = {k: v for k, v in kwargs.items() if k != "enable_fp_fusion"}
        consts.update(cfg.kwargs)
        sig, attrs = {}, {}
        for i, name in enumerate(jit.arg_names):
            v = named.get(name)
            if name in consts:
                sig[name] = "constexpr"
            elif isinstance(v, torch.Tensor):
                sig[name] = "*" + TY[v.dtype]
                if v.data_ptr() % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
            elif isinstance(v, int) and v == 1:  # Triton specialises ints equal to 1
                sig[name], consts[name] = "constexpr", 1
            elif isinstance(v, int):
                sig[name] = "i32" if -2**31 <= v < 2**31 else "i64"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
            else:
                sig[name] = "fp32"
        opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
                "enable_fp_fusion": kwargs.get("enable_fp_fusion", True)}
        try:
            k = triton.compile(ASTSource(jit, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", cc, 32),
                               options=opts)
        except Exception as e:
            return {"ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        ptx = k.asm["ptx"]
        return {"ok": True, "shared": int(k.metadata.shared), "config": str(cfg),
                "mma_f16": ".f16.f16" in ptx or ".bf16.bf16" in ptx, "mma_tf32": ".tf32.tf32" in ptx,
                "kwargs": {n: v for n, v in kwargs.items() if isinstance(v, (bool, str, int))}}

    def case_fn(case, dtype):
        dt = DT[dtype]
        M, K, N = 64, 256, 192
        x, W = torch.randn(M, K, dtype=dt), torch.randn(N, K, dtype=dt)
        kw = {}
        if "bias" in case:
            kw["bias"] = torch.randn(N, dtype=dt)
        if "pro" in case:
            kw["pro_scale"] = torch.randn(K, dtype=dt)
        if "col" in case:
            kw.update(col_scale=torch.rand(N), bias_scaled=True, store_pre=True)
        if "reduce" in case:
            kw["reduce_with"] = torch.randn(M, N, dtype=dt)
        if "lr" in case:
            adt = torch.float32 if "lr32" in case else dt
            kw.update(lr_left=torch.randn(M, 8, dtype=adt), lr_right=torch.randn(8, N, dtype=adt),
                      segments=[fl.Segment(0, 8, 2.0, 0.0)])
        if "nf4" in case:
            nb = N * K // 64
            dq = "dq" in case
            op = NF4Operand(torch.randint(0, 256, (N * K // 2,), dtype=torch.uint8),
                            torch.randint(0, 256, (nb,), dtype=torch.uint8) if dq else torch.rand(nb),
                            torch.linspace(-1, 1, 16), (N, K), dt, 64,
                            *((torch.zeros(1), torch.rand(nb // 256 + 1), torch.linspace(-1, 1, 256), 256) if dq else ()))
            w = fl.NF4KN(op, "wt" in case)
            xin = x if "wt" in case else torch.randn(M, N, dtype=dt)
            if "reduce_with" in kw and "wt" not in case:
                kw["reduce_with"] = torch.randn(M, K, dtype=dt)
            if "bias" in kw and "wt" not in case:
                kw["bias"] = torch.randn(K, dtype=dt)
            return lambda: fl.fused_linear(xin, w, **kw)
        return lambda: fl.fused_linear(x, W.t(), **kw)

    spec = json.loads(sys.argv[1])
    torch.backends.cuda.matmul.allow_tf32 = spec.get("tf32", False)
    for case, dtype in spec["cases"]:
        for args, kwargs in record(case_fn(case, dtype)):
            for cc in spec["targets"]:
                print(json.dumps(dict(compile_one(args, kwargs, cc), case=case, dtype=dtype, cc=cc)), flush=True)
''')


def _compile(cases, targets, tf32=False):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    spec = json.dumps({"cases": cases, "targets": targets, "tf32": tf32})
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, spec], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == len(cases) * len(targets), proc.stdout[-2000:]
    return rows


SMEM = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 120: 99 * 1024}


@pytest.mark.slow
def test_launches_without_low_rank_terms_compile_for_every_target():
    """IA3 and the bias/pro_scale/col+pre/reduce-only launches: no segment loop is compiled
    (it used to be, with `rank` read from the output as a float: a compile error everywhere)."""
    cases = [["bias", "fp16"], ["bias pro", "bf16"], ["bias col", "fp32"], ["reduce", "fp16"],
             ["bias nf4 wt dq", "fp16"], ["reduce nf4 w", "bf16"]]
    for row in _compile(cases, [80, 90]):
        assert row["ok"], row
        assert row["kwargs"]["HAS_LR"] is False
        assert row["shared"] <= SMEM[row["cc"]], row
    # the 99 KB targets get their own configs
    for row in _compile([["bias", "fp32"], ["bias nf4 wt", "fp16"]], [86, 120]):
        assert row["ok"] and row["shared"] <= SMEM[row["cc"]], row


@pytest.mark.slow
def test_dot_precision_follows_operand_dtypes_and_tf32_setting():
    """fp16 base with fp32 adapters: 16-bit mma for the base product, exact fp32 (no tf32
    mma) for the low-rank product unless TF32 is allowed; fp16 adapters: 16-bit mma only."""
    strict = _compile([["lr lr32", "fp16"], ["lr", "fp16"], ["bias", "fp32"]], [80])
    (mixed, half, f32) = strict
    assert mixed["ok"] and half["ok"] and f32["ok"]
    assert mixed["kwargs"]["LR_F32"] and mixed["kwargs"]["LR_PREC"] == "ieee" and not mixed["kwargs"]["F32_DOT"]
    assert mixed["mma_f16"] and not mixed["mma_tf32"]
    assert not half["kwargs"]["LR_F32"] and half["mma_f16"] and not half["mma_tf32"]
    assert f32["kwargs"]["DOT_PREC"] == "ieee" and not f32["mma_tf32"]
    allowed = _compile([["lr lr32", "fp16"], ["bias", "fp32"]], [80], tf32=True)
    assert allowed[0]["kwargs"]["LR_PREC"] == "tf32" and allowed[0]["mma_tf32"] and allowed[0]["mma_f16"]
    assert allowed[1]["kwargs"]["DOT_PREC"] == "tf32" and allowed[1]["mma_tf32"]


# ------------------------------------------------------------------------------------------
# 64-bit offsets (interpreter). The operand under test is a view with a huge stride over a
# big torch.empty buffer: Linux commits its pages lazily, so only the rows written cost memory.
# With 32-bit offsets the last row's offset (>= 2^31) wraps to a negative one.
# ------------------------------------------------------------------------------------------
def _huge_strided(rows: int, cols: int, dtype, by_rows: bool = True) -> torch.Tensor:
    """[rows, cols] view (by_rows; else its transpose) whose row stride puts the last row at or
    past element 2^31 (virtual size ~2^31 elements); only the viewed elements are written."""
    stride = 2**31 // (rows - 1) + 1
    base = torch.empty((rows - 1) * stride + cols, dtype=dtype)
    v = base.as_strided((rows, cols), (stride, 1))
    v.copy_(torch.randn(rows, cols).to(dtype))
    return v if by_rows else v.t()


@pytest.mark.parametrize("operand", ["x_rows", "x_cols", "w_rows", "w_cols", "lr_left", "lr_right", "reduce_with"])
def test_offsets_past_2_pow_31_elements(operand):
    from conftest import assert_kernel_close
    from peft_fast.triton_kernels.fused_linear import Segment, fused_linear, fused_linear_ref

    torch.manual_seed(hash(operand) % 2**31)
    dt = torch.float16
    M, K, N, R = 3, 40, 24, 5
    x = _huge_strided(M, K, dt) if operand == "x_rows" else \
        _huge_strided(K, M, dt, by_rows=False) if operand == "x_cols" else torch.randn(M, K).to(dt)
    w = _huge_strided(K, N, dt) if operand == "w_rows" else \
        _huge_strided(N, K, dt, by_rows=False) if operand == "w_cols" else torch.randn(K, N).to(dt)
    L = _huge_strided(M, R, dt) if operand == "lr_left" else torch.randn(M, R).to(dt)
    Rt = _huge_strided(R, N, dt) if operand == "lr_right" else torch.randn(R, N).to(dt)
    z = _huge_strided(M, N, dt) if operand == "reduce_with" else torch.randn(M, N).to(dt)
    kw = dict(lr_left=L, lr_right=Rt, segments=[Segment(0, R, 0.7, 0.0)], reduce_with=z)
    out, _, red = fused_linear(x, w, **kw)
    d = lambda t: t.double() if torch.is_tensor(t) else t  # noqa: E731
    ref = fused_linear_ref(d(x), d(w), **{k: d(v) for k, v in kw.items()})
    same = fused_linear_ref(x, w, **kw)
    assert_kernel_close(out, ref[0], same[0], f"{operand} out")
    assert_kernel_close(red, ref[2], same[2], f"{operand} reduction")


# ------------------------------------------------------------------------------------------
# NF4 decode in the GEMM: bit-exact weights (x = identity: every output element is one weight)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("transpose", [True, False], ids=["W^T", "W"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["dq0", "dq1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape,blocksize", [((40, 128), 64), ((33, 256), 128)], ids=str)
def test_nf4_decode_in_gemm_is_bit_exact(transpose, double_quant, dtype, shape, blocksize):
    bnb = pytest.importorskip("bitsandbytes")
    from peft_fast.triton_kernels.fused_linear import NF4KN, fused_linear, nf4_decodes_in_gemm
    from peft_fast.triton_kernels.nf4 import NF4Operand, nf4_dequantize_ref

    torch.manual_seed(sum(shape) + blocksize)
    W = (torch.randn(*shape) * 3).to(dtype)
    p, qs = bnb.functional.quantize_4bit(W, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")
    extra = (qs.offset, qs.state2.absmax, qs.state2.code, qs.state2.blocksize) if double_quant else ()
    op = NF4Operand(p.reshape(-1), qs.absmax, qs.code, tuple(W.shape), dtype, blocksize, *extra)
    assert nf4_decodes_in_gemm(op)
    w = NF4KN(op, transpose)
    expected = nf4_dequantize_ref(op)
    assert torch.equal(expected, bnb.functional.dequantize_4bit(p, qs))
    expected = expected.t() if transpose else expected  # [K, N]
    eye = torch.eye(w.shape[0], dtype=dtype)
    out, _, _ = fused_linear(eye, w)
    assert torch.equal(out, expected)


# ------------------------------------------------------------------------------------------
# Per-target config lists (no compile): every launch kind keeps >= 2 configs on every target,
# each within the target's shared memory by the pipelined-loop estimate; the autotuner's
# pruner keeps exactly the target's configs.
# ------------------------------------------------------------------------------------------
_KIND_ARGS = {
    "16": dict(K=4096, N=4096, sxm=4096, sxk=1, swk=1, swn=4096),
    "16s": dict(K=4096, N=4096, sxm=4096, sxk=1, swk=1, swn=4096, HAS_LR=True, LR_MASK=True),
    "16f": dict(K=4096, N=4096, sxm=4096, sxk=1, swk=1, swn=4096, HAS_LR=True, LR_F32=True, LR_PREC="ieee"),
    "16u": dict(K=100, N=300, sxm=100, sxk=1, swk=1, swn=100),
    "tf32": dict(F32_DOT=True, DOT_PREC="tf32"),
    "ieee": dict(F32_DOT=True, DOT_PREC="ieee"),
    "nf4t": dict(W_NF4=True, W_T=True, q_bs=64),
    "nf4w": dict(W_NF4=True, W_T=False, q_bs=64),
    "nf4w32": dict(W_NF4=True, W_T=False, q_bs=32),
    "nf4f32": dict(W_NF4=True, W_T=True, q_bs=32, F32_DOT=True, DOT_PREC="ieee"),
}


@pytest.mark.parametrize("cc", [80, 86, 89, 90, 120])
@pytest.mark.parametrize("kind", list(_KIND_ARGS))
def test_every_launch_kind_keeps_two_configs_that_fit(cc, kind, monkeypatch):
    from peft_fast.triton_kernels import _triton
    from peft_fast.triton_kernels.fused_linear import _operand_kind, get_fused_linear_configs

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    args = _KIND_ARGS[kind]
    assert _operand_kind(args) == kind.replace("nf4w32", "nf4w")
    cfgs = get_fused_linear_configs(cc, args)
    assert len(cfgs) >= 2
    elt = 4 if args.get("F32_DOT") else 2
    for c in cfgs:
        m = c.kwargs
        smem = max(c.num_stages - 1, 1) * (m["BM"] + m["BN"]) * m["BK"] * elt
        assert smem <= SMEM[cc], (kind, cc, c)
        if args.get("W_NF4"):
            assert (m["BK"] if args["W_T"] else m["BN"]) <= args["q_bs"]
    monkeypatch.setattr(_triton, "device_capability", lambda device=None: cc)
    monkeypatch.delenv("PEFT_FAST_AUTOTUNE", raising=False)  # =0 would keep one config
    everything = get_fused_linear_configs()
    kept = _triton.target_pruner(get_fused_linear_configs)(everything, args)
    assert sorted(_triton.config_key(c) for c in kept) == sorted(_triton.config_key(c) for c in cfgs)
