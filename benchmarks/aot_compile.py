"""Compile every Triton kernel of peft_fast for real NVIDIA GPUs, on a machine without one.

Records each kernel's real launch signatures by running the launchers (aot_launches.py), then
compiles every (launch, target, config) the autotuner may pick on that target
(aot_compile_core.py) and reports per row: success or the compiler's error, registers, spill
bytes, shared memory against the target's per-block limit (sm_80 163 KB, sm_86/sm_89/sm_120
99 KB, sm_90 227 KB), and the tensor-core instruction kinds in the PTX against what the launch's
dot operands ask for.

    python benchmarks/aot_compile.py                       # full sweep, all targets and configs
    python benchmarks/aot_compile.py --configs first --check   # the CI subset: fail on problems
    python benchmarks/aot_compile.py --triton-path DIR     # the same with another triton (e.g. 3.6)

Results (--out, default benchmarks/results/aot): aot_<label>.csv (one row per compile),
aot_<label>.json (meta + summary), aot_<label>.md (table), aot_<label>.png (plot).
A compile is cached by Triton (~/.triton/cache): a rerun takes seconds.
Problems: compile (the compiler rejected it), smem (shared memory over the target's limit),
spill (local-memory bytes per thread > 0), no-16bit-mma (a 16-bit dot without 16-bit tensor
cores), tf32-not-allowed (an fp32 dot on tf32 tensor cores while TF32 is off, torch's
default). --check fails on every problem except spills, which fail only with --fail-on-spill.
"""
from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

_LAUNCHES: list = []  # recorded in the parent, inherited by forked workers


def _work(item):
    import warnings

    from aot_compile_core import compile_launch

    warnings.simplefilter("ignore")
    idx, cc, cfg, rank = item
    return compile_launch(_LAUNCHES[idx], cc, cfg, rank).row()


def _run_item(item):
    return _work(item)  # looked up at call time in the (forked) worker


def _crashed(item, why: str) -> dict:
    """The row of a compile whose process died (an LLVM/ptxas abort takes the process with it)."""
    from aot_compile_core import SMEM_LIMIT, Result, config_name

    idx, cc, cfg, rank = item
    launch = _LAUNCHES[idx]
    return Result(kernel=launch.kernel, scenario=launch.scenario, dtype=launch.dtype, target=cc,
                  config=config_name(cfg), config_rank=rank, ok=False, error=why, smem_limit=SMEM_LIMIT.get(cc, 0),
                  problems="compile").row()


def _compile_all(items, jobs: int, on_row) -> None:
    """Compile in forked worker processes. A worker killed by a compiler abort breaks the pool:
    the unfinished items are then compiled one process each, and the one that dies again gets
    a 'compile' row naming the crash, instead of the sweep hanging or dying."""
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    ctx = mp.get_context("fork")
    left = dict(enumerate(items))
    try:
        with ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=ctx) as ex:
            futs = {ex.submit(_run_item, item): i for i, item in left.items()}
            for f in as_completed(futs):
                on_row(f.result())
                left.pop(futs[f])
    except BrokenProcessPool:
        for item in list(left.values()):
            with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as ex:
                try:
                    row = ex.submit(_run_item, item).result()
                except BrokenProcessPool:
                    row = _crashed(item, "compiler process died (abort or signal): see stderr above")
            on_row(row)


def plan(launches, targets, configs: str) -> list:
    """(launch index, target, config, rank) for every compile of the sweep, the autotuner's
    first configs of every target first (a sweep cut short still covers them)."""
    from aot_compile_core import target_configs

    items = []
    for i, launch in enumerate(launches):
        for cc in targets:
            cfgs = target_configs(launch, cc)
            if configs == "first":
                cfgs = cfgs[:1]
            items += [(i, cc, cfg, r) for r, cfg in enumerate(cfgs)]
    return sorted(items, key=lambda it: it[3])


def variants(launches) -> list:
    """One launch per (kernel, constexpr meta-parameters, activation dtype): drops launches that
    differ only in the dtypes of unused pointer slots, alignment or integer specialisation
    (the CI subset; the full sweep keeps every distinct launch)."""
    seen, out = set(), []
    for launch in launches:
        k = (launch.kernel, launch.dtype, tuple(sorted((n, repr(v)) for n, v in launch.kwargs.items())))
        if k not in seen:
            seen.add(k)
            out.append(launch)
    return out


def run_sweep(targets=(80, 86, 89, 90, 120), dtypes=("fp32", "fp16", "bf16"), shapes=("real",), configs="all",
              kernels=None, jobs=1, progress=True, dedupe="launch", tf32=True, partial_csv=None) -> list[dict]:
    """Record the launches and compile them; returns one dict per compile (Result.row()).
    dedupe: 'launch' (every distinct launch signature) or 'variant' (see `variants`).
    Raises ValueError naming an unknown target, dtype, shape set or kernel."""
    from aot_compile_core import SMEM_LIMIT
    from aot_launches import DTYPES, SHAPES

    for what, vals, known in (("target", targets, SMEM_LIMIT), ("dtype", dtypes, DTYPES), ("shape set", shapes, SHAPES)):
        bad = [v for v in vals if v not in known]
        if bad or not vals:
            raise ValueError(f"unknown {what} {bad or vals!r}; known: {', '.join(map(str, known))}")
    from aot_launches import record_launches

    global _LAUNCHES
    os.environ.pop("TRITON_INTERPRET", None)
    _LAUNCHES = record_launches(dtypes=dtypes, shapes=shapes, tf32=tf32)
    if dedupe == "variant":
        _LAUNCHES = variants(_LAUNCHES)
    if kernels:
        known = {launch.kernel for launch in _LAUNCHES}
        if set(kernels) - known:
            raise ValueError(f"unknown kernel(s) {sorted(set(kernels) - known)}; recorded kernels: {', '.join(sorted(known))}")
        _LAUNCHES = [launch for launch in _LAUNCHES if launch.kernel in kernels]
    items = plan(_LAUNCHES, targets, configs)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(items), desc="compiling", unit="kernel", mininterval=2, file=sys.stderr)
    rows = []

    def on_row(row):
        rows.append(row)
        bar and bar.update()
        if partial_csv and len(rows) % 250 == 0:  # a killed sweep keeps what it compiled
            _write_csv(sorted(rows, key=_order), partial_csv)

    _compile_all(items, jobs, on_row)
    bar and bar.close()
    rows.sort(key=_order)
    return rows


def _order(r):
    return (r["kernel"], r["scenario"], r["target"], r["config_rank"])


def _write_csv(rows, path) -> None:
    import csv

    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["kernel"])
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def failures(rows, fail_on_spill: bool = False) -> list[dict]:
    bad = []
    for r in rows:
        probs = set(filter(None, r["problems"].split(";")))
        if not fail_on_spill:
            probs.discard("spill")
        if probs:
            bad.append(r)
    return bad


def summary(rows) -> list[dict]:
    """One line per (kernel, target): compiles, problems, max shared memory/spill, mma kinds."""
    out = {}
    for r in rows:
        s = out.setdefault((r["kernel"], r["target"]), dict(kernel=r["kernel"], target=f"sm_{r['target']}",
                                                             compiles=0, failed=0, smem_over=0, spilling=0,
                                                             no_16bit_mma=0, tf32=0, max_shared_kb=0.0,
                                                             smem_limit_kb=r["smem_limit"] / 1024, max_spill=0,
                                                             max_regs=0, mma=set()))
        s["compiles"] += 1
        p = r["problems"]
        s["failed"] += "compile" in p
        s["smem_over"] += "smem" in p
        s["spilling"] += "spill" in p
        s["no_16bit_mma"] += "no-16bit-mma" in p
        s["tf32"] += "tf32-not-allowed" in p
        s["max_shared_kb"] = max(s["max_shared_kb"], r["shared"] / 1024)
        s["max_spill"] = max(s["max_spill"], r["spill"])
        s["max_regs"] = max(s["max_regs"], r["regs"])
        s["mma"].update(k for k in r["mma"].split(",") if k)
    res = []
    for s in out.values():
        s["mma"] = ",".join(sorted(s["mma"])) or "-"
        s["max_shared_kb"] = round(s["max_shared_kb"], 1)
        res.append(s)
    return res


def _markdown(summ, meta, bad) -> str:
    cols = ["kernel", "target", "compiles", "failed", "smem_over", "spilling", "no_16bit_mma", "tf32", "max_shared_kb",
            "smem_limit_kb", "max_regs", "max_spill", "mma"]
    lines = [f"# Compile-only check: triton {meta['triton']}, {meta['date']}", "",
             f"{meta['compiles']} compiles of {meta['launches']} distinct launches, targets "
             f"{', '.join('sm_%d' % t for t in meta['targets'])}, configs: {meta['configs']}; "
             f"{meta['seconds']:.0f} s with {meta['jobs']} process(es).", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(s[c]) for c in cols) + " |" for s in summ]
    if bad:
        lines += ["", f"## Problems ({len(bad)} rows)", ""]
        lines += [f"- {r['kernel']} sm_{r['target']} {r['config']} [{r['scenario']}]: {r['problems']}"
                  f"{' - ' + r['error'][:200] if r['error'] else ''}" for r in bad[:200]]
    return "\n".join(lines) + "\n"


def _plot(summ, path, title) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kernels = sorted({s["kernel"] for s in summ})
    targets = sorted({s["target"] for s in summ}, key=lambda t: int(t[3:]))
    fig, ax = plt.subplots(figsize=(max(6.5, 1.6 + 1.4 * len(targets)), 1.2 + 0.45 * len(kernels)))
    by = {(s["kernel"], s["target"]): s for s in summ}
    for yi, k in enumerate(kernels):
        for xi, t in enumerate(targets):
            s = by.get((k, t))
            if s is None:
                continue
            frac = s["max_shared_kb"] / s["smem_limit_kb"] if s["smem_limit_kb"] else 0
            n_bad = s["failed"] + s["smem_over"] + s["no_16bit_mma"] + s["tf32"]
            color = "#d62728" if n_bad else ("#ff7f0e" if s["spilling"] else "#2ca02c")
            ax.barh(yi, min(frac, 1.5) * 0.9, left=xi, height=0.6, color=color)
            ax.text(xi + 0.02, yi, f"{s['max_shared_kb']:.0f}K {s['compiles'] - n_bad}/{s['compiles']}", va="center",
                    fontsize=7)
    for xi in range(len(targets) + 1):
        ax.axvline(xi, color="grey", lw=0.5)
    ax.set_yticks(range(len(kernels)), kernels, fontsize=8)
    ax.set_xticks([i + 0.45 for i in range(len(targets))], targets)
    ax.set_title(title + "\nbar: max shared memory / per-block limit; green ok, orange spills, red problems",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(rows, meta, out_dir, label) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"aot_{label}")
    summ = summary(rows)
    bad = failures(rows, meta.get("fail_on_spill", False))
    meta = dict(meta, problems=len(bad), spilling=sum("spill" in r["problems"] for r in rows),
                failed=sum("compile" in r["problems"] for r in rows))
    paths = {}
    _write_csv(rows, stem + ".csv")
    paths["csv"] = stem + ".csv"
    with open(stem + ".json.tmp", "w") as f:
        json.dump({"meta": meta, "summary": summ}, f, indent=1)
    os.replace(stem + ".json.tmp", stem + ".json")
    with open(stem + ".md.tmp", "w") as f:
        f.write(_markdown(summ, meta, bad))
    os.replace(stem + ".md.tmp", stem + ".md")
    _plot(summ, stem + ".png", f"peft_fast kernels, triton {meta['triton']}")
    paths.update(json=stem + ".json", md=stem + ".md", png=stem + ".png")
    return paths


def main(argv=None) -> int:
    from aot_compile_core import SMEM_LIMIT, TARGETS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default=",".join(map(str, TARGETS)),
                    help=f"compute capabilities, comma-separated, of {', '.join(map(str, SMEM_LIMIT))}")
    ap.add_argument("--dtypes", default="fp32,fp16,bf16")
    ap.add_argument("--shapes", default="real", help="shape sets of aot_launches.SHAPES: real, odd (unaligned)")
    ap.add_argument("--configs", choices=("all", "first"), default="all",
                    help="every config the autotuner may pick per target, or only its first")
    ap.add_argument("--kernels", default="", help="only these kernels (comma-separated names)")
    ap.add_argument("--no-tf32", action="store_true", help="skip the fp32 launches recorded with TF32 allowed")
    ap.add_argument("--dedupe", choices=("launch", "variant"), default="launch",
                    help="every distinct launch signature, or one per kernel x meta-parameters x dtype (CI)")
    ap.add_argument("--jobs", type=int, default=max(1, os.cpu_count() or 1))
    ap.add_argument("--out", default=os.path.join(HERE, "results", "aot"))
    ap.add_argument("--label", default="",
                    help="file label (default: triton<version>_<configs>_<shapes>[_variant][_partial])")
    ap.add_argument("--check", action="store_true", help="exit 1 if any problem (spills only with --fail-on-spill)")
    ap.add_argument("--fail-on-spill", action="store_true")
    ap.add_argument("--triton-path", default="",
                    help="run the sweep with the triton installed in this directory (pip install --target DIR)")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    if a.triton_path:
        if not os.path.isdir(os.path.join(a.triton_path, "triton")):
            ap.error(f"--triton-path {a.triton_path!r} holds no triton package (pip install --target DIR triton==X)")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [a.triton_path, os.environ.get("PYTHONPATH")])))
        args = [x for x in (argv if argv is not None else sys.argv[1:])]
        i = args.index("--triton-path") if "--triton-path" in args else None
        args = args[:i] + args[i + 2:] if i is not None else [x for x in args if not x.startswith("--triton-path=")]
        return subprocess.call([sys.executable, os.path.abspath(__file__), *args], env=env)

    import torch
    import triton

    try:
        targets = tuple(int(t) for t in a.targets.split(","))
    except ValueError:
        ap.error(f"--targets {a.targets!r}: expected compute capabilities like 80,86,89,90,120")
    dtypes, shapes = tuple(a.dtypes.split(",")), tuple(a.shapes.split(","))
    kernels = set(filter(None, a.kernels.split(",")))
    partial = bool(kernels) or set(targets) != set(TARGETS) or set(dtypes) != {"fp32", "fp16", "bf16"} or a.no_tf32
    label = a.label or (f"triton{triton.__version__}_{a.configs}_{'-'.join(shapes)}"
                        + (f"_{a.dedupe}" if a.dedupe != "launch" else "") + ("_partial" if partial else ""))
    os.makedirs(a.out, exist_ok=True)
    t0 = time.time()
    try:
        rows = run_sweep(targets=targets, dtypes=dtypes, shapes=shapes, configs=a.configs, kernels=kernels,
                         jobs=a.jobs, progress=not a.no_progress, dedupe=a.dedupe, tf32=not a.no_tf32,
                         partial_csv=os.path.join(a.out, f"aot_{label}.csv"))
    except ValueError as e:
        ap.error(str(e))
    meta = {"triton": triton.__version__, "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "targets": list(targets), "configs": a.configs, "shapes": a.shapes, "dtypes": a.dtypes,
            "compiles": len(rows), "launches": len(_LAUNCHES), "dedupe": a.dedupe, "jobs": a.jobs, "seconds": time.time() - t0,
            "fail_on_spill": a.fail_on_spill}
    paths = write_results(rows, meta, a.out, label)
    bad = failures(rows, a.fail_on_spill)
    with open(paths["md"]) as f:
        print(f.read())
    print(f"results: {', '.join(paths.values())}")
    if a.check and bad:
        print(f"FAILED: {len(bad)} compile(s) with problems (see {paths['md']})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
