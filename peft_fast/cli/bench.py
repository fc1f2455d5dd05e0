"""`peft-fast bench`: the same training workload with peft_fast and with real peft, side by side.

One process, the providers alternating step by step after a warm-up: the frozen base model,
and for each method its peft and peft_fast models (the frozen weights shared). Reported per
method: train-step tokens/s, forward-only tokens/s, peak memory, peft_fast/peft and the ratio
to the frozen base model; `mixed` adds N LoRA adapters in one batch (adapter_names). Without
peft installed, peft_fast is compared with the frozen base model only. It calls the public API
(get_peft_model, ...), so whatever kernels peft_fast has are the ones measured.

Model: a Llama-architecture config built in code (no download), chosen by device: `1b`
(Llama-3.2-1B-like, bf16, batch 4 x seq 512) on CUDA, `small` (hidden 512, 4 layers, vocab
4096, fp32, batch 4 x seq 256, one thread, process CPU time) on CPU; or any local Hugging Face
model directory with --model. `--layers` runs the per-layer benchmark instead.

    peft-fast bench                                  # the default workload on this machine
    peft-fast bench --methods all --out bench_out    # + qlora and mixed; JSON, CSV and PNG
    peft-fast bench --model ./my-llama --seq-len 1024 --batch-size 2 --methods lora qlora
    peft-fast bench --layers --preset 1b             # one adapted layer per Llama-1B shape
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import warnings
from types import SimpleNamespace

from ._bench_model import METHODS, PRESETS, TRAIN_METHODS, BenchError

DEFAULT_METHODS = {"cpu": ["lora", "dora", "ia3"], "cuda": ["lora", "dora", "ia3", "qlora", "mixed"]}
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16", "half": "float16"}
LAYER_METHODS = ("lora", "dora", "ia3")


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{s!r} must be >= 1")
    return v


def _non_negative_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"{s!r} must be >= 0")
    return v


def _methods(s: str) -> list:
    """'lora', 'lora,dora' or 'all' -> a list of known methods (argparse error otherwise)."""
    out = []
    for m in filter(None, (x.strip().lower() for x in s.split(","))):
        if m == "all":
            out.extend(METHODS)
        elif m in METHODS:
            out.append(m)
        else:
            raise argparse.ArgumentTypeError(f"unknown method {m!r}; choose from {', '.join(METHODS)} (or all)")
    if not out:
        raise argparse.ArgumentTypeError(f"no method in {s!r}; choose from {', '.join(METHODS)} (or all)")
    return out


def _dtype(s: str) -> str:
    try:
        return DTYPES[s.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"unknown dtype {s!r}; choose from float32, bfloat16, float16") from None


def _autocast_dtype(s: str) -> str:
    d = _dtype(s)
    if d == "float32":
        raise argparse.ArgumentTypeError(f"--autocast {s!r}: autocast needs a 16-bit dtype (bfloat16 or float16)")
    return d


def _shape(s: str) -> tuple:
    from ._bench_layers import parse_shape

    return parse_shape(s)


def add_parser(subparsers) -> argparse.ArgumentParser:
    ap = subparsers.add_parser(
        "bench", help="throughput and memory of peft_fast vs peft vs the frozen base model, side by side",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("workload")
    g.add_argument("--methods", nargs="+", type=_methods, default=None, metavar="METHOD",
                   help="any of lora dora ia3 qlora mixed, or all (space- or comma-separated). Default: lora dora "
                        "ia3 on CPU; all five on CUDA. qlora needs bitsandbytes with 4-bit support on the device "
                        "(recent bitsandbytes runs on CPU too, so --methods qlora works without a GPU); mixed is "
                        "N LoRA adapters in one inference batch. qlora and mixed are opt-in on CPU: they would "
                        "make the default CPU run (make bench) about 1.7x longer, past its 3-minute budget on "
                        "2 cores")
    g.add_argument("--model", default=None, metavar="DIR",
                   help="a local Hugging Face causal-LM directory (config.json + weights) instead of a preset")
    g.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="built-in Llama config (random weights): tiny (tests), small (CPU default: h512 i1376 L4 "
                        "V4096, b4 x 256, fp32), 1b (CUDA default: Llama-3.2-1B-like, b4 x 512, bf16). With "
                        "--model it only sets the batch/seq/dtype defaults")
    g.add_argument("--seq-len", type=_positive_int, default=None, help="tokens per sample (default: the preset's)")
    g.add_argument("--batch-size", type=_positive_int, default=None, help="samples per step (default: the preset's)")
    g.add_argument("--rank", type=_positive_int, default=16, help="LoRA/DoRA rank r (lora_alpha = 2r; default 16)")
    g.add_argument("--targets", default=None, metavar="NAMES",
                   help="comma-separated target module names, or all-linear. Default: all-linear for "
                        "lora/dora/qlora/mixed; for ia3 PEFT's defaults for the model type (Llama: "
                        "k_proj,v_proj,down_proj, down_proj feed-forward)")
    g.add_argument("--dtype", type=_dtype, default=None,
                   help="float32 | bfloat16 | float16 (default: the preset's: bf16 on CUDA, fp32 on CPU)")
    g.add_argument("--autocast", type=_autocast_dtype, default=None, metavar="DTYPE",
                   help="bfloat16 | float16: train and forward under torch.autocast in that dtype (as Trainer's "
                        "bf16=True/fp16=True), the model kept in --dtype (use float32). Default: off")
    g.add_argument("--adapters", type=_positive_int, default=None,
                   help="mixed: number of distinct adapters in the batch (default: the batch size)")
    r = ap.add_argument_group("measurement")
    r.add_argument("--steps", type=_positive_int, default=None, help="timed steps per provider and phase "
                   "(default: 10 on CUDA, 6 on CPU; --layers: the layer bench's own)")
    r.add_argument("--warmup", type=_non_negative_int, default=None,
                   help="untimed warm-up rounds (default: 3 on CUDA, 1 on CPU)")
    r.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    r.add_argument("--threads", type=_positive_int, default=None,
                   help="CPU threads (default 1: the clock is then the process's CPU time, robust to other load; "
                        "with more threads it is wall time)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--out", default=None, metavar="DIR",
                   help="write bench.json, bench.csv (every measurement, device, versions, date, settings) and "
                        "bench.png (the ratios) there; with --layers layers.{json,csv,png}")
    lay = ap.add_argument_group("per-layer mode")
    lay.add_argument("--layers", action="store_true",
                     help="time one adapted linear layer per shape of the model (fwd, bwd, full) instead of the "
                          "whole model; methods lora dora ia3")
    lay.add_argument("--layer-shapes", nargs="+", type=_shape, default=None, metavar="INxOUT",
                     help="--layers: shapes instead of the model's (q/o, k/v, gate/up, down)")
    lay.add_argument("--layer-tokens", nargs="+", type=_positive_int, default=None, metavar="M",
                     help="--layers: token counts (default: 1 and batch x seq)")
    ap.set_defaults(func=run)
    return ap


# ------------------------------------------------------------------------------------------ settings
def resolve(args) -> SimpleNamespace:
    """Check the arguments and fill in the defaults; BenchError names a bad value."""
    import torch

    dev_s = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(dev_s)
    except RuntimeError:
        raise BenchError(f"--device {dev_s!r} is not a device (cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise BenchError(f"--device {dev_s!r}: only cpu and cuda are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BenchError(f"--device {dev_s!r}: CUDA is not available to this torch ({torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BenchError(f"--device {dev_s!r}: only {torch.cuda.device_count()} CUDA device(s)")
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
    kind = device.type
    model_dir = None
    if args.model is not None:
        from ._bench_model import check_model_dir

        model_dir = check_model_dir(args.model)
    preset = args.preset or ("1b" if kind == "cuda" else "small")
    p = PRESETS[preset]
    methods = list(dict.fromkeys(m for group in (args.methods or [DEFAULT_METHODS[kind]]) for m in group))
    explicit = args.methods is not None
    if args.layers:
        bad = [m for m in methods if m not in LAYER_METHODS]
        if bad and explicit:
            raise BenchError(f"--layers measures {', '.join(LAYER_METHODS)}; not {', '.join(bad)}")
        methods = [m for m in methods if m in LAYER_METHODS]
    targets = None
    if args.targets is not None:
        names = [t.strip() for t in args.targets.split(",") if t.strip()]
        if not names:
            raise BenchError(f"--targets {args.targets!r}: no module name")
        targets = "all-linear" if names == ["all-linear"] else names
        if "all-linear" in names and len(names) > 1:
            raise BenchError(f"--targets {args.targets!r}: all-linear cannot be combined with names")
    threads = args.threads or 1
    cfg = SimpleNamespace(
        device=device, preset=preset, model_dir=model_dir, methods=methods, explicit_methods=explicit,
        batch=args.batch_size or p["batch"], seq=args.seq_len or p["seq"], rank=args.rank, targets=targets,
        dtype_name=args.dtype or ("bfloat16" if (kind == "cuda" and model_dir) else p["dtype"]),
        steps=args.steps or (10 if kind == "cuda" else 6),
        warmup=args.warmup if args.warmup is not None else (3 if kind == "cuda" else 1),
        threads=threads if kind == "cpu" else None, progress=not args.no_progress, out=args.out,
        adapters=args.adapters, qlora_problem=None, autocast_name=args.autocast)
    cfg.dtype = getattr(torch, cfg.dtype_name)
    cfg.autocast = getattr(torch, cfg.autocast_name) if cfg.autocast_name else None
    if cfg.autocast is not None and cfg.dtype != torch.float32:
        raise BenchError(f"--autocast {cfg.autocast_name} with --dtype {cfg.dtype_name}: autocast is for float32 "
                         "models (pass --dtype float32)")
    cfg.adapters = cfg.adapters or cfg.batch
    if "qlora" in methods and not args.layers:
        from ._bench_model import bnb_4bit_problem

        cfg.qlora_problem = bnb_4bit_problem(device)
        if cfg.qlora_problem and explicit:
            raise BenchError(f"--methods qlora: {cfg.qlora_problem}")
    if args.out is not None and os.path.exists(args.out) and not os.path.isdir(args.out):
        raise BenchError(f"--out {args.out!r} exists and is not a directory")
    return cfg


def _libs() -> tuple:
    """({"peft_fast": module, "peft": module if installed}, note about peft or '')."""
    import peft_fast

    libs = {"peft_fast": peft_fast}
    try:
        import peft

        libs["peft"] = peft
        return libs, ""
    except ImportError:
        return libs, "peft is not installed: peft_fast is compared with the frozen base model only"


def _model_desc(cfg, model) -> str:
    n = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    size = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
    if cfg.model_dir:
        return f"{os.path.basename(cfg.model_dir.rstrip(os.sep))} ({size} params)"
    c = model.config
    return (f"llama-{cfg.preset} (h{c.hidden_size} i{c.intermediate_size} L{c.num_hidden_layers} "
            f"V{c.vocab_size}, {size} params)")


@contextlib.contextmanager
def _quiet_and_threads(threads):
    """Library warnings off, torch's thread count set; both restored afterwards."""
    import torch

    old_threads = torch.get_num_threads()
    tlog = None
    try:
        from transformers.utils import logging as tlog

        old_verb = tlog.get_verbosity()
        tlog.set_verbosity_error()
    except Exception:  # noqa: BLE001 - transformers missing: its error comes later, clearly
        tlog = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if threads:
                torch.set_num_threads(threads)
            yield
    finally:
        torch.set_num_threads(old_threads)
        if tlog is not None:
            tlog.set_verbosity(old_verb)


def _log(msg: str) -> None:
    print(f"peft-fast bench: {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ run
def run(args) -> int:
    try:
        cfg = resolve(args)
    except BenchError as e:
        print(f"peft-fast bench: error: {e}", file=sys.stderr)
        return 2
    try:
        with _quiet_and_threads(cfg.threads):
            return _run_layers(cfg, args) if args.layers else _run_model(cfg)
    except BenchError as e:
        print(f"peft-fast bench: error: {e}", file=sys.stderr)
        return 2


def _base_model(cfg):
    from ._bench_model import build_preset_model, load_model_dir

    if cfg.model_dir:
        _log(f"loading {cfg.model_dir} ({cfg.dtype_name}, {cfg.device})")
        return load_model_dir(cfg.model_dir, cfg.dtype, cfg.device)
    return build_preset_model(cfg.preset, cfg.dtype, cfg.device, cfg.seq + 8)


def _run_model(cfg) -> int:
    import torch

    from ._bench_common import device_name, now, versions
    from ._bench_model import vocab_size
    from ._bench_report import print_report, write_outputs
    from ._bench_run import MEM_KIND, Clock
    from ._bench_workload import rows_from, run_mixed, run_train

    t_start = time.monotonic()
    libs, peft_note = _libs()
    if peft_note:
        _log(peft_note)
    cfg.clock = Clock(cfg.device, cfg.threads or 0)
    base = _base_model(cfg)
    base.requires_grad_(False)
    cfg.vocab = vocab_size(base)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq), generator=g).to(cfg.device)
    cfg.batch_tensors = {"input_ids": ids, "labels": ids}
    vers = versions()
    desc = _model_desc(cfg, base)
    meta = {
        "device": device_name(cfg.device), "date": now(), "versions": vers, "no_peft": "peft" not in libs,
        "note": peft_note,
        "settings": {"model": desc, "model_dir": cfg.model_dir, "preset": None if cfg.model_dir else cfg.preset,
                     "device": str(cfg.device), "dtype": cfg.dtype_name, "autocast": cfg.autocast_name,
                     "batch_size": cfg.batch,
                     "seq_len": cfg.seq, "rank": cfg.rank, "targets": cfg.targets or "default",
                     "methods": cfg.methods, "steps": cfg.steps, "warmup": cfg.warmup, "threads": cfg.threads,
                     "clock": cfg.clock.name},
        "peak_mem_kind": MEM_KIND["cuda" if cfg.clock.cuda else "cpu"],
        "workloads": {
            "train": "model(input_ids, labels).loss.backward(), AdamW step on the adapters, zero_grad; frozen base: "
                     "fwd+bwd to the input embeddings",
            "forward": "eval(), no_grad: model(input_ids)",
            "prefill": "mixed: eval(), no_grad, adapter_names = a{i mod N} per sample",
            "decode": "mixed: one token per sample on a KV cache of seq_len tokens"},
    }
    row_meta = {"date": meta["date"], "device": meta["device"], "torch": vers["torch"], "peft": vers["peft"] or "",
                "peft_fast": vers["peft_fast"], "transformers": vers["transformers"],
                "bitsandbytes": vers["bitsandbytes"] or "", "model": desc, "dtype": cfg.dtype_name,
                "autocast": cfg.autocast_name or "",
                "batch_size": cfg.batch, "seq_len": cfg.seq, "rank": cfg.rank, "threads": cfg.threads or "",
                "clock": cfg.clock.name}
    ac = f" under autocast({cfg.autocast_name})" if cfg.autocast_name else ""
    _log(f"{desc}, batch {cfg.batch} x seq {cfg.seq}, {cfg.dtype_name}{ac}, {meta['device']}; methods "
         f"{' '.join(cfg.methods)}; {cfg.steps} steps after {cfg.warmup} warm-up round(s)")
    providers = []
    train_methods = [m for m in cfg.methods if m in TRAIN_METHODS]
    if train_methods:
        providers += run_train(cfg, base, libs, train_methods, _log)
    if "mixed" in cfg.methods:
        meta["mixed"] = {"adapters": cfg.adapters, "batch": cfg.batch}
        providers += run_mixed(cfg, base, libs, _log)
    rows = rows_from(providers, cfg, row_meta, base)
    meta["elapsed_s"] = round(time.monotonic() - t_start, 1)
    try:
        import peft_fast.ops as ops

        meta["path_choices"] = [{**c, "key": list(c["key"])} for c in ops.path_choices()]
    except Exception:  # noqa: BLE001 - informative only
        meta["path_choices"] = []
    print_report(rows, meta)
    if cfg.out:
        paths = write_outputs(cfg.out, rows, meta)
        _log("wrote " + ", ".join(paths))
    errors = [r for r in rows if r["status"] == "error"]
    if errors:
        _log(f"{len(errors)} measurement(s) failed: see the notes under the table"
             + (" and the note column of bench.csv" if cfg.out else ""))
        return 1
    return 0


# ------------------------------------------------------------------------------------------ --layers
def _layer_shapes(cfg) -> list:
    """(in, out) of a Llama block's projections: q/o, k/v, gate/up, down (deduplicated)."""
    if cfg.model_dir:
        from transformers import AutoConfig

        c = AutoConfig.from_pretrained(cfg.model_dir, local_files_only=True)
        h, i = c.hidden_size, c.intermediate_size
        heads = c.num_attention_heads
        kv = getattr(c, "num_key_value_heads", None) or heads
        hd = getattr(c, "head_dim", None) or h // heads
    else:
        p = PRESETS[cfg.preset]
        h, i, heads, kv = p["hidden_size"], p["intermediate_size"], p["num_attention_heads"], p["num_key_value_heads"]
        hd = h // heads
    return list(dict.fromkeys([(h, heads * hd), (h, kv * hd), (h, i), (i, h)]))


def _run_layers(cfg, args) -> int:
    from . import _bench_layers as bl

    if not cfg.methods:
        raise BenchError(f"--layers: no method to measure (it measures {', '.join(LAYER_METHODS)})")
    shapes = args.layer_shapes or _layer_shapes(cfg)
    tokens = args.layer_tokens or sorted({1, cfg.batch * cfg.seq})
    argv = ["--methods", *cfg.methods, "--ranks", str(cfg.rank), "--tokens", *map(str, tokens),
            "--shapes", *(f"{a}x{b}" for a, b in shapes), "--dtype", cfg.dtype_name, "--device", str(cfg.device)]
    if args.steps:
        argv += ["--reps", str(args.steps)]
    if args.warmup is not None:
        argv += ["--warmup", str(args.warmup)]
    largs = bl.parse_args(argv, prog="peft-fast bench --layers")
    largs.no_progress = not cfg.progress
    _log(f"--layers: {', '.join(cfg.methods)}; shapes {' '.join(f'{a}x{b}' for a, b in shapes)}; M {tokens}; "
         f"r={cfg.rank}; {cfg.dtype_name}; {cfg.device}")
    rows, meta = bl.run(largs)
    meta["settings"] = {"shapes": [list(s) for s in shapes], "tokens": tokens, "rank": cfg.rank,
                        "methods": cfg.methods, "threads": cfg.threads, "model": cfg.model_dir or cfg.preset}
    bl.print_table(rows, meta)
    if cfg.out and rows:
        _log("wrote " + ", ".join(bl.write_outputs(cfg.out, rows, meta, append=False)))
    n_err = bl.count_errors(rows)
    if n_err:
        _log(f"{n_err} layer measurement(s) failed with an error (see the note column)")
    return 1 if n_err else 0


def main(argv=None) -> int:
    """`python -m peft_fast.cli.bench ...`: this sub-command alone."""
    ap = argparse.ArgumentParser(prog="peft-fast")
    add_parser(ap.add_subparsers(dest="command"))
    args = ap.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
