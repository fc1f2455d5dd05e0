"""The settings of a `peft-fast train` run: defaults, checks, and what a checkpoint carries into --resume.

Every flag parses to None when it is not on the command line, so that "given" and "left at its
default" stay apart. `resolve` fills each setting from, in this order: the command line, the
settings saved in the checkpoint being resumed (the run's own), the demo's or the generic default.

On --resume (README, `peft-fast train`):
  FIXED        define the run -- the base model, the adapter, data order and batching: taken from
               the checkpoint; a different value on the command line is an error naming both.
  OVERRIDABLE  how long and how fast it trains, what is kept, where it runs, the data file: taken
               from the checkpoint unless given again (a different --data only warns, by content).
  not carried  --output, --resume, --overwrite, --no-progress.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from ._train_util import CLIError

FIXED = ("model", "method", "r", "alpha", "dropout", "targets", "four_bit", "seed", "batch_size", "grad_accum",
         "seq_len")
OVERRIDABLE = ("data", "epochs", "max_steps", "lr", "lr_scheduler", "warmup_steps", "weight_decay", "max_grad_norm",
               "save_steps", "save_total_limit", "gradient_checkpointing", "device", "dtype", "threads")
CARRIED = FIXED + OVERRIDABLE

# defaults of a run with --model; the demo's own replace some (DEMO)
DEFAULTS = dict(method="lora", r=8, dropout=0.05, targets="all-linear", four_bit=False, seed=0, batch_size=8,
                grad_accum=1, seq_len=512, epochs=3.0, max_steps=0, lr=2e-4, lr_scheduler="linear", warmup_steps=0,
                weight_decay=0.0, max_grad_norm=1.0, save_steps=0, save_total_limit=2,
                gradient_checkpointing=False, device="auto", dtype="auto", threads=None, progress=True)
DEMO = dict(lr=1e-2, batch_size=32, epochs=8.0, seq_len=64, threads=1,
            dtype="float32")  # 100k parameters: bf16 would only cost accuracy
# shown as "(default: X)" in --help; the others say it in their own help text
SHOWN = {k: v for k, v in DEFAULTS.items()
         if k not in DEMO and k != "device" and not isinstance(v, bool) and v is not None}
LORA_ONLY = ("r", "alpha", "dropout")


def flag(key: str) -> str:
    return "--4bit" if key == "four_bit" else "--" + key.replace("_", "-")


def default_output(demo: bool) -> str:
    return "peft-fast-demo" if demo else "peft-fast-output"


def resolve(args) -> tuple[bool, Optional[Path], Optional[dict]]:
    """Fill every setting of `args` in place; returns (demo?, checkpoint to resume, its state blob).

    Reads only: nothing is written before the whole command line has been checked."""
    from ._train_loop import find_checkpoint, read_checkpoint

    given = {k for k in CARRIED if getattr(args, k) is not None}
    if args.resume and args.overwrite:
        raise CLIError("--resume continues the run in --output and --overwrite starts it over; pass one of them")
    ckpt = blob = None
    demo = args.model is None
    if args.resume:
        if args.output is None:  # continue where the checkpoint lives, not in a default directory
            args.output = (str(Path(args.resume).expanduser().absolute().parent) if args.resume != "latest"
                           else default_output(demo))
        ckpt = find_checkpoint(Path(args.output).expanduser().absolute(), args.resume)
        blob = read_checkpoint(ckpt)
        saved = blob.get("meta", {}).get("settings")
        if saved is not None:
            demo = _apply_saved(args, saved, given, ckpt)
        else:  # written by an older peft-fast
            print(f"warning: checkpoint {str(ckpt)!r} holds no run settings (an older peft-fast wrote it): the "
                  "command line and the defaults decide, --save-total-limit included", file=sys.stderr)
    if args.output is None:
        args.output = default_output(demo)

    method = args.method or DEFAULTS["method"]
    if method == "ia3":  # IA3 learns scaling vectors: no rank, alpha or dropout to set
        for key in LORA_ONLY:
            if key in given:
                raise CLIError(f"{flag(key)} {getattr(args, key)} does not apply to --method ia3 (no rank, alpha or "
                               f"dropout); drop it, or use --method lora/dora")
    if "max_steps" in given and "epochs" in given and args.max_steps > 0:
        raise CLIError(f"--epochs {args.epochs:g} and --max-steps {args.max_steps} both set the run's length; "
                       "pass one of them")
    if "epochs" in given and "max_steps" not in given:
        args.max_steps = 0  # on --resume: the new --epochs, not the saved --max-steps, sets the length
    for key, value in {**DEFAULTS, **(DEMO if demo else {})}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.alpha is None:
        args.alpha = 2.0 * args.r
    _check_ranges(args)
    if not demo:
        from ._train_model import model_dir_of

        model_dir_of(args.model)  # a missing model directory is the first thing to say
        if args.data is None:
            raise CLIError(f"--model {args.model!r} needs --data JSONL: the built-in demo data only go with the "
                           "built-in demo model (no --model)")
    return demo, ckpt, blob


def saved_settings(args, demo: bool) -> dict:
    """What a checkpoint records of this run (after `resolve`): paths absolute, ia3's unused fields None."""
    out = {k: getattr(args, k) for k in CARRIED}
    out["model"] = None if demo else str(Path(args.model).expanduser().resolve())
    out["data"] = None if args.data is None else str(Path(args.data).expanduser().resolve())
    if args.method == "ia3":
        out.update(dict.fromkeys(LORA_ONLY))
    out["demo"] = demo
    return out


def _apply_saved(args, saved: dict, given: set, ckpt: Path) -> bool:
    """Take the checkpoint's settings where the command line is silent; refuse changes to FIXED ones."""
    demo = bool(saved.get("demo"))
    if demo and args.model is not None:
        raise CLIError(f"--resume: checkpoint {str(ckpt)!r} is of a demo run (no --model); this command line has "
                       f"--model {args.model!r}")
    moved = {k for k in ("model", "data") if saved.get(k) is not None and not Path(saved[k]).exists()}
    for key in sorted(moved - given):
        raise CLIError(f"--resume: the {key} of checkpoint {str(ckpt)!r}, {saved[key]!r}, no longer exists; "
                       f"pass {flag(key)} with its new place")
    for key in FIXED:
        if key in moved:  # the only way a fixed path may change: the saved one is gone (moved)
            continue
        if key in given and saved.get(key) is not None and _norm(key, getattr(args, key)) != _norm(key, saved[key]):
            raise CLIError(f"--resume: checkpoint {str(ckpt)!r} was trained with {key}={saved[key]!r}; this "
                           f"command line has {flag(key)} {getattr(args, key)} ({key}={getattr(args, key)!r}). "
                           f"{flag(key)} cannot change within a run: drop it to continue, or start a new run in "
                           "another --output")
    for key in CARRIED:
        if key not in given and key in saved:
            setattr(args, key, saved[key])
    return demo


def _norm(key: str, value):
    """The value of a FIXED setting as compared on --resume (paths resolved, target lists parsed)."""
    if key == "model":
        return str(Path(value).expanduser().resolve())
    if key == "targets":
        from ._train_model import parse_targets

        t = parse_targets(value)
        return t if isinstance(t, str) else sorted(t)
    if key in ("alpha", "dropout"):
        return float(value)
    return value


def _check_ranges(args) -> None:
    checks = [("--r", args.r, args.r >= 1), ("--batch-size", args.batch_size, args.batch_size >= 1),
              ("--grad-accum", args.grad_accum, args.grad_accum >= 1), ("--seq-len", args.seq_len, args.seq_len >= 2),
              ("--lr", args.lr, args.lr > 0), ("--dropout", args.dropout, 0 <= args.dropout < 1),
              ("--epochs", args.epochs, args.epochs > 0), ("--max-steps", args.max_steps, args.max_steps >= 0),
              ("--warmup-steps", args.warmup_steps, args.warmup_steps >= 0),
              ("--weight-decay", args.weight_decay, args.weight_decay >= 0),
              ("--max-grad-norm", args.max_grad_norm, args.max_grad_norm >= 0),
              ("--save-steps", args.save_steps, args.save_steps >= 0),
              ("--save-total-limit", args.save_total_limit, args.save_total_limit >= 0),
              ("--threads", args.threads, args.threads is None or args.threads >= 1)]
    for name, value, ok in checks:
        if not ok:
            raise CLIError(f"{name} {value} is out of range")
