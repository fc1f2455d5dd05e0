#!/usr/bin/env bash
# The one script to run on a GPU machine: install this repo (and a carried bitsandbytes wheel,
# nothing else), record the environment, run the GPU tests, the per-layer benchmark and the
# QLoRA benchmark. Every step runs even when an earlier one failed; each step's exit code goes
# into suite_summary.json and the script exits non-zero at the end if any step failed.
#
# The GPU machine has no network: only `pip install --no-deps -e .` of this repo, plus the
# bitsandbytes wheel if one was carried (wheels/ or .whl/; without it the QLoRA tests skip and
# the QLoRA bench step fails with exit code 2). Prepare the wheel once, here, in the repo root
# (a py3-none x86-64 wheel, about 43 MB; wheels/ is git-ignored; its requirements torch, numpy
# and packaging are in the device image):
#   .venv/bin/pip download bitsandbytes==0.50.2 --no-deps --only-binary :all: --platform manylinux_2_24_x86_64 -d wheels/
# and pass it along with the device tool's run call:  carry: ["wheels"]
#   run(command="bash benchmarks/gpu_suite.sh", carry=["wheels"], timeout_s=600)
#
# Time: designed to end inside ~9 minutes on an H100 (the device tool's limit is 10 minutes a
# command). Each bench gets a time budget after which it starts no new case (it still writes
# what it has), and each step has a hard cap (`timeout`) well above it:
#   pytest -m gpu       capped at SUITE_PYTEST_TIMEOUT_S (240 s)
#   bench_layers.py     --time-budget: what is left of SUITE_BUDGET_S (500 s from the start)
#                       minus the QLoRA bench's share and a margin (SUITE_BENCH_BUDGET_S sets it)
#   bench_qlora.py      --time-budget SUITE_QLORA_BUDGET_S (150 s; less if less is left), of
#                       which up to 90 s are kept for its part c (the 1B-model training step)
#
# Results, RES=${SUITE_RESULTS_DIR:-benchmarks/results/gpu/<device-name-slug>}:
#   env.txt  suite_summary.json
#   pytest/  pytest_gpu.xml  pytest_gpu.log
#   layers/  bench_layers.log  layers.csv  layers.json  layers.png
#   qlora/   bench_qlora.log  qlora.csv  qlora.json  qlora.png
# The device tool returns at most 8 files from $OUT in all (not per folder), no more than two
# folders down. So when OUT is set, after every step (a run killed at its limit still returns
# what was done), $OUT/<slug>/ receives exactly these 8 files:
#   results.tar.gz (the whole RES tree: logs, JSON with meta and path choices)  suite_summary.json
#   env.txt  pytest_gpu.log  layers.csv  layers.png  qlora.csv  qlora.png
#
# Environment knobs:
#   SUITE_QUICK=1            the benches' --quick (tiny shapes; also used when no CUDA is found)
#   SUITE_BENCH_ARGS="..."   extra bench_layers arguments, e.g. "--methods lora --tokens 512 8192"
#   SUITE_QLORA_ARGS="..."   extra bench_qlora arguments, e.g. "--parts b c --grad-ckpt"
#   SUITE_BUDGET_S           seconds from the start by which the benches should be done (500)
#   SUITE_BENCH_BUDGET_S     bench_layers' --time-budget (default: computed as above)
#   SUITE_QLORA_BUDGET_S     bench_qlora's --time-budget (150)
#   SUITE_MULTI=1            also run bench_multi_lora.py (its own call: SUITE_SKIP_PYTEST=1
#                            SUITE_SKIP_LAYERS=1 SUITE_SKIP_QLORA=1 SUITE_MULTI=1); SUITE_MULTI_ARGS,
#                            SUITE_MULTI_TIMEOUT_S (400)
#   SUITE_PYTEST_TIMEOUT_S   hard cap of the GPU tests (240)
#   SUITE_SKIP_INSTALL=1 / SUITE_SKIP_PYTEST=1 / SUITE_SKIP_LAYERS=1 / SUITE_SKIP_QLORA=1
#   SUITE_RESULTS_DIR        where the full results go (default above)
#   PYTHON                   interpreter (default python3)
#
#   bash benchmarks/gpu_suite.sh            # on the device tool: OUT is set, results come back
set -u
set -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=5 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
SUITE_START=$(date +%s)
BUDGET_S=${SUITE_BUDGET_S:-500}

slug=$("$PY" - <<'EOF' 2>/dev/null
import re
try:
    import torch
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
except Exception:
    name = "unknown"
print(re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown")
EOF
)
slug="${slug:-unknown}"
RES="${SUITE_RESULTS_DIR:-benchmarks/results/gpu/${slug}}"
EXPORT_DIR=""
[ -n "${OUT:-}" ] && EXPORT_DIR="${OUT}/${slug}"
mkdir -p "$RES/pytest" "$RES/layers" "$RES/qlora" ${EXPORT_DIR:+"$EXPORT_DIR"}
STEPS_FILE="$(mktemp)"
echo "== results in $RES${EXPORT_DIR:+ (8 files copied to $EXPORT_DIR after each step)}"

elapsed() { echo $(( $(date +%s) - SUITE_START )); }

has_cuda=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)

# write_summary COMPLETE: suite_summary.json from the steps so far
write_summary() {
    "$PY" - "$STEPS_FILE" "$RES/suite_summary.json" "$slug" "$(elapsed)" "$1" <<'EOF'
import datetime, json, os, sys
steps_file, out, slug, total, complete = sys.argv[1:6]
steps = []
for line in open(steps_file):
    name, rc, secs = line.split()
    steps.append({"step": name, "exit_code": int(rc), "seconds": int(secs)})
summary = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "device": slug,
           "total_seconds": int(total), "complete": complete == "1",
           "ok": complete == "1" and all(s["exit_code"] == 0 for s in steps), "steps": steps}
tmp = out + ".tmp"
with open(tmp, "w") as f:
    json.dump(summary, f, indent=2)
os.replace(tmp, out)
if complete == "1":
    print(json.dumps(summary, indent=2))
EOF
}

# export: the 8 files the device tool can return (no-op without OUT)
export_results() {
    [ -n "$EXPORT_DIR" ] || return 0
    local tmp; tmp=$(mktemp)  # outside $OUT: a run killed mid-tar leaves no ninth file there
    tar -czf "$tmp" -C "$(dirname "$RES")" "$(basename "$RES")" 2>/dev/null \
        && mv -f "$tmp" "$EXPORT_DIR/results.tar.gz"
    rm -f "$tmp"
    local f
    for f in suite_summary.json env.txt pytest/pytest_gpu.log layers/layers.csv layers/layers.png \
             qlora/qlora.csv qlora/qlora.png; do
        [ -f "$RES/$f" ] && cp -f "$RES/$f" "$EXPORT_DIR/$(basename "$f")"
    done
    return 0
}

# step NAME CMD...: run, record "NAME RC SECONDS", never abort the suite; export after each
step() {
    local name="$1"; shift
    local t0=$(date +%s)
    echo "== [$name] $* (at $(elapsed) s)"
    "$@"
    local rc=$?
    echo "$name $rc $(( $(date +%s) - t0 ))" >>"$STEPS_FILE"
    echo "== [$name] exit $rc"
    write_summary 0
    export_results
    return 0
}

install_repo() {
    {
        echo "# pip install --no-deps --no-build-isolation -e ."
        "$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>&1 || return 1
        local whl
        whl=$(ls wheels/bitsandbytes-*.whl .whl/bitsandbytes-*.whl 2>/dev/null | head -n 1)
        if [ -n "$whl" ]; then
            echo "# bitsandbytes from $whl"
            "$PY" -m pip install -q --no-deps --no-index "$whl" 2>&1 || return 1
        else
            echo "# no bitsandbytes wheel carried (wheels/ or .whl/): its tests skip, bench_qlora fails (exit 2)"
        fi
    } 2>&1 | tee -a "$RES/env.txt"
}

record_env() {
    {
        echo "# date: $(date -u +%Y-%m-%dT%H:%M:%SZ)   git: $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
        echo "# nvidia-smi"
        nvidia-smi 2>&1 || echo "(nvidia-smi not available)"
        echo "# versions"
        "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "| capability", f"{p.major}.{p.minor}", "| SMs", p.multi_processor_count,
          "| memory GiB", round(p.total_memory / 2**30, 1))
else:
    print("device: no CUDA")
for mod in ("triton", "peft", "transformers", "accelerate", "bitsandbytes", "pytest", "peft_fast"):
    try:
        m = __import__(mod)
        print(f"{mod} {getattr(m, '__version__', '?')}  ({getattr(m, '__file__', '')})")
    except Exception as e:
        print(f"{mod} missing ({type(e).__name__}: {e})")
EOF
    } 2>&1 | tee -a "$RES/env.txt"
}

gpu_tests() {
    local timeout_flag=()
    if "$PY" -c "import pytest_timeout" 2>/dev/null; then
        timeout_flag=(--timeout 600)
    else
        echo "(pytest-timeout missing: running without --timeout)"
    fi
    timeout "${SUITE_PYTEST_TIMEOUT_S:-240}" \
        "$PY" -m pytest -m gpu -q -x ${timeout_flag[@]+"${timeout_flag[@]}"} -p no:cacheprovider \
        --junitxml "$RES/pytest/pytest_gpu.xml" tests 2>&1 | tee "$RES/pytest/pytest_gpu.log"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 5 ]; then  # pytest: no test selected — nothing failed
        echo "(no gpu-marked tests collected)"
        rc=0
    fi
    [ "$rc" -eq 124 ] && echo "(GPU tests stopped at SUITE_PYTEST_TIMEOUT_S=${SUITE_PYTEST_TIMEOUT_S:-240} s)"
    return "$rc"
}

quick_flag() {
    if [ "${SUITE_QUICK:-0}" = "1" ] || [ "$has_cuda" != "1" ]; then
        [ "$has_cuda" != "1" ] && echo "(no CUDA device: running the --quick shapes)" >&2
        echo "--quick"
    fi
}

# what the QLoRA bench will be given: its own budget, or less when less is left
qlora_budget() {
    local want=${SUITE_QLORA_BUDGET_S:-150}
    [ "${SUITE_SKIP_QLORA:-0}" = "1" ] && want=0
    echo "$want"
}

bench_layers() {
    local args=(--out "$RES/layers")
    local q; q=$(quick_flag); [ -n "$q" ] && args+=("$q")
    # leave the QLoRA bench its budget plus ~60 s for its start-up, the last case and writing
    local reserve=$(( $(qlora_budget) > 0 ? $(qlora_budget) + 60 : 0 ))
    local left=$(( BUDGET_S - $(elapsed) - reserve - 40 ))
    [ "$left" -lt 60 ] && left=60
    local budget=${SUITE_BENCH_BUDGET_S:-$left}
    args+=(--time-budget "$budget")
    # shellcheck disable=SC2206  # word splitting of the extra arguments is intended
    args+=(${SUITE_BENCH_ARGS:-})
    echo "bench_layers.py ${args[*]}"
    timeout $(( budget + 150 )) "$PY" benchmarks/bench_layers.py "${args[@]}" 2>&1 | tee "$RES/layers/bench_layers.log"
    return "${PIPESTATUS[0]}"
}

bench_qlora() {
    local args=(--out "$RES/qlora")
    local q; q=$(quick_flag); [ -n "$q" ] && args+=("$q")
    local budget; budget=$(qlora_budget)
    local left=$(( BUDGET_S - $(elapsed) - 40 ))
    [ "$left" -lt "$budget" ] && budget=$left
    [ "$budget" -lt 60 ] && budget=60
    args+=(--time-budget "$budget")
    # shellcheck disable=SC2206
    args+=(${SUITE_QLORA_ARGS:-})
    echo "bench_qlora.py ${args[*]}"
    timeout $(( budget + 150 )) "$PY" benchmarks/bench_qlora.py "${args[@]}" 2>&1 | tee "$RES/qlora/bench_qlora.log"
    return "${PIPESTATUS[0]}"
}

bench_multi_lora() {
    mkdir -p "$RES/multi"
    local args=(--out "$RES/multi")
    local q; q=$(quick_flag); [ -n "$q" ] && args+=("$q")
    # shellcheck disable=SC2206
    args+=(${SUITE_MULTI_ARGS:-})
    echo "bench_multi_lora.py ${args[*]}"
    timeout "${SUITE_MULTI_TIMEOUT_S:-400}" "$PY" benchmarks/bench_multi_lora.py "${args[@]}" 2>&1 \
        | tee "$RES/multi/bench_multi_lora.log"
    return "${PIPESTATUS[0]}"
}

: >"$RES/env.txt"
if [ "${SUITE_SKIP_INSTALL:-0}" != "1" ]; then step install install_repo; fi
step env record_env
if [ "${SUITE_SKIP_PYTEST:-0}" != "1" ]; then step pytest_gpu gpu_tests; fi
if [ "${SUITE_SKIP_LAYERS:-0}" != "1" ]; then step bench_layers bench_layers; fi
if [ "${SUITE_SKIP_QLORA:-0}" != "1" ]; then step bench_qlora bench_qlora; fi
# mixed-adapter batches: opt-in (SUITE_MULTI=1), since the three benches above fill one 10-minute
# device call; results go into results.tar.gz only (multi/)
if [ "${SUITE_MULTI:-0}" = "1" ]; then step bench_multi_lora bench_multi_lora; fi

write_summary 1
export_results
rm -f "$STEPS_FILE"

if "$PY" -c "import json,sys; sys.exit(0 if json.load(open(sys.argv[1]))['ok'] else 1)" "$RES/suite_summary.json"; then
    echo "== suite OK ($RES${EXPORT_DIR:+, exported to $EXPORT_DIR})"
    exit 0
fi
echo "== suite FAILED: see $RES/suite_summary.json"
exit 1
