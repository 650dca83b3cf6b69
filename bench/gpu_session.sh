#!/usr/bin/env bash
# Everything a session with a lent GPU should run, in one call of at most 8 minutes (the device tool allows 10 a
# command): install, the GPU tests (compiled kernels, autotuning off), the quick training-kernel table and the
# packed inference table. The script itself writes the results into bench/RESULTS.md (device, date, versions, git
# sha, commands, tables; bench/record_results.py) and copies that file to $OUT with the logs, CSVs and plots
# (8 files at most, the device tool's limit). The device's copy of the tree is thrown away: copy $OUT/RESULTS.md
# back over bench/RESULTS.md here and commit it.
#
#   TRITON_BQ_GIT_SHA=$(git rev-parse --short HEAD) bash bench/gpu_session.sh   # on the GPU machine, repo root
#   STEPS="tests matmul" bash bench/gpu_session.sh
#   BUDGET=300 bash bench/gpu_session.sh      # seconds for install and all steps together (default 430)
#   PYTHON=python bash bench/gpu_session.sh   # the interpreter that holds torch (default python3)
#
# The device machine's copy of the tree may have no .git: pass the sha in TRITON_BQ_GIT_SHA (bench/_common.py
# reads it) so RESULTS.md and the CSVs name the commit.
set -uo pipefail  # no -e: a failing step is recorded and the next one still runs
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-bench/results/gpu-session}
STEPS=${STEPS:-"tests matmul inference"}
PYTHON=${PYTHON:-python3}
# Each step gets its own share, capped by what is left of the budget, so the whole run ends in time even when one
# step is slow (compile-bound first runs); the budget counts from here (install included), and recording the
# results afterwards takes seconds, so 430 s stays under 8 minutes.
BUDGET=${BUDGET:-430}
declare -A SHARE=([tests]=150 [matmul]=170 [inference]=110)
mkdir -p "$OUT"
status=0
deadline=$((SECONDS + BUDGET))
recorded=()
# An inherited TRITON_INTERPRET=1 would run every kernel in the CPU interpreter and record its times as GPU ones.
unset TRITON_INTERPRET

limit() {  # seconds for a step: its share, or what is left of the budget if that is less
    local left=$((deadline - SECONDS))
    local share=${SHARE[$1]}
    ((left < share)) && share=$left
    ((share < 1)) && share=1
    echo "$share"
}

# Without a GPU the benchmarks fall back to an interpreter check and exit 0; stop before recording that as a run.
"$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" || {
    echo "no CUDA device visible to $PYTHON (torch.cuda.is_available() is False): nothing run"
    exit 1
}

# The GPU image ships torch, triton and transformers; install only our package (no downloads there). If pip cannot
# (no setuptools, read-only site-packages), import the tree through a path shim with the same package layout
# (triton_bq, and kernels/ as triton_bq.kernels, as pyproject.toml maps them).
if ! "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1; then
    echo "pip install failed (tail of its log below); importing the tree through a path shim instead"
    tail -5 "$OUT/install.log"
    shim=$(mktemp -d)
    mkdir "$shim/triton_bq"
    for entry in "$PWD"/triton_bq/*; do ln -s "$entry" "$shim/triton_bq/"; done
    ln -s "$PWD/kernels" "$shim/triton_bq/kernels"
    export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
fi
rm -f "$OUT/install.log"
"$PYTHON" -c "import triton_bq.kernels.linear" || {
    echo "triton_bq does not import"
    exit 1
}

# Test workers: the compiles are CPU-bound and the GPU is idle between them; pytest-xdist (in the GPU image) runs
# them in parallel on one GPU when it is installed.
workers=()
"$PYTHON" -c "import xdist" 2>/dev/null && workers=(-n 4)

for step in $STEPS; do
    case "$step" in
    tests)
        # Autotuning off: the first config of each list, one compile per kernel specialization. No -x: one failure
        # must not hide the rest of the only GPU run; --maxfail stops a run that fails everywhere.
        args=(-q --maxfail=20 -p no:cacheprovider --durations=10 "${workers[@]}" tests/test_kernels_linear.py
            tests/test_kernels_scales.py tests/test_packed_matmul.py tests/test_packed_model.py tests/test_modules.py)
        command="TRITON_BQ_AUTOTUNE=0 $PYTHON -m pytest ${args[*]}"
        TRITON_BQ_AUTOTUNE=0 timeout -k 10 "$(limit tests)" "$PYTHON" -m pytest "${args[@]}" >"$OUT/tests.log" 2>&1
        code=$?
        tail -5 "$OUT/tests.log"
        ;;
    matmul)
        # Default configs (autotuning off): the tests above compiled them, and tuning every shape would not fit.
        args=(bench/matmul.py --quick --providers cublas,reference,triton_bq,triton_bq_int8,triton_bq_fused --acts none,a8
            --warmup 10 --rep 40)
        command="TRITON_BQ_AUTOTUNE=0 $PYTHON ${args[*]}"
        TRITON_BQ_AUTOTUNE=0 timeout -k 10 "$(limit matmul)" "$PYTHON" "${args[@]}" --out "$OUT" \
            >"$OUT/matmul.log" 2>&1
        code=$?
        tail -30 "$OUT/matmul.log"
        ;;
    inference)
        args=(bench/inference.py --shapes llm,bert-base --ms 1,4,16,64,256,4096 --warmup 10 --rep 40)
        command="$PYTHON ${args[*]}"
        timeout -k 10 "$(limit inference)" "$PYTHON" "${args[@]}" --out "$OUT" >"$OUT/inference.log" 2>&1
        code=$?
        tail -40 "$OUT/inference.log"
        ;;
    *)
        echo "unknown step $step (tests, matmul, inference)"
        status=1
        continue
        ;;
    esac
    ((code == 124)) && echo "step $step ran out of its time ($command)"
    ((code != 0)) && status=1
    recorded+=(--step "$step=$code=$command")
done

"$PYTHON" bench/record_results.py --out "$OUT" ${recorded[@]+"${recorded[@]}"} || status=1
cp bench/RESULTS.md "$OUT/RESULTS.md"
exit $status
