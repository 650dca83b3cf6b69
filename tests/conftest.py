"""Test setup: run Triton kernels in the CPU interpreter when no GPU is present.

``TRITON_INTERPRET`` must be set before triton is imported anywhere, so this runs first.
"""

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# Under pytest-xdist (scripts/test.sh: one worker per core) the workers share the cores: each worker's torch takes
# its share of the threads instead of one per core each (oversubscribed intra-op threads spin against each other).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

import pytest  # noqa: E402

DEVICES = ["cuda"] if torch.cuda.is_available() else ["cpu"]


@pytest.fixture(params=DEVICES)
def device(request):
    """The device kernels run on: CUDA when present, else the CPU under TRITON_INTERPRET=1."""
    return request.param


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
