#!/usr/bin/env bash
# The one script to run on a GPU machine: record the environment the image has, install this repo
# (and a carried bitsandbytes wheel, nothing else), run the GPU tests, the per-layer benchmark and
# the QLoRA benchmark. Every step runs even when an earlier one failed; each step's exit code goes
# into suite_summary.json and the script exits non-zero at the end if any step failed.
#
# The GPU machine has no network and its own python (torch 2.11, triton 3.6, transformers 5.17,
# peft, accelerate; no bitsandbytes): only `pip install --no-deps -e .` of this repo, plus the
# bitsandbytes wheel if one was carried (wheels/ or .whl/; without it the QLoRA tests skip and
# the QLoRA bench step fails with exit code 2). Prepare the wheel once, here, in the repo root
# (a py3-none x86-64 wheel, about 43 MB; wheels/ is git-ignored; its requirements torch, numpy
# and packaging are in the device image):
#   .venv/bin/pip download bitsandbytes==0.50.2 --no-deps --only-binary :all: --platform manylinux_2_24_x86_64 -d wheels/
# and pass it along with the device tool's run call:  carry: ["wheels"]
#
# Time: the GPU budget is 15 minutes of device time for a whole issue, the machine's start
# (1-2 min) included. So one call of at most 8 minutes, and a second short one right after it
# (a machine stays warm only ~30 s after a call; no machine starts with under 4 min left):
#   1. run(command="bash benchmarks/gpu_suite.sh", carry=["wheels"], timeout_s=480)
#   2. run(command="SUITE_SKIP_PYTEST=1 SUITE_SKIP_LAYERS=1 SUITE_SKIP_QLORA=1 SUITE_MULTI=1 SUITE_CPP=1 "
#          "SUITE_HARD_S=220 bash benchmarks/gpu_suite.sh", timeout_s=240)
#      (mixed-adapter batches with the C++/CUDA extension built), or, to cover the layer shapes
#      call 1 had no time for: SUITE_SKIP_PYTEST=1 SUITE_SKIP_QLORA=1 SUITE_HARD_S=220
#      SUITE_BUDGET_S=200 SUITE_BENCH_ARGS="--shapes 4096x14336 14336x4096"
# No step runs past SUITE_HARD_S (470 s) from the start: every step runs under `timeout` with
# min(its own cap, what is left of SUITE_HARD_S), and a step with under 10 s left is skipped
# (exit 124). The benches get soft budgets (--time-budget: no new case starts after it; what
# they have is still written) that end by SUITE_BUDGET_S (430 s), and hard caps above them:
#   env                 first: the versions the image has (python, torch, CUDA, triton,
#                       transformers, peft, accelerate, bitsandbytes, GPU name, capability);
#                       cap 60 s, typically ~10 s
#   install             pip install --no-deps -e . (PEFT_FAST_SKIP_CPP=1 unless SUITE_CPP=1: the
#                       nvcc build of peft_fast._C takes 1-2 min) + the wheel; cap
#                       SUITE_INSTALL_TIMEOUT_S (90 s; 200 s with SUITE_CPP=1), typically 10-30 s
#   pytest -m gpu       cap SUITE_PYTEST_TIMEOUT_S (150 s; pytest-timeout's session timeout 20 s
#                       earlier, so the summary and XML are still written), 60 s per test, stops
#                       after SUITE_PYTEST_MAXFAIL (5) failures; PEFT_FAST_PATH_STRICT=1, so a
#                       kernel that cannot launch fails its test instead of passing on the torch
#                       fallback (_path.py); PEFT_FAST_AUTOTUNE=0 (this step only, not the
#                       benches), so every launch compiles and runs the first config of its GPU's
#                       list instead of compiling and timing several per new shape, which on a
#                       cold Triton cache would leave most tests beyond the cap
#   bench_layers.py     --time-budget: SUITE_BUDGET_S minus the time spent and the QLoRA bench's
#                       share (its budget + 30 s), counted from its process start; it starts no
#                       case the last like it says would end after the budget; cap: that + 60 s
#   bench_qlora.py      --time-budget SUITE_QLORA_BUDGET_S (110 s; less if less is left before
#                       SUITE_BUDGET_S), of which 40% (at most 90 s) is kept for its part c (the
#                       1B-model training step: skipped with a recorded reason when its estimate
#                       does not fit, cut short between rounds of timed steps); cap: that + 60 s
#   bench_multi_lora.py (SUITE_MULTI=1) cap SUITE_MULTI_TIMEOUT_S (150 s); it has no soft budget
# The benches rewrite their CSV/JSON after every finished case and, on the SIGTERM of a step's cap,
# write what they have (JSON status "terminated", PNG) and exit 143: a capped step keeps its rows.
#
# Results, RES=${SUITE_RESULTS_DIR:-benchmarks/results/gpu/<device-name-slug>}:
#   env.txt  suite_summary.json
#   pytest/  pytest_gpu.xml  pytest_gpu.log
#   layers/  bench_layers.log  layers.csv  layers.json  layers.png
#   qlora/   bench_qlora.log  qlora.csv  qlora.json  qlora.png
#   multi/   bench_multi_lora.log  multi_lora.csv  multi_lora.json  multi_lora.png
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
#   SUITE_MULTI_ARGS="..."   extra bench_multi_lora arguments
#   SUITE_HARD_S             seconds from the start after which no step runs (470)
#   SUITE_BUDGET_S           seconds from the start by which the benches should be done (430)
#   SUITE_BENCH_BUDGET_S     bench_layers' --time-budget (default: computed as above)
#   SUITE_QLORA_BUDGET_S     bench_qlora's --time-budget (110)
#   SUITE_MULTI=1            also run bench_multi_lora.py; SUITE_MULTI_TIMEOUT_S (150)
#   SUITE_CPP=1              build the C++/CUDA extension peft_fast._C at install
#   SUITE_INSTALL_TIMEOUT_S / SUITE_PYTEST_TIMEOUT_S / SUITE_PYTEST_MAXFAIL   see above
#   SUITE_SKIP_INSTALL=1 / SUITE_SKIP_PYTEST=1 / SUITE_SKIP_LAYERS=1 / SUITE_SKIP_QLORA=1
#   SUITE_RESULTS_DIR        where the full results go (default above)
#   SUITE_DRY_RUN=1          run nothing: print each step's command and cap, as if every step ran
#                            to its cap (the worst case; checks that the caps fit SUITE_HARD_S)
#   PYTHON                   interpreter (default python3)
set -u
set -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=5 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
SUITE_START=$(date +%s)
HARD_S=${SUITE_HARD_S:-470}
BUDGET_S=${SUITE_BUDGET_S:-430}
QLORA_BUDGET_S=${SUITE_QLORA_BUDGET_S:-110}
DRY=${SUITE_DRY_RUN:-0}
KILL_GRACE_S=5  # `timeout -k`: SIGKILL this long after SIGTERM

STEPS_FILE="$(mktemp)"
CLOCK_FILE="$(mktemp)"  # SUITE_DRY_RUN: the simulated seconds since the start
echo 0 >"$CLOCK_FILE"

elapsed() {
    if [ "$DRY" = "1" ]; then cat "$CLOCK_FILE"; else echo $(( $(date +%s) - SUITE_START )); fi
}

slug=$(timeout 60 "$PY" - <<'EOF' 2>/dev/null
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
has_cuda=0
[ "$slug" != "cpu" ] && [ "$slug" != "unknown" ] && has_cuda=1
RES="${SUITE_RESULTS_DIR:-benchmarks/results/gpu/${slug}}"
EXPORT_DIR=""
[ -n "${OUT:-}" ] && EXPORT_DIR="${OUT}/${slug}"
mkdir -p "$RES/pytest" "$RES/layers" "$RES/qlora" ${EXPORT_DIR:+"$EXPORT_DIR"}
echo "== results in $RES${EXPORT_DIR:+ (8 files copied to $EXPORT_DIR after each step)}; hard end ${HARD_S} s, benches' end ${BUDGET_S} s"

# left: seconds before SUITE_HARD_S
left() { echo $(( HARD_S - $(elapsed) )); }

# cap WANT: WANT seconds, or what is left before SUITE_HARD_S (minus the kill grace)
cap() {
    local want=$1 l; l=$(( $(left) - KILL_GRACE_S ))
    [ "$want" -gt "$l" ] && want=$l
    echo "$want"
}

# capped SECS CMD...: run CMD under `timeout` (SIGTERM, SIGKILL KILL_GRACE_S later) for SECS,
# or less: what is left of the running step's cap (STEP_END); in a dry run print it and advance
# the simulated clock by those seconds
STEP_END=$HARD_S
capped() {
    local secs=$1; shift
    local l=$(( STEP_END - $(elapsed) ))
    [ "$secs" -gt "$l" ] && secs=$l
    if [ "$secs" -lt 1 ]; then
        echo "(no time left in this step: not run) $*"
        return 124
    fi
    if [ "$DRY" = "1" ]; then
        echo "(dry run) timeout ${secs}s: $*"
        echo $(( $(cat "$CLOCK_FILE") + secs )) >"$CLOCK_FILE"
        return 0
    fi
    echo "(timeout ${secs}s) $*"
    timeout -k "$KILL_GRACE_S" "$secs" "$@"
}

# write_summary COMPLETE: suite_summary.json from the steps so far
write_summary() {
    "$PY" - "$STEPS_FILE" "$RES/suite_summary.json" "$slug" "$(elapsed)" "$1" "$HARD_S" "$BUDGET_S" "$DRY" <<'EOF'
import datetime, json, os, sys
steps_file, out, slug, total, complete, hard, budget, dry = sys.argv[1:9]
steps = []
for line in open(steps_file):
    name, rc, secs, cap = line.split()
    steps.append({"step": name, "exit_code": int(rc), "seconds": int(secs), "cap_seconds": int(cap)})
summary = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "device": slug,
           "total_seconds": int(total), "hard_end_seconds": int(hard), "bench_end_seconds": int(budget),
           "dry_run": dry == "1", "complete": complete == "1",
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

# step NAME CAP FN...: run FN with STEP_CAP=min(CAP, time left) seconds, record
# "NAME RC SECONDS CAP", never abort the suite; export after each step
step() {
    local name="$1" want="$2"; shift 2
    local t0; t0=$(elapsed)
    STEP_CAP=$(cap "$want")
    STEP_END=$(( t0 + STEP_CAP ))
    echo "== [$name] (at ${t0} s, cap ${STEP_CAP} s)"
    local rc
    if [ "$STEP_CAP" -lt 10 ]; then
        echo "(skipped: $(left) s left before SUITE_HARD_S=${HARD_S})"
        rc=124
        STEP_CAP=0
    else
        "$@"
        rc=$?
    fi
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && echo "(stopped at its cap of ${STEP_CAP} s)"
    echo "$name $rc $(( $(elapsed) - t0 )) $STEP_CAP" >>"$STEPS_FILE"
    echo "== [$name] exit $rc"
    write_summary 0
    export_results
    return 0
}

record_env() {
    {
        echo "# date: $(date -u +%Y-%m-%dT%H:%M:%SZ)   git: $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
        echo "# versions found (before installing anything)"
        capped "$(( STEP_CAP - 15 > 5 ? STEP_CAP - 15 : 5 ))" "$PY" - <<'EOF'
import importlib, importlib.metadata as md, platform, sys
print("python", platform.python_version(), "|", sys.executable)
for dist in ("torch", "triton", "transformers", "peft", "accelerate", "bitsandbytes", "safetensors", "numpy",
             "pytest", "pytest-timeout", "peft_fast"):
    try:
        v = md.version(dist)
    except md.PackageNotFoundError:
        v = "not installed"
    print(f"{dist} {v}")
try:
    import torch
    print("torch CUDA", torch.version.cuda, "| cuDNN", torch.backends.cudnn.version())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print("GPU", p.name, "| capability", f"{p.major}.{p.minor}", "| SMs", p.multi_processor_count,
              "| memory GiB", round(p.total_memory / 2**30, 1), "| devices", torch.cuda.device_count())
    else:
        print("GPU: none (torch.cuda.is_available() is False)")
except Exception as e:
    print(f"torch unusable: {type(e).__name__}: {e}")
EOF
        echo "# nvidia-smi"
        capped 10 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 \
            || echo "(nvidia-smi not available)"
    } 2>&1 | tee -a "$RES/env.txt"
}

install_repo() {
    {
        local skip_cpp=1
        [ "${SUITE_CPP:-0}" = "1" ] && skip_cpp=0
        echo "# pip install --no-deps --no-build-isolation -e .  (PEFT_FAST_SKIP_CPP=$skip_cpp)"
        PEFT_FAST_SKIP_CPP=$skip_cpp capped "$STEP_CAP" "$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>&1 \
            || return 1
        local whl
        whl=$(ls wheels/bitsandbytes-*.whl .whl/bitsandbytes-*.whl 2>/dev/null | head -n 1)
        if [ -n "$whl" ]; then
            echo "# bitsandbytes from $whl"
            capped "$(cap 60)" "$PY" -m pip install -q --no-deps --no-index "$whl" 2>&1 || return 1
        else
            echo "# no bitsandbytes wheel carried (wheels/ or .whl/): unless the image has it, its tests skip" \
                 "and bench_qlora fails (exit 2)"
        fi
        echo "# after the install"
        capped "$(cap 60)" "$PY" - <<'EOF'
import importlib.metadata as md
for dist in ("peft_fast", "bitsandbytes"):
    try:
        print(dist, md.version(dist))
    except md.PackageNotFoundError:
        print(dist, "not installed")
try:
    import peft_fast, peft_fast._segments as s
    print("peft_fast from", peft_fast.__file__, "| C++ extension:", "built" if s.HAS_CPP else "not built")
except Exception as e:
    print(f"peft_fast import failed: {type(e).__name__}: {e}")
EOF
    } 2>&1 | tee -a "$RES/env.txt"
}

gpu_tests() {
    local extra=()
    # pytest-timeout: 60 s per test; from 2.3 also a session timeout shortly before the hard cap,
    # so that a slow run still ends with its summary and the JUnit XML
    case $("$PY" -c "import importlib.metadata as m; print(m.version('pytest-timeout'))" 2>/dev/null) in
        "") echo "(pytest-timeout missing: only the step's cap applies)" ;;
        0.*|1.*|2.0*|2.1*|2.2*) extra=(--timeout 60) ;;
        *) extra=(--timeout 60 --session-timeout $(( STEP_CAP > 40 ? STEP_CAP - 20 : STEP_CAP / 2 ))) ;;
    esac
    # the settings go through `env` so that a dry run prints them with the command
    capped "$STEP_CAP" env PEFT_FAST_PATH_STRICT=1 PEFT_FAST_AUTOTUNE=0 \
        "$PY" -m pytest -m gpu -v -rfEs --maxfail "${SUITE_PYTEST_MAXFAIL:-5}" ${extra[@]+"${extra[@]}"} \
        -p no:cacheprovider --junitxml "$RES/pytest/pytest_gpu.xml" tests 2>&1 | tee "$RES/pytest/pytest_gpu.log"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 5 ]; then  # pytest: no test selected — nothing failed
        echo "(no gpu-marked tests collected)"
        rc=0
    fi
    return "$rc"
}

quick_flag() {
    if [ "${SUITE_QUICK:-0}" = "1" ] || [ "$has_cuda" != "1" ]; then
        [ "$has_cuda" != "1" ] && echo "(no CUDA device: running the --quick shapes)" >&2
        echo "--quick"
    fi
}

# the seconds the QLoRA bench will be given when it starts (0 when skipped)
qlora_share() {
    [ "${SUITE_SKIP_QLORA:-0}" = "1" ] && { echo 0; return; }
    echo $(( QLORA_BUDGET_S + 30 ))
}

bench_layers() {
    local args=(--out "$RES/layers")
    local q; q=$(quick_flag); [ -n "$q" ] && args+=("$q")
    local budget=$(( BUDGET_S - $(elapsed) - $(qlora_share) ))
    [ "$budget" -lt 30 ] && budget=30
    budget=${SUITE_BENCH_BUDGET_S:-$budget}
    args+=(--time-budget "$budget")
    # shellcheck disable=SC2206  # word splitting of the extra arguments is intended
    args+=(${SUITE_BENCH_ARGS:-})
    capped "$(cap $(( budget + 60 )))" "$PY" benchmarks/bench_layers.py "${args[@]}" 2>&1 \
        | tee "$RES/layers/bench_layers.log"
    return "${PIPESTATUS[0]}"
}

bench_qlora() {
    local args=(--out "$RES/qlora")
    local q; q=$(quick_flag); [ -n "$q" ] && args+=("$q")
    local budget=$QLORA_BUDGET_S
    local l=$(( BUDGET_S - $(elapsed) - 10 ))
    [ "$l" -lt "$budget" ] && budget=$l
    [ "$budget" -lt 45 ] && budget=45
    args+=(--time-budget "$budget")
    # shellcheck disable=SC2206
    args+=(${SUITE_QLORA_ARGS:-})
    capped "$(cap $(( budget + 60 )))" "$PY" benchmarks/bench_qlora.py "${args[@]}" 2>&1 \
        | tee "$RES/qlora/bench_qlora.log"
    return "${PIPESTATUS[0]}"
}

bench_multi_lora() {
    mkdir -p "$RES/multi"
    local args=(--out "$RES/multi")
    local q; q=$(quick_flag); [ -n "$q" ] && args+=("$q")
    # shellcheck disable=SC2206
    args+=(${SUITE_MULTI_ARGS:-})
    capped "$STEP_CAP" "$PY" benchmarks/bench_multi_lora.py "${args[@]}" 2>&1 | tee "$RES/multi/bench_multi_lora.log"
    return "${PIPESTATUS[0]}"
}

: >"$RES/env.txt"
install_cap=90
[ "${SUITE_CPP:-0}" = "1" ] && install_cap=200
step env 60 record_env
if [ "${SUITE_SKIP_INSTALL:-0}" != "1" ]; then step install "${SUITE_INSTALL_TIMEOUT_S:-$install_cap}" install_repo; fi
if [ "${SUITE_SKIP_PYTEST:-0}" != "1" ]; then step pytest_gpu "${SUITE_PYTEST_TIMEOUT_S:-150}" gpu_tests; fi
# the benches' own caps are computed inside (from their budgets); the step cap is what is left
if [ "${SUITE_SKIP_LAYERS:-0}" != "1" ]; then step bench_layers "$HARD_S" bench_layers; fi
if [ "${SUITE_SKIP_QLORA:-0}" != "1" ]; then step bench_qlora "$HARD_S" bench_qlora; fi
# mixed-adapter batches: opt-in (SUITE_MULTI=1; its own short call, see the header); results go
# into results.tar.gz only (multi/)
if [ "${SUITE_MULTI:-0}" = "1" ]; then step bench_multi_lora "${SUITE_MULTI_TIMEOUT_S:-150}" bench_multi_lora; fi

write_summary 1
export_results
rm -f "$STEPS_FILE" "$CLOCK_FILE"

if "$PY" -c "import json,sys; sys.exit(0 if json.load(open(sys.argv[1]))['ok'] else 1)" "$RES/suite_summary.json"; then
    echo "== suite OK ($RES${EXPORT_DIR:+, exported to $EXPORT_DIR})"
    exit 0
fi
echo "== suite FAILED: see $RES/suite_summary.json"
exit 1
