"""Per-layer benchmark: one adapted linear layer, peft_fast vs peft vs the frozen base layer.

The core of `peft-fast bench --layers` and of `benchmarks/bench_layers.py` (a thin wrapper
with this module's command line). Without peft installed the peft provider is left out and
peft_fast is compared with the frozen base layer only.

Providers (all in one process, interleaved case by case, the order rotated from case to case):
  base       a frozen nn.Linear (no bias, like Llama's); the input x requires grad, so the
             backward to x runs as it does inside a model
  peft       real `peft`: the same nn.Linear (a copy) inside a one-attribute module (`proj`),
             wrapped by peft.get_peft_model
  peft_fast  the same with peft_fast.get_peft_model (same API and configs)

Methods: lora (r, lora_alpha=2r, lora_dropout=0.05), dora (use_dora, dropout 0), ia3 (the
layer as target; --ia3-ff marks it a feed-forward module, which scales the input instead of
the output). Library defaults otherwise, e.g. both keep 16-bit bases' adapters in fp32.
Models are in train() mode (dropout active) and every adapter weight is randomised after
creation (lora_A, lora_B, ia3_l; the same values for peft and peft_fast), so a zero lora_B or
a ones ia3_l cannot let a provider skip work. DoRA's magnitude keeps its init (||W|| rows).

Modes, all with autograd recording as in training; x: [1, M, in], dy: [1, M, out] fixed:
  fwd   y = model(x) (the graph is built and then dropped)
  bwd   the forward runs once outside the timer with its graph kept; the timer covers
        y.backward(dy, retain_graph=True) alone (as Triton's own fused-attention benchmark
        does), gradients set to None before every rep so AccumulateGrad does exactly what a
        training step does. Timing the backward directly avoids the noise of a difference of
        two timings. Should a provider's graph refuse a second backward, that provider's bwd
        falls back to median(full) - median(fwd) and the row's note says so.
  full  model(x).backward(dy)
Gradients of x and of the trainable parameters are set to None before every timed rep.

Timing: on CUDA `triton.testing.do_bench` (L2 flushed before each rep; median, p20 and p80 of
its per-rep CUDA-event times) after two untimed warm-up steps (Triton autotuning happens
there, outside do_bench's own estimate); on CPU time.perf_counter around each rep.
Peak memory (CUDA only): torch.cuda.max_memory_allocated() during one fwd+bwd minus what was
allocated just before it (weights, x, dy): activations kept for backward, temporaries and
the new gradients. The same figure is written on each mode's row of that provider.
A CUDA out-of-memory error is recorded as "oom" for that provider and case, any other error
as "error" (message in `note`); the run goes on and exits 1 if any "error" was recorded.

Defaults (this module's own command line): Llama-3-8B layer shapes (in, out) 4096x4096, 4096x1024, 4096x14336, 14336x4096,
M in {1, 16, 512, 8192} tokens, r in {8, 16, 64}, bf16 on CUDA (fp32 on CPU).
--quick: tiny shapes for CPU smoke tests (64x96, 96x72; M 1, 37; r 1, 8; fp32; few reps).

    python benchmarks/bench_layers.py --out benchmarks/results/gpu/h100
    python benchmarks/bench_layers.py --quick --out /tmp/bl
    peft-fast bench --layers --preset tiny          # shapes from the bench model instead
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
import traceback
import warnings

import torch
from torch import nn

from ._bench_common import RowWriter, bar_plot, device_name, now, quantiles, save_figure, versions, write_rows

PROVIDERS = ("base", "peft", "peft_fast")
METHODS = ("lora", "dora", "ia3")
MODES = ("fwd", "bwd", "full")
FULL_DEFAULTS = {"shapes": [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)],
                 "tokens": [1, 16, 512, 8192], "ranks": [8, 16, 64]}
QUICK_DEFAULTS = {"shapes": [(64, 96), (96, 72)], "tokens": [1, 37], "ranks": [1, 8]}


class OneLinear(nn.Module):
    """The smallest model holding the layer under test, as attribute `proj`."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.proj = linear

    def forward(self, x):
        return self.proj(x)


def method_label(method: str, ia3_ff: bool) -> str:
    return "ia3_ff" if (method == "ia3" and ia3_ff) else method


def adapter_config(lib, method: str, r: int, ia3_ff: bool):
    if method == "lora":
        return lib.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05, target_modules=["proj"])
    if method == "dora":
        return lib.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, use_dora=True, target_modules=["proj"])
    if method == "ia3":
        return lib.IA3Config(target_modules=["proj"], feedforward_modules=["proj"] if ia3_ff else [])
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


@torch.no_grad()
def randomise_adapters(model: nn.Module, seed: int) -> None:
    """Same random adapter weights for any provider (drawn on CPU in name order, then copied)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if not p.requires_grad or "magnitude" in name:
            continue
        if "lora_A" in name:
            vals = torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1])
        elif "lora_B" in name:
            vals = torch.randn(p.shape, generator=g) * 0.02
        elif "ia3_l" in name:
            vals = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
        else:
            continue
        p.copy_(vals.to(p.dtype))


def build_providers(linear: nn.Linear, method: str, r: int, ia3_ff: bool, libs: dict) -> dict:
    """{provider: model or exception} for one (method, shape, r); models in train() mode.

    libs: {"peft_fast": module} and, when installed, {"peft": module}."""
    models: dict = {}
    base = OneLinear(linear).train()
    base.requires_grad_(False)
    models["base"] = base
    for name in (n for n in ("peft", "peft_fast") if n in libs):
        try:
            m = libs[name].get_peft_model(OneLinear(copy.deepcopy(linear)), adapter_config(libs[name], method, r, ia3_ff))
            randomise_adapters(m, seed=1234)
            models[name] = m.train()
        except Exception as e:  # noqa: BLE001 - recorded per provider, the other providers go on
            models[name] = e
    return models


def trainables(model: nn.Module) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def set_grads_none(tensors) -> None:
    for t in tensors:
        t.grad = None


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, grads, args) -> dict:
    """{'median', 'p20', 'p80'} in ms of fn(), gradients set to None before every rep."""
    if args.device.type == "cuda":
        from triton.testing import do_bench  # only here: the script imports without Triton

        med, p20, p80 = do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms, grad_to_none=grads,
                                 quantiles=[0.5, 0.2, 0.8])
        return {"median": med, "p20": p20, "p80": p80}
    for _ in range(args.warmup):
        set_grads_none(grads)
        fn()
    samples = []
    for _ in range(args.reps):
        set_grads_none(grads)
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    q = quantiles(samples)
    return {"median": q["median"], "p20": q["p20"], "p80": q["p80"]}


def peak_mem_mib(step, grads, device):
    """Extra CUDA memory at the peak of one fwd+bwd over what was allocated before it."""
    if device.type != "cuda":
        return ""
    set_grads_none(grads)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    set_grads_none(grads)
    return round(peak / 2**20, 2)


def retained_backward_works(model, x, dy, grads) -> bool:
    """True when the graph can be run backward twice (the bwd mode needs retain_graph)."""
    try:
        y = model(x)
        y.backward(dy, retain_graph=True)
        y.backward(dy, retain_graph=True)
        return True
    except torch.cuda.OutOfMemoryError:  # a RuntimeError too, but not a replay problem
        raise
    except RuntimeError:
        return False
    finally:
        set_grads_none(grads)


def measure_provider(model, x, dy, modes, args) -> dict:
    """{'times': {mode: stats}, 'mem': MiB or '', 'mode_notes': {mode: str}} for one provider and case."""
    grads = [x] + trainables(model)

    def fwd():
        model(x)

    def full():
        model(x).backward(dy)

    for _ in range(2):  # untimed: Triton autotuning, cuBLAS heuristics, allocator warm-up
        full()
    set_grads_none(grads)
    sync(args.device)
    out = {"times": {}, "mem": peak_mem_mib(full, grads, args.device), "mode_notes": {}}
    for mode in modes:
        if mode == "fwd":
            out["times"][mode] = time_fn(fwd, grads, args)
        elif mode == "full":
            out["times"][mode] = time_fn(full, grads, args)
        elif retained_backward_works(model, x, dy, grads):
            y = model(x)
            out["times"][mode] = time_fn(lambda: y.backward(dy, retain_graph=True), grads, args)
            del y
        else:
            f = out["times"].get("fwd") or time_fn(fwd, grads, args)
            u = out["times"].get("full") or time_fn(full, grads, args)
            out["times"][mode] = {"median": u["median"] - f["median"], "p20": u["p20"] - f["median"],
                                  "p80": u["p80"] - f["median"]}
            out["mode_notes"][mode] = "bwd=full-fwd (graph not replayable)"
    set_grads_none(grads)
    return out


def relative_diff(a: nn.Module, b: nn.Module, x) -> float:
    """max|a(x) - b(x)| / max|b(x)| (only meaningful without dropout), on the timed (grad) path."""
    ya, yb = a(x).detach().float(), b(x).detach().float()
    return float((ya - yb).abs().max() / yb.abs().max().clamp_min(1e-12))


def run_case(models: dict, case: dict, order: list, args) -> list[dict]:
    """Time every provider on one case, interleaved; returns one row per (provider, mode)."""
    dev, dtype = args.device, args.torch_dtype
    g = torch.Generator(device=dev).manual_seed(case["M"])
    x = torch.randn(1, case["M"], case["in"], generator=g, device=dev, dtype=dtype).requires_grad_(True)
    dy = torch.randn(1, case["M"], case["out"], generator=g, device=dev, dtype=dtype)
    results: dict = {}
    for prov in order:
        m = models[prov]
        if isinstance(m, Exception):
            results[prov] = {"status": "error", "note": f"{type(m).__name__}: {m}"[:300]}
            continue
        try:
            results[prov] = {"status": "ok", **measure_provider(m, x, dy, args.modes, args)}
        except torch.cuda.OutOfMemoryError:
            results[prov] = {"status": "oom", "note": "CUDA out of memory"}
        except Exception as e:  # noqa: BLE001 - keep going; the exit code reports it
            traceback.print_exc()
            results[prov] = {"status": "error", "note": f"{type(e).__name__}: {e}"[:300]}
        finally:
            set_grads_none([x] + (trainables(m) if isinstance(m, nn.Module) else []))
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    check = ""
    if case["method"] != "lora" and all(isinstance(models.get(p), nn.Module) for p in ("peft", "peft_fast")):
        try:  # dropout-free methods: both libraries must compute the same function
            check = float(f"{relative_diff(models['peft_fast'], models['peft'], x):.3g}")
        except Exception:  # noqa: BLE001 - a failing check is not a timing failure
            check = "error"
        tol = 1e-4 if args.torch_dtype == torch.float32 else 3e-2
        if check == "error" or check > tol:
            results["peft_fast"]["note"] = (results["peft_fast"].get("note", "") + f" output differs from peft: {check}").strip()
            print(f"warning: {case} peft_fast output differs from peft (rel {check})", file=sys.stderr)
    rows = []
    for mode in args.modes:
        base_t = results.get("base", {}).get("times", {}).get(mode, {}).get("median")
        peft_t = results.get("peft", {}).get("times", {}).get(mode, {}).get("median")
        for prov in args.providers:
            res = results[prov]
            row = {**args.row_meta, "method": case["label"], "in_features": case["in"], "out_features": case["out"],
                   "M": case["M"], "r": case["r"], "dtype": args.dtype, "mode": mode, "provider": prov,
                   "median_ms": res["status"], "p20_ms": res["status"], "p80_ms": res["status"],
                   "ratio_vs_base": "", "speedup_vs_peft": "", "peak_mem_MiB": "",
                   "adapter_dtype": adapter_dtype(models[prov]), "rel_diff_vs_peft": check if prov == "peft_fast" else "",
                   "note": " ".join(filter(None, (res.get("note", ""), res.get("mode_notes", {}).get(mode, ""))))}
            if res["status"] == "ok":
                t = res["times"][mode]
                row.update(median_ms=round(t["median"], 5), p20_ms=round(t["p20"], 5), p80_ms=round(t["p80"], 5),
                           peak_mem_MiB=res["mem"])
                if base_t and base_t > 0:
                    row["ratio_vs_base"] = round(t["median"] / base_t, 4)
                if prov != "base" and peft_t and t["median"] > 0:
                    row["speedup_vs_peft"] = round(peft_t / t["median"], 4)
            rows.append(row)
    return rows


def adapter_dtype(model) -> str:
    if not isinstance(model, nn.Module):
        return ""
    ps = trainables(model)
    return str(ps[0].dtype).replace("torch.", "") if ps else ""


def make_cases(args) -> list[dict]:
    """Cases grouped by (shape, method, r) so one set of models serves every M."""
    cases = []
    for fin, fout in args.shapes:
        for method in args.methods:
            for r in (args.ranks if method != "ia3" else [""]):
                for M in args.tokens:
                    cases.append({"in": fin, "out": fout, "method": method, "label": method_label(method, args.ia3_ff),
                                  "r": r, "M": M})
    return cases


def load_libs() -> dict:
    """{"peft_fast": module, "peft": module}; peft only where it is installed."""
    import peft_fast

    libs = {"peft_fast": peft_fast}
    try:
        import peft

        libs["peft"] = peft
    except ImportError:
        pass
    return libs


def budget_stop(args, elapsed: float, estimate: float, done: int, total: int):
    """Why no further case should start under args.time_budget (None: go on). Stops when the budget
    is spent, or when the next case, estimated to take `estimate` s, would end after it."""
    if not args.time_budget:
        return None
    if elapsed >= args.time_budget:
        return (f"time budget {args.time_budget:g} s spent ({elapsed:.1f} s from the process's start): "
                f"{done} of {total} cases run")
    if elapsed + estimate > args.time_budget:
        return (f"time budget {args.time_budget:g} s: {done} of {total} cases run; the next case, estimated at "
                f"{estimate:.1f} s from the last like it, would end at {elapsed + estimate:.1f} s")
    return None


def run(args, writer=None) -> tuple[list[dict], dict]:
    """Every case; rows also go to writer.add() as each case finishes (writer: a RowWriter or None).

    args.t_start: the time.monotonic() reading --time-budget counts from (default: now)."""
    t_start = getattr(args, "t_start", None)
    if t_start is None:
        t_start = time.monotonic()
    warnings.filterwarnings("ignore")
    libs = load_libs()
    peft_fast = libs["peft_fast"]
    args.providers = tuple(p for p in PROVIDERS if p == "base" or p in libs)
    vers = versions()
    meta = {"device": device_name(), "date": now(), "versions": vers, "dtype": args.dtype,
            "timer": "triton.testing.do_bench" if args.device.type == "cuda" else "time.perf_counter",
            "warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms, "warmup": args.warmup, "reps": args.reps,
            "threads": torch.get_num_threads(), "PEFT_FAST_BACKEND": os.environ.get("PEFT_FAST_BACKEND", ""),
            "bwd": "y.backward(dy, retain_graph=True) timed alone after an untimed forward",
            "peak_mem": "max_memory_allocated during one fwd+bwd minus memory_allocated before it",
            "providers": list(args.providers),
            "note": "" if "peft" in libs else "peft not installed: peft_fast compared with the frozen base layer only"}
    if args.time_budget:
        meta["time_budget_s"] = args.time_budget
        meta["time_budget_clock"] = "from the process's start (imports included)"

    def finalize(m):  # which GEMM path (Triton kernel or cuBLAS composition) each op/shape ran, with timings
        m["path_choices"] = [{**c, "key": list(c["key"])} for c in peft_fast.ops.path_choices()]

    if writer is not None:
        writer.meta.update(meta)
        meta = writer.meta
        writer.finalize = finalize
    args.row_meta = {"date": meta["date"], "device": meta["device"], "torch": vers["torch"], "triton": vers["triton"],
                     "peft": vers["peft"], "peft_fast": vers["peft_fast"]}
    cases = make_cases(args)
    meta["cases_total"] = len(cases)
    try:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(cases), desc="layer cases", leave=False, disable=getattr(args, "no_progress", False))
    except ImportError:
        bar = None
    rows: list[dict] = []
    key, models = None, None
    last_first, last_next = 0.0, 0.0  # durations of the last case that built its models / reused them
    args.current_case = ""
    for i, case in enumerate(cases):
        k = (case["in"], case["out"], case["method"], case["r"])
        why = budget_stop(args, time.monotonic() - t_start, last_first if k != key else last_next, i, len(cases))
        if why:
            meta["truncated"] = why
            meta["status"] = "truncated"
            print(f"warning: {why}", file=sys.stderr)
            break
        t_case = time.monotonic()
        args.current_case = f"case {i + 1} of {len(cases)}: {case['label']} {case['in']}x{case['out']} " \
                            f"M={case['M']} r={case['r']}"
        new_models = k != key
        if new_models:  # a new (shape, method, r): build the three providers once for all M
            models = None
            if args.device.type == "cuda":
                torch.cuda.empty_cache()
            torch.manual_seed(0)
            linear = nn.Linear(case["in"], case["out"], bias=False, device=args.device, dtype=args.torch_dtype)
            try:
                models = build_providers(linear, case["method"], case["r"] or 8, args.ia3_ff, libs)
            except torch.cuda.OutOfMemoryError as e:
                models = {"base": OneLinear(linear).train().requires_grad_(False),
                          **{p: e for p in args.providers if p != "base"}}
            del linear
            key = k
        n = len(args.providers)
        order = list(args.providers[i % n:] + args.providers[: i % n])  # rotate who goes first
        if bar is not None:
            bar.set_postfix_str(f"{case['label']} {case['in']}x{case['out']} M={case['M']} r={case['r']}")
        case_rows = run_case(models, case, order, args)
        rows.extend(case_rows)
        meta["cases_done"] = i + 1
        args.current_case = f"the writing of case {i + 1} of {len(cases)}'s rows (finished)"
        if writer is not None:
            writer.add(case_rows)
        args.current_case = f"nothing: case {i + 1} of {len(cases)} finished, the next not started"
        dt = time.monotonic() - t_case
        if new_models:
            last_first = dt
        else:
            last_next = dt
        if bar is not None:
            bar.update(1)
    args.current_case = ""
    if bar is not None:
        bar.close()
    finalize(meta)
    return rows, meta


def _num(v):
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _ratio(a, b) -> str:
    a, b = _num(a), _num(b)
    return f"{a / b:.3f}" if a is not None and b else "-"


from ._bench_report import print_table_lines  # noqa: E402


def print_table(rows: list[dict], meta: dict) -> None:
    """Ratios per (method, shape, M, r, mode): peft_fast/base, peft/base, peft/peft_fast."""
    by = {}
    for r in rows:
        by.setdefault((r["method"], r["in_features"], r["out_features"], r["M"], r["r"], r["mode"]), {})[r["provider"]] = r
    header = ("method", "in x out", "M", "r", "mode", "base ms", "peft_fast/base", "peft/base", "peft/peft_fast",
              "peak MiB peft -> fast")
    lines = []
    for (method, fin, fout, M, rank, mode), p in by.items():
        b, pe, fa = (p.get(k, {}).get("median_ms", "-") for k in PROVIDERS)
        mem = f"{p['peft']['peak_mem_MiB']} -> {p['peft_fast']['peak_mem_MiB']}" \
            if p.get("peft", {}).get("peak_mem_MiB", "") != "" else "-"
        lines.append((method, f"{fin}x{fout}", str(M), str(rank) or "-", mode,
                      f"{b:.4f}" if _num(b) is not None else str(b), _ratio(fa, b), _ratio(pe, b), _ratio(pe, fa), mem))
    title = f"one adapted linear layer, {meta['dtype']}, {meta['timer']} — {meta['device']}"
    if meta.get("note"):
        title += f"\n({meta['note']})"
    def color(cell):  # peft/peft_fast: green where peft_fast is faster
        sp = _num(float(cell)) if cell != "-" else None
        return cell if sp is None else f"[{'green' if sp > 1.0 else 'red'}]{cell}[/]"

    print_table_lines(title, header, [(*ln[:8], color(ln[8]), ln[9]) for ln in lines], n_left=0)


def ratio_plot(path: str, rows: list[dict], meta: dict) -> bool:
    """fwd+bwd time / frozen base for peft and peft_fast, one panel per method."""
    full = [r for r in rows if r["mode"] == "full" and r["provider"] in ("peft", "peft_fast")]
    if not full:
        return False
    methods = list(dict.fromkeys(r["method"] for r in full))

    def label(r):
        return f"{r['in_features']}x{r['out_features']} M{r['M']}" + (f" r{r['r']}" if r["r"] != "" else "")

    if len(methods) == 1 and len({label(r) for r in full}) <= 12:  # a few bars: the shared grouped-bar helper
        labels = list(dict.fromkeys(label(r) for r in full))
        provs = [p for p in ("peft", "peft_fast") if any(r["provider"] == p for r in full)]
        series = {p: [next((_num(r["ratio_vs_base"]) or math.nan for r in full if r["provider"] == p and label(r) == lb), math.nan)
                      for lb in labels] for p in provs}
        return bar_plot(path, [lb.replace(" M", "\nM") for lb in labels], series,
                        f"{methods[0]}: fwd+bwd / frozen base — {meta['device']}", "x frozen base")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return False
    n_max = max(len({label(r) for r in full if r["method"] == m}) for m in methods)
    fig, axes = plt.subplots(len(methods), 1, figsize=(max(6.0, 0.45 * n_max + 2), 3.2 * len(methods)), squeeze=False)
    for ax, m in zip(axes[:, 0], methods):
        labels = list(dict.fromkeys(label(r) for r in full if r["method"] == m))
        for prov, marker in (("peft", "o"), ("peft_fast", "s")):
            if not any(r["provider"] == prov for r in full):
                continue
            ys = [next((_num(r["ratio_vs_base"]) or math.nan for r in full
                        if r["method"] == m and r["provider"] == prov and label(r) == lb), math.nan) for lb in labels]
            ax.plot(range(len(labels)), ys, marker=marker, lw=1, label=prov)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, fontsize=6, rotation=90)
        ax.set_ylabel("x frozen base")
        ax.set_title(f"{m}: fwd+bwd time / frozen base", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"one adapted linear layer, {meta['dtype']} — {meta['device']}", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return True


def parse_shape(s: str) -> tuple[int, int]:
    try:
        a, b = s.lower().split("x")
        return int(a), int(b)
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {s!r} is not IN x OUT, e.g. 4096x1024") from None


def parse_args(argv=None, prog=None):
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes, fp32, few reps (CPU smoke test)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--ranks", nargs="+", type=int, default=None)
    ap.add_argument("--tokens", nargs="+", type=int, default=None, help="M, the number of tokens")
    ap.add_argument("--shapes", nargs="+", type=parse_shape, default=None, help="INxOUT, e.g. 4096x14336")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="default: bfloat16 on CUDA, float32 on CPU and with --quick")
    ap.add_argument("--ia3-ff", action="store_true", help="IA3: mark the layer as feed-forward (scale its input)")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--warmup-ms", type=float, default=None, help="CUDA: do_bench warm-up time (default 10, quick 5)")
    ap.add_argument("--rep-ms", type=float, default=None, help="CUDA: do_bench timed time (default 50, quick 20)")
    ap.add_argument("--warmup", type=int, default=None, help="CPU: untimed reps (default 3, quick 1)")
    ap.add_argument("--reps", type=int, default=None, help="CPU: timed reps (default 15, quick 5)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's; 1 with --quick on CPU)")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds from the process's start after which no new case starts, nor one that the last "
                         "case like it says would end after them (the rows so far are kept)")
    ap.add_argument("--out", default=None,
                    help="directory for layers.csv (appended), layers.json (both rewritten after every case), "
                         "layers.png (at the end, or at a SIGTERM: the rows so far are written and it exits 143)")
    args = ap.parse_args(argv)
    d = QUICK_DEFAULTS if args.quick else FULL_DEFAULTS
    args.shapes = args.shapes or d["shapes"]
    args.tokens = args.tokens or d["tokens"]
    args.ranks = args.ranks or d["ranks"]
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.dtype is None:
        args.dtype = "bfloat16" if (args.device.type == "cuda" and not args.quick) else "float32"
    args.torch_dtype = getattr(torch, args.dtype)
    for name, full_v, quick_v in (("warmup_ms", 10.0, 5.0), ("rep_ms", 50.0, 20.0), ("warmup", 3, 1), ("reps", 15, 5)):
        if getattr(args, name) is None:
            setattr(args, name, quick_v if args.quick else full_v)
    if args.threads is None and args.quick and args.device.type == "cpu":
        args.threads = 1  # tiny ops: more threads only add synchronisation noise
    bad = [v for v in args.tokens + args.ranks if v < 1]
    if bad:
        ap.error(f"--tokens and --ranks must be >= 1, got {bad}")
    return args


def write_outputs(out_dir: str, rows: list[dict], meta: dict, append: bool) -> list:
    """layers.csv, layers.json and layers.png in out_dir; returns the paths written."""
    csv_path, json_path = write_rows(out_dir, "layers", rows, meta, append=append)
    png = os.path.join(out_dir, "layers.png")
    return [csv_path, json_path] + ([png] if ratio_plot(png, rows, meta) else [])


def count_errors(rows: list[dict]) -> int:
    return sum(r["median_ms"] == "error" for r in rows)


def main(argv=None, prog=None, t0=None) -> list[dict]:
    """The command line of benchmarks/bench_layers.py: rows are appended to <out>/layers.csv, and
    <out>/layers.csv and layers.json are rewritten after every case (a run killed at its cap keeps
    its finished rows; SIGTERM also writes the PNG and exits 143). t0: the time.monotonic() reading
    --time-budget counts from (default: this process's start)."""
    from ._bench_common import process_start

    args = parse_args(argv, prog=prog)
    args.t_start = process_start() if t0 is None else t0
    if args.threads:
        torch.set_num_threads(args.threads)
    writer = RowWriter(args.out, "layers", {}, append=True, plot=ratio_plot, t0=args.t_start) if args.out else None
    if writer is not None:
        writer.install_sigterm(lambda: getattr(args, "current_case", ""))
    try:
        rows, meta = run(args, writer)
    except BaseException:
        if writer is not None:
            writer.finish(status="error")  # the rows so far, with the meta known so far
        raise
    print_table(rows, meta)
    if writer is not None:
        paths = writer.finish()  # the PNG, the path choices in the JSON; puts the SIGTERM handler back
        if rows:
            print("wrote " + ", ".join(paths))
    if count_errors(rows):
        print(f"{count_errors(rows)} row(s) failed with an error (see `note`)", file=sys.stderr)
    return rows


if __name__ == "__main__":
    sys.exit(1 if count_errors(main()) else 0)
