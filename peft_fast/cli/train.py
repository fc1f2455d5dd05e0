"""`peft-fast train`: supervised fine-tuning of a local causal LM with a LoRA, DoRA or IA3 adapter,
in 4 bit (QLoRA) or not, on a local JSONL dataset; with no --model, a built-in CPU demo.

Output directory (--output):

    adapter_config.json, adapter_model.safetensors   the adapter, PEFT format (peft loads it)
    tokenizer files                                   the tokenizer the run used
    loss.png, train_log.json                          loss curve; per-step losses, LRs, settings
    checkpoint-<step>/                                adapter + training_state.pt (for --resume)
    demo_base/                                        demo only: the tiny base model + tokenizer

Every file is written to a temporary name and renamed, so an interrupted run leaves complete
files (Ctrl-C saves a checkpoint first). The pieces live in _train_data (JSONL, tokenization),
_train_model (4-bit checks, loading), _train_loop (the loop, checkpoints, plot), _train_demo,
_train_settings (defaults, checks, the settings a checkpoint carries into --resume).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from ._train_util import DTYPES, CLIError, report

PROG = "peft-fast train"


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Every flag parses to None when absent (so --resume can tell given from default); the help
    shows the default from _train_settings.SHOWN instead (the others say theirs in the text)."""

    def _get_help_string(self, action):
        from ._train_settings import SHOWN

        if action.dest in SHOWN and action.help:
            return f"{action.help} (default: {SHOWN[action.dest]})"
        return action.help


RESUME_HELP = """\
--resume continues a run with its own settings, saved in every checkpoint.
  Fixed within a run (giving a different value is an error): --model --method --r --alpha
    --dropout --targets --4bit --seed --batch-size --grad-accum --seq-len
  Taken from the checkpoint unless given again: --epochs --max-steps --lr --lr-scheduler
    --warmup-steps --weight-decay --max-grad-norm --save-steps --save-total-limit
    --[no-]gradient-checkpointing --device --dtype --threads --data (different data only warn)
  --epochs given alone replaces a saved --max-steps. Without --output, --resume DIR/checkpoint-N
  continues in DIR."""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train", help="fine-tune with LoRA/DoRA/IA3 (QLoRA with --4bit); no --model: built-in demo",
        description=textwrap.fill(  # the raw formatter keeps the epilog's layout, so wrap this here
            "Supervised fine-tuning of a local causal LM with a LoRA, DoRA or IA3 adapter. JSONL rows are "
            "{\"text\": ...} (loss on all tokens) or {\"prompt\": ..., \"response\": ...} (loss on the "
            "response only). Without --model it runs a demo: a tiny random Llama learns to reverse "
            "strings on CPU in well under a minute (--model needs --data).", 79),
        epilog=RESUME_HELP, formatter_class=_Formatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", metavar="DIR", help="local model directory (config, weights, tokenizer); "
                   "default: the demo's tiny Llama")
    g.add_argument("--data", metavar="JSONL", help="training data (required with --model); "
                   "default: the demo's string-reversal set")
    g.add_argument("--output", metavar="DIR", help="output directory (default: peft-fast-demo for the demo, "
                   "else peft-fast-output)")
    g.add_argument("--overwrite", action="store_true",
                   help="start over in an --output that holds an earlier run or other adapter/model files "
                        "(the demo does so by itself over an earlier demo)")
    g.add_argument("--resume", nargs="?", const="latest", metavar="CKPT",
                   help="continue from a checkpoint directory, or without a value from the newest in --output, "
                        "with the run's saved settings (see below)")
    g = p.add_argument_group("adapter")
    g.add_argument("--method", choices=("lora", "dora", "ia3"), help="adapter type")
    g.add_argument("--r", type=int, help="LoRA/DoRA rank")
    g.add_argument("--alpha", type=float, help="LoRA/DoRA alpha (default: 2 * r)")
    g.add_argument("--dropout", type=float, help="LoRA/DoRA dropout")
    g.add_argument("--targets", help="modules to adapt: 'all-linear' or comma-separated names (e.g. q_proj,v_proj)")
    g.add_argument("--4bit", dest="four_bit", action="store_true", default=None,
                   help="load the base model in 4-bit NF4 with bitsandbytes (QLoRA)")
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=float, help="epochs (default: 3; demo: 8)")
    g.add_argument("--max-steps", type=int, help="optimizer steps instead of --epochs (0: from --epochs)")
    g.add_argument("--lr", type=float, help="peak learning rate (default: 2e-4; demo: 1e-2)")
    g.add_argument("--lr-scheduler", choices=("linear", "cosine", "constant"), help="decay after warm-up")
    g.add_argument("--warmup-steps", type=int, help="steps of linear LR warm-up")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay")
    g.add_argument("--max-grad-norm", type=float, help="gradient clipping (0: off)")
    g.add_argument("--batch-size", type=int, help="rows per micro-batch (default: 8; demo: 32)")
    g.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    g.add_argument("--seq-len", type=int, help="tokens per row, longer rows are cut (default: 512; demo: 64)")
    g.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                   help="recompute activations in backward (default: off)")
    g.add_argument("--seed", type=int, help="data order, adapter init, dropout (and the demo model)")
    g = p.add_argument_group("run")
    g.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: auto, cuda if available)")
    g.add_argument("--dtype", choices=DTYPES,
                   help="base model dtype (default: auto, bf16 on GPUs that have it, else fp32; demo: float32)")
    g.add_argument("--save-steps", type=int, help="checkpoint every N steps (0: every epoch)")
    g.add_argument("--save-total-limit", type=int, help="checkpoints kept (0: all)")
    g.add_argument("--threads", type=int,
                   help="torch CPU threads (default: torch's; demo: 1, as a tiny model only pays for more)")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="log lines instead of a bar")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    try:
        return _run(args)
    except CLIError as e:
        _drop_new_empty_output(args)
        return report(PROG, e)
    except KeyboardInterrupt:
        _drop_new_empty_output(args)
        print(f"\n{PROG}: interrupted before training started", file=sys.stderr)
        return 130


def _drop_new_empty_output(args) -> None:
    """A refused run leaves no trace: remove the --output directory if this run created it and
    wrote nothing into it (a directory that existed before, or has files, is kept)."""
    out = getattr(args, "_created_output", None)
    if out is not None and out.is_dir() and not any(out.iterdir()):
        out.rmdir()


def _prepare_output(args, demo: bool, resume_from) -> Path:
    """--output as an absolute directory, refusing to write into another run's or a model's files."""
    from ._train_loop import list_checkpoints

    out = Path(args.output).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise CLIError(f"--output {args.output!r} exists and is not a directory")
    old = list_checkpoints(out) if out.is_dir() else []
    if resume_from is not None:
        # the run prunes old checkpoints of its --output: never those of another run
        if old and resume_from.parent.resolve() != out.resolve():
            raise CLIError(f"--output {str(out)!r} holds checkpoints of another run ({old[-1].name}) than "
                           f"{str(resume_from)!r}; resume into that checkpoint's own directory or an empty --output")
    elif not args.overwrite and not (demo and (out / "demo_base" / "config.json").is_file()):
        if old:
            raise CLIError(f"--output {args.output!r} holds checkpoints of an earlier run ({old[-1].name}); "
                           "pass --resume to continue it, --overwrite to start over, or another --output")
        clash = [n for n in ("adapter_config.json", "train_log.json", "config.json") if (out / n).is_file()]
        if clash:
            what = "a model" if clash == ["config.json"] else "an adapter or a finished run"
            raise CLIError(f"--output {args.output!r} already holds {what} ({', '.join(clash)}); "
                           "pass --overwrite to write over it, or another --output")
    if not out.exists():
        args._created_output = out  # removed again if the run is refused before writing (run())
    out.mkdir(parents=True, exist_ok=True)
    if resume_from is None:
        for ckpt in old:
            shutil.rmtree(ckpt)
    return out


def _run(args) -> int:
    from ._train_settings import resolve, saved_settings

    demo, resume_from, blob = resolve(args)

    from ._train_util import check_device_usable, resolve_device, resolve_dtype

    device = resolve_device(args.device)
    if args.four_bit:  # before anything heavy: a missing bitsandbytes should fail in a second
        from ._train_model import check_bitsandbytes

        check_bitsandbytes(device)
    check_device_usable(device)
    if args.four_bit:
        from ._train_model import probe_bitsandbytes

        probe_bitsandbytes(device)

    import torch

    from ._train_data import encode, pad_id_of, read_jsonl, steps_per_epoch
    from ._train_demo import DEMO_DATA, build_demo_base, example_texts
    from ._train_model import adapter_config, attach_adapter, load_base, load_tokenizer, model_dir_of, parse_targets
    from ._train_util import atomic_dir

    model_dir = None if demo else model_dir_of(args.model)
    data_path = Path(args.data).expanduser() if args.data else DEMO_DATA
    examples, data_sha = read_jsonl(str(data_path))
    targets = parse_targets(args.targets)
    out = _prepare_output(args, demo, resume_from)
    if args.threads:
        torch.set_num_threads(args.threads)

    if demo:  # a model of 100k parameters: transformers' load/save progress bars are only noise
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        model_dir = out / "demo_base"
        if not (resume_from and (model_dir / "config.json").is_file()):
            with atomic_dir(model_dir, overwrite=True) as tmp:
                build_demo_base(tmp, example_texts(examples), args.seed)
    tokenizer = load_tokenizer(model_dir)
    rows, dropped = encode(examples, tokenizer, args.seq_len)
    if not rows:
        raise CLIError(f"no row of {str(data_path)!r} has a label token left within --seq-len {args.seq_len}")

    from ._train_loop import Settings, State, load_checkpoint, make_optimizer, total_steps, train

    s = Settings(lr=args.lr, batch_size=args.batch_size, grad_accum=args.grad_accum, epochs=args.epochs,
                 max_steps=args.max_steps, seed=args.seed, output=out, weight_decay=args.weight_decay,
                 warmup_steps=args.warmup_steps, scheduler=args.lr_scheduler, max_grad_norm=args.max_grad_norm,
                 save_steps=args.save_steps, save_total_limit=args.save_total_limit, progress=args.progress)
    total = total_steps(len(rows), s)
    if blob is not None and blob["step"] > total:
        length = f"--max-steps {total}" if args.max_steps else f"--epochs {args.epochs:g} ({total} steps)"
        raise CLIError(f"--resume: checkpoint {str(resume_from)!r} is at step {blob['step']}, past this run's "
                       f"{length}; pass a larger one")

    dtype = resolve_dtype(args.dtype, device)
    torch.manual_seed(args.seed)  # adapter initialisation (LoRA A) and dropout
    base = load_base(model_dir, device, dtype, args.four_bit, args.gradient_checkpointing)
    config = adapter_config(args.method, args.r, args.alpha, args.dropout, targets, base)
    model = attach_adapter(base, config)

    adapter_meta = {"method": args.method, "targets": args.targets}
    if args.method != "ia3":
        adapter_meta.update(r=args.r, alpha=args.alpha)
    meta = {"adapter": adapter_meta, "data_sha256": data_sha, "model": str(model_dir),
            "settings": saved_settings(args, demo)}
    optimizer = make_optimizer(model, s)
    state = State()
    if resume_from is not None:
        state = load_checkpoint(model, optimizer, resume_from, blob, s, device, meta)

    trainable, n_all = _param_counts(model)
    n_text = sum(ex.text is not None for ex in examples)
    spe = steps_per_epoch(len(rows), args.batch_size, args.grad_accum)
    print(f"model    {'demo: tiny random Llama, ' if demo else ''}{model_dir}  ({n_all / 1e6:.2f}M params"
          f"{', 4-bit NF4' if args.four_bit else ''}, {str(dtype).replace('torch.', '')}, {device})")
    print(f"adapter  {args.method}" + ("" if args.method == "ia3" else
                                        f" r={args.r} alpha={args.alpha:g} dropout={args.dropout:g}")
          + f" targets={args.targets}: {trainable:,} trainable params ({100 * trainable / max(1, n_all):.2f}%)")
    print(f"data     {data_path}  ({len(rows)} rows: {len(examples) - n_text} prompt/response, {n_text} text"
          + (f"; {dropped} dropped, no label left within --seq-len {args.seq_len}" if dropped else "") + ")")
    print(f"steps    {total} ({total / spe:.3g} epochs x {spe} steps; batch {args.batch_size} x accum "
          f"{args.grad_accum}; lr {args.lr:g} {args.lr_scheduler})"
          + (f"; resuming {resume_from.name} at step {state.step}" if resume_from is not None else ""))
    if blob is not None and blob.get("meta", {}).get("data_sha256") not in (None, data_sha):
        print(f"warning: the data differ from those of {resume_from.name}; the resumed order will too",
              file=sys.stderr)

    from ._train_loop import Interrupted

    start_step, t0 = state.step, time.perf_counter()
    try:
        state = train(model, rows, pad_id_of(tokenizer), device, s, optimizer, state, meta)
    except Interrupted as e:
        print(f"\n{PROG}: interrupted at step {e.step}; checkpoint {e.checkpoint}; "
              f"continue with --resume --output {args.output}", file=sys.stderr)
        return 130
    wall = time.perf_counter() - t0

    _save_final(model, tokenizer, out, state, args, total, demo, data_path)
    losses = state.losses
    if losses:
        tail = losses[-min(10, len(losses)):]
        print(f"done     {state.step - start_step} steps in {wall:.1f} s ({state.tokens / max(state.elapsed, 1e-9):,.0f} "
              f"label tokens/s); loss {losses[0]:.4f} (step 1) -> {losses[-1]:.4f} (step {len(losses)}), "
              f"mean of the last {len(tail)}: {sum(tail) / len(tail):.4f}")
    print(f"adapter  {out}  (adapter_config.json, adapter_model.safetensors: loads with peft or peft_fast)")
    print(f"loss     {out / 'loss.png'}")
    if demo and data_path == DEMO_DATA:
        _demo_samples(model, tokenizer, examples, device)
    if demo:
        print(f"merge    peft-fast merge --base {model_dir} --adapter {out} --out {out / 'merged'}")
    return 0


def _param_counts(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = 0
    for p in model.parameters():
        # a bitsandbytes Params4bit packs two weights per byte
        total += p.numel() * (2 if p.__class__.__name__ == "Params4bit" else 1)
    return trainable, total


def _save_final(model, tokenizer, out: Path, state, args, total: int, demo: bool, data_path: Path) -> None:
    from ..utils.io import atomic_write_text
    from ._train_demo import DEMO_DATA
    from ._train_loop import plot_losses
    from ._train_util import move_files_into

    tmp = Path(tempfile.mkdtemp(prefix=".final.tmp-", dir=out))
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        move_files_into(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}
    log = {"demo": demo, "settings": settings, "total_steps": total, "steps": state.step,
           "losses": state.losses, "lrs": state.lrs, "label_tokens": state.tokens,
           "train_seconds": state.elapsed}
    atomic_write_text(str(out / "train_log.json"), json.dumps(log, indent=1))
    title = f"peft-fast train: {args.method}" + ("" if args.method == "ia3" else f" r={args.r}") + \
            (" 4-bit" if args.four_bit else "") + (" (demo: string reversal)" if data_path == DEMO_DATA else f" on {data_path.name}")
    why_not = plot_losses(state.losses, out / "loss.png", title)
    if why_not:
        print(f"warning: no loss.png: {why_not}", file=sys.stderr)


def _demo_samples(model, tokenizer, examples, device, n: int = 30) -> None:
    """Exact-match rate of the trained demo model's greedy answers on `n` strings it never saw."""
    from ._train_demo import demo_row, greedy, heldout_words

    model.eval()
    seen = {ex.response[::-1] for ex in examples if ex.response}
    results = []
    for word in heldout_words(n, seen):
        got = greedy(model, tokenizer, demo_row(word)["prompt"], len(word) + 2, device)
        results.append((word, got, got == demo_row(word)["response"]))
    shown = [f"{w} -> {g} {'ok' if ok else 'x'}" for w, g, ok in results[:3]]
    print(f"check    unseen strings reversed exactly: {sum(r[2] for r in results)}/{n}  (e.g. {';  '.join(shown)})")
