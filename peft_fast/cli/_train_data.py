"""Supervised fine-tuning data for `peft-fast train`: JSONL reading, tokenization, batching.

One JSON object per line, in one of two forms (blank lines are skipped):

    {"text": "..."}                          loss on every token
    {"prompt": "...", "response": "..."}     loss on the response tokens only

A prompt/response row is tokenized as ``tokens(prompt, with the tokenizer's special tokens) +
tokens(response, none) + [eos]``; its labels are -100 (ignored) on the prompt, so the model is
trained to produce the response given the prompt, and to stop. The two parts are tokenized
separately so that the boundary is exact; the text is concatenated as given (put any
separator, e.g. a newline, at the end of the prompt).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ._train_util import CLIError

IGNORE = -100


@dataclass
class Example:
    line: int                 # 1-based line number in the file (for messages)
    text: Optional[str] = None
    prompt: Optional[str] = None
    response: Optional[str] = None


def read_jsonl(path: str) -> tuple[list[Example], str]:
    """The examples of a JSONL file and the file's sha256; CLIError naming the bad line."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CLIError(f"dataset file {str(path)!r} does not exist")
    if p.is_dir():
        raise CLIError(f"dataset {str(path)!r} is a directory; --data takes a JSONL file")
    raw = p.read_bytes()
    examples = []
    for n, line in enumerate(raw.splitlines(), start=1):
        where = f"{path}, line {n}"
        try:
            s = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CLIError(f"{where}: not UTF-8 ({e.reason} at byte {e.start})") from None
        if not s.strip():
            continue
        try:
            obj = json.loads(s)
        except json.JSONDecodeError as e:
            raise CLIError(f"{where}: not valid JSON ({e.msg} at column {e.colno}): {_clip(s)}") from None
        examples.append(_example(obj, n, where))
    if not examples:
        raise CLIError(f"dataset {str(path)!r} holds no examples (expected one JSON object per line)")
    return examples, hashlib.sha256(raw).hexdigest()


def _example(obj, n: int, where: str) -> Example:
    if not isinstance(obj, dict):
        raise CLIError(f"{where}: expected a JSON object with 'text' or 'prompt'/'response', "
                       f"got a JSON {type(obj).__name__}")
    has_text, has_pr = "text" in obj, ("prompt" in obj or "response" in obj)
    if has_text and has_pr:
        raise CLIError(f"{where}: has both 'text' and 'prompt'/'response'; use one form per line")
    if has_text:
        _check_str(obj, "text", where)
        return Example(n, text=obj["text"])
    if "prompt" in obj and "response" in obj:
        _check_str(obj, "prompt", where, allow_empty=True)
        _check_str(obj, "response", where)
        return Example(n, prompt=obj["prompt"], response=obj["response"])
    raise CLIError(f"{where}: expected a 'text' field or both 'prompt' and 'response', got keys {sorted(obj)}")


def _check_str(obj: dict, key: str, where: str, allow_empty: bool = False) -> None:
    v = obj[key]
    if not isinstance(v, str):
        raise CLIError(f"{where}: '{key}' must be a string, got {type(v).__name__}")
    if not v and not allow_empty:
        raise CLIError(f"{where}: '{key}' is empty")


def _clip(s: str, n: int = 60) -> str:
    s = s.strip()
    return repr(s if len(s) <= n else s[:n] + "...")


# ------------------------------------------------------------------------------ tokenization
def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def encode(examples: list[Example], tokenizer, seq_len: int) -> tuple[list[tuple[list[int], list[int]]], int]:
    """[(input_ids, labels)] truncated to `seq_len` tokens, and how many rows were dropped
    because truncation left them no label to learn from."""
    eos = tokenizer.eos_token_id
    rows, dropped = [], 0
    for ex in examples:
        if ex.text is not None:
            ids = _ids(tokenizer, ex.text, True)
            if eos is not None and (not ids or ids[-1] != eos):
                ids.append(eos)
            labels = list(ids)
        else:
            p = _ids(tokenizer, ex.prompt, True)
            if eos is not None and p and p[-1] == eos:  # tokenizers that close every sequence
                p = p[:-1]
            r = _ids(tokenizer, ex.response, False) + ([eos] if eos is not None else [])
            ids, labels = p + r, [IGNORE] * len(p) + r
        ids, labels = ids[:seq_len], labels[:seq_len]
        # labels[0] is never predicted (nothing precedes it): a row needs a label after position 0
        if not any(lab != IGNORE for lab in labels[1:]):
            dropped += 1
            continue
        rows.append((ids, labels))
    return rows, dropped


def pad_id_of(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return int(tid)
    return 0


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels (-100 on padding)."""
    T = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, :len(x)] = torch.tensor(x)
        labels[i, :len(y)] = torch.tensor(y)
        mask[i, :len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def n_label_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens the loss is taken over: labels after the causal shift that are not ignored."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def epoch_batches(n_rows: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Row indices of each micro-batch of one epoch: a shuffle fixed by (seed, epoch), so that a
    resumed run sees exactly the batches the uninterrupted run would have."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n_rows, generator=g).tolist()
    return [order[i:i + batch_size] for i in range(0, n_rows, batch_size)]


def steps_per_epoch(n_rows: int, batch_size: int, grad_accum: int) -> int:
    return math.ceil(math.ceil(n_rows / batch_size) / grad_accum)
