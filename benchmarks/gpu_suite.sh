#!/usr/bin/env bash
# The one script to run on a GPU machine: install this repo (nothing else), record the
# environment, run the GPU tests, run the per-layer benchmark. Every step runs even when an
# earlier one failed; each step's exit code goes into suite_summary.json and the script exits
# non-zero at the end if any step failed.
#
# The GPU machine has no network: only `pip install --no-deps -e .` of this repo, plus a
# bitsandbytes wheel if one was carried (wheels/ or .whl/). Designed to finish well inside
# 10 minutes on an H100 (the bench stops starting new cases after SUITE_BENCH_BUDGET_S).
#
# Results: ${OUT:-benchmarks/results/gpu}/<device-name-slug>/  (at most 8 files, one folder
# down, so that everything comes back from the device tool's $OUT):
#   env.txt  pytest_gpu.xml  pytest_gpu.log  bench_layers.log  layers.csv  layers.json
#   layers.png  suite_summary.json
#
# Environment knobs:
#   SUITE_QUICK=1          bench_layers --quick (tiny shapes; also used when no CUDA is found)
#   SUITE_BENCH_ARGS="..." extra bench_layers arguments, e.g. "--methods lora --tokens 512 8192"
#   SUITE_BENCH_BUDGET_S   seconds after which the bench starts no new case (default: what is
#                          left of SUITE_BUDGET_S, 480, minus a margin)
#   SUITE_SKIP_INSTALL=1   skip the editable install (already installed)
#   SUITE_SKIP_PYTEST=1    skip the GPU tests
#   PYTHON                 interpreter (default python3)
#
#   bash benchmarks/gpu_suite.sh            # on the device tool: OUT is set, results come back
set -u
set -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=5 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
SUITE_START=$(date +%s)

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
OUT_DIR="${OUT:-benchmarks/results/gpu}/${slug}"
mkdir -p "$OUT_DIR"
STEPS_FILE="$(mktemp)"
echo "== results in $OUT_DIR"

# step NAME CMD...: run, record "NAME RC SECONDS", never abort the suite
step() {
    local name="$1"; shift
    local t0=$(date +%s)
    echo "== [$name] $*"
    "$@"
    local rc=$?
    echo "$name $rc $(( $(date +%s) - t0 ))" >>"$STEPS_FILE"
    echo "== [$name] exit $rc"
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
            echo "# no bitsandbytes wheel carried (wheels/ or .whl/): its tests skip"
        fi
    } 2>&1 | tee -a "$OUT_DIR/env.txt"
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
    } 2>&1 | tee -a "$OUT_DIR/env.txt"
}

gpu_tests() {
    local timeout_flag=()
    if "$PY" -c "import pytest_timeout" 2>/dev/null; then
        timeout_flag=(--timeout 600)
    else
        echo "(pytest-timeout missing: running without --timeout)"
    fi
    "$PY" -m pytest -m gpu -q -x ${timeout_flag[@]+"${timeout_flag[@]}"} -p no:cacheprovider \
        --junitxml "$OUT_DIR/pytest_gpu.xml" tests 2>&1 | tee "$OUT_DIR/pytest_gpu.log"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 5 ]; then  # pytest: no test selected — nothing failed
        echo "(no gpu-marked tests collected)"
        rc=0
    fi
    return "$rc"
}

bench() {
    local args=(--out "$OUT_DIR")
    local has_cuda
    has_cuda=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
    if [ "${SUITE_QUICK:-0}" = "1" ] || [ "$has_cuda" != "1" ]; then
        [ "$has_cuda" != "1" ] && echo "(no CUDA device: running the --quick shapes)"
        args+=(--quick)
    fi
    local left=$(( ${SUITE_BUDGET_S:-480} - ($(date +%s) - SUITE_START) - 30 ))
    [ "$left" -lt 60 ] && left=60
    args+=(--time-budget "${SUITE_BENCH_BUDGET_S:-$left}")
    # shellcheck disable=SC2206  # word splitting of the extra arguments is intended
    args+=(${SUITE_BENCH_ARGS:-})
    echo "bench_layers.py ${args[*]}"
    "$PY" benchmarks/bench_layers.py "${args[@]}" 2>&1 | tee "$OUT_DIR/bench_layers.log"
    return "${PIPESTATUS[0]}"
}

: >"$OUT_DIR/env.txt"
if [ "${SUITE_SKIP_INSTALL:-0}" != "1" ]; then step install install_repo; fi
step env record_env
if [ "${SUITE_SKIP_PYTEST:-0}" != "1" ]; then step pytest_gpu gpu_tests; fi
step bench_layers bench

"$PY" - "$STEPS_FILE" "$OUT_DIR/suite_summary.json" "$slug" "$(( $(date +%s) - SUITE_START ))" <<'EOF'
import datetime, json, os, sys
steps_file, out, slug, total = sys.argv[1:5]
steps = []
for line in open(steps_file):
    name, rc, secs = line.split()
    steps.append({"step": name, "exit_code": int(rc), "seconds": int(secs)})
summary = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "device": slug,
           "total_seconds": int(total), "ok": all(s["exit_code"] == 0 for s in steps), "steps": steps}
tmp = out + ".tmp"
with open(tmp, "w") as f:
    json.dump(summary, f, indent=2)
os.replace(tmp, out)
print(json.dumps(summary, indent=2))
EOF
rm -f "$STEPS_FILE"

if "$PY" -c "import json,sys; sys.exit(0 if json.load(open(sys.argv[1]))['ok'] else 1)" "$OUT_DIR/suite_summary.json"; then
    echo "== suite OK ($OUT_DIR)"
    exit 0
fi
echo "== suite FAILED: see $OUT_DIR/suite_summary.json"
exit 1
