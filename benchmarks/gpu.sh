#!/usr/bin/env bash
# GPU run of the benchmarks: the CUDA-marked tests, then accuracy/rounding/coverage (measurements
# 1-3, TF32 off) and inference latency (measurement 5) on the first CUDA device.
#
# Usage: benchmarks/gpu.sh OUT_DIR
#
# Writes into OUT_DIR: gpu.txt (nvidia-smi -L), cuda_tests.log, accuracy.md/.json/.log,
# latency.md/.json/.log and summary.md (every step's status and tables). Each step runs under
# `timeout` with its own log (a table's .md is its stdout; its .log the rest), and a failing step
# does not stop the next. The accuracy step is the longest (8 models x 3 seeds x 3 dtypes, 8
# batches of 16 at 224x224; its one-seed, one-batch predecessor took about a minute on an H200,
# hence the 420 s default limit, not yet measured). Installs nothing: the project runs from this checkout
# (PYTHONPATH=.), and the packages it needs beyond torch/torchvision/timm/numpy/pytest
# (array-api-compat; mmcv-lite and aimet-torch, optional: a peer that does not import is left out
# of the tables with a note) must already be importable, e.g. through PYTHONPATH. Without a GPU
# every step says so and is skipped.
#
# Environment: PYTHON (default python3); BENCH_DEVICE (default cuda; cpu runs the same steps on the
# CPU, to try the script on a machine without a GPU -- the cuda tests then skip); ACCURACY_ARGS, LATENCY_ARGS (extra arguments);
# TESTS_TIMEOUT, ACCURACY_TIMEOUT, LATENCY_TIMEOUT (seconds; defaults 90, 420, 120).

set -u
if [ $# -ne 1 ] || [ -z "$1" ]; then
    echo "usage: $0 OUT_DIR" >&2
    exit 2
fi
mkdir -p "$1" || { echo "cannot create output folder $1" >&2; exit 2; }
OUT_DIR=$(cd "$1" && pwd)
cd "$(dirname "$0")/.." || exit 2
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
SUMMARY="$OUT_DIR/summary.md"
STATUS=0

note() { echo "$*" | tee -a "$SUMMARY"; }

# run_step NAME TIMEOUT COMMAND... : runs with its own log, records its exit status, never aborts the script.
run_step() {
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS rc
    echo "== $name: $*" >&2
    set +e
    timeout --kill-after=10 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
    rc=$?
    if [ $rc -eq 0 ]; then
        note "- $name: ok ($((SECONDS - start)) s)"
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        note "- $name: TIMED OUT after ${limit} s (see $name.log)"; STATUS=1
    else
        note "- $name: FAILED with exit status $rc ($((SECONDS - start)) s; see $name.log)"; STATUS=1
    fi
    return 0
}

: >"$SUMMARY"
note "# GPU benchmark run"
note ""
note "Started $(date -u '+%Y-%m-%d %H:%M UTC'); commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)."
note ""
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L >"$OUT_DIR/gpu.txt" 2>&1 || echo "nvidia-smi -L failed" >>"$OUT_DIR/gpu.txt"
else
    echo "nvidia-smi not found" >"$OUT_DIR/gpu.txt"
fi
note "GPU: $(head -n 1 "$OUT_DIR/gpu.txt")"

DEVICE=${BENCH_DEVICE:-cuda}
HAS_CUDA=$(timeout 120 "$PYTHON" -c 'import torch; print(int(torch.cuda.is_available()))' 2>"$OUT_DIR/probe.log")
if [ "$DEVICE" = cpu ]; then
    note "BENCH_DEVICE=cpu: the steps run on the CPU (a dry run of this script; CUDA available: ${HAS_CUDA:-unknown})."
elif [ "$HAS_CUDA" != "1" ]; then
    note "torch sees no CUDA device (torch.cuda.is_available() is not True; see probe.log): every GPU step skipped."
    exit 0
fi
note "$("$PYTHON" -c 'import torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, device " + (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"))' 2>&1 | tail -n 1)"
for module in array_api_compat mmcv aimet_torch timm torchvision; do
    if "$PYTHON" -c "import $module" >/dev/null 2>&1; then
        note "- $module: importable"
    else
        note "- $module: NOT importable (steps that need it fail or leave it out)"
    fi
done
note ""
note "## Steps"

# No path: pytest's configured testpaths (tests, spec, refimpl); -m cuda keeps only the CUDA-marked tests.
run_step cuda_tests "${TESTS_TIMEOUT:-90}" "$PYTHON" -m pytest -m cuda -q -p no:cacheprovider
if [ -s "$OUT_DIR/cuda_tests.log" ]; then note "  $(tail -n 1 "$OUT_DIR/cuda_tests.log")"; fi
run_step accuracy "${ACCURACY_TIMEOUT:-420}" sh -c \
    "\"$PYTHON\" benchmarks/accuracy.py --device $DEVICE --json \"$OUT_DIR/accuracy.json\" ${ACCURACY_ARGS:-} >\"$OUT_DIR/accuracy.md\""
run_step latency "${LATENCY_TIMEOUT:-120}" sh -c \
    "\"$PYTHON\" benchmarks/latency.py --device $DEVICE --json \"$OUT_DIR/latency.json\" ${LATENCY_ARGS:-} >\"$OUT_DIR/latency.md\""

note ""
for table in accuracy latency; do
    if [ -s "$OUT_DIR/$table.md" ]; then
        cat "$OUT_DIR/$table.md" >>"$SUMMARY"
        echo >>"$SUMMARY"
    fi
done
exit $STATUS
