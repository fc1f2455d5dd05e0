"""The lean training loop of `peft-fast train`: AdamW on the adapter parameters, gradient
accumulation with token-weighted loss, LR schedule, clipping, checkpoints that resume exactly,
a tqdm progress bar, and the loss-curve PNG.

Why not transformers' Trainer: it works with peft_fast models (see trainer_integration.py), but
for a CLI whose job is adapters it adds seconds of start-up, an accelerate dependency and
far more knobs than the command exposes; this loop is ~200 lines and resumes bit-exactly.

Exact resume: the shuffle of each epoch is a function of (seed, epoch) (_train_data.epoch_batches)
and the loop state is (step, epoch, index of the next micro-batch in that epoch); a checkpoint
stores that with the optimizer state and the RNG states, so an interrupted run continued with
--resume takes the same steps as one that never stopped.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ._train_data import IGNORE, collate, epoch_batches, n_label_tokens, steps_per_epoch
from ._train_util import CLIError

STATE_FILE = "training_state.pt"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class Settings:
    lr: float
    batch_size: int
    grad_accum: int
    epochs: float
    max_steps: int            # <= 0: from epochs
    seed: int
    output: Path
    weight_decay: float = 0.0
    warmup_steps: int = 0
    scheduler: str = "linear"  # linear | cosine | constant (after warm-up)
    max_grad_norm: float = 1.0
    save_steps: int = 0       # 0: a checkpoint at the end of every epoch
    save_total_limit: int = 2
    progress: bool = True


@dataclass
class State:
    step: int = 0             # optimizer steps done
    epoch: int = 0            # epoch of the next micro-batch
    micro: int = 0            # index of the next micro-batch within that epoch
    losses: list = field(default_factory=list)   # mean token loss of each step
    lrs: list = field(default_factory=list)
    tokens: int = 0           # label tokens trained on
    elapsed: float = 0.0      # seconds in the loop, over all runs


class Interrupted(Exception):
    def __init__(self, checkpoint: Path, step: int):
        super().__init__(f"interrupted at step {step}; checkpoint {checkpoint}")
        self.checkpoint, self.step = checkpoint, step


def total_steps(n_rows: int, s: Settings) -> int:
    if s.max_steps and s.max_steps > 0:
        return s.max_steps
    return max(1, math.ceil(s.epochs * steps_per_epoch(n_rows, s.batch_size, s.grad_accum)))


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak LR for optimizer step `step` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return max(0.0, 1.0 - progress)


def make_optimizer(model, s: Settings) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise CLIError("the adapter has no trainable parameters (check --targets)")
    return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)


# ------------------------------------------------------------------------------ checkpoints
def list_checkpoints(output: Path) -> list[Path]:
    found = [(int(m.group(1)), p) for p in output.glob("checkpoint-*")
             if p.is_dir() and (m := _CKPT.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def find_checkpoint(output: Path, spec: str) -> Path:
    """The checkpoint --resume names: 'latest' (newest in --output) or a checkpoint directory."""
    if spec == "latest":
        found = list_checkpoints(output)
        if not found:
            raise CLIError(f"--resume: no checkpoint-* directory with {STATE_FILE} in {str(output)!r}")
        return found[-1]
    p = Path(spec).expanduser()
    if not p.is_dir():
        raise CLIError(f"--resume: checkpoint directory {spec!r} does not exist")
    if not (p / STATE_FILE).is_file():
        raise CLIError(f"--resume: {spec!r} is not a checkpoint (no {STATE_FILE})")
    return p


def save_checkpoint(model, optimizer, state: State, s: Settings, meta: dict) -> Path:
    """Write checkpoint-<step>/ (PEFT adapter files + training_state.pt) atomically; prune old ones."""
    final = s.output / f"checkpoint-{state.step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=s.output))
    try:
        model.save_pretrained(str(tmp))
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save({"step": state.step, "epoch": state.epoch, "micro": state.micro, "losses": state.losses,
                    "lrs": state.lrs, "tokens": state.tokens, "elapsed": state.elapsed,
                    "optimizer": optimizer.state_dict(), "rng": rng, "meta": meta}, tmp / STATE_FILE)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if s.save_total_limit > 0:
        for old in list_checkpoints(s.output)[:-s.save_total_limit]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint(path: Path) -> dict:
    """The training state saved in checkpoint `path`; CLIError naming it when unreadable or incomplete."""
    try:
        blob = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated zip, unpickling error, I/O error, ...
        raise CLIError(f"--resume: checkpoint {str(path)!r} is unreadable: {STATE_FILE} failed to load "
                       f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); resume from an "
                       "older checkpoint-* instead") from None
    missing = [k for k in ("step", "epoch", "micro", "losses", "lrs", "tokens", "elapsed", "optimizer", "rng")
               if not isinstance(blob, dict) or k not in blob]
    if missing:
        raise CLIError(f"--resume: checkpoint {str(path)!r} is incomplete: {STATE_FILE} lacks {missing}")
    return blob


def load_checkpoint(model, optimizer, path: Path, blob: dict, s: Settings, device, meta: dict) -> State:
    """Adapter weights, optimizer and RNG states from checkpoint `path` (`blob`: its read_checkpoint);
    CLIError when the checkpoint was made with a different adapter (method, rank, targets, ...)."""
    from peft_fast import load_peft_weights, set_peft_model_state_dict

    theirs = blob.get("meta", {}).get("adapter", {})
    for key, ours in meta["adapter"].items():
        if key in theirs and theirs[key] != ours:
            raise CLIError(f"--resume: checkpoint {str(path)!r} was trained with {key}={theirs[key]!r}, "
                           f"this run has {key}={ours!r}; use the same adapter options to resume")
    try:
        weights = load_peft_weights(str(path), device=str(device))
    except Exception as e:  # noqa: BLE001 - missing or truncated adapter file
        raise CLIError(f"--resume: cannot read the adapter weights of checkpoint {str(path)!r} "
                       f"({type(e).__name__}: {e}); resume from an older checkpoint-* instead") from None
    result = set_peft_model_state_dict(model, weights)
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k or "ia3_" in k]
    if missing or getattr(result, "unexpected_keys", []):
        raise CLIError(f"--resume: checkpoint {str(path)!r} does not fit this adapter "
                       f"(missing {missing[:3]}, unexpected {list(result.unexpected_keys)[:3]})")
    try:
        optimizer.load_state_dict(blob["optimizer"])
    except (ValueError, KeyError) as e:
        raise CLIError(f"--resume: the optimizer state of checkpoint {str(path)!r} does not fit this adapter "
                       f"({e})") from None
    # load_state_dict restored the saved hyperparameters: this run's settings (the saved ones unless
    # given again on the command line) decide; lr is set every step
    for g in optimizer.param_groups:
        g["weight_decay"] = s.weight_decay
    torch.set_rng_state(blob["rng"]["torch"])
    if "cuda" in blob["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(blob["rng"]["cuda"])
    return State(step=blob["step"], epoch=blob["epoch"], micro=blob["micro"], losses=list(blob["losses"]),
                 lrs=list(blob["lrs"]), tokens=blob["tokens"], elapsed=blob["elapsed"])


# ------------------------------------------------------------------------------ the loop
def _micro_loss(model, batch: dict, device, n_tokens: int) -> torch.Tensor:
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # next-token loss, summed here and divided by the label tokens of the whole optimizer step,
    # so accumulated micro-batches weigh every token equally (as one big batch would)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                           ignore_index=IGNORE, reduction="sum")
    return loss / n_tokens


def train(model, rows: list, pad_id: int, device, s: Settings, optimizer, state: State, meta: dict,
          log: Callable[[str], None] = print) -> State:
    """Run optimizer steps from `state` up to the total; checkpoints as configured and at the end."""
    from tqdm.auto import tqdm

    total = total_steps(len(rows), s)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    model.train()
    bar = tqdm(total=total, initial=min(state.step, total), unit="step", desc="train", dynamic_ncols=True,
               disable=not s.progress, leave=True)
    log_every = max(1, total // 10)
    saved_at = -1
    last = [time.perf_counter()]

    def tick() -> None:  # fold the time since the last tick into state.elapsed (before saves, at the end)
        now = time.perf_counter()
        state.elapsed += now - last[0]
        last[0] = now

    try:
        while state.step < total:
            batches = epoch_batches(len(rows), s.batch_size, s.seed, state.epoch)
            while state.micro < len(batches) and state.step < total:
                group = [collate([rows[i] for i in idx], pad_id)
                         for idx in batches[state.micro:state.micro + s.grad_accum]]
                n_tok = max(1, sum(n_label_tokens(b) for b in group))
                lr = s.lr * lr_factor(state.step, total, s.warmup_steps, s.scheduler)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                step_loss = 0.0
                for b in group:
                    loss = _micro_loss(model, b, device, n_tok)
                    loss.backward()
                    step_loss += float(loss.detach())
                if not math.isfinite(step_loss):
                    raise CLIError(f"the loss is {step_loss} at step {state.step + 1}; try a lower --lr "
                                   f"(now {s.lr:g}) or --dtype float32")
                if s.max_grad_norm and s.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                # the state advances only after a complete step (what a checkpoint may record)
                state.step += 1
                state.micro += len(group)
                state.losses.append(step_loss)
                state.lrs.append(lr)
                state.tokens += n_tok
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", refresh=False)
                if not s.progress and (state.step % log_every == 0 or state.step in (1, total)):
                    log(f"step {state.step}/{total}  loss {step_loss:.4f}  lr {lr:.2e}")
                if s.save_steps > 0 and state.step % s.save_steps == 0 and state.step < total:
                    tick()
                    save_checkpoint(model, optimizer, state, s, meta)
                    saved_at = state.step
            if state.micro >= len(batches):
                state.epoch, state.micro = state.epoch + 1, 0
                if s.save_steps <= 0 and state.step < total:
                    tick()
                    save_checkpoint(model, optimizer, state, s, meta)
                    saved_at = state.step
    except KeyboardInterrupt:
        bar.close()
        tick()
        path = save_checkpoint(model, optimizer, state, s, meta)
        raise Interrupted(path, state.step) from None
    bar.close()
    tick()
    if saved_at != state.step:
        save_checkpoint(model, optimizer, state, s, meta)
    return state


# ------------------------------------------------------------------------------ outputs
def plot_losses(losses: list[float], path: Path, title: str) -> Optional[str]:
    """Loss-curve PNG written atomically; returns a reason string instead when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        return f"matplotlib is not installed ({e})"
    steps = list(range(1, len(losses) + 1))
    fig = Figure(figsize=(7, 4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(steps, losses, lw=0.8, alpha=0.45, color="tab:blue", label="step loss")
    if len(losses) >= 10:
        w = max(2, len(losses) // 25)
        smooth = [sum(losses[max(0, i - w + 1):i + 1]) / len(losses[max(0, i - w + 1):i + 1])
                  for i in range(len(losses))]
        ax.plot(steps, smooth, lw=1.8, color="tab:blue", label=f"mean of {w} steps")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / label token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=".loss-", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return None
