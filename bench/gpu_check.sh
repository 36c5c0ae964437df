#!/usr/bin/env bash
# The GPU check, one command on a fresh CUDA machine (Python 3.11 and pip, PyPI reachable):
#
#     bash bench/gpu_check.sh
#
# 1. installs the README's way: `pip install -r requirements-triton.txt` WITHOUT constraints.txt (which pins
#    the CPU build torch==2.13.0): PyPI's Linux torch wheels are CUDA builds, and torch pins the triton
#    version it works with. Set TORCH_SPEC (e.g. TORCH_SPEC='torch==2.8.0') to pin another torch.
# 2. runs the CUDA tests (`pytest -m cuda`: every layer and implementation on CUDA tensors against CPU
#    float64, AMP, torch.compile, determinism) and the Triton tests with the compiled kernels on the GPU
#    (PAC_TRITON_TEST_DEVICE=cuda: every output and gradient against the brute-force reference);
# 3. runs bench/bench_gpu.py (writes bench/results_gpu.md),
# and prints one summary table (checks, then the benchmark). Each step has a time limit, cut to what is left
# of BUDGET (470 s) so that the whole run stays under 8 minutes; the exit status is non-zero if any step
# failed, timed out or was skipped for lack of time.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

PYTHON=${PYTHON:-python}
LOGS=${LOGS:-${TMPDIR:-/tmp}/pac_gpu_check_logs}
mkdir -p "$LOGS"
declare -a CHECKS=()
status=0

# step NAME SECONDS COMMAND...: runs COMMAND under a time limit, logs to $LOGS/NAME.log, records the result.
BUDGET=${BUDGET:-470}  # seconds for the whole check: every step's limit is cut to what is left of it

step() {
    local name=$1 limit=$2
    shift 2
    local began=$SECONDS rc left=$((BUDGET - SECONDS))
    if [ "$left" -lt 15 ]; then
        CHECKS+=("| $name | SKIPPED | 0 s | out of the ${BUDGET}s budget |")
        status=1
        return 1
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (limit ${limit}s): $*" >&2
    timeout --signal=INT --kill-after=20 "$limit" "$@" >"$LOGS/$name.log" 2>&1
    rc=$?
    local summary
    summary=$(grep -E '^(=+ )?[0-9]+ (passed|failed|skipped|error)' "$LOGS/$name.log" | tail -n 1 | tr -d '=')
    [ "$rc" -eq 124 ] && summary="timed out after ${limit}s"
    CHECKS+=("| $name | $([ "$rc" -eq 0 ] && echo ok || echo "FAILED (exit $rc)") | $((SECONDS - began)) s | ${summary:-} |")
    if [ "$rc" -ne 0 ]; then
        status=1
        tail -n 30 "$LOGS/$name.log" >&2
    fi
    return "$rc"
}

step install 180 "$PYTHON" -m pip install -q ${TORCH_SPEC:+"$TORCH_SPEC"} -r requirements-triton.txt
if ! step cuda-visible 60 "$PYTHON" -c \
    "import torch, triton; assert torch.cuda.is_available(), f'no CUDA device for torch {torch.__version__}'; \
print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"; then
    echo "No usable CUDA torch (a CPU build of torch installed before? then pip install --force-reinstall torch)" >&2
    printf '%s\n' "| check | result | time | summary |" "|---|---|---|---|" "${CHECKS[@]}"
    exit 1
fi
step cuda-tests 200 "$PYTHON" -m pytest -q -m cuda tests/test_cuda.py
step triton-tests-on-cuda 120 env PAC_TRITON_TEST_DEVICE=cuda "$PYTHON" -m pytest -q -m triton \
    -k matches_reference tests/test_pac_triton.py
rm -f bench/results_gpu.md
step bench 200 "$PYTHON" bench/bench_gpu.py --out bench/results_gpu.md

echo
echo "| check | result | time | summary |"
echo "|---|---|---|---|"
printf '%s\n' "${CHECKS[@]}"
echo
[ -f bench/results_gpu.md ] && cat bench/results_gpu.md
exit "$status"
