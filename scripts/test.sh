#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite. Kernels run in Triton's CPU interpreter without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
set +e
python -m pytest -q --durations=15 "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests: failing" >&2
    exit 1
fi
exit "$status"
