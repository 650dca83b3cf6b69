"""train/glue.py on 2 gloo processes (``accelerate launch --multi_gpu``, CPU) against 1 process on the same global
batch: one process with ``--per_device_train_batch_size 8``, two with 4 each (issue #16). The pipeline is
``--quant ternary``: teacher, half-width full-precision model (``width``), ternary A8 student.

What is expected to match, and what not:
- Data order: Accelerate's seedable sampler draws the same permutation on every process count and each process takes
  every other batch of 4, so the global batches are the same. The tiny data set divides into full global batches
  (a partial last batch would be completed with repeated examples on 2 processes).
- Padding: every process pads its batch to the longest sequence of the global batch (``train.loop.
  pad_to_global_length``); without it the hidden-state loss (mean over padded positions too) and per-tensor A8
  scales differ.
- Schedule: warm-up and decay count optimizer steps of the global batch (before, 2 processes rounded the warm-up
  in half steps).
- Dropout is off in the tiny config: dropout masks are drawn per process, so with dropout the runs agree only in
  distribution. Evaluation: the same batches of 8 in both (the last one completed with duplicates on 2 processes,
  which ``gather_for_metrics`` drops: ``eval_samples`` is the dev size).
- Each stage is compared given the one-process models before it (``--teacher_name_or_path``,
  ``--width_name_or_path``). The students distil from the same (one-process) teacher and width model: a quantized
  student amplifies its teachers' float-level difference to visible hidden-stage loss differences after an epoch,
  while from the same teacher it stays at float level. The 2-process teacher is compared by its own run.

Tolerances (float32 sums in another order): losses of every step within ``*_LOSS``, best weights within
``*_WEIGHTS``, teacher dev accuracy equal, student dev accuracy within one dev example (an A8 student's prediction
near the decision boundary may flip). The measured differences are beside the tolerances.
"""

import contextlib
import csv
import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

REPO = Path(__file__).resolve().parents[1]
# train/ is a folder of scripts beside the package, not installed: import it from the checkout.
sys.path.insert(0, str(REPO))

from train.context import BEST_DIR, DONE_FILE  # noqa: E402
from train.history import HISTORY_FILE, read_history  # noqa: E402

SCRIPT = REPO / "train" / "glue.py"
POSITIVE = ["good", "great", "nice", "happy", "love", "fine"]
NEGATIVE = ["bad", "awful", "sad", "hate", "poor", "worst"]
FILLER = ["the", "flight", "was", "movie", "food", "very", "really", "a", "it", "is"]
TRAIN_SIZE = 96
DEV_SIZE = 33  # odd: the 2-process evaluation pads a shard with a duplicate that must not be counted
GLOBAL_BATCH = 8  # one process takes all of it, each of 2 processes half
TEACHER_LOSS, TEACHER_WEIGHTS = 1e-5, 1e-3  # measured: 6e-8, 7e-6
# Measured: hidden stage 6e-8, 7e-6; logits stage 6e-6, 3e-4; every dev accuracy equal. Without the padding
# fix the first hidden-stage losses differ by 5e-3, without the schedule fix the teacher's third loss by 6e-4.
STUDENT_LOSS, STUDENT_WEIGHTS = 1e-4, 2e-3
STAGES = ("teacher", "width", "ternary_a8_hidden", "ternary_a8_logits")


def sentences(count, rng, flip):
    """Sentences of 1 to 6 filler words and two sentiment words: lengths vary, so batches are padded."""
    rows = []
    for _ in range(count):
        label = rng.randint(0, 1)
        words = rng.sample(FILLER, rng.randint(1, 6)) + rng.sample(POSITIVE if label else NEGATIVE, 2)
        rng.shuffle(words)
        rows.append({"sentence": " ".join(words), "label": 1 - label if rng.random() < flip else label})
    return rows


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny dropout-free BERT classifier folder and train/dev CSV files of sentences of varying length."""
    root = tmp_path_factory.mktemp("tiny")
    vocab_dir = root / "vocab"
    vocab_dir.mkdir()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POSITIVE, *NEGATIVE, *FILLER]
    (vocab_dir / "vocab.txt").write_text("\n".join(words) + "\n")
    model_dir = root / "model"
    BertTokenizerFast.from_pretrained(vocab_dir, do_lower_case=True).save_pretrained(model_dir)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    BertForSequenceClassification(config).save_pretrained(model_dir)
    rng = random.Random(0)
    files = {}
    for name, count, flip in (("train", TRAIN_SIZE, 0.0), ("dev", DEV_SIZE, 0.2)):
        files[name] = root / f"{name}.csv"
        with open(files[name], "w", newline="") as handle:
            writer = csv.DictWriter(handle, ["sentence", "label"])
            writer.writeheader()
            writer.writerows(sentences(count, rng, flip))
    return {"model": str(model_dir), "train": str(files["train"]), "dev": str(files["dev"])}


@contextlib.contextmanager
def reserved_port():
    """A free port, held for the launch: bound with ``SO_REUSEADDR`` and not listening, so no other process gets
    it from the kernel (a released port could go to any test's socket before torchrun binds it), while torchrun's
    store (``SO_REUSEADDR`` too) still binds it, and ``accelerate launch``'s check (a connect) sees it free."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def run(tiny, output_dir, processes, *extra):
    """Run the script as ``processes`` processes (gloo) on the same global batch; returns each finished stage's
    DONE.json, history and best weights."""
    argv = [
        "--model_name_or_path", tiny["model"], "--train_file", tiny["train"], "--validation_file", tiny["dev"],
        "--output_dir", str(output_dir), "--quant", "ternary", "--keep_checkpoints", "all",
        "--per_device_train_batch_size", str(GLOBAL_BATCH // processes), "--per_device_eval_batch_size", "8",
        "--learning_rate", "5e-3", "--ternary_learning_rate", "1e-3", "--num_train_epochs", "2",
        "--logging_steps", "1", "--evals_per_epoch", "2", "--cpu", *extra,
    ]
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    with reserved_port() as port:
        launcher = [sys.executable]
        if processes > 1:
            launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                        str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                        "--main_process_port", str(port)]
        result = subprocess.run([*launcher, str(SCRIPT), *argv], cwd=REPO, env=env, capture_output=True,
                                text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    outcome = {}
    for stage in STAGES:
        if not (output_dir / stage / DONE_FILE).is_file():
            continue
        done = json.loads((output_dir / stage / DONE_FILE).read_text())
        assert done["num_processes"] == processes
        weights = None
        if done["steps"]:
            weights = load_file(str(output_dir / stage / BEST_DIR / "model.safetensors"))
        outcome[stage] = {"done": done, "history": read_history(output_dir / stage / HISTORY_FILE), "weights": weights}
    return outcome


def assert_stages_match(one, two, stages, loss_tolerance, weight_tolerance, metric_tolerance):
    for stage in stages:
        a, b = one[stage], two[stage]
        assert a["done"]["steps"] == b["done"]["steps"] > 0, stage
        losses = [(x["step"], x["loss"], y["loss"]) for x, y in zip(a["history"], b["history"], strict=True)
                  if "loss" in x]
        assert len(losses) == a["done"]["steps"], stage
        for step, x, y in losses:
            assert abs(x - y) <= loss_tolerance, (stage, step, x, y)
        evaluations = [(x["step"], x["eval"], y["eval"]) for x, y in zip(a["history"], b["history"], strict=True)
                       if "eval" in x]
        assert evaluations, stage
        for step, x, y in [*evaluations, (a["done"]["best_step"], a["done"]["metrics"], b["done"]["metrics"])]:
            assert x["eval_samples"] == y["eval_samples"] == DEV_SIZE, (stage, step)
            assert abs(x["accuracy"] - y["accuracy"]) <= metric_tolerance, (stage, step, x, y)
        assert a["weights"].keys() == b["weights"].keys()
        for name, tensor in a["weights"].items():
            torch.testing.assert_close(b["weights"][name], tensor, rtol=0, atol=weight_tolerance, msg=stage + name)


@pytest.mark.slow
def test_two_processes_match_one_process(tiny, tmp_path):
    one = run(tiny, tmp_path / "one", 1)
    teacher = run(tiny, tmp_path / "two_teacher", 2, "--stop_after", "teacher")
    given_teacher = ("--teacher_name_or_path", str(tmp_path / "one" / "teacher" / BEST_DIR))
    width = run(tiny, tmp_path / "two_width", 2, *given_teacher, "--stop_after", "width")
    students = run(tiny, tmp_path / "two_students", 2, *given_teacher,
                   "--width_name_or_path", str(tmp_path / "one" / "width" / BEST_DIR))
    assert one["teacher"]["done"]["metrics"]["accuracy"] > 0.6  # the teacher learned: the metrics can differ
    # The teacher fine-tuned on 2 processes.
    assert_stages_match(one, teacher, ["teacher"], TEACHER_LOSS, TEACHER_WEIGHTS, 0.0)
    # The same teacher evaluated on 2 processes (gather_for_metrics drops the padding duplicate).
    assert students["teacher"]["done"]["metrics"] == one["teacher"]["done"]["metrics"]
    # The half-width full-precision model distilled on 2 processes from the same teacher (same Taylor plan).
    assert_stages_match(one, width, ["width"], TEACHER_LOSS, TEACHER_WEIGHTS, 0.0)
    assert students["width"]["done"]["metrics"] == one["width"]["done"]["metrics"]
    # The ternary A8 student distilled on 2 processes from the same teacher and width model.
    assert_stages_match(one, students, STAGES[2:], STUDENT_LOSS, STUDENT_WEIGHTS, 1 / DEV_SIZE)
