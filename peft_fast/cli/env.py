"""`peft-fast env`: versions, devices, available backends, and which path each op takes here.

The op paths are asked of the code that decides them at run time -- `peft_fast.ops.backend_for`
(fused LoRA/DoRA/IA3/QLoRA ops) and `peft_fast._segments` (mixed-adapter batches) -- on an
empty tensor of each device, so the report follows PEFT_FAST_BACKEND, TRITON_INTERPRET,
PEFT_FAST_DISABLE_CPP and PEFT_FAST_GEMM exactly as the ops would. Versions come from package
metadata, so reporting a package never imports it (bitsandbytes is imported once, to say
whether it works).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys

# the environment variables that change what peft_fast runs, each with what it does (one line)
SETTING_HELP = {
    "PEFT_FAST_BACKEND": "force the fused ops' backend: triton or torch "
                         "(default: triton on CUDA or interpreted, else torch)",
    "PEFT_FAST_GEMM": "force the GEMM path: triton, torch or nf4_fused (default: the fastest, measured per shape)",
    "PEFT_FAST_PATH_STRICT": "1: a kernel that cannot launch (out of resources, compile error) raises instead of "
                             "falling back to the next path",
    "PEFT_FAST_AUTOTUNE": "0: no Triton autotuning, each launch runs the first config of its GPU's list "
                          "(short test runs on a cold Triton cache)",
    "TRITON_INTERPRET": "1: run the Triton kernels on CPU through Triton's interpreter (slow; for tests)",
    "PEFT_FAST_DISABLE_CPP": "1: do not use the C++/CUDA extension peft_fast._C (the torch fallback runs)",
    "PEFT_FAST_TRAINER_INTEGRATION": "0: do not install the transformers Trainer integration on import",
    "PEFT_FAST_AS_PEFT": "1: `import peft` gives peft_fast (the peft alias, installed on import peft_fast; "
                         "peft-fast's own commands still compare with and report the real peft)",
    "CUDA_VISIBLE_DEVICES": "which CUDA devices torch sees",
}
SETTINGS = tuple(SETTING_HELP)
PACKAGES = ("torch", "triton", "transformers", "peft", "bitsandbytes", "accelerate", "safetensors")
FUSED_OPS = ("lora", "dora", "ia3", "qlora (nf4)")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("env", help="versions, devices, backends and the path each op takes",
                              description="Report versions, devices, which peft_fast backends are available and "
                                          "which path each op will take on each device.")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.set_defaults(func=run)
    return p


def _version(dist: str):
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _bitsandbytes() -> dict:
    try:
        import bitsandbytes as bnb
    except Exception as e:  # noqa: BLE001 - a broken install raises anything
        return {"importable": False, "error": f"{type(e).__name__}: {e}"}
    devices = getattr(bnb, "supported_torch_devices", None)
    return {"importable": True, "devices": sorted(devices) if devices is not None else None}


def _devices() -> list[dict]:
    import torch

    out = [{"device": "cpu", "name": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            prop = torch.cuda.get_device_properties(i)
            out.append({"device": f"cuda:{i}", "name": prop.name, "memory_gib": round(prop.total_memory / 2**30, 1),
                        "capability": f"{prop.major}.{prop.minor}", "bf16": torch.cuda.is_bf16_supported()})
    return out


def _op_paths(device: str, bnb: dict) -> dict:
    """{op: path} for tensors on `device`, from the functions that choose at run time."""
    import torch

    from .. import _segments, ops

    t = torch.empty(0, device=device)
    try:
        fused = ops.backend_for(t)
    except (RuntimeError, ValueError) as e:  # e.g. PEFT_FAST_BACKEND=triton on CPU without the interpreter
        fused = f"error: {e}"
    if fused == "triton" and t.device.type == "cpu":
        fused = "triton (interpreter)"
    paths = {op: fused for op in FUSED_OPS}
    if fused.startswith("triton"):
        gemm = os.environ.get("PEFT_FAST_GEMM", "auto").lower()
        paths["base GEMM"] = (f"forced: {gemm}" if gemm != "auto" else
                              "measured per shape (triton vs torch)" if t.is_cuda else "triton (not measured)")
    else:
        paths["base GEMM"] = "torch"
    if fused.startswith("error"):
        paths["mixed-adapter batch"] = fused
    elif fused.startswith("triton"):
        paths["mixed-adapter batch"] = "triton segmented / per-token kernels"
    else:
        cpp = _segments._use_cpp(t.new_zeros(1, dtype=torch.long))
        paths["mixed-adapter batch"] = "torch + C++ segments (peft_fast._C)" if cpp else "torch (C++ fallback)"
    if not bnb.get("importable") or (bnb.get("devices") is not None and t.device.type not in bnb["devices"]):
        paths["qlora (nf4)"] = "unavailable (bitsandbytes)"
    return paths


def collect() -> dict:
    import torch

    import peft_fast

    from .. import _segments
    from ..triton_kernels._triton import HAS_TRITON, interpreting

    bnb = _bitsandbytes()
    versions = {"python": platform.python_version(), "peft_fast": peft_fast.__version__}
    versions.update({name: _version(name) for name in PACKAGES})
    versions["torch"] = torch.__version__
    versions["cuda (torch)"] = torch.version.cuda
    if getattr(torch.version, "hip", None):
        versions["hip (torch)"] = torch.version.hip
    devices = _devices()
    backends = {
        "triton": HAS_TRITON,
        "triton interpreter (TRITON_INTERPRET=1)": interpreting(),
        "C++ extension (peft_fast._C)": bool(_segments.HAS_CPP),
        "C++ extension CUDA kernels": bool(_segments.HAS_CPP_CUDA),
        "C++ extension enabled": _segments.cpp_enabled(),
        "bitsandbytes": bnb.get("importable", False),
    }
    return {
        "platform": platform.platform(),
        "versions": versions,
        "devices": devices,
        "backends": backends,
        "bitsandbytes": bnb,
        "settings": {k: os.environ.get(k) for k in SETTINGS},
        "op_paths": {d["device"]: _op_paths(d["device"], bnb) for d in devices},
    }


def _print_rich(info: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(100, Console().width))
    yes = lambda v: "[green]yes[/]" if v is True else "[red]no[/]" if v is False else str(v)  # noqa: E731

    t = Table(title=f"peft_fast {info['versions']['peft_fast']} environment", title_justify="left")
    t.add_column("package")
    t.add_column("version")
    for k, v in info["versions"].items():
        t.add_row(k, v if v else "[dim]none (CPU build)[/]" if k.endswith("(torch)") else "[dim]not installed[/]")
    console.print(t)

    t = Table(title="devices", title_justify="left")
    for col in ("device", "name", "details"):
        t.add_column(col)
    for d in info["devices"]:
        details = ", ".join(f"{k} {v}" for k, v in d.items() if k not in ("device", "name"))
        t.add_row(d["device"], str(d["name"]), details)
    console.print(t)

    t = Table(title="backends", title_justify="left")
    t.add_column("backend")
    t.add_column("available")
    for k, v in info["backends"].items():
        t.add_row(k, yes(v))
    bnb = info["bitsandbytes"]
    t.add_row("bitsandbytes 4-bit devices", ", ".join(bnb["devices"]) if bnb.get("devices") else
              bnb.get("error", "-"))
    console.print(t)

    t = Table(title="settings (environment variables)", title_justify="left")
    t.add_column("variable")
    t.add_column("value")
    t.add_column("what it does")
    for k, v in info["settings"].items():
        t.add_row(k, "[dim]unset[/]" if v is None else v, SETTING_HELP.get(k, ""))
    console.print(t)

    t = Table(title="op paths (what each op runs for tensors on each device)", title_justify="left")
    t.add_column("op")
    devices = list(info["op_paths"])
    for d in devices:
        t.add_column(d)
    for op in info["op_paths"][devices[0]]:
        t.add_row(op, *[info["op_paths"][d][op] for d in devices])
    console.print(t)


def _print_plain(info: dict) -> None:
    print(f"peft_fast {info['versions']['peft_fast']} environment ({info['platform']})")
    for section in ("versions", "backends", "settings"):
        print(f"\n{section}:")
        for k, v in info[section].items():
            what = f"  ({SETTING_HELP[k]})" if section == "settings" and k in SETTING_HELP else ""
            print(f"  {k:42s} {v}{what}")
    print("\ndevices:")
    for d in info["devices"]:
        print("  " + ", ".join(f"{k} {v}" for k, v in d.items()))
    for dev, paths in info["op_paths"].items():
        print(f"\nop paths on {dev}:")
        for op, path in paths.items():
            print(f"  {op:42s} {path}")


def run(args) -> int:
    info = collect()
    if args.json:
        json.dump(info, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    try:
        import rich  # noqa: F401
    except ImportError:
        _print_plain(info)
        return 0
    _print_rich(info)
    return 0
