#!/usr/bin/env bash
# Everything a session with a lent GPU should run, in one call (the device tool allows 10 minutes a command):
# install, the GPU tests (compiled kernels, torch.compile), the quick training-kernel benchmark and the packed
# inference benchmark. Logs, CSVs and plots (8 files at most, the device tool's limit) go to $OUT (default bench/results/gpu-session); copy the printed
# tables into bench/RESULTS.md with the device, date, versions and this command.
#
#   bash bench/gpu_session.sh                 # on the GPU machine, from the repository root
#   STEPS="tests matmul" bash bench/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu-session}
STEPS=${STEPS:-"tests matmul inference"}
mkdir -p "$OUT"
status=0

# The GPU image ships torch, triton and transformers; install only our package (no downloads there).
python -m pip install -q --no-deps --no-build-isolation -e . >/tmp/triton_bq-install.log 2>&1 || {
    cp /tmp/triton_bq-install.log "$OUT/install.log"
    echo "install failed: $OUT/install.log"
    exit 1
}
python - <<'EOF' | tee "$OUT/versions.txt"
import datetime, torch, triton
print(datetime.date.today(), torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
EOF

for step in $STEPS; do
    case "$step" in
    tests)
        # The first config of each autotune list keeps compilation to one variant per kernel.
        TRITON_BQ_AUTOTUNE=0 timeout 240 python -m pytest -q -x -p no:cacheprovider --durations=10 \
            tests/test_kernels_linear.py tests/test_kernels_scales.py tests/test_packed_matmul.py \
            tests/test_packed_model.py tests/test_modules.py >"$OUT/tests.log" 2>&1 || status=1
        tail -5 "$OUT/tests.log"
        ;;
    matmul)
        timeout 240 python bench/matmul.py --quick --providers cublas,reference,compiled,triton_bq,triton_bq_codes \
            --acts none,a8 --out "$OUT" 2>&1 | tee "$OUT/matmul.log" | tail -40 || status=1
        ;;
    inference)
        timeout 180 python bench/inference.py --shapes llm,bert-base --ms 1,4,16,64,256,4096 --out "$OUT" 2>&1 \
            | tee "$OUT/inference.log" | tail -45 || status=1
        ;;
    *)
        echo "unknown step $step (tests, matmul, inference)"
        status=1
        ;;
    esac
done
exit $status
