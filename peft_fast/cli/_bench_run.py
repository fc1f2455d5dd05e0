"""The measurements of `peft-fast bench`: providers timed side by side, interleaved.

A provider is one model under test (the frozen base, or the base with a method's adapters made
by peft or peft_fast) and the callables of each phase it runs:
  train     model(input_ids, labels).loss.backward(), optimizer step, zero_grad (AdamW on the
            adapters; the frozen base runs forward and backward to its input embeddings, no step)
  forward   eval(), no_grad: model(input_ids), the logits of the whole batch
  prefill   (mixed) eval(), no_grad: the batch, one adapter per sample (`adapter_names`)
  decode    (mixed) one new token per sample on a KV cache of the batch (the cache is cropped
            back outside the timed region after every step)
All providers of a phase run one step each per round, the order rotated every round, after
`warmup` untimed rounds, so machine noise hits them alike. Clock: on CUDA wall time with a
synchronize before and after each step; on CPU the process's CPU time with one thread (robust
to other load), wall time with more.
Peak memory: on CUDA max_memory_allocated during a step minus memory_allocated before it (the
largest over the timed steps); on CPU the bytes of the unique storages autograd saves for
backward during one training step (activations; not measured for the no-grad phases).
A provider that raises is recorded with its error and dropped from later rounds.
"""
from __future__ import annotations

import gc
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

MEM_KIND = {
    "cuda": "CUDA max_memory_allocated during a step minus memory_allocated before it (largest over timed steps)",
    "cpu": "activations saved for backward: bytes of the unique storages autograd keeps during one training step",
}


@dataclass
class Provider:
    method: str  # "base", "base_4bit", "lora", "dora", "ia3", "qlora", "mixed"
    provider: str  # "base", "peft", "peft_fast", "peft_fast_one"
    model: Optional[nn.Module] = None
    fns: dict = field(default_factory=dict)  # phase -> step callable
    post: dict = field(default_factory=dict)  # phase -> untimed callable after each step
    opt: Optional[torch.optim.Optimizer] = None
    base: str = "base"  # the method whose "base" provider is this one's frozen base
    samples: dict = field(default_factory=dict)  # phase -> [seconds]
    mem: dict = field(default_factory=dict)  # phase -> bytes
    loss: Optional[float] = None
    error: str = ""
    n_trainable: int = 0

    @property
    def key(self) -> str:
        return f"{self.method}:{self.provider}"


class Clock:
    """Step timer and peak-memory probe for one device."""

    def __init__(self, device: torch.device, threads: int, kind: Optional[str] = None):
        """kind (CPU only): "cpu" or "wall" instead of the choice by thread count."""
        self.device = device
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.name, self._now = "wall time, CUDA synchronized", time.perf_counter
        elif kind == "cpu" or (kind is None and threads == 1):
            self.name, self._now = "process CPU time (1 thread)", time.process_time
        else:
            self.name, self._now = f"wall time ({threads} threads)", time.perf_counter

    def measure(self, fn: Callable) -> tuple:
        """(seconds, peak bytes or None) of one fn()."""
        if not self.cuda:
            t0 = self._now()
            fn()
            return self._now() - t0, None
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        t0 = self._now()
        fn()
        torch.cuda.synchronize(self.device)
        dt = self._now() - t0
        return dt, torch.cuda.max_memory_allocated(self.device) - before


def saved_activation_bytes(fn: Callable) -> int:
    """Bytes of the unique (non-parameter) storages autograd saves for backward while fn() runs."""
    seen: dict = {}

    def pack(t):
        if isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter) and t.numel():
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def record_error(p: Provider, e: BaseException, where: str, trace: bool = True) -> None:
    """Mark the provider failed (the message is kept for the results) and drop its model.
    trace=False: an expected kind of failure (e.g. a config that does not fit the model)."""
    if isinstance(e, torch.cuda.OutOfMemoryError):
        p.error = f"CUDA out of memory ({where})"
    else:
        if trace:
            traceback.print_exc()
        p.error = f"{where}: {type(e).__name__}: {e}"[:400]
    device = next((t.device for t in p.model.parameters()), None) if p.model is not None else None
    p.model = p.opt = None
    p.fns, p.post = {}, {}
    if device is not None and device.type == "cuda":  # give an OOM'd provider's memory back to the others
        free_memory(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def interleave(providers: list, phase: str, steps: int, warmup: int, clock: Clock, bar=None,
               cpu_mem: bool = False) -> None:
    """Run `phase` for every provider that has it: warmup untimed rounds, then `steps` timed
    rounds, one step per provider per round, the order rotated each round. cpu_mem: measure the
    saved activations (CPU) in the first round (an extra untimed round when warmup is 0)."""
    alive = [p for p in providers if phase in p.fns and not p.error]
    rounds = warmup + steps
    first_mem = cpu_mem and not clock.cuda
    extra = 1 if (first_mem and warmup == 0) else 0
    mem_round = -extra  # the first round: a warm-up one, or the extra one
    for i in range(-extra, rounds):
        alive = [p for p in alive if not p.error]
        if not alive:
            return
        k = i % len(alive)
        for p in alive[k:] + alive[:k]:
            if bar is not None:
                bar.set_postfix_str(f"{phase} {p.key}", refresh=False)
            try:
                if first_mem and i == mem_round:
                    p.mem[phase] = saved_activation_bytes(p.fns[phase])
                    dt, peak = None, None
                else:
                    dt, peak = clock.measure(p.fns[phase])
                if phase in p.post:
                    p.post[phase]()
            except Exception as e:  # noqa: BLE001 - this provider stops; the others go on
                record_error(p, e, f"{phase} step")
                continue
            finally:
                if bar is not None:
                    bar.update(1)
            if i >= warmup and dt is not None:
                p.samples.setdefault(phase, []).append(dt)
                if peak is not None:
                    p.mem[phase] = max(p.mem.get(phase, 0), peak)


def n_steps(providers: list, phase: str, steps: int, warmup: int, cpu_mem: bool, cuda: bool) -> int:
    n = sum(phase in p.fns and not p.error for p in providers)
    return n * (steps + warmup + (1 if (cpu_mem and not cuda and warmup == 0) else 0))
