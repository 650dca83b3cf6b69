"""train/glue.py: stage planning, the training loop (keep-best, exact resume), and the script end to end.

Everything runs on a tiny randomly initialised BERT with a WordPiece vocabulary written here (no download) and
tiny CSV data. Script runs are subprocesses without ``TRITON_INTERPRET`` (interpreted kernels would be far too
slow for training); ``HF_HUB_OFFLINE=1`` keeps them off the network.
"""

import csv
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertTokenizerFast,
)

REPO = Path(__file__).resolve().parents[1]
# train/ is a folder of scripts beside the package, not installed: import it from the checkout.
sys.path.insert(0, str(REPO))

from train import console, context, glue, launch, loop, models, options, resume, stages  # noqa: E402
from train import report as report_module  # noqa: E402
from train.history import HISTORY_FILE, History, read_history  # noqa: E402
from train.metrics import compute_metrics  # noqa: E402
from train.resume import latest_checkpoint, start_partial  # noqa: E402

SCRIPT = REPO / "train" / "glue.py"
POSITIVE = ["good", "great", "nice", "happy", "love", "fine"]
NEGATIVE = ["bad", "awful", "sad", "hate", "poor", "worst"]
FILLER = ["the", "flight", "was", "movie", "food", "very", "really", "a", "it", "is"]
DEV_SIZE = 33  # odd, so a 2-process evaluation that counted a padding duplicate would be visible


def sentiment_rows(count, rng, flip=0.0):
    """Sentences of filler and two sentiment words; a fraction ``flip`` of labels is wrong (noisy dev metrics)."""
    rows = []
    for _ in range(count):
        label = rng.randint(0, 1)
        words = rng.sample(FILLER, 4) + rng.sample(POSITIVE if label else NEGATIVE, 2)
        rng.shuffle(words)
        rows.append({"sentence": " ".join(words), "label": 1 - label if rng.random() < flip else label})
    return rows


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny BERT classifier folder (config, random weights, WordPiece tokenizer) and train/dev CSV files."""
    root = tmp_path_factory.mktemp("tiny")
    vocab_dir = root / "vocab"
    vocab_dir.mkdir()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POSITIVE, *NEGATIVE, *FILLER]
    (vocab_dir / "vocab.txt").write_text("\n".join(words) + "\n")
    model_dir = root / "model"
    tokenizer = BertTokenizerFast.from_pretrained(vocab_dir, do_lower_case=True)
    assert tokenizer.tokenize("The flight was GOOD") == ["the", "flight", "was", "good"]
    tokenizer.save_pretrained(model_dir)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=27, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertForSequenceClassification(config).save_pretrained(model_dir)
    rng = random.Random(0)
    files = {}
    for name, count, flip in (("train", 96, 0.0), ("dev", DEV_SIZE, 0.2)):
        files[name] = root / f"{name}.csv"
        with open(files[name], "w", newline="") as handle:
            writer = csv.DictWriter(handle, ["sentence", "label"])
            writer.writeheader()
            writer.writerows(sentiment_rows(count, rng, flip))
    return {"model": str(model_dir), "train": str(files["train"]), "dev": str(files["dev"])}


def tiny_argv(tiny, output_dir, *extra):
    return [
        "--model_name_or_path", tiny["model"], "--train_file", tiny["train"], "--validation_file", tiny["dev"],
        "--output_dir", str(output_dir), "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8",
        "--learning_rate", "3e-3", "--num_train_epochs", "4", "--logging_steps", "4", *extra,
    ]


def child_env():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return env


def run_script(args, launcher=(sys.executable,), timeout=240):
    return subprocess.run([*launcher, str(SCRIPT), *args], cwd=REPO, env=child_env(), capture_output=True,
                          text=True, timeout=timeout)


def kill_at_first_checkpoint(argv, partial, timeout):
    """Start the script, kill it (SIGKILL) once ``partial`` holds a complete checkpoint (or after ``timeout`` s),
    and return the newest complete checkpoint it left (``None`` if none)."""
    process = subprocess.Popen([sys.executable, str(SCRIPT), *argv], cwd=REPO, env=child_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while latest_checkpoint(partial) is None and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return latest_checkpoint(partial)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def dev_accuracy_of(model_dir, tiny):
    """Accuracy of a saved model on the dev CSV, computed here in one process without the script."""
    with open(tiny["dev"], newline="") as handle:
        rows = list(csv.DictReader(handle))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    encoded = tokenizer([row["sentence"] for row in rows], padding=True, return_tensors="pt")
    with torch.no_grad():
        predictions = model(**encoded).logits.argmax(-1).numpy()
    return compute_metrics(("accuracy",), predictions, [int(row["label"]) for row in rows])["accuracy"]


# ---- planning and options (no training) ----


def stage_names(*argv):
    args = glue.parse_args(["--model_name_or_path", "unused", *argv])
    options.check_args(args)
    return [stage.name for stage in stages.plan_stages(args)]


def test_plan_stages_per_quant():
    assert stage_names("--quant", "ternary") == ["teacher", "width", "ternary_a8_hidden", "ternary_a8_logits"]
    assert stage_names("--quant", "ternary", "--ternary_width", "1") == [
        "teacher", "ternary_a8_hidden", "ternary_a8_logits"]
    assert stage_names("--quant", "binary", "--act_bits", "4") == [
        "teacher", "width", "ternary_a4_hidden", "ternary_a4_logits", "tws_a4", "binary_a4_hidden",
        "binary_a4_logits", "bwn_a4_hidden", "bwn_a4_logits",
    ]
    both = stage_names("--quant", "binary", "--act_bits", "8,4")
    assert both[:2] == ["teacher", "width"] and both.count("width") == 1 and len(both) == 2 + 2 * 7
    assert both.index("bwn_a8_logits") < both.index("ternary_a4_hidden")
    assert stage_names("--quant", "binary", "--no-bwn_baseline")[-1] == "binary_a8_logits"
    assert stage_names("--quant", "bwn") == ["teacher", "bwn_a8_hidden", "bwn_a8_logits"]
    assert stage_names("--quant", "binary", "--stop_after", "width") == ["teacher", "width"]
    assert stage_names("--quant", "binary", "--stop_after", "tws")[-1] == "tws_a8"
    assert stage_names("--stop_after", "teacher") == ["teacher"]


def test_plan_teachers_and_starting_points():
    args = glue.parse_args(["--model_name_or_path", "unused", "--quant", "binary"])
    options.check_args(args)
    plan = {stage.name: stage for stage in stages.plan_stages(args)}
    assert (plan["width"].init_from, plan["width"].teacher, plan["width"].loss) == ("teacher", "teacher", "width")
    assert plan["ternary_a8_hidden"].init_from == "width"
    for name in ("ternary_a8_hidden", "ternary_a8_logits", "binary_a8_hidden", "binary_a8_logits"):
        assert plan[name].teacher == "width" and plan[name].act_bits == 8
    assert plan["bwn_a8_hidden"].teacher == "teacher" and plan["bwn_a8_hidden"].init_from == "teacher"
    assert [s.name for s in stages.needed_by(plan["width"], list(plan.values()))] == [
        "ternary_a8_hidden", "ternary_a8_logits", "binary_a8_hidden", "binary_a8_logits"]
    args = glue.parse_args(["--model_name_or_path", "unused", "--ternary_teacher", "teacher", "--weight_method",
                            "lat"])
    options.check_args(args)
    plan = {stage.name: stage for stage in stages.plan_stages(args)}
    assert plan["ternary_a8_hidden"].teacher == "teacher" and plan["ternary_a8_hidden"].weight_method == "lat"
    assert plan["binary_a8_logits"].weight_method == "bwn"
    # Taught by the full-width teacher, the students need the width model only to start from it.
    assert [s.name for s in stages.needed_by(plan["width"], list(plan.values()))] == ["ternary_a8_hidden"]


def test_plan_learning_rates_follow_the_recipe():
    args = glue.parse_args(["--model_name_or_path", "unused", "--quant", "binary"])
    options.check_args(args)
    rates = {stage.name: stage.learning_rate for stage in stages.plan_stages(args)}
    assert rates["ternary_a8_hidden"] == pytest.approx(2.5e-5) and rates["ternary_a8_logits"] == pytest.approx(1e-5)
    assert rates["binary_a8_hidden"] == pytest.approx(1.25e-4) and rates["binary_a8_logits"] == pytest.approx(5e-5)
    assert rates["tws_a8"] == 0.0


def test_offline_defaults():
    args = glue.parse_args(["--model_name_or_path", "unused"])
    options.check_args(args)
    assert (args.task, args.max_seq_length, args.max_train_samples, args.max_eval_samples) == (
        "tweets", 64, options.OFFLINE_MAX_TRAIN_SAMPLES, options.OFFLINE_MAX_EVAL_SAMPLES
    )
    assert args.output_dir == os.path.join("runs", "tweets") and args.quant == "binary"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--num_train_epochs", "0"], r"--num_train_epochs must be >= 1, got 0"),
        (["--learning_rate", "-1"], r"--learning_rate must be > 0, got -1.0"),
        (["--warmup_ratio", "1.5"], r"--warmup_ratio must be in \[0, 1\), got 1.5"),
        (["--ternary_width", "0"], r"--ternary_width must be in \(0, 1\], got 0.0"),
        (["--checkpointing_steps", "-2"], r"--checkpointing_steps must be >= 0, got -2"),
        (["--task", "nope"], r"--task must be one of"),
        (["--quant", "bwn", "--stop_after", "tws"], r"--stop_after 'tws' names no stage of --quant bwn"),
        (["--report_to", "nope"], r"--report_to must name trackers among tensorboard, wandb"),
        (["--act_bits", "8,8"], r"--act_bits must be distinct values among 8, 4"),
        (["--act_bits", "2"], r"--act_bits must be distinct values among 8, 4"),
        (["--split_budget", "-1"], r"--split_budget must be none, bwn or a positive size in MB, got '-1'"),
        (["--split_budget", "bwn", "--quant", "ternary"], r"--split_budget bwn needs --quant binary"),
        (["--width_name_or_path", "w", "--ternary_width", "1"], r"--width_name_or_path needs --ternary_width below"),
    ],
)
def test_bad_options_raise_value_error(argv, message):
    args = glue.parse_args(["--model_name_or_path", "unused", *argv])
    with pytest.raises(ValueError, match=message):
        options.check_args(args)
        stages.plan_stages(args)


def test_report_to_needs_the_tracker_package(monkeypatch):
    monkeypatch.setattr(options, "get_available_trackers", lambda: [])
    args = glue.parse_args(["--model_name_or_path", "unused", "--report_to", "tensorboard"])
    with pytest.raises(ValueError, match=r"--report_to tensorboard needs the package 'tensorboard', which is not "
                                         r"installed: pip install tensorboard"):
        options.check_args(args)
    args = glue.parse_args(["--model_name_or_path", "unused"])
    options.check_args(args)
    assert args.report_to == []


def test_console_plain_lines_and_run_eta(capsys):
    out = console.Console(True, {"teacher": 4, "tws_a8": 0, "student": 6}, interactive=False)
    out.start_stage("teacher", "fine-tune")
    out.open_bar(4, 0)
    assert out.run_eta(0) is None
    out.step(2)
    # Two of ten steps took the time so far: eight steps remain at that rate.
    eta = out.run_eta(2)
    assert eta == pytest.approx(8 * out.rate_seconds) and eta > 0
    with out.status("evaluating on dev"):
        out.write("[teacher] step 2/4 dev accuracy 0.5")
    out.close_bar()
    out.mark_finished("teacher")
    assert out.run_eta(0) == pytest.approx(6 * out.rate_seconds)
    assert out.step_offset("student") == 4 and out.step_offset("elsewhere") == 0
    captured = capsys.readouterr()
    assert captured.out == "stage 1/3: teacher (fine-tune)\n[teacher] step 2/4 dev accuracy 0.5\n"
    assert "\r" not in captured.err and "\x1b" not in captured.err
    assert console.format_seconds(3725) == "1:02:05" and console.format_seconds(65) == "1:05"


class RecordHandler(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_load_hf_model_is_quiet_only_about_a_new_head(tiny, tmp_path, monkeypatch):
    from transformers import BertModel

    base = BertModel(BertConfig(vocab_size=27, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=64))
    base.save_pretrained(tmp_path / "base")
    state = base.state_dict()
    del state["encoder.layer.0.output.dense.weight"]
    base.save_pretrained(tmp_path / "broken", state_dict=state)
    ctx = types.SimpleNamespace(spec=types.SimpleNamespace(label_names=None, num_labels=2, is_regression=False))
    handler = RecordHandler()
    logger = logging.getLogger(models.LOADING_LOGGER)
    logger.addHandler(handler)
    try:
        model = models.load_hf_model(ctx, tmp_path / "base")
        assert model.classifier.out_features == 2 and handler.messages == []
        models.load_hf_model(ctx, tmp_path / "broken")
    finally:
        logger.removeHandler(handler)
    assert len(handler.messages) == 1 and "LOAD REPORT" in handler.messages[0]
    assert "encoder.layer.0.output.dense.weight" in handler.messages[0]


def test_remove_unneeded_models_keeps_the_teacher_and_final_models(tmp_path):
    args = glue.parse_args(["--model_name_or_path", "unused", "--output_dir", str(tmp_path)])
    options.check_args(args)
    plan = stages.plan_stages(args)
    ctx = types.SimpleNamespace(args=args, accelerator=types.SimpleNamespace(is_main_process=True,
                                                                           wait_for_everyone=lambda: None),
                                stage_dir=lambda name: tmp_path / name,
                                done=lambda name: {"model": context.BEST_DIR} if (
                                    tmp_path / name / context.DONE_FILE).is_file() else None)
    for stage in plan[:5]:  # teacher, width, ternary hidden and logits, TWS finished; the binary student not yet
        (tmp_path / stage.name / context.BEST_DIR).mkdir(parents=True)
        (tmp_path / stage.name / context.DONE_FILE).write_text("{}")
    args.keep_checkpoints = "all"
    assert resume.remove_unneeded_models(ctx, plan) == []
    args.keep_checkpoints = "needed"
    assert resume.remove_unneeded_models(ctx, plan) == [tmp_path / "ternary_a8_hidden" / context.BEST_DIR]
    kept = sorted(path.parent.name for path in tmp_path.glob(f"*/{context.BEST_DIR}"))
    # TWS stays until the binary student that starts from it has finished; the width model is no intermediate.
    assert kept == ["teacher", "ternary_a8_logits", "tws_a8", "width"]
    with pytest.raises(ValueError, match=r"stage 'ternary_a8_logits' starts from stage 'ternary_a8_hidden', whose "
                                         r"model .* was removed"):
        (tmp_path / "ternary_a8_logits" / context.DONE_FILE).unlink()
        resume.check_starting_points(ctx, plan)


def test_history_lines_and_tracker_steps(tmp_path):
    logged = []
    accelerator = types.SimpleNamespace(is_main_process=True, log_with=["tracker"],
                                        log=lambda values, step: logged.append((step, values)))
    history = History(accelerator, "student", tmp_path, step_offset=100)
    history.train(4, 0.5, {"loss": 0.5, "lr": 1e-3})
    history.evaluation(6, 0.75, {"accuracy": 0.8}, True)
    history.train(8, 1.0, {"loss": 0.4, "lr": 5e-4})
    assert logged == [(104, {"student/train/loss": 0.5, "student/train/lr": 1e-3}),
                      (106, {"student/eval/accuracy": 0.8}),
                      (108, {"student/train/loss": 0.4, "student/train/lr": 5e-4})]
    history.truncate(6)
    assert read_history(tmp_path / HISTORY_FILE) == [
        {"step": 4, "epoch": 0.5, "loss": 0.5, "lr": 1e-3},
        {"step": 6, "epoch": 0.75, "eval": {"accuracy": 0.8}, "best": True},
    ]


def test_keep_umask_modes(tmp_path):
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    context.keep_umask_modes(tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


# ---- the training loop, in process ----


@pytest.fixture
def one_thread():
    """Tiny models train faster on one thread, and far faster when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Interrupted(Exception):
    """Raised by a loss function to simulate a killed run."""


def soft_cross_entropy(outputs, teacher_outputs, batch):
    # Logit distillation written here: the loop only needs a callable (the library provides the real losses).
    return -(teacher_outputs.logits.softmax(-1) * outputs.logits.log_softmax(-1)).sum(-1).mean()


def make_context(tiny, output_dir, *extra):
    args = glue.parse_args(tiny_argv(tiny, output_dir, "--checkpointing_steps", "5", "--num_train_epochs", "2", *extra))
    return launch.build_context(args)


def saved_tensors(directory):
    return load_file(str(Path(directory) / "model.safetensors"))


def distill_once(tiny, output_dir, interrupt_at=None, resume=False):
    """Run the distillation loop for one stage: a fresh student learns a teacher's logits."""
    ctx, _ = make_context(tiny, output_dir, *(["--resume_from_checkpoint", "latest"] if resume else []))
    stage = stages.Stage("student", "distill", "32-32-32", loss="logits", learning_rate=1e-3)
    start_partial(ctx, stage)
    set_seed(7)
    teacher = models.load_hf_model(ctx, tiny["model"])
    student = models.load_hf_model(ctx, tiny["model"])
    calls = []

    def loss_fn(outputs, teacher_outputs, batch):
        calls.append(1)
        if interrupt_at is not None and len(calls) == interrupt_at:
            raise Interrupted
        return soft_cross_entropy(outputs, teacher_outputs, batch)

    record = loop.train_stage(ctx, stage, student, teacher=teacher, loss_fn=loss_fn,
                              save_model=lambda model, directory: models.save_hf_model(ctx, model, directory))
    final = {name: tensor.detach().clone() for name, tensor in student.state_dict().items()}
    return final, record, len(calls)


def test_distillation_loop_keeps_best_and_resumes_exactly(tiny, tmp_path, one_thread):
    straight_final, straight, straight_calls = distill_once(tiny, tmp_path / "straight")
    assert straight["steps"] == straight_calls == 24
    assert straight["tokens"] > 0 and straight["tokens_per_second"] > 0
    assert straight["best_metrics"]["eval_samples"] == DEV_SIZE
    best = tmp_path / "straight" / "student.partial" / context.BEST_DIR
    best_state = json.loads((best / context.BEST_STATE_FILE).read_text())
    assert best_state["step"] == straight["best_step"] and best_state["metrics"] == straight["best_metrics"]
    assert dev_accuracy_of(best, tiny) == straight["best_metrics"]["accuracy"]

    with pytest.raises(Interrupted):
        distill_once(tiny, tmp_path / "resumed", interrupt_at=13)
    checkpoint = latest_checkpoint(tmp_path / "resumed" / "student.partial")
    assert checkpoint.name == "step_10"
    resumed_final, resumed, resumed_calls = distill_once(tiny, tmp_path / "resumed", resume=True)
    assert resumed_calls == 14 and resumed["steps"] == 24
    assert resumed["best_step"] == straight["best_step"] and resumed["best_metrics"] == straight["best_metrics"]
    # Same final weights bit for bit: model, optimizer, schedule, data order and dropout RNG were all restored.
    assert resumed_final.keys() == straight_final.keys()
    for name in straight_final:
        torch.testing.assert_close(resumed_final[name], straight_final[name], rtol=0, atol=0, msg=name)
    expected = saved_tensors(best)
    actual = saved_tensors(tmp_path / "resumed" / "student.partial" / context.BEST_DIR)
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0, msg=name)
    assert not all(torch.equal(straight_final[name], expected[name]) for name in expected)
    # The history of the resumed stage drops what it trained again: the same lines, in order.
    def history_of(run):
        records = read_history(tmp_path / run / "student.partial" / HISTORY_FILE)
        return [(r["step"], r.get("loss"), r.get("eval"), r.get("best")) for r in records]
    straight_history = history_of("straight")
    assert history_of("resumed") == straight_history
    assert [step for step, loss, *_ in straight_history if loss is not None] == [4, 8, 12, 16, 20, 24]
    assert [step for step, _, metrics, _ in straight_history if metrics is not None] == [6, 12, 18, 24]


def test_restart_without_resume_discards_the_partial_stage(tiny, tmp_path, one_thread):
    with pytest.raises(Interrupted):
        distill_once(tiny, tmp_path, interrupt_at=7)
    assert latest_checkpoint(tmp_path / "student.partial").name == "step_5"
    _, record, calls = distill_once(tiny, tmp_path)
    assert calls == record["steps"] == 24


# ---- the script end to end (subprocesses) ----


def read_done(output_dir, stage):
    return json.loads((Path(output_dir) / stage / context.DONE_FILE).read_text())


@pytest.mark.slow
def test_script_teacher_and_report(tiny, tmp_path):
    output_dir = tmp_path / "run"
    result = run_script(tiny_argv(tiny, output_dir, "--stop_after", "teacher"))
    assert result.returncode == 0, result.stderr[-4000:]
    done = read_done(output_dir, "teacher")
    assert done["steps"] == 48 and done["num_processes"] == 1 and done["bits"] == "32-32-32"
    assert done["metrics"]["eval_samples"] == DEV_SIZE
    stored = saved_tensors(output_dir / "teacher" / "best")
    assert done["size_bytes"] == sum(tensor.numel() * tensor.element_size() for tensor in stored.values())
    assert not (output_dir / "teacher.partial").exists() and not (output_dir / "teacher" / "checkpoints").exists()
    assert 0.5 < done["metrics"]["accuracy"] < 1.0
    assert dev_accuracy_of(output_dir / "teacher" / "best", tiny) == done["metrics"]["accuracy"]
    report = json.loads((output_dir / "report.json").read_text())
    assert [row["stage"] for row in report["rows"]] == ["teacher"]
    assert report["rows"][0]["metrics"]["accuracy"] == done["metrics"]["accuracy"]
    markdown = (output_dir / "report.md").read_text()
    assert f"| teacher | 32-32-32 | 1 | {done['metrics']['accuracy'] * 100:.2f} |" in markdown
    assert "| teacher | 32-32-32 |" in result.stdout
    # The console: a stage header, plain lines off a terminal, no loading bars or load reports.
    assert "stage 1/1: teacher (W-E-A 32-32-32, fine-tune the full-precision model)" in result.stdout
    for stream in (result.stdout, result.stderr):
        assert "\r" not in stream and "\x1b" not in stream
    assert "Loading weights" not in result.stderr and "Writing model shards" not in result.stderr
    assert f"{output_dir} holds " in result.stdout
    # History: every logged step and every evaluation.
    history = read_history(output_dir / "teacher" / HISTORY_FILE)
    train_lines = [record for record in history if "loss" in record]
    assert [record["step"] for record in train_lines] == list(range(4, 49, 4))
    assert all(record["lr"] >= 0 and record["tokens_per_second"] > 0 for record in train_lines)
    assert [record["step"] for record in history if "eval" in record] == [6, 12, 18, 24, 30, 36, 42, 48]
    assert max(r["eval"]["accuracy"] for r in history if "eval" in r) == done["metrics"]["accuracy"]
    # The report: model named, legend, plots linked; sizes and modes of what the run left.
    assert markdown.startswith(f"# local: binary pipeline ({tiny['model']})")
    assert "W-E-A: bits of the weights" in markdown and "x smaller: the teacher's size" in markdown
    for plot in ("plots/training_curves.png", "plots/accuracy_vs_size.png"):
        assert f"]({plot})" in markdown and (output_dir / plot).read_bytes().startswith(b"\x89PNG")
    assert report["run_folder_bytes"] == pytest.approx(report_module.folder_bytes(output_dir), rel=0.05)
    umask = os.umask(0)
    os.umask(umask)
    modes = {path.relative_to(output_dir): path.stat().st_mode & 0o777 for path in output_dir.rglob("*")
             if path.is_file()}
    assert modes and set(modes.values()) == {0o666 & ~umask}, modes

    again = run_script(tiny_argv(tiny, output_dir, "--stop_after", "teacher"))
    assert again.returncode == 0, again.stderr[-4000:]
    assert "[teacher] finished earlier, skipped" in again.stdout
    assert read_done(output_dir, "teacher") == done

    changed = run_script(tiny_argv(tiny, output_dir, "--stop_after", "teacher", "--seed", "1"))
    assert changed.returncode != 0
    assert "holds stage 'teacher' finished with other settings (seed: finished with 42, now 1)" in changed.stderr

    other_dir = tmp_path / "given_teacher"
    given = run_script(tiny_argv(tiny, other_dir, "--stop_after", "teacher",
                                 "--teacher_name_or_path", str(output_dir / "teacher" / "best")))
    assert given.returncode == 0, given.stderr[-4000:]
    loaded = read_done(other_dir, "teacher")
    assert loaded["steps"] == 0 and loaded["metrics"] == done["metrics"]
    assert loaded["model"] == str((output_dir / "teacher" / "best").resolve())


@pytest.mark.slow
def test_script_runs_every_quantized_stage(tiny, tmp_path):
    output_dir = tmp_path / "run"
    result = run_script(tiny_argv(tiny, output_dir, "--quant", "binary", "--num_train_epochs", "1", "--seeds", "42,43"),
                        timeout=480)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((output_dir / "report.json").read_text())
    finished = [row["stage"] for row in report["rows"]]
    assert finished == ["teacher", "width", "ternary_a8_hidden", "ternary_a8_logits", "tws_a8", "binary_a8_hidden",
                        "binary_a8_logits", "bwn_a8_hidden", "bwn_a8_logits"]
    assert all(row["size_mb"] < report["rows"][0]["size_mb"] for row in report["rows"][1:])
    # The width model, the ternary student and the binary one split from it keep half the heads and FFN neurons;
    # BWN does not. The split binary encoder has as many 1-bit weights as the full-width BWN one.
    assert [row["width"] for row in report["rows"]] == [1.0] + [0.5] * 6 + [1.0] * 2
    parts = {row["stage"]: row["size_parts"] for row in report["rows"]}
    assert parts["binary_a8_logits"]["encoder"]["binary_weights"] == parts["bwn_a8_logits"]["encoder"][
        "binary_weights"] > 0
    assert parts["ternary_a8_logits"]["encoder"]["ternary_weights"] * 2 == parts["bwn_a8_logits"]["encoder"][
        "binary_weights"]
    for row in report["rows"]:
        assert sum(part["stored_bytes"] for part in row["size_parts"].values()) == round(row["size_mb"] * 1e6)
        predictions = json.loads((output_dir / row["stage"] / context.PREDICTIONS_FILE).read_text())
        assert len(predictions["predictions"]) == len(predictions["labels"]) == DEV_SIZE
        assert compute_metrics(("accuracy",), predictions["predictions"], predictions["labels"])["accuracy"] == (
            row["metrics"]["accuracy"])
    # The width stage taught the ternary and binary students: its model starts and teaches them, and stays.
    assert "distil hidden states and attention scores from width, from tws_a8" in result.stdout
    quantization = json.loads((output_dir / "binary_a8_logits" / "best" / "quantization.json").read_text())
    assert quantization["split"] and quantization["width"] == 0.5
    assert [len(kept["heads"]) for kept in quantization["width_plan"].values()] == [1, 1]
    assert [len(kept["neurons"]) for kept in quantization["width_plan"].values()] == [32, 32]
    # Ternary weight splitting starts the binary student where the ternary one ended.
    assert read_done(output_dir, "tws_a8")["metrics"] == read_done(output_dir, "ternary_a8_logits")["metrics"]
    # --keep_checkpoints needed: the intermediate models went once their followers finished.
    kept = sorted(path.parent.name for path in output_dir.glob("*/best"))
    assert kept == ["binary_a8_logits", "bwn_a8_logits", "teacher", "ternary_a8_logits", "width"]
    assert all((output_dir / row["stage"] / HISTORY_FILE).is_file() for row in report["rows"] if row["steps"])
    assert "ternary_a8_hidden" in result.stdout and "removed" in result.stdout
    # --seeds 42,43: the second seed trains its quantized stages in seed_43/ from the first seed's teacher and
    # width model (evaluated, not trained), and the seeds report pairs TWS with BWN on the same dev examples.
    second = output_dir / "seed_43"
    for stage in ("teacher", "width"):
        given = read_done(second, stage)
        assert given["steps"] == 0 and given["metrics"] == read_done(output_dir, stage)["metrics"]
        assert given["model"] == str((output_dir / stage / "best").resolve())
    assert read_done(second, "binary_a8_logits")["settings"]["seed"] == 43
    summary = json.loads((output_dir / "seeds.json").read_text())
    assert sorted(map(int, summary["seeds"])) == [42, 43]
    shared = {row["stage"]: (row["shared"], row["seeds"]) for row in summary["stages"]}
    assert shared["teacher"] == shared["width"] == (True, 1) and shared["binary_a8_logits"] == (False, 2)
    [comparison] = summary["comparisons"]
    assert (comparison["tws_stage"], comparison["bwn_stage"]) == ("binary_a8_logits", "bwn_a8_logits")
    first_seed = [entry for entry in comparison["per_seed"] if int(entry["seed"]) == 42][0]
    assert first_seed["tws_accuracy"] == pytest.approx(read_done(output_dir, "binary_a8_logits")["metrics"]["accuracy"])
    assert 0 <= comparison["bootstrap"]["p_value"] <= 1
    markdown = (output_dir / "seeds.md").read_text()
    assert "significant at the 0.05 level" in markdown and "seeds.md" not in result.stderr


@pytest.mark.slow
def test_script_width_stage_resumes_and_is_skipped_when_finished(tiny, tmp_path):
    output_dir = tmp_path / "run"
    argv = tiny_argv(tiny, output_dir, "--stop_after", "width", "--num_train_epochs", "6",
                     "--checkpointing_steps", "10", "--evals_per_epoch", "1", "--logging_steps", "40")
    checkpoint = kill_at_first_checkpoint(argv, output_dir / "width.partial", timeout=240)
    assert checkpoint is not None and read_done(output_dir, "teacher") and not (output_dir / "width").exists()
    step = int(checkpoint.name.removeprefix("step_"))
    result = run_script([*argv, "--resume_from_checkpoint", "latest"])
    assert result.returncode == 0, result.stderr[-4000:]
    assert "[teacher] finished earlier, skipped" in result.stdout
    assert f"[width] resumed from {checkpoint} at step {step}" in result.stdout
    done = read_done(output_dir, "width")
    assert done["steps"] == 72 and done["width"] == 0.5 and done["kind"] == "width"
    # A full-precision narrow model: half the heads and FFN neurons, nothing quantized, loss on logits + hidden.
    history = read_history(output_dir / "width" / HISTORY_FILE)
    assert all({"logits", "hidden"} <= set(record) for record in history if "loss" in record)
    quantization = json.loads((output_dir / "width" / "best" / "quantization.json").read_text())
    assert quantization["weight_method"] is None and quantization["width"] == 0.5
    narrow = models.load_student(output_dir / "width" / "best")
    assert [layer.attention.self.num_attention_heads for layer in narrow.bert.encoder.layer] == [1, 1]
    assert not any(type(module).__name__.startswith(("Quant", "Binary", "Ternary")) for module in narrow.modules())
    again = run_script(argv)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "[width] finished earlier, skipped" in again.stdout and read_done(output_dir, "width") == done


@pytest.mark.slow
def test_script_killed_mid_stage_resumes_from_checkpoint(tiny, tmp_path):
    output_dir = tmp_path / "run"
    argv = tiny_argv(tiny, output_dir, "--stop_after", "teacher", "--num_train_epochs", "10",
                     "--checkpointing_steps", "10", "--evals_per_epoch", "1", "--logging_steps", "40")
    checkpoint = kill_at_first_checkpoint(argv, output_dir / "teacher.partial", timeout=180)
    assert checkpoint is not None and not (output_dir / "teacher").exists()
    step = int(checkpoint.name.removeprefix("step_"))
    result = run_script([*argv, "--resume_from_checkpoint", "latest"])
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"[teacher] resumed from {checkpoint} at step {step}" in result.stdout
    assert read_done(output_dir, "teacher")["steps"] == 120


@pytest.mark.slow
def test_two_processes_gloo(tiny, tmp_path):
    output_dir = tmp_path / "run"
    launcher = (sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(free_port()))
    result = run_script([*tiny_argv(tiny, output_dir, "--stop_after", "teacher"), "--cpu"], launcher=launcher)
    assert result.returncode == 0, result.stderr[-4000:]
    done = read_done(output_dir, "teacher")
    assert done["num_processes"] == 2 and done["steps"] == 24
    assert done["metrics"]["eval_samples"] == DEV_SIZE
    assert dev_accuracy_of(output_dir / "teacher" / "best", tiny) == done["metrics"]["accuracy"]
    assert result.stdout.count("| teacher | 32-32-32 |") == 1


@pytest.mark.slow
def test_accelerate_launch_cpu_flag(tiny, tmp_path):
    output_dir = tmp_path / "run"
    launcher = (sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(free_port()))
    result = run_script(tiny_argv(tiny, output_dir, "--stop_after", "teacher"), launcher=launcher)
    assert result.returncode == 0, result.stderr[-4000:]
    # accelerate starts one process for --cpu without MPI; the script restarts itself as two gloo processes.
    assert "restarting as 2 CPU processes" in result.stdout
    done = read_done(output_dir, "teacher")
    assert done["num_processes"] == 2 and done["metrics"]["eval_samples"] == DEV_SIZE
    assert result.stdout.count("| teacher | 32-32-32 |") == 1


def test_requested_cpu_processes_only_for_a_single_process_cpu_launch(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    # Not started by a multi-process launch (no MASTER_PORT): nothing to restart.
    assert launch.requested_cpu_processes() is None
    monkeypatch.setenv("MASTER_PORT", "29500")
    # The parent of pytest is not `accelerate launch`: the count cannot be read.
    assert launch.requested_cpu_processes() is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launch.requested_cpu_processes() is None
    command = launch.relaunch_command(3, ["--quant", "binary"])
    assert command[1:7] == ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "3", "--num_machines"]
    assert command[-3:] == ["--quant", "binary", "--cpu"] and "29500" in command


@pytest.mark.slow
def test_script_lat_students_and_split_budget(tiny, tmp_path):
    output_dir = tmp_path / "run"
    result = run_script(tiny_argv(tiny, output_dir, "--quant", "binary", "--num_train_epochs", "1",
                                  "--weight_method", "lat", "--split_budget", "bwn"), timeout=480)
    assert result.returncode == 0, result.stderr[-4000:]
    # Loss-aware ternary students keep Adam's second moments with their weights: reloaded, they compute what the
    # run evaluated (with D = 1 they would not).
    best = output_dir / "ternary_a8_logits" / "best"
    assert (best / models.SECOND_MOMENTS_FILE).is_file()
    quantization = json.loads((best / context.QUANT_FILE).read_text())
    assert quantization["weight_method"] == "lat"
    done = read_done(output_dir, "ternary_a8_logits")
    predictions = json.loads((output_dir / "ternary_a8_logits" / context.PREDICTIONS_FILE).read_text())
    student = models.load_student(best).eval()
    with open(tiny["dev"], newline="") as handle:
        rows = list(csv.DictReader(handle))
    tokenizer = AutoTokenizer.from_pretrained(best)
    encoded = tokenizer([row["sentence"] for row in rows], padding=True, return_tensors="pt")
    with torch.no_grad():
        reloaded = student(**encoded).logits.argmax(-1).tolist()
    assert reloaded == predictions["predictions"]
    assert done["metrics"]["accuracy"] == compute_metrics(("accuracy",), reloaded, predictions["labels"])["accuracy"]
    # --split_budget bwn: the split binary model fits the BWN-direct model's stored bytes.
    split = read_done(output_dir, "tws_a8")
    bwn = read_done(output_dir, "bwn_a8_logits")
    assert split["split_budget_bytes"] == bwn["size_bytes"] and split["size_bytes"] <= bwn["size_bytes"]
    assert isinstance(split["split"], list)
    assert read_done(output_dir, "binary_a8_logits")["size_bytes"] == split["size_bytes"]
    assert "--split_budget bwn:" in result.stdout
