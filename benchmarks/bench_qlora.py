"""QLoRA benchmark: peft_fast's fused 4-bit LoRA against peft + bitsandbytes (and our own
bf16 LoRA), in three parts. Targets an H100, bf16, r=16, NF4 (bitsandbytes storage format).

Shapes are Llama-3-8B projections, written IN x OUT as in bench_layers (the NF4 weight is
W[OUT, IN]): 4096x4096 (q/o_proj), 4096x1024 (k/v_proj: W is 1024x4096), 4096x14336
(gate/up_proj), 14336x4096 (down_proj).

Part a, dequant bandwidth. One random weight per shape is quantized by bitsandbytes (NF4,
blocksize 64, with and without double quantization) and expanded back to `dtype`:
  triton     peft_fast.triton_kernels.nf4.nf4_dequantize(op, out=buf)   (buf preallocated)
  bnb        bitsandbytes.functional.dequantize_4bit(packed, quant_state, out=buf)
  torch_ref  nf4_dequantize_ref(op) (allocates; the plain-PyTorch reference)
  GB/s = (bytes read + bytes written) / median time, with bytes read = packed codes + absmax
  (fp32, or the uint8 codes plus the fp32 second-level absmax with double quant) and bytes
  written = OUT*IN*sizeof(dtype); the 16- and 256-entry lookup tables are not counted.
  frac_copy_bw = that GB/s / the device's copy bandwidth, measured first as
  (2 x bytes) / time of dst.copy_(src) on a --copy-mib buffer (1 GiB; row provider "copy").
  Each output is compared with bnb's (max |diff| in rel_diff; bit-exact = 0).
  On CPU the Triton provider runs only under TRITON_INTERPRET=1.

Part b, one layer (x: [1, M, IN], dy: [1, M, OUT], no bias, r=16, lora_alpha=32, lora_dropout
0.05, LoRA A and B randomised, identical across providers; NF4 with double quant):
  bnb_base         the frozen bnb.nn.Linear4bit alone (x requires grad: dx is computed)
  peft_bnb         peft.get_peft_model on that layer (peft's bnb Linear4bit LoRA)
  peft_fast        peft_fast.get_peft_model on the same layer (the fused QLoRA op)
  peft_fast_dense  peft_fast LoRA on a dense nn.Linear in `dtype` (bf16 on CUDA) holding the
                   dequantized weight: the "QLoRA <= 1.15x our bf16 LoRA" target
  Training (train() mode, dropout active), M in --train-tokens (512, 8192), modes as in
  bench_layers: fwd (graph built), bwd (y.backward(dy, retain_graph=True) alone), full
  (fwd+bwd, the headline); gradients set to None before every rep; peak_mem_MiB is the CUDA
  memory at the peak of one fwd+bwd over what was allocated before it.
  Decode (mode "decode"): eval() mode under torch.no_grad(), M in --decode-tokens (1, 4, 16,
  64), the forward alone: bitsandbytes' 4-bit inference path (its gemv kernel at M=1) for
  bnb_base and peft_bnb. Built afresh from the same weight (a bnb eval forward may repack the
  weight on some CPUs). rel_diff = max|y - y_peft_bnb| / max|y_peft_bnb| of that forward.

Part c, one training step of a Llama-3.2-1B-shaped model (LlamaConfig hidden 2048,
intermediate 8192, 16 layers, 32 heads, 8 kv heads, vocab 128256, tied embeddings; random
weights from a fixed seed, built on the device in `dtype`; every nn.Linear except lm_head
swapped for a bnb Linear4bit, NF4 + double quant, compute dtype `dtype`): peft_bnb vs
peft_fast, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear"),
B randomised. A step is model(input_ids, labels).loss.backward(), AdamW.step(),
zero_grad(set_to_none). Each model is built from the same seed (checksums of the 4-bit
weights are compared: meta "c_models_identical"). peak_mem_MiB = max_memory_allocated during
one step (after 2 warm-up steps) minus what was allocated before that model was built: its
weights, adapters, optimizer state and the step's peak. tokens_per_s = batch*seq / median
step time; steps are interleaved between the two models. --grad-ckpt turns on gradient
checkpointing (use_reentrant=False). Default seq 2048 x batch 1.

Timing: CUDA: triton.testing.do_bench (median, p20, p80; L2 flushed) after two untimed calls
(part c: CUDA events around each step); CPU: time.perf_counter. Providers are interleaved
case by case, the order rotated. A CUDA out-of-memory error becomes an "oom" row for that
provider; any other error an "error" row (the run goes on and exits 1).

Output (--out DIR): qlora.csv (rows appended), qlora.json (meta: versions, copy bandwidth,
peft_fast.ops.path_choices(), ...; and the rows), qlora.png (headline ratios). CSV and JSON are
rewritten as each row finishes (a run killed at its cap keeps them; meta "status" says running,
complete, truncated or terminated); the PNG is drawn at the end, or at a SIGTERM (`timeout`), which
writes what there is and exits 143.

Time budget (--time-budget, seconds from the process's start, imports included): parts a and b
start no case after budget - min(90 s, 40%) (the rest is part c's). Part c is skipped, with
"skipped" rows saying what was left, what it needed and where that estimate comes from, when its
estimate does not fit (both models built and warmed up plus one timed step each: a prior per
configuration, C_PRIOR, or --c-min-s); it skips its second model when the first one's measured
setup would not fit what is left, and stops its timed steps (after one each) when the next round
would not. A rich table
prints the headlines: dequant fraction of copy bandwidth; QLoRA / dense LoRA and
peft+bnb / QLoRA at the largest M, fwd+bwd; decode speed-up vs peft+bnb at the smallest M;
part c peak memory and tokens/s, peft_fast vs peft+bnb.

--quick: tiny shapes (64x96, 192x96), M 37 (train) and 1, 4 (decode), r 8, a 2-layer toy
Llama for part c, few reps; fp32 on CPU (default dtype: bf16 on CUDA, fp32 on CPU).
On CPU, bitsandbytes 0.50 cannot take every shape (its dequant kernel needs IN % 64 == 0, its
AVX512-bf16 inference repacking also OUT % 32 == 0): its providers (a: bnb; b: bnb_base,
peft_bnb) get "unsupported" rows whose note says why, instead of errors or wrong numbers.
Needs bitsandbytes (exit code 2 without it); imports without Triton.

    python benchmarks/bench_qlora.py --out benchmarks/results/gpu/h100/qlora
    python benchmarks/bench_qlora.py --quick --out /tmp/bq
"""
from __future__ import annotations

import time

_T_IMPORT = time.monotonic()  # before the heavy imports: --time-budget counts them

import argparse  # noqa: E402
import gc  # noqa: E402
import math
import os
import statistics
import sys  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_layers import (  # noqa: E402  (shared per-layer plumbing)
    OneLinear,
    measure_provider,
    parse_shape,
    randomise_adapters,
    set_grads_none,
    sync,
    time_fn,
    trainables,
)
from bench_qlora_report import num, plot, report  # noqa: E402
from common import device_name, now, versions  # noqa: E402

from peft_fast.cli._bench_common import RowWriter, process_start  # noqa: E402

warnings.filterwarnings("ignore")

LAYER_NAMES = {(4096, 4096): "q/o_proj", (4096, 1024): "k/v_proj", (4096, 14336): "gate/up_proj",
               (14336, 4096): "down_proj"}
FULL = {"shapes": [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)], "train_tokens": [512, 8192],
        "decode_tokens": [1, 4, 16, 64], "rank": 16, "copy_mib": 1024, "c_steps": 8,
        "c_model": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True,
                        max_position_embeddings=131072, rope_theta=500000.0, use_cache=False), "c_seq": 2048}
QUICK = {"shapes": [(64, 96), (192, 96)], "train_tokens": [37], "decode_tokens": [1, 4], "rank": 8, "copy_mib": 16,
         "c_steps": 3,
         "c_model": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True, max_position_embeddings=256,
                         use_cache=False),
         "c_seq": 64}
B_PROVIDERS = ("bnb_base", "peft_bnb", "peft_fast", "peft_fast_dense")
A_PROVIDERS = ("triton", "bnb", "torch_ref")
C_PROVIDERS = ("peft_bnb", "peft_fast")
C_RESERVE_S = 90  # with --time-budget, parts a and b stop this early to leave part c its time
# Part c's time before anything is measured, per provider: "setup" (build the random 4-bit model,
# get_peft_model, 3 untimed steps whose first compiles/autotunes what part b did not) and one timed
# "step". PRIORS, not measurements: the full 1B model on a GPU is a guess (2048 tokens x 1.2B params
# is ~1e13 FLOP a step, well under 0.1 s at H100/H200 rates; 0.5 s leaves room for the 4-bit
# decode, the optimizer and a cold Triton cache); --quick is measured on a 2-core CPU (~0.5 s and
# ~0.03 s). --c-min-s overrides the estimate. Part c also checks the budget as it goes (before the
# second model, with the first one's setup as measured, and before every round of timed steps).
C_PRIOR = {"full_cuda": {"setup_s": 15.0, "step_s": 0.5}, "full_cpu": {"setup_s": 60.0, "step_s": 20.0},
           "quick": {"setup_s": 1.0, "step_s": 0.1}}
COLUMNS = ("date", "device", "torch", "triton", "bitsandbytes", "peft", "transformers", "peft_fast", "part", "mode",
           "shape", "layer", "M", "r", "dtype", "double_quant", "provider", "median_ms", "p20_ms", "p80_ms",
           "GB_per_s", "frac_copy_bw", "speedup_vs_bnb_dequant", "ratio_vs_bnb_base", "ratio_vs_dense_lora",
           "speedup_vs_peft_bnb", "peak_mem_MiB", "mem_ratio_vs_peft_bnb", "tokens_per_s", "rel_diff", "note")
OOM = torch.cuda.OutOfMemoryError


# ------------------------------------------------------------------------------------------ helpers
def mk_row(args, **kw) -> dict:
    row = dict.fromkeys(COLUMNS, "")
    row.update(args.row_meta, dtype=args.dtype)
    for k, v in kw.items():
        if k not in row:
            raise KeyError(k)
        row[k] = v
    return row


def put_times(row: dict, res: dict, t: dict | None) -> dict:
    """median/p20/p80 from timing stats, or the provider's status ('oom', 'error')."""
    if res.get("status", "ok") != "ok" or t is None:
        st = res.get("status", "error")
        row.update(median_ms=st, p20_ms=st, p80_ms=st, note=res.get("note", row["note"]))
    else:
        row.update(median_ms=round(t["median"], 5), p20_ms=round(t["p20"], 5), p80_ms=round(t["p80"], 5))
    return row


def ratio(a, b, nd=4):
    a, b = num(a), num(b)
    return round(a / b, nd) if a is not None and b else ""


def free_cuda(device, collect: bool = True) -> None:
    """Return cached CUDA blocks; gc.collect() (slow with transformers loaded: ~0.1-0.3 s) only
    where models were dropped or an error may have left reference cycles."""
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def err_result(e: BaseException) -> dict:
    if isinstance(e, OOM):
        return {"status": "oom", "note": "CUDA out of memory"}
    return {"status": "error", "note": f"{type(e).__name__}: {e}"[:300]}


def out_of_time(args, reserve: float = 0.0) -> bool:
    return bool(args.time_budget) and time.monotonic() - args.t_start > args.time_budget - reserve


def time_left(args) -> float:
    """Seconds left of --time-budget (counted from the process's start); inf without a budget."""
    return args.time_budget - (time.monotonic() - args.t_start) if args.time_budget else math.inf


def left_text(args, left: float) -> str:
    if left > 0:
        return f"{left:.1f} s left of the {args.time_budget:g} s time budget"
    return f"the {args.time_budget:g} s time budget spent ({args.time_budget - left:.1f} s from the process's start)"


def c_prior(args) -> dict:
    return C_PRIOR["quick" if args.quick else ("full_cuda" if args.device.type == "cuda" else "full_cpu")]


def c_estimate(args) -> tuple[float, float, str]:
    """(seconds part c needs at least: both models set up and one timed step each; seconds for all
    --c-steps; where the numbers come from)."""
    p = c_prior(args)
    n = len(C_PROVIDERS)
    full = n * (p["setup_s"] + args.c_steps * p["step_s"])
    if args.c_min_s is not None:
        return args.c_min_s, max(full, args.c_min_s), f"--c-min-s {args.c_min_s:g}"
    kind = "--quick" if args.quick else f"the full model on {args.device.type}"
    return (n * (p["setup_s"] + p["step_s"]), full,
            f"a prior for {kind} ({p['setup_s']:g} s to build and warm up each model, {p['step_s']:g} s a step), "
            "not measured on this device")


def bnb_cpu_problem(device, model=None, x=None, shape=None):
    """Why bitsandbytes' CPU path cannot run this case (a note for an "unsupported" row), or None:
    `model`'s Linear4bit on input x (part b), or a weight [out, in] = `shape` (part a dequant)."""
    from peft_fast.quant.bnb_state import cpu_forward_problem, cpu_shape_problem

    if device.type != "cpu":
        return None
    if model is None:
        why = cpu_shape_problem(shape, 64, repack=False)
    else:
        layer = next(m for m in model.modules() if type(m).__name__ == "Linear4bit"
                     and type(m).__module__.startswith("bitsandbytes"))
        why = cpu_forward_problem(layer, x)
    return f"bitsandbytes CPU: {why}" if why else None


def lora_config(lib, r: int, target):
    return lib.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05, target_modules=target)


def make_linear4bit(w: torch.Tensor, args, double_quant: bool = True) -> nn.Module:
    """bnb.nn.Linear4bit (no bias, NF4) holding W [out, in]; quantized on the move to the device."""
    import bitsandbytes as bnb

    out_f, in_f = w.shape
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=args.torch_dtype,
                              compress_statistics=double_quant, quant_type="nf4", device="meta")
    # quantizing reads w without changing it (the Params4bit's data is rebound to the packed codes)
    p = bnb.nn.Params4bit(w.detach(), requires_grad=False, quant_type="nf4", compress_statistics=double_quant)
    layer.weight = p.to(args.device)
    layer.quant_state = layer.weight.quant_state
    return layer


def one_linear_4bit(w, args) -> nn.Module:
    m = OneLinear(make_linear4bit(w, args))
    m.is_loaded_in_4bit = True  # peft dispatches its bnb LoRA layer on this flag (as on a from_pretrained model)
    return m


# ------------------------------------------------------------------------------------------ part a
def measure_copy_bw(args) -> dict:
    n = int(args.copy_mib * 2**20)
    src = torch.empty(n, dtype=torch.uint8, device=args.device).random_(0, 255)
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    sync(args.device)
    t = time_fn(lambda: dst.copy_(src), [], args)
    del src, dst
    free_cuda(args.device, collect=False)
    return {"bytes": 2 * n, "GBps": 2 * n / (t["median"] * 1e-3) / 1e9, "times": t}


def nf4_bytes(op, dtype) -> int:
    """Bytes read (packed codes + absmax, + second-level absmax with double quant) + written."""
    n = op.shape[0] * op.shape[1]
    read = op.packed.numel() * op.packed.element_size() + op.absmax.numel() * op.absmax.element_size()
    if op.absmax2 is not None:
        read += op.absmax2.numel() * op.absmax2.element_size() + 4  # + the fp32 offset
    return read + n * torch.empty((), dtype=dtype).element_size()


def run_part_a(args, rows: list, meta: dict) -> None:
    import bitsandbytes as bnb

    from peft_fast.quant import nf4_from_bnb
    from peft_fast.triton_kernels.nf4 import nf4_dequantize, nf4_dequantize_ref

    providers = list(A_PROVIDERS)
    if args.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        providers.remove("triton")
        meta["a_skipped"] = "triton: no CUDA device (set TRITON_INTERPRET=1 to run it through the interpreter)"
        print(f"part a: skipping {meta['a_skipped']}", file=sys.stderr)
    copy = measure_copy_bw(args)
    meta["copy_bandwidth_GBps"] = round(copy["GBps"], 2)
    meta["copy_bandwidth"] = f"(read+write bytes) / median time of dst.copy_(src), {args.copy_mib:g} MiB uint8"
    rows.append(put_times(mk_row(args, part="a", mode="copy", shape=f"{args.copy_mib:g}MiB", provider="copy",
                                 GB_per_s=round(copy["GBps"], 2), frac_copy_bw=1.0,
                                 note="reference: (read+write)/time of Tensor.copy_"), {}, copy["times"]))
    bw = copy["GBps"]
    i = 0
    for fin, fout in args.shapes:
        for dq in args.double_quant:
            if out_of_time(args, args.c_reserve):
                meta.setdefault("truncated", []).append(f"part a stopped at {fin}x{fout} dq={dq}: time budget")
                return
            res, ref, bufs, notes = {}, None, {}, {}
            try:
                g = torch.Generator(device=args.device).manual_seed(fin * 7 + fout)
                w = torch.randn(fout, fin, generator=g, device=args.device, dtype=args.torch_dtype) * 0.02
                p = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=bool(dq))
                p = p.to(args.device)
                del w
                q = nf4_from_bnb(p)
                op = q.operand()
                nbytes = nf4_bytes(op, args.torch_dtype)
                bufs = {k: torch.empty(fout, fin, device=args.device, dtype=args.torch_dtype)
                        for k in ("triton", "bnb")}
                fns = {"triton": lambda: nf4_dequantize(op, out=bufs["triton"]),
                       "bnb": lambda: bnb.functional.dequantize_4bit(p.data, p.quant_state, out=bufs["bnb"]),
                       "torch_ref": lambda: nf4_dequantize_ref(op)}
                why = bnb_cpu_problem(args.device, shape=(fout, fin))
                if why:  # bitsandbytes would misread this weight: compare with the (bit-exact) reference
                    res["bnb"] = {"status": "unsupported", "note": why}
                    print(f"part a: bnb {fin}x{fout} unsupported: {why}", file=sys.stderr)
                    ref = fns["torch_ref"]().clone()
                    notes.update(triton="diff vs torch_ref", torch_ref="diff vs torch_ref")
                else:
                    try:
                        ref = fns["bnb"]().clone()
                    except NotImplementedError:  # bitsandbytes' CPU backend has no out= variant: it allocates
                        fns["bnb"] = lambda: bnb.functional.dequantize_4bit(p.data, p.quant_state)
                        ref = fns["bnb"]().clone()
                        notes["bnb"] = "allocates its output (no out= kernel on this device)"
            except Exception as e:  # noqa: BLE001 - the case fails, the run goes on
                traceback.print_exc()
                res = {k: res.get(k) or err_result(e) for k in providers}
            order = providers[i % len(providers):] + providers[:i % len(providers)]
            i += 1
            for prov in order:
                if prov in res:
                    continue
                try:
                    for _ in range(2):  # untimed: Triton autotuning, allocator warm-up
                        out = fns[prov]()
                    sync(args.device)
                    diff = float((out.float() - ref.float()).abs().max())
                    del out
                    res[prov] = {"status": "ok", "t": time_fn(fns[prov], [], args), "diff": diff}
                except Exception as e:  # noqa: BLE001
                    if not isinstance(e, OOM):
                        traceback.print_exc()
                    res[prov] = err_result(e)
                free_cuda(args.device, collect=res[prov]["status"] != "ok")
            bnb_t = res.get("bnb", {}).get("t", {}).get("median")
            for prov in providers:
                r = res[prov]
                row = put_times(mk_row(args, part="a", mode="dequant", shape=f"{fin}x{fout}",
                                       layer=LAYER_NAMES.get((fin, fout), ""), double_quant=int(bool(dq)),
                                       provider=prov), r, r.get("t"))
                if r["status"] == "ok":
                    gbs = nbytes / (r["t"]["median"] * 1e-3) / 1e9
                    row.update(GB_per_s=round(gbs, 2), frac_copy_bw=round(gbs / bw, 4),
                               speedup_vs_bnb_dequant=ratio(bnb_t, r["t"]["median"]), rel_diff=r["diff"],
                               note="; ".join(filter(None, (f"{nbytes} bytes moved", notes.get(prov, ""),
                                                            "" if r["diff"] == 0 else "NOT bit-exact vs bnb"))))
                rows.append(row)
            del bufs, ref
            fns = op = p = q = None  # noqa: F841 - release the case's tensors before the next
            free_cuda(args.device, collect=False)


# ------------------------------------------------------------------------------------------ part b
def build_b(w, args, libs: dict, train: bool) -> dict:
    """{provider: model or exception}, all from the dense weight w [out, in]."""
    import bitsandbytes as bnb

    models: dict = {}
    base = one_linear_4bit(w, args).requires_grad_(False)
    models["bnb_base"] = base.train(train)
    for prov in ("peft_bnb", "peft_fast"):
        lib = libs["peft" if prov == "peft_bnb" else "peft_fast"]
        try:
            if isinstance(lib, Exception):
                raise lib
            m = lib.get_peft_model(one_linear_4bit(w, args), lora_config(lib, args.rank, ["proj"]))
            randomise_adapters(m, seed=1234)
            models[prov] = m.train(train)
        except Exception as e:  # noqa: BLE001 - recorded per provider
            models[prov] = e
    try:
        lw = base.proj.weight
        dense = nn.Linear(w.shape[1], w.shape[0], bias=False, device=args.device, dtype=args.torch_dtype)
        with torch.no_grad():
            dense.weight.copy_(bnb.functional.dequantize_4bit(lw.data, lw.quant_state))
        m = libs["peft_fast"].get_peft_model(OneLinear(dense), lora_config(libs["peft_fast"], args.rank, ["proj"]))
        randomise_adapters(m, seed=1234)
        models["peft_fast_dense"] = m.train(train)
    except Exception as e:  # noqa: BLE001
        models["peft_fast_dense"] = e
    for prov, want in (("peft_bnb", "peft.tuners.lora.bnb.Linear4bit"),
                       ("peft_fast", "peft_fast.tuners.lora.bnb.Linear4bit")):
        if isinstance(models[prov], nn.Module):
            cls = type(models[prov].base_model.model.proj)
            if f"{cls.__module__}.{cls.__name__}" != want:
                args.b_notes[prov] = f"layer is {cls.__module__}.{cls.__name__}, not {want}"
    return models


def b_rows(args, results: dict, modes, shape, M) -> list:
    fin, fout = shape
    out = []
    for mode in modes:
        t = {p: results[p].get("times", {}).get(mode, {}).get("median") for p in B_PROVIDERS}
        for prov in B_PROVIDERS:
            r = results[prov]
            tm = r.get("times", {}).get(mode)
            row = put_times(mk_row(args, part="b", mode=mode, shape=f"{fin}x{fout}",
                                   layer=LAYER_NAMES.get((fin, fout), ""), M=M, r=args.rank if prov != "bnb_base" else "",
                                   double_quant=1, provider=prov), r, tm)
            if r["status"] == "ok" and tm:
                row.update(ratio_vs_bnb_base=ratio(tm["median"], t["bnb_base"]),
                           ratio_vs_dense_lora=ratio(tm["median"], t["peft_fast_dense"]),
                           speedup_vs_peft_bnb=ratio(t["peft_bnb"], tm["median"]),
                           peak_mem_MiB=r.get("mem", ""), rel_diff=r.get("rel_diff", {}).get(mode, ""),
                           note=" ".join(filter(None, (args.b_notes.get(prov, ""), r.get("mode_notes", {}).get(mode, "")))))
            out.append(row)
    return out


def run_part_b(args, libs: dict, rows: list, meta: dict) -> None:
    dev, dt = args.device, args.torch_dtype
    i = 0
    for fin, fout in args.shapes:
        if out_of_time(args, args.c_reserve):
            meta.setdefault("truncated", []).append(f"part b stopped before {fin}x{fout}: time budget")
            return
        g = torch.Generator(device=dev).manual_seed(fin + 3 * fout)
        w = torch.randn(fout, fin, generator=g, device=dev, dtype=dt) / math.sqrt(fin)
        args.b_notes = {}
        for phase in ("train", "decode"):
            tokens = args.train_tokens if phase == "train" else args.decode_tokens
            modes = args.modes if phase == "train" else ["decode"]
            if not tokens or (phase == "train" and not modes):
                continue
            try:
                models = build_b(w, args, libs, train=phase == "train")
            except Exception as e:  # noqa: BLE001 - even the frozen base failed (e.g. OOM)
                models = {p: e for p in B_PROVIDERS}
            for M in tokens:
                if out_of_time(args, args.c_reserve):
                    meta.setdefault("truncated", []).append(f"part b stopped at {fin}x{fout} {phase} M={M}")
                    break
                gx = torch.Generator(device=dev).manual_seed(M)
                x = torch.randn(1, M, fin, generator=gx, device=dev, dtype=dt).requires_grad_(phase == "train")
                dy = torch.randn(1, M, fout, generator=gx, device=dev, dtype=dt)
                order = list(B_PROVIDERS[i % 4:] + B_PROVIDERS[:i % 4])
                i += 1
                results = {}
                for prov in order:
                    m = models[prov]
                    if isinstance(m, Exception):
                        results[prov] = err_result(m)
                        continue
                    why = bnb_cpu_problem(dev, m, x) if prov in ("bnb_base", "peft_bnb") else None
                    if why:
                        results[prov] = {"status": "unsupported", "note": why}
                        print(f"part b: {prov} {fin}x{fout} {phase} M={M} unsupported: {why}", file=sys.stderr)
                        continue
                    try:
                        if phase == "train":
                            results[prov] = {"status": "ok", **measure_provider(m, x, dy, modes, args)}
                        else:
                            results[prov] = {"status": "ok", "times": {"decode": measure_decode(m, x, args)}}
                    except Exception as e:  # noqa: BLE001
                        if not isinstance(e, OOM):
                            traceback.print_exc()
                        results[prov] = err_result(e)
                    finally:
                        set_grads_none([x] + (trainables(m) if isinstance(m, nn.Module) else []))
                        free_cuda(dev, collect=results.get(prov, {}).get("status") != "ok")
                if phase == "decode":
                    add_decode_diffs(models, results, x)
                rows.extend(b_rows(args, results, modes, (fin, fout), M))
                del x, dy
            del models
            free_cuda(dev)
        del w


def measure_decode(model, x, args) -> dict:
    def fwd():
        with torch.no_grad():
            model(x)

    fwd()
    fwd()
    sync(args.device)
    return time_fn(fwd, [], args)


def add_decode_diffs(models, results, x) -> None:
    ref = models.get("peft_bnb")
    if not isinstance(ref, nn.Module) or results.get("peft_bnb", {}).get("status") != "ok":
        return
    with torch.no_grad():
        yr = ref(x).float()
        den = yr.abs().max().clamp_min(1e-12)
        for prov in ("peft_fast", "peft_fast_dense"):
            if isinstance(models.get(prov), nn.Module) and results[prov]["status"] == "ok":
                d = float((models[prov](x).float() - yr).abs().max() / den)
                results[prov]["rel_diff"] = {"decode": float(f"{d:.3g}")}


# ------------------------------------------------------------------------------------------ part c
def build_llama_4bit(args, seed: int) -> nn.Module:
    """Llama-shaped causal LM with random weights; every nn.Linear but lm_head -> bnb NF4 (double quant)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**args.c_model)
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(args.torch_dtype)
    try:
        with torch.device(args.device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    model.requires_grad_(False)
    for pname, parent in list(model.named_modules()):
        for cname, child in list(parent.named_children()):
            full = f"{pname}.{cname}" if pname else cname
            if type(child) is nn.Linear and full != "lm_head":
                setattr(parent, cname, make_linear4bit(child.weight.data, args))
                del child
    model.is_loaded_in_4bit = True  # what from_pretrained(quantization_config=...) sets; peft dispatches on it
    model.is_quantized = True
    model.quantization_method = "bitsandbytes"
    free_cuda(args.device)
    return model


def quant_checksum(model) -> tuple:
    sums = []
    for name, m in sorted(model.named_modules(), key=lambda t: t[0]):
        if type(m).__name__ == "Linear4bit" and hasattr(m.weight, "quant_state"):
            w = m.weight
            sums.append(int(w.data.view(torch.uint8).sum(dtype=torch.int64)))
            sums.append(round(float(w.quant_state.absmax.float().sum()), 3))
    return tuple(sums)


def run_part_c(args, libs: dict, rows: list, meta: dict) -> None:
    dev = args.device
    ntok = args.c_batch * args.c_seq
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, args.c_model["vocab_size"], (args.c_batch, args.c_seq), generator=g).to(dev)
    meta["c_config"] = {**args.c_model, "seq": args.c_seq, "batch": args.c_batch, "dtype": args.dtype,
                        "gradient_checkpointing": args.grad_ckpt, "lora": f"r={args.rank} alpha={2 * args.rank} "
                        "dropout=0.05 all-linear", "optimizer": "AdamW(lr=1e-4)", "4bit": "nf4, double quant"}
    shape = f"llama h{args.c_model['hidden_size']} L{args.c_model['num_hidden_layers']} " \
            f"v{args.c_model['vocab_size']} seq{args.c_seq}xb{args.c_batch}"
    mode = "train_step" + ("_gc" if args.grad_ckpt else "")
    need, full_est, source = c_estimate(args)
    left = time_left(args)
    meta["c_estimate"] = {"min_s": round(need, 1), "all_steps_s": round(full_est, 1), "from": source}
    if need > left:  # would not fit: say so in the rows instead of being killed at the cap
        why = (f"skipped: {left_text(args, left)}, part c needs an "
               f"estimated {need:.1f} s (both models built and warmed up, one timed step each; {full_est:.1f} s "
               f"with {args.c_steps} steps), from {source}")
        meta["c_skipped"] = why
        print(f"part c: {why}", file=sys.stderr)
        for prov in C_PROVIDERS:
            rows.append(mk_row(args, part="c", mode=mode, shape=shape, layer="all-linear", M=ntok, r=args.rank,
                               double_quant=1, provider=prov, median_ms="skipped", p20_ms="skipped",
                               p80_ms="skipped", note=why))
        return
    state, res, checks = {}, {}, {}
    setup_s: dict = {}
    for prov in C_PROVIDERS:
        lib = libs["peft" if prov == "peft_bnb" else "peft_fast"]
        if setup_s:  # the next model's setup, as the last one's was measured, and one step of each
            est = max(setup_s.values()) + (len(state) + 1) * c_prior(args)["step_s"]
            left = time_left(args)
            if est > left:
                why = (f"skipped: {left_text(args, left)}; building and "
                       f"warming up this model is estimated at {max(setup_s.values()):.1f} s (measured: "
                       + ", ".join(f"{k} {v:.1f} s" for k, v in setup_s.items()) + ")")
                print(f"part c: {prov} {why}", file=sys.stderr)
                res[prov] = {"status": "skipped", "note": why}
                continue
        t_setup = time.monotonic()
        free_cuda(dev)
        base_bytes = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
        try:
            if isinstance(lib, Exception):
                raise lib
            model = build_llama_4bit(args, seed=0)
            checks[prov] = quant_checksum(model)
            meta["c_attn_implementation"] = getattr(model.config, "_attn_implementation", None)
            if args.grad_ckpt:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model = lib.get_peft_model(model, lora_config(lib, args.rank, "all-linear"))
            randomise_adapters(model, seed=4321)
            model.train()
            params = trainables(model)
            opt = torch.optim.AdamW(params, lr=1e-4)
            st = {"model": model, "opt": opt, "n_params": sum(p.numel() for p in params)}
            for _ in range(2):  # untimed: path choices, autotuning, optimizer state
                c_step(st, ids)
            sync(dev)
            if dev.type == "cuda":
                static = torch.cuda.memory_allocated(dev) - base_bytes
                torch.cuda.reset_peak_memory_stats(dev)
                c_step(st, ids)
                torch.cuda.synchronize(dev)
                st["peak_MiB"] = round((torch.cuda.max_memory_allocated(dev) - base_bytes) / 2**20, 1)
                st["static_MiB"] = round(static / 2**20, 1)
            state[prov] = st
            res[prov] = {"status": "ok", "samples": []}
            setup_s[prov] = time.monotonic() - t_setup
        except Exception as e:  # noqa: BLE001 - OOM or error for this provider only
            if not isinstance(e, OOM):
                traceback.print_exc()
            res[prov] = err_result(e)
            state.pop(prov, None)
            model = opt = st = None  # noqa: F841
            free_cuda(dev)
    if len(checks) == 2:
        meta["c_models_identical"] = checks["peft_bnb"] == checks["peft_fast"]
    meta["c_setup_s"] = {k: round(v, 1) for k, v in setup_s.items()}
    t_round = 0.0
    for k in range(args.c_steps):  # interleaved, the order alternating
        if k and state and t_round > time_left(args):  # one step of each at least; then only rounds that fit
            meta["c_truncated"] = (f"{k} of {args.c_steps} timed steps per model: the next round (~{t_round:.1f} s) "
                                   f"would end after the {args.time_budget:g} s time budget")
            print(f"part c: {meta['c_truncated']}", file=sys.stderr)
            break
        t0 = time.monotonic()
        order = list(state) if k % 2 == 0 else list(reversed(state))
        for prov in order:
            try:
                res[prov]["samples"].append(timed_step(state[prov], ids, dev))
            except Exception as e:  # noqa: BLE001
                if not isinstance(e, OOM):
                    traceback.print_exc()
                res[prov] = err_result(e)
                state.pop(prov)
                free_cuda(dev)
        t_round = time.monotonic() - t0
    stats = {}
    for prov in C_PROVIDERS:
        s = res[prov].get("samples")
        if s:
            q = sorted(s)
            stats[prov] = {"median": statistics.median(q), "p20": q[int(0.2 * (len(q) - 1))],
                           "p80": q[math.ceil(0.8 * (len(q) - 1))]}
    for prov in C_PROVIDERS:
        st = state.get(prov, {})
        t = stats.get(prov)
        row = put_times(mk_row(args, part="c", mode=mode, shape=shape,
                               layer="all-linear", M=ntok, r=args.rank, double_quant=1, provider=prov),
                        res[prov] if t or res[prov]["status"] != "ok" else {"status": "error", "note": "no step timed"}, t)
        if t:
            peak = st.get("peak_MiB", "")
            ref_peak = state.get("peft_bnb", {}).get("peak_MiB")
            row.update(tokens_per_s=round(ntok / (t["median"] * 1e-3), 1),
                       speedup_vs_peft_bnb=ratio(stats.get("peft_bnb", {}).get("median"), t["median"]),
                       peak_mem_MiB=peak, mem_ratio_vs_peft_bnb=ratio(peak, ref_peak),
                       note=f"{st['n_params']} trainable params; {len(res[prov]['samples'])} steps"
                       + (f" (of {args.c_steps}: time budget)" if "c_truncated" in meta else "")
                       + (f"; weights+adapters+optimizer {st['static_MiB']} MiB" if "static_MiB" in st else ""))
        rows.append(row)
    state.clear()
    free_cuda(dev)


def c_step(st, ids) -> None:
    out = st["model"](input_ids=ids, labels=ids)
    out.loss.backward()
    st["opt"].step()
    st["opt"].zero_grad(set_to_none=True)


def timed_step(st, ids, dev) -> float:
    if dev.type == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(dev)
        a.record()
        c_step(st, ids)
        b.record()
        torch.cuda.synchronize(dev)
        return a.elapsed_time(b)
    t0 = time.perf_counter()
    c_step(st, ids)
    return (time.perf_counter() - t0) * 1e3


# ------------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes and model, few reps (CPU smoke test)")
    ap.add_argument("--parts", nargs="+", default=["a", "b", "c"], choices=["a", "b", "c"])
    ap.add_argument("--shapes", nargs="+", type=parse_shape, default=None, help="INxOUT (parts a, b)")
    ap.add_argument("--double-quant", nargs="+", type=int, default=[0, 1], choices=[0, 1], help="part a")
    ap.add_argument("--train-tokens", nargs="*", type=int, default=None, help="part b training M (512 8192)")
    ap.add_argument("--decode-tokens", nargs="*", type=int, default=None, help="part b decode M (1 4 16 64)")
    ap.add_argument("--modes", nargs="*", default=["fwd", "bwd", "full"], choices=["fwd", "bwd", "full"],
                    help="part b training modes")
    ap.add_argument("--rank", type=int, default=None, help="LoRA r (16; quick 8); lora_alpha = 2r")
    ap.add_argument("--copy-mib", type=float, default=None, help="part a copy-bandwidth buffer (1024; quick 16)")
    ap.add_argument("--c-seq", type=int, default=None, help="part c sequence length (2048; quick 64)")
    ap.add_argument("--c-batch", type=int, default=1)
    ap.add_argument("--c-layers", type=int, default=None, help="part c decoder layers (16)")
    ap.add_argument("--c-steps", type=int, default=None, help="part c timed steps per provider (8; quick 3)")
    ap.add_argument("--grad-ckpt", action="store_true", help="part c: gradient checkpointing (use_reentrant=False)")
    ap.add_argument("--c-min-s", type=float, default=None,
                    help="with --time-budget: seconds part c needs at least (both models set up, one step each); "
                         "it is skipped, with the reason in its rows, when less is left. Default: a prior "
                         "(C_PRIOR: full model on CUDA 2 x (15 s + 0.5 s); --quick 2 x (1 s + 0.1 s))")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                    help="default bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--warmup-ms", type=float, default=None, help="CUDA do_bench warm-up (10; quick 5)")
    ap.add_argument("--rep-ms", type=float, default=None, help="CUDA do_bench timed time (50; quick 20)")
    ap.add_argument("--warmup", type=int, default=None, help="CPU untimed reps (3; quick 1)")
    ap.add_argument("--reps", type=int, default=None, help="CPU timed reps (15; quick 5)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (quick on CPU: 1)")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds from the process's start after which no new case starts; parts a, b stop "
                         f"min({C_RESERVE_S} s, 40%%) early for part c, which is skipped (rows say why) when its "
                         "estimate does not fit and stops its timed steps when the next round would not")
    ap.add_argument("--out", default=None,
                    help="directory for qlora.csv (appended), qlora.json (both rewritten as rows finish), qlora.png "
                         "(at the end, or at a SIGTERM: the rows so far are written and it exits 143)")
    args = ap.parse_args(argv)
    d = QUICK if args.quick else FULL
    args.shapes = args.shapes or d["shapes"]
    args.train_tokens = d["train_tokens"] if args.train_tokens is None else args.train_tokens
    args.decode_tokens = d["decode_tokens"] if args.decode_tokens is None else args.decode_tokens
    args.rank = args.rank or d["rank"]
    args.copy_mib = args.copy_mib or d["copy_mib"]
    args.c_seq = args.c_seq or d["c_seq"]
    args.c_steps = args.c_steps or d["c_steps"]
    args.c_model = dict(d["c_model"])
    if args.c_layers:
        args.c_model["num_hidden_layers"] = args.c_layers
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.dtype = args.dtype or ("bfloat16" if args.device.type == "cuda" else "float32")
    args.torch_dtype = getattr(torch, args.dtype)
    for name, full_v, quick_v in (("warmup_ms", 10.0, 5.0), ("rep_ms", 50.0, 20.0), ("warmup", 3, 1), ("reps", 15, 5)):
        if getattr(args, name) is None:
            setattr(args, name, quick_v if args.quick else full_v)
    if args.threads is None and args.quick and args.device.type == "cpu":
        args.threads = 1
    bad = [v for v in args.train_tokens + args.decode_tokens + [args.rank, args.c_seq, args.c_batch, args.c_steps]
           if v < 1]
    if bad:
        ap.error(f"token counts, --rank, --c-seq, --c-batch and --c-steps must be >= 1, got {bad}")
    args.c_reserve = min(C_RESERVE_S, 0.4 * args.time_budget) if ("c" in args.parts and args.time_budget) else 0.0
    return args


def run(args) -> tuple[list, dict]:
    import peft_fast

    libs = {"peft_fast": peft_fast}
    try:
        import peft

        libs["peft"] = peft
    except Exception as e:  # noqa: BLE001 - the peft_bnb provider becomes "error" rows
        libs["peft"] = e
    vers = versions()
    import bitsandbytes

    vers["bitsandbytes"] = bitsandbytes.__version__
    meta = {"device": device_name(), "date": now(), "versions": vers, "dtype": args.dtype, "rank": args.rank,
            "timer": "triton.testing.do_bench" if args.device.type == "cuda" else "time.perf_counter",
            "warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms, "warmup": args.warmup, "reps": args.reps,
            "threads": torch.get_num_threads(), "parts": args.parts, "quick": args.quick,
            "PEFT_FAST_BACKEND": os.environ.get("PEFT_FAST_BACKEND", ""),
            "PEFT_FAST_GEMM": os.environ.get("PEFT_FAST_GEMM", ""),
            "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", ""),
            "peak_mem_b": "max_memory_allocated during one fwd+bwd minus memory_allocated before it",
            "peak_mem_c": "max_memory_allocated during one step minus memory_allocated before the model was built"}
    if args.device.type == "cuda":
        p = torch.cuda.get_device_properties(args.device)
        meta["device_props"] = {"sms": p.multi_processor_count, "memory_GiB": round(p.total_memory / 2**30, 1)}
    args.row_meta = {"date": meta["date"], "device": meta["device"],
                     **{k: vers.get(k) for k in ("torch", "triton", "bitsandbytes", "peft", "transformers", "peft_fast")}}
    if getattr(args, "t_start", None) is None:
        args.t_start = time.monotonic()
    if args.time_budget:
        meta["time_budget_s"] = args.time_budget
        meta["time_budget_clock"] = "from the process's start (imports included)"
    writer = getattr(args, "writer", None)
    if writer is not None:
        writer.meta.update(meta)
        meta = writer.meta
        writer.finalize = add_path_choices
    rows: list = LiveRows(writer)
    for part, fn in (("a", lambda: run_part_a(args, rows, meta)), ("b", lambda: run_part_b(args, libs, rows, meta)),
                     ("c", lambda: run_part_c(args, libs, rows, meta))):
        if part not in args.parts:
            continue
        t0 = time.monotonic()
        args.current_part = f"part {part}"
        print(f"== part {part}", file=sys.stderr)
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - a part that breaks outside a provider: one error row
            traceback.print_exc()
            rows.append(mk_row(args, part=part, provider="-", median_ms="error", p20_ms="error", p80_ms="error",
                               note=f"{type(e).__name__}: {e}"[:300]))
        meta.setdefault("part_seconds", {})[part] = round(time.monotonic() - t0, 1)
        free_cuda(args.device)
    args.current_part = ""
    add_path_choices(meta)
    if meta.get("truncated") or meta.get("c_skipped") or meta.get("c_truncated"):
        meta["status"] = "truncated"
    return list(rows), meta


def add_path_choices(meta: dict) -> None:
    import peft_fast

    try:
        import json  # the records hold tuples and may hold dtypes: JSON-safe copies

        meta["path_choices"] = json.loads(json.dumps(peft_fast.ops.path_choices(), default=str))
    except Exception as e:  # noqa: BLE001
        meta["path_choices"] = f"unavailable: {type(e).__name__}: {e}"


class LiveRows(list):
    """The run's rows; each one appended also goes to the writer (CSV and JSON rewritten), so a
    run killed at its cap keeps every finished row."""

    def __init__(self, writer=None):
        super().__init__()
        self.writer = writer

    def append(self, row) -> None:
        super().append(row)
        if self.writer is not None:
            self.writer.add([row])

    def extend(self, rows) -> None:
        rows = list(rows)
        super().extend(rows)
        if self.writer is not None:
            self.writer.add(rows)


def main(argv=None) -> list:
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # noqa: BLE001
        print(f"bench_qlora needs bitsandbytes ({type(e).__name__}: {e}). Install it (pip install bitsandbytes); on "
              "the GPU machine carry the wheel in wheels/ (see benchmarks/gpu_suite.sh).", file=sys.stderr)
        sys.exit(2)
    args = parse_args(argv)
    # --time-budget counts from the process's start when run as a script, else from this module's import
    args.t_start = process_start() if __name__ == "__main__" else _T_IMPORT
    if args.threads:
        torch.set_num_threads(args.threads)
    args.writer = None
    if args.out:
        args.writer = RowWriter(args.out, "qlora", {}, append=True, t0=args.t_start,
                                plot=lambda path, rows, meta: plot(path, rows, args, meta))
        args.writer.install_sigterm(lambda: getattr(args, "current_part", ""))
    try:
        rows, meta = run(args)
    except BaseException:
        if args.writer is not None:
            args.writer.finish(status="error")  # the rows so far, with the meta known so far
        raise
    report(rows, meta, args)
    if args.writer is not None:
        paths = args.writer.finish()  # the PNG, the path choices; puts the SIGTERM handler back
        if rows:
            print("wrote " + ", ".join(paths))
    errors = [r for r in rows if r["median_ms"] == "error"]
    if errors:
        print(f"{len(errors)} row(s) failed with an error (see `note`)", file=sys.stderr)
    return rows


if __name__ == "__main__":
    sys.exit(1 if any(r["median_ms"] == "error" for r in main()) else 0)
