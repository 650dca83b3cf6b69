#!/usr/bin/env bash
# Everything a session with a lent GPU should run, in one call of at most 8 minutes (the device tool allows 10 a
# command): install, the GPU tests (compiled kernels, autotuning off), the quick training-kernel table and the
# packed inference table. The script itself writes the results into bench/RESULTS.md (device, date, versions, git
# sha, commands, tables; bench/record_results.py) and copies that file to $OUT with the logs, CSVs and plots
# (8 files at most, the device tool's limit).
#
#   bash bench/gpu_session.sh                 # on the GPU machine, from the repository root
#   STEPS="tests matmul" bash bench/gpu_session.sh
#   BUDGET=300 bash bench/gpu_session.sh      # seconds for all steps together (default 450)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu-session}
STEPS=${STEPS:-"tests matmul inference"}
# Each step gets its own share, capped by what is left of the budget, so the whole run ends in time even when one
# step is slow (compile-bound first runs); 450 s of steps plus install and recording stays under 8 minutes.
BUDGET=${BUDGET:-450}
declare -A SHARE=([tests]=150 [matmul]=180 [inference]=120)
mkdir -p "$OUT"
status=0
deadline=$((SECONDS + BUDGET))
recorded=()

limit() {  # seconds for a step: its share, or what is left of the budget if that is less
    local left=$((deadline - SECONDS))
    local share=${SHARE[$1]}
    ((left < share)) && share=$left
    ((share < 1)) && share=1
    echo "$share"
}

# The GPU image ships torch, triton and transformers; install only our package (no downloads there).
python -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || {
    echo "install failed: $OUT/install.log"
    exit 1
}
rm -f "$OUT/install.log"

for step in $STEPS; do
    case "$step" in
    tests)
        # Autotuning off: the first config of each list, one compile per kernel specialization.
        command="TRITON_BQ_AUTOTUNE=0 python -m pytest -q -x -p no:cacheprovider --durations=10 tests/test_kernels_linear.py tests/test_kernels_scales.py tests/test_packed_matmul.py tests/test_packed_model.py tests/test_modules.py"
        TRITON_BQ_AUTOTUNE=0 timeout "$(limit tests)" python -m pytest -q -x -p no:cacheprovider --durations=10 \
            tests/test_kernels_linear.py tests/test_kernels_scales.py tests/test_packed_matmul.py \
            tests/test_packed_model.py tests/test_modules.py >"$OUT/tests.log" 2>&1
        code=$?
        tail -5 "$OUT/tests.log"
        ;;
    matmul)
        # Default configs (autotuning off): the tests above compiled them, and tuning every shape would not fit.
        command="TRITON_BQ_AUTOTUNE=0 python bench/matmul.py --quick --providers cublas,reference,triton_bq,triton_bq_codes --acts none,a8 --warmup 10 --rep 40"
        TRITON_BQ_AUTOTUNE=0 timeout "$(limit matmul)" python bench/matmul.py --quick \
            --providers cublas,reference,triton_bq,triton_bq_codes --acts none,a8 --warmup 10 --rep 40 \
            --out "$OUT" >"$OUT/matmul.log" 2>&1
        code=$?
        tail -30 "$OUT/matmul.log"
        ;;
    inference)
        command="python bench/inference.py --shapes llm,bert-base --ms 1,4,16,64,256,4096 --warmup 10 --rep 40"
        timeout "$(limit inference)" python bench/inference.py --shapes llm,bert-base --ms 1,4,16,64,256,4096 \
            --warmup 10 --rep 40 --out "$OUT" >"$OUT/inference.log" 2>&1
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

python bench/record_results.py --out "$OUT" "${recorded[@]}" || status=1
cp bench/RESULTS.md "$OUT/RESULTS.md"
exit $status
