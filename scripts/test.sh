#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite. Kernels run in Triton's CPU interpreter without a GPU.
# One pytest-xdist worker per core, each test file on one worker (module fixtures such as the tiny pipeline runs are
# made once); extra arguments go to pytest (e.g. -n 0: one process, -k ...).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
set +e
python -m pytest -q -n auto --dist loadfile --durations=15 "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests: failing" >&2
    exit 1
fi
exit "$status"
