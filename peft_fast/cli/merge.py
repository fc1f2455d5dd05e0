"""`peft-fast merge`: fold an adapter into its base model and save a plain transformers model.

    peft-fast merge --base BASE_DIR --adapter ADAPTER_DIR --out OUT_DIR

Loads the base with the transformers Auto class of the adapter's task type, the adapter with
`peft_fast.PeftModel.from_pretrained` (adapters saved by peft or peft_fast), calls
`merge_and_unload()`, and writes the model (safetensors) plus the tokenizer files of the adapter
directory, or failing that of the base directory. Everything is written into a temporary
directory beside OUT_DIR and renamed into place at the end, so OUT_DIR is either complete or
untouched.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from ._train_util import DTYPES, CLIError, report

PROG = "peft-fast merge"
AUTO_CLASS = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
              "SEQ_CLS": "AutoModelForSequenceClassification", "TOKEN_CLS": "AutoModelForTokenClassification",
              "QUESTION_ANS": "AutoModelForQuestionAnswering", "FEATURE_EXTRACTION": "AutoModel"}


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("merge", help="merge an adapter into its base model and save the full model",
                              description="Load BASE + ADAPTER, merge_and_unload(), save the full model "
                                          "(safetensors) and the tokenizer to OUT, atomically.")
    p.add_argument("--base", required=True, metavar="DIR", help="base model directory (save_pretrained format)")
    p.add_argument("--adapter", required=True, metavar="DIR", help="adapter directory (adapter_config.json + weights)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory for the merged model")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="dtype to load and save the base in (default auto: as stored in the base)")
    p.add_argument("--device", default="cpu", help="device to merge on (default: cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    try:
        return _run(args)
    except CLIError as e:
        return report(PROG, e)


def _run(args) -> int:
    from ._train_util import (atomic_dir, check_device_usable, require_dir, resolve_device, tokenizer_files)

    base = require_dir(args.base, "base model directory", marker="config.json")
    adapter = require_dir(args.adapter, "adapter directory", marker="adapter_config.json")
    if not any((adapter / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
        raise CLIError(f"adapter directory {args.adapter!r} has no adapter_model.safetensors (or .bin)")
    out = Path(args.out).expanduser().absolute()
    if out in (base.absolute(), adapter.absolute()):
        raise CLIError(f"--out {args.out!r} must differ from --base and --adapter")
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {args.out!r} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise CLIError(f"--out {args.out!r} exists and is not empty (pass --overwrite to replace it)")
    try:
        adapter_cfg = json.loads((adapter / "adapter_config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CLIError(f"cannot read {adapter / 'adapter_config.json'}: {e}") from None
    device = resolve_device(args.device)
    check_device_usable(device)

    import torch
    import transformers

    import peft_fast

    task = adapter_cfg.get("task_type") or "FEATURE_EXTRACTION"
    auto_cls = getattr(transformers, AUTO_CLASS.get(task, "AutoModel"))
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    t0 = time.perf_counter()
    try:
        model = auto_cls.from_pretrained(str(base), dtype=dtype)
    except Exception as e:  # noqa: BLE001 - transformers raises many types
        raise CLIError(f"cannot load {auto_cls.__name__} from {args.base!r} ({type(e).__name__}: {e})") from None
    model.to(device)
    try:
        model = peft_fast.PeftModel.from_pretrained(model, str(adapter))
    except Exception as e:  # noqa: BLE001
        raise CLIError(f"cannot load adapter {args.adapter!r} onto {args.base!r} ({type(e).__name__}: {e})") from None
    kind = adapter_cfg.get("peft_type", "?")
    merged = model.merge_and_unload()

    src = tokenizer_files(adapter) or tokenizer_files(base)
    with atomic_dir(out, overwrite=args.overwrite) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        for f in src:
            shutil.copy2(f, tmp / f.name)
    n = sum(p.numel() for p in merged.parameters())
    dt = next(merged.parameters()).dtype
    print(f"merged {kind} adapter {args.adapter} into {args.base} ({auto_cls.__name__}, {n / 1e6:.2f}M params, "
          f"{str(dt).replace('torch.', '')}) in {time.perf_counter() - t0:.1f} s")
    print(f"saved  {out}" + (f"  (tokenizer from {src[0].parent})" if src else "  (no tokenizer found to copy)"))
    return 0

