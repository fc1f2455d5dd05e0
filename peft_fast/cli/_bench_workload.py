"""The workloads of `peft-fast bench`: training (lora, dora, ia3, qlora) and mixed-adapter
inference (`mixed`), each with its providers built, run interleaved, and turned into rows.

Providers of the training workload (all alive at once, the frozen weights shared):
  base      the frozen base model (fwd+bwd to the input embeddings; forward)
  base_4bit the frozen NF4 base of QLoRA (every nn.Linear but the output layer a bnb Linear4bit)
  <method>  peft and peft_fast: get_peft_model(copy of the base, the method's config)
Mixed-adapter inference (N LoRA adapters, sample i uses adapter i mod N):
  peft_fast       peft_fast with adapter_names (its one op per layer)
  peft            peft with the same adapter_names (its loop over adapters)
  peft_fast_one   peft_fast, the same batch on one adapter (the ceiling to approach)
  base            the frozen base model
Adapter weights are randomised (the same values for peft and peft_fast, drawn in name order),
so a zero lora_B or a ones ia3_l cannot let a provider skip work.
"""
from __future__ import annotations

import contextlib

import math

import torch

from ._bench_common import num, quantiles, ratio
from ._bench_layers import randomise_adapters
from ._bench_model import config_summary, method_config, shared_copy, to_4bit
from ._bench_run import Provider, free_memory, interleave, n_steps, record_error

TRAIN_PHASES = ("train", "forward")
MIXED_PHASES = ("prefill", "decode")


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def _trainables(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def _autocast(device, dtype):
    """torch.autocast on the model's device in `dtype`, or a null context when dtype is None."""
    return torch.autocast(torch.device(device).type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _attach_train_fns(p: Provider, batch: dict, autocast=None) -> None:
    """p.fns["train"] / ["forward"]: one training step / one no-grad forward, under
    torch.autocast(autocast) when given (the model stays fp32; Trainer's bf16=True)."""
    model = p.model
    device = batch["input_ids"].device
    model.train()
    model.enable_input_require_grads()  # the frozen base then runs its full backward as well
    params = _trainables(model)
    p.n_trainable = sum(t.numel() for t in params)
    if p.provider != "base":
        if not params:
            raise RuntimeError("no trainable parameters")
        p.opt = torch.optim.AdamW(params, lr=1e-4)
    else:
        model.requires_grad_(False)
        p.n_trainable = 0

    def train():
        with _autocast(device, autocast):
            out = model(**batch)
        out.loss.backward()
        if p.opt is not None:
            p.opt.step()
            p.opt.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)
        if p.loss is None:  # the first step: same weights, same batch for peft and peft_fast
            p.loss = float(out.loss.detach())

    ids = batch["input_ids"]

    def forward():
        with torch.no_grad(), _autocast(device, autocast):
            model(input_ids=ids)

    p.fns = {"train": train, "forward": forward}


def build_train_providers(cfg, base_model, libs: dict, methods: list, log) -> list:
    """Providers of the training workload, in the order they are reported."""
    providers = []
    if any(m != "qlora" for m in methods):  # qlora's own frozen base is the NF4 one
        providers.append(Provider("base", "base", model=shared_copy(base_model)))
    base4 = None
    for method in methods:
        if method == "qlora" and cfg.qlora_problem:
            providers.append(Provider("qlora", "peft_fast", error=f"skipped: {cfg.qlora_problem}"))
            continue
        if method == "qlora" and base4 is None:
            log(f"quantizing the base model to NF4 for qlora ({cfg.device})")
            base4 = to_4bit(base_model, cfg.dtype, cfg.device)
            providers.append(Provider("base_4bit", "base", model=shared_copy(base4), base="base_4bit"))
        src = base4 if method == "qlora" else base_model
        for name in ("peft", "peft_fast"):
            if name not in libs:
                continue
            p = Provider(method, name, base="base_4bit" if method == "qlora" else "base")
            try:
                torch.manual_seed(2)
                model = libs[name].get_peft_model(shared_copy(src), method_config(libs[name], method, cfg.rank,
                                                                                  cfg.targets, src))
                randomise_adapters(model, seed=1234)
                p.model = model
            except Exception as e:  # noqa: BLE001 - recorded for this provider; the run goes on
                record_error(p, e, "get_peft_model", trace=False)
            providers.append(p)
    for p in providers:
        if p.model is not None:
            try:
                _attach_train_fns(p, cfg.batch_tensors, getattr(cfg, "autocast", None))
            except Exception as e:  # noqa: BLE001
                record_error(p, e, "setup")
    return providers


def run_train(cfg, base_model, libs: dict, methods: list, log, phases=TRAIN_PHASES) -> list:
    """Build, warm up and time the training workload; returns its providers with their samples."""
    providers = build_train_providers(cfg, base_model, libs, methods, log)
    total = sum(n_steps(providers, ph, cfg.steps, cfg.warmup, ph == "train", cfg.clock.cuda) for ph in phases)
    bar = _progress(total, "bench " + "/".join(methods), cfg.progress)
    try:
        for phase in phases:  # train first: on some CPUs a no-grad eval forward repacks bnb weights
            for p in providers:
                if p.model is not None and not p.error:
                    p.model.train(phase == "train")
            interleave(providers, phase, cfg.steps, cfg.warmup, cfg.clock, bar, cpu_mem=(phase == "train"))
    finally:
        if bar is not None:
            bar.close()
    for p in providers:  # keep the numbers, free the models
        p.model = p.opt = None
        p.fns = {}
    free_memory(cfg.device)
    return providers


# ------------------------------------------------------------------------------------------ mixed
def _mixed_model(lib, base_model, cfg, n: int):
    model = None
    for i in range(n):
        c = method_config(lib, "mixed", cfg.rank, cfg.targets, base_model)
        if model is None:
            model = lib.get_peft_model(shared_copy(base_model), c, adapter_name=f"a{i}")
        else:
            model.add_adapter(f"a{i}", c)
    randomise_adapters(model, seed=4321)
    return model.eval()


def _attach_mixed_fns(p: Provider, model, kw: dict, ids, nxt, seq: int, autocast=None) -> None:
    model.eval()

    def prefill():
        with torch.no_grad(), _autocast(ids.device, autocast):
            model(input_ids=ids, use_cache=False, **kw)

    state = {}

    def make_cache():
        with torch.no_grad(), _autocast(ids.device, autocast):
            state["cache"] = model(input_ids=ids, use_cache=True, **kw).past_key_values

    def decode():
        if "cache" not in state:  # (re)built outside the timed region when it could not be cropped
            raise RuntimeError("no KV cache")
        with torch.no_grad(), _autocast(ids.device, autocast):
            model(input_ids=nxt, past_key_values=state["cache"], use_cache=True, **kw)

    def reset():  # back to the prompt's length, so every step decodes at the same position
        try:
            state["cache"].crop(seq)
        except Exception:  # noqa: BLE001 - a cache type without crop(): rebuild it
            make_cache()

    make_cache()
    p.fns = {"prefill": prefill, "decode": decode}
    p.post = {"decode": reset}


def run_mixed(cfg, base_model, libs: dict, log) -> list:
    """Mixed-adapter batches: N adapters, sample i on adapter i mod N; prefill and decode."""
    n = cfg.adapters
    names = [f"a{i % n}" for i in range(cfg.batch)]
    ids = cfg.batch_tensors["input_ids"]
    g = torch.Generator().manual_seed(3)
    nxt = torch.randint(0, cfg.vocab, (cfg.batch, 1), generator=g).to(cfg.device)
    providers = [Provider("mixed", "base", model=shared_copy(base_model).eval())]
    fast = None
    for name in ("peft_fast", "peft"):
        if name not in libs:
            continue
        p = Provider("mixed", name)
        try:
            p.model = _mixed_model(libs[name], base_model, cfg, n)
        except Exception as e:  # noqa: BLE001
            record_error(p, e, "get_peft_model", trace=False)
        providers.append(p)
        if name == "peft_fast":
            fast = p
    if fast is not None and fast.model is not None:
        providers.append(Provider("mixed", "peft_fast_one", model=fast.model))
    for p in providers:
        if p.model is None:
            continue
        kw = {"adapter_names": names} if p.provider in ("peft", "peft_fast") else {}
        try:
            if p.provider == "peft_fast_one":
                p.model.set_adapter("a0")
            _attach_mixed_fns(p, p.model, kw, ids, nxt, cfg.seq, getattr(cfg, "autocast", None))
        except Exception as e:  # noqa: BLE001
            record_error(p, e, "setup")
    total = sum(n_steps(providers, ph, cfg.steps, cfg.warmup, False, cfg.clock.cuda) for ph in MIXED_PHASES)
    bar = _progress(total, f"bench mixed ({n} adapters)", cfg.progress)
    try:
        for phase in MIXED_PHASES:
            interleave(providers, phase, cfg.steps, cfg.warmup, cfg.clock, bar)
    finally:
        if bar is not None:
            bar.close()
    for p in providers:
        p.model = p.opt = None
        p.fns, p.post = {}, {}
    free_memory(cfg.device)
    return providers


# ------------------------------------------------------------------------------------------ rows
def _stats(p: Provider, phase: str):
    s = p.samples.get(phase)
    return quantiles(s) if s else None


def rows_from(providers: list, cfg, meta_row: dict, base_model, train_phases=TRAIN_PHASES) -> list:
    """One row per (provider, phase): times, tokens/s, the ratios and the peak memory."""
    by_key = {p.key: p for p in providers}
    rows = []
    for p in providers:
        for phase in MIXED_PHASES if p.method == "mixed" else train_phases:
            q = _stats(p, phase)
            tokens = cfg.batch * (1 if phase == "decode" else cfg.seq)
            row = {**meta_row, "method": p.method, "provider": p.provider, "phase": phase,
                   "adapter": "" if p.provider == "base" else config_summary(p.method, cfg.rank, cfg.targets, base_model),
                   "tokens_per_step": tokens, "status": "ok" if q else ("skipped" if p.error.startswith("skipped")
                                                                       else "error"),
                   "tokens_per_s": "", "median_ms": "", "p20_ms": "", "p80_ms": "", "speedup_vs_peft": "",
                   "time_vs_base": "", "vs_one_adapter": "", "peak_mem_MiB": "", "peak_mem_kind": "",
                   "mem_vs_peft": "", "loss_first_step": "", "rel_loss_diff_vs_peft": "", "trainable_params": "",
                   "steps": 0, "note": p.error}
            if p.method == "mixed" and p.provider != "base":
                row["adapter"] += f" ({cfg.adapters} adapters)" if p.provider != "peft_fast_one" else " (one adapter)"
            if q:
                row.update(tokens_per_s=round(tokens / q["median"], 1), median_ms=round(q["median"] * 1e3, 3),
                           p20_ms=round(q["p20"] * 1e3, 3), p80_ms=round(q["p80"] * 1e3, 3), steps=q["n"])
            if phase in p.mem:
                row["peak_mem_MiB"] = round(p.mem[phase] / 2**20, 1)
                row["peak_mem_kind"] = "cuda_max_allocated" if cfg.clock.cuda else "cpu_saved_activations"
            if phase == "train" and p.provider != "base":
                row["trainable_params"] = p.n_trainable
                row["loss_first_step"] = round(p.loss, 6) if p.loss is not None else ""
            rows.append(row)
    # ratios within a phase: vs the same method's peft, vs its frozen base, vs one adapter (mixed)
    idx = {(r["method"], r["provider"], r["phase"]): r for r in rows}
    for r in rows:
        if r["status"] != "ok":
            continue
        p = by_key[f"{r['method']}:{r['provider']}"]
        base_key = ("mixed", "base") if r["method"] == "mixed" else (p.base, "base")
        b = idx.get((*base_key, r["phase"]))
        if b is not None and b["status"] == "ok":
            r["time_vs_base"] = ratio(r["median_ms"], b["median_ms"])
        ref = idx.get((r["method"], "peft", r["phase"]))
        if r["provider"] != "base" and ref is not None and ref["status"] == "ok":
            r["speedup_vs_peft"] = ratio(ref["median_ms"], r["median_ms"])
            r["mem_vs_peft"] = ratio(r["peak_mem_MiB"], ref["peak_mem_MiB"])
            lf, lp = num(r["loss_first_step"]), num(ref["loss_first_step"])
            if lf is not None and lp:
                r["rel_loss_diff_vs_peft"] = float(f"{abs(lf - lp) / abs(lp):.3g}")
        one = idx.get(("mixed", "peft_fast_one", r["phase"]))
        if r["method"] == "mixed" and r["provider"] != "base" and one is not None and one["status"] == "ok":
            r["vs_one_adapter"] = ratio(one["median_ms"], r["median_ms"])
    for r in rows:
        for k in ("time_vs_base", "speedup_vs_peft", "vs_one_adapter"):
            v = r[k]
            if v != "" and not (isinstance(v, float) and math.isfinite(v) and v > 0):
                r[k] = ""
    return rows
