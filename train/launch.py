"""Starting a run: the restart of a one-process ``accelerate launch --cpu`` as N gloo processes, and the setup of
the shared ``Context`` (options checked, Accelerator started, data loaded and tokenized, stages planned).

Without MPI, ``accelerate launch --cpu`` starts the script once whatever ``--num_processes`` says;
``requested_cpu_processes`` reads the count back from the launcher's command line and ``relaunch_command`` is the
``accelerate launch`` that restarts the script as that many CPU processes (torch.distributed with gloo).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import transformers
from accelerate import Accelerator
from accelerate.commands.launch import launch_command_parser
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, ProjectConfiguration
from transformers import AutoTokenizer

from train.console import Console
from train.context import TRACKERS_DIR, Context
from train.data import load_task_data, tokenize_task_data
from train.options import check_args
from train.resume import check_finished_stages, check_resume_argument, check_starting_points
from train.stages import Stage, plan_stages

# The script that ``accelerate launch`` runs (the entry point beside this module).
ENTRY_SCRIPT = Path(__file__).resolve().with_name("glue.py")
# Environment variables set by distributed launchers (torch.distributed, MPI implementations).
LAUNCHED_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def launcher_arguments() -> list[str] | None:
    """The arguments of the ``accelerate launch`` that is this process's parent (``/proc``, Linux), else ``None``."""
    try:
        words = [word.decode(errors="replace") for word in
                 Path(f"/proc/{os.getppid()}/cmdline").read_bytes().split(b"\0") if word]
    except OSError:
        return None
    # `accelerate launch ARGS` or `python -m accelerate.commands.launch ARGS`.
    start = next((i + 1 for i, word in enumerate(words)
                  if word == "launch" or word.endswith("accelerate.commands.launch")), None)
    return None if start is None else words[start:]


def requested_cpu_processes() -> int | None:
    """The ``--num_processes`` of an ``accelerate launch --cpu`` that started this script as its only process.

    Without MPI, Accelerate's simple launcher runs the script once for ``--cpu`` and sets ``ACCELERATE_USE_CPU`` and
    ``MASTER_PORT`` (when more than one process was asked for) but not the count, so the count is read back from the
    launcher's command line (``/proc/<parent>/cmdline``, Linux). ``None`` when the script runs any other way, was
    started by a distributed launcher (``WORLD_SIZE`` or an MPI size set), asked for MPI or several machines, or
    the count cannot be read.
    """
    env = os.environ
    use_cpu = env.get("ACCELERATE_USE_CPU", "").lower() in ("true", "1")
    launched = any(name in env for name in LAUNCHED_VARIABLES)
    if launched or "MASTER_PORT" not in env or not use_cpu:
        return None
    words = launcher_arguments()
    if words is None:
        return None
    try:
        launch_args, _ = launch_command_parser().parse_known_args(words)
    except SystemExit:
        return None
    processes, machines = launch_args.num_processes, launch_args.num_machines or 1
    if not launch_args.cpu or launch_args.mpirun_hostfile or processes is None or processes < 2 or machines > 1:
        return None
    return processes


def relaunch_command(processes: int, argv: list[str], script: Path = ENTRY_SCRIPT) -> list[str]:
    """``accelerate launch`` of ``script`` as ``processes`` CPU processes (torch.distributed, gloo) on this host."""
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
        "--num_machines", "1", "--main_process_port", os.environ["MASTER_PORT"],
        "--mixed_precision", os.environ.get("ACCELERATE_MIXED_PRECISION", "no"), "--dynamo_backend", "no",
        str(script), *argv, "--cpu",
    ]


def make_accelerator(args: argparse.Namespace) -> Accelerator:
    """The run's Accelerator: seedable data order, unused parameters allowed, quiet non-main processes, the
    trackers of ``--report_to`` (logging under ``<output_dir>/trackers``)."""
    accelerator = Accelerator(
        cpu=args.cpu,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to or None,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, TRACKERS_DIR)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        # The hidden-state sub-stage leaves the classifier head out of the loss.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    if not accelerator.is_local_main_process:
        transformers.logging.set_verbosity_error()
    if accelerator.num_processes == 1 and "MASTER_PORT" in os.environ and "WORLD_SIZE" not in os.environ:
        print(
            "warning: one process only (the launcher's process count could not be read); start N CPU processes "
            "with `accelerate launch --multi_gpu --num_processes N train/glue.py --cpu` (torch.distributed, gloo)"
        )
    return accelerator


def stage_steps(args: argparse.Namespace, stages: list[Stage], train_examples: int, processes: int) -> dict[str, int]:
    """The training steps of each planned stage (0 for stages that do not train), for the run's time estimate."""
    batches = math.ceil(train_examples / args.per_device_train_batch_size)
    steps = math.ceil(batches / processes) * args.num_train_epochs
    trains = {"teacher": args.teacher_name_or_path is None, "width": args.width_name_or_path is None,
              "distill": True, "split": False}
    return {stage.name: steps if trains[stage.kind] else 0 for stage in stages}


def build_context(args: argparse.Namespace) -> tuple[Context, list[Stage]]:
    """Check the options, start Accelerate, load and tokenize the data, plan the stages; nothing is trained yet.

    Every input problem (options, task, files, columns, labels, finished stages with other settings, a resume
    path) raises ValueError here.
    """
    check_args(args)
    accelerator = make_accelerator(args)
    stages = plan_stages(args)
    console = Console(accelerator.is_local_main_process, {})
    console.quiet_library_bars()
    with accelerator.main_process_first():
        data = load_task_data(
            args.task, train_file=args.train_file, validation_file=args.validation_file,
            text_columns=args.text_columns, label_column=args.label_column,
            max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples,
            seed=args.data_seed,
        )
        tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
        tokenized = tokenize_task_data(data, tokenizer, args.max_seq_length)
    console.plan = stage_steps(args, stages, len(tokenized["train"]), accelerator.num_processes)
    ctx = Context(accelerator, args, data.spec, tokenizer, tokenized, Path(args.output_dir), data.source, console)
    check_finished_stages(ctx, stages)
    check_starting_points(ctx, stages)
    check_resume_argument(ctx, stages)
    if accelerator.is_main_process:
        ctx.output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    return ctx, stages
