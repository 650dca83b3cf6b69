#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job: the BinaryBERT pipeline on the offline default
# (MiniLM teacher -> ternary student -> TWS -> binary student -> report). Extra arguments go to train/glue.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Without an `accelerate config` file, accelerate launch fills in defaults and warns about each one (among them
# "--num_processes was set to a value of 0"): pass them. One process, or one per GPU when there are several. Without
# a GPU, accelerate launch gives the process one thread (OMP_NUM_THREADS=1) unless told otherwise: use every core.
launch=()
if ! python -c "import os, sys; from accelerate.commands.config import default_config_file as f; sys.exit(not os.path.isfile(f))"; then
    gpus=$(python -c "import torch; print(torch.cuda.device_count())")
    if [ "$gpus" -gt 1 ]; then
        launch=(--multi_gpu --num_processes "$gpus")
    else
        launch=(--num_processes 1)
    fi
    if [ "$gpus" -eq 0 ]; then
        launch+=(--num_cpu_threads_per_process "$(nproc)")
    fi
    launch+=(--num_machines 1 --mixed_precision no --dynamo_backend no)
fi
accelerate launch "${launch[@]}" train/glue.py --quant binary "$@"
