#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job: the BinaryBERT pipeline on the offline default
# (MiniLM teacher -> ternary student -> TWS -> binary student -> report). Extra arguments go to train/glue.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
accelerate launch train/glue.py --quant binary "$@"
