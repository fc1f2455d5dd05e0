"""Compile recorded launches for real NVIDIA targets on a machine without a GPU.

A stand-in Triton driver reports the chosen target (sm_80, sm_86, ...) and device, so the
kernel's own `JITFunction.run(..., warmup=True)` does exactly what the first launch on that GPU
would do: bind and specialise the arguments, build the ASTSource and call `triton.compile`
(ptxas ships in the triton wheel). Nothing is loaded or launched. From the compiled kernel:
  shared memory per block (metadata.shared) against the target's limit,
  registers and local-memory (spill) bytes per thread (`cuobjdump --dump-resource-usage`),
  tensor-core instruction kinds in the PTX (mma / wgmma with their operand types),
and, against what the launch asks for, whether a 16-bit dot really uses 16-bit tensor cores.
"""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Iterator, Optional

from peft_fast.triton_kernels._triton import SMEM_PER_BLOCK as SMEM_LIMIT  # the kernels' own table

TARGETS = (80, 86, 89, 90, 120)  # the default sweep: A100, RTX 30xx, RTX 40xx/L4, H100/H200, RTX 50xx


@dataclass
class Result:
    kernel: str
    scenario: str
    dtype: str
    target: int
    config: str
    config_rank: int  # position of the config in the target's list (0: the autotuner's first)
    ok: bool
    error: str = ""
    shared: int = -1  # bytes per block
    smem_limit: int = 0
    regs: int = -1
    stack: int = -1  # stack frame + local memory bytes per thread (cuobjdump)
    spill: int = -1  # spill-store bytes per thread (ptxas -v; 0 when the frame is empty)
    mma: str = ""  # tensor-core kinds found, e.g. "mma.f16", "wgmma.bf16", "mma.tf32"
    dots: str = ""  # dtypes of the launch's dot operands, e.g. "fp16,fp32" (see DOTS)
    seconds: float = 0.0
    problems: str = ""  # ';'-joined: "compile", "smem", "spill", "no-16bit-mma", "tf32-not-allowed"

    def row(self) -> dict:
        return asdict(self)


class _StandInDriver:
    """Just enough of a Triton GPU driver for compiling (never for launching)."""

    def __init__(self, target):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 1000 + self.target.arch  # one JIT cache per target

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        import torch
        return torch.device("cpu")

    def __getattr__(self, name):
        raise RuntimeError(f"aot_compile: the stand-in driver has no {name!r} (compiling only, no GPU)")


@contextlib.contextmanager
def stand_in_driver(cc: int) -> Iterator[None]:
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    prev = driver._active if hasattr(driver, "_active") else None
    driver.set_active(_StandInDriver(GPUTarget("cuda", cc, 32)))
    try:
        yield
    finally:
        if prev is None:
            driver._active = None
        else:
            driver.set_active(prev)


def target_configs(launch, cc: int) -> list:
    """The configs the autotuner may pick on target `cc` for this launch, in its order."""
    from triton.runtime.autotuner import Autotuner

    tuner = launch.fn
    if not isinstance(tuner, Autotuner):
        return [None]
    prune = getattr(tuner, "early_config_prune", None)
    getter = getattr(prune, "get_configs", None)
    named = dict(launch.args, **launch.kwargs)
    if getter is None:
        return list(tuner.configs)
    from peft_fast.triton_kernels._triton import config_key

    allowed = [config_key(c) for c in getter(cc, named)]
    by_key = {config_key(c): c for c in tuner.configs}
    return [by_key[k] for k in allowed if k in by_key]


def config_name(cfg) -> str:
    if cfg is None:
        return "-"
    meta = ",".join(f"{k}={v}" for k, v in cfg.kwargs.items())
    return f"{meta},w={cfg.num_warps},s={cfg.num_stages}"


# The dtypes each kernel's tl.dot calls compute in, from the launch's arguments. A 16-bit dot must
# give 16-bit tensor-core instructions; an fp32 one must not give tf32 ones while TF32 is off
# (torch's default; Launch.tf32 records the setting the launcher saw).
def _dt(t) -> str:
    return {"torch.float16": "fp16", "torch.bfloat16": "bf16"}.get(str(getattr(t, "dtype", "")), "fp32")


def _fused_linear_dots(a: dict) -> list:
    base = "fp32" if a.get("F32_DOT") else _dt(a["x_ptr"])
    if not a.get("HAS_LR", (a.get("N_SEG") or 0) > 0):
        return [base]
    return [base, "fp32" if a.get("LR_F32") else _dt(a["l_ptr"])]


DOTS = {
    "_fused_linear_kernel": _fused_linear_dots,  # base product, low-rank product
    "_lora_shrink_kernel": lambda a: [_dt(a["a_ptr"])],  # x rounded to A's dtype
    "_lora_grad_a_kernel": lambda a: [_dt(a["g_ptr"])],
    "_sgmv_shrink_kernel": lambda a: [_dt(a["a_ptr"])],
    "_sgmv_expand_kernel": lambda a: [_dt(a["b_ptr"])],  # xa cast to B's dtype
    # W A^T: 16-bit mma when W and A share a 16-bit dtype, else an exact fp32 dot (see dora.py)
    "_dora_norm_kernel": lambda a: [_dt(a["w_ptr"]) if a.get("DOT16") else "fp32"],
}


def expected_dots(launch) -> list[str]:
    """Dtypes ('fp32', 'fp16', 'bf16') of the launch's dots; empty for kernels without one."""
    override = getattr(launch, "expect_dots", None)
    if override is not None:
        return list(override)
    rule = DOTS.get(launch.kernel)
    return rule(dict(launch.args, **launch.kwargs)) if rule else []


_PTX_TYPE = {"fp16": "f16", "bf16": "bf16"}
_MMA = re.compile(r"\b(wgmma\.mma_async(?:\.sync)?|mma\.sync)\.aligned\.[\w.]+")


def mma_kinds(ptx: str) -> str:
    kinds = set()
    for m in _MMA.finditer(ptx):
        ins = m.group(0)
        family = "wgmma" if ins.startswith("wgmma") else "mma"
        for t in ("bf16", "f16", "tf32", "e4m3", "e5m2", "s8", "f64"):
            if f".{t}" in ins:
                kinds.add(f"{family}.{t}")
                break
    return ",".join(sorted(kinds))


def _cuobjdump() -> Optional[str]:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else None


def resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, stack + local bytes) per thread of the first function in a cubin."""
    tool = _cuobjdump()
    if tool is None:
        return -1, -1
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", out)
    stack = re.search(r"STACK:(\d+)", out)
    local = re.search(r"LOCAL:(\d+)", out)
    frame = max(int(stack.group(1)) if stack else 0, int(local.group(1)) if local else 0)
    return (int(regs.group(1)) if regs else -1), frame


def spill_bytes(ptx: str, cc: int, enable_fp_fusion: bool = True) -> int:
    """Spill stores (bytes per thread) as ptxas -v reports them for this PTX and target: a stack
    frame can also hold non-spill data, so a frame > 0 is settled by asking ptxas. -1 if unknown."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(cc).path, "-v", "-lineinfo", *([] if enable_fp_fusion else ["--fmad=false"]),
               f"--gpu-name={sm_arch_from_capability(cc)}", src, "-o", os.path.join(d, "k.o")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    found = re.findall(r"(\d+) bytes spill stores", proc.stdout + proc.stderr)
    return max(map(int, found)) if found else -1


def compile_launch(launch, cc: int, cfg, rank: int = 0) -> Result:
    """Compile one launch with one config for target `cc` and judge the result."""
    from triton.runtime.autotuner import Autotuner

    res = Result(kernel=launch.kernel, scenario=launch.scenario, dtype=launch.dtype, target=cc,
                 config=config_name(cfg), config_rank=rank, ok=False, smem_limit=SMEM_LIMIT.get(cc, 0),
                 dots=",".join(expected_dots(launch)))
    jit = launch.fn.fn if isinstance(launch.fn, Autotuner) else launch.fn
    kwargs = dict(launch.kwargs)
    if cfg is not None:
        kwargs.update(cfg.all_kwargs())
    t0 = time.perf_counter()
    try:
        with stand_in_driver(cc):
            kernel = jit.run(*launch.args.values(), grid=(1,), warmup=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - the compiler's error is the result
        res.error = f"{type(e).__name__}: {str(e).strip()[:400]}"
        res.problems = "compile"
        res.seconds = time.perf_counter() - t0
        return res
    res.seconds = time.perf_counter() - t0
    res.ok = True
    res.shared = int(kernel.metadata.shared)
    res.regs, res.stack = resource_usage(kernel.asm["cubin"])
    res.spill = 0 if res.stack == 0 else spill_bytes(kernel.asm["ptx"], cc, kernel.metadata.enable_fp_fusion)
    res.mma = mma_kinds(kernel.asm["ptx"])
    problems = []
    if res.shared > res.smem_limit:
        problems.append("smem")
    if res.spill > 0 or (res.spill < 0 and res.stack > 0):  # unknown spill count with a frame: assume spills
        problems.append("spill")
    kinds = {k.split(".")[1] for k in res.mma.split(",") if k}
    dots = set(filter(None, res.dots.split(",")))
    # every 16-bit dtype asked for has its mma; tf32 with no fp32 dot means a 16-bit dot was widened
    if any(d in dots and _PTX_TYPE[d] not in kinds for d in ("fp16", "bf16")) or \
            ("tf32" in kinds and dots and "fp32" not in dots):
        problems.append("no-16bit-mma")
    if "fp32" in dots and "tf32" in kinds and not launch.tf32:
        problems.append("tf32-not-allowed")
    res.problems = ";".join(problems)
    return res
