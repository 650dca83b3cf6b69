"""README.md: every Python code block runs as written, every bash block names a script of the repository, and no
file points at documents that are not in the repository.

Each Python block runs on its own in a fresh interpreter (an empty working directory, the hub offline, no
``TRITON_INTERPRET``: the layers fall back to the PyTorch reference on the CPU). The bash blocks start whole jobs
(set-up, the full pipeline, the test suite): they are checked, not run.
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from test_train_glue import run_script, tiny, tiny_argv  # noqa: F401  (the pipeline tests' tiny model and data)

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
# Pointers to documents outside the repository (written in two parts so that this file does not match itself).
STALE = ("METHOD" + ".md", "../" + "shared")
SEARCHED = ("README.md", "pyproject.toml", "docs", "scripts", "train", "bench", "triton_bq", "kernels", "tests")


def code_blocks(language: str) -> list[tuple[int, str]]:
    """``(line number, code)`` of every fenced block of ``language`` in the README."""
    text = README.read_text()
    return [(text.count("\n", 0, match.start()) + 1, match.group(2))
            for match in FENCE.finditer(text) if match.group(1) == language]


PYTHON_BLOCKS = code_blocks("python")
BASH_BLOCKS = code_blocks("bash")


def test_the_readme_has_code_blocks():
    assert len(PYTHON_BLOCKS) >= 3 and len(BASH_BLOCKS) >= 2


# A block that reads the main job's output runs where a tiny run of the same pipeline left it.
PIPELINE_OUTPUT = "runs/tweets"


@pytest.mark.slow
@pytest.mark.parametrize(("line", "code"), PYTHON_BLOCKS, ids=[f"line{line}" for line, _ in PYTHON_BLOCKS])
def test_python_block_runs(line, code, tmp_path, request):
    if PIPELINE_OUTPUT in code:
        tiny = request.getfixturevalue("tiny")
        result = run_script(tiny_argv(tiny, tmp_path / PIPELINE_OUTPUT, "--quant", "binary", "--num_train_epochs",
                                      "1"), timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    script = tmp_path / f"readme_line{line}.py"
    script.write_text(code)
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, f"README.md block at line {line} failed:\n{result.stderr[-4000:]}"


@pytest.mark.parametrize(("line", "code"), BASH_BLOCKS, ids=[f"line{line}" for line, _ in BASH_BLOCKS])
def test_bash_block_names_a_script_of_the_repository(line, code):
    for command in code.strip().splitlines():
        words = shlex.split(command)
        assert words[0] == "bash" and (REPO / words[1]).is_file(), f"README.md line {line}: {command!r}"


def test_no_pointers_outside_the_repository():
    hits = []
    for name in SEARCHED:
        root = REPO / name
        files = [root] if root.is_file() else [path for path in root.rglob("*") if path.is_file()]
        for path in files:
            if path.suffix not in (".md", ".py", ".sh", ".toml", ".txt") or path == Path(__file__).resolve():
                continue
            text = path.read_text(errors="replace")
            hits += [f"{path.relative_to(REPO)}: {stale}" for stale in STALE if stale in text]
    assert not hits, "\n".join(hits)
