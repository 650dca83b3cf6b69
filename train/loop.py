"""The training loop of one stage, and dev evaluation.

``train_stage`` builds the optimizer (AdamW, weight decay on matrices only) and the schedule (linear warm-up, then
linear decay), prepares everything with Accelerate and runs a ``StageLoop``: each step runs the frozen teacher
(optional) and the model on a batch and minimises the stage's loss with gradient clipping; the dev set is
evaluated ``--evals_per_epoch`` times per epoch and every improvement of the task's main metric is saved to
``<stage>.partial/best`` (keep-best); every ``--checkpointing_steps`` steps ``accelerator.save_state`` writes a
checkpoint that ``--resume_from_checkpoint`` continues exactly (same data order, random state and final weights).
Each logged step and each evaluation is a line of the stage's ``history.jsonl`` (``train/history.py``) and shows on
the console (``train/console.py``): the stage's progress bar, and evaluations and saving as their own status.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, get_linear_schedule_with_warmup

from train.console import format_seconds
from train.context import (
    BEST_DIR,
    BEST_STATE_FILE,
    CHECKPOINTS_DIR,
    PREDICTIONS_FILE,
    TRAINER_STATE_FILE,
    Context,
    keep_umask_modes,
    replace_dir,
    write_json,
)
from train.data import TaskSpec
from train.history import History
from train.metrics import compute_metrics, is_better
from train.resume import resume_checkpoint
from train.stages import Stage

# Each process's sums of the log interval a checkpoint cut (a resumed run logs the same values).
WINDOW_FILE = "log_window_{}.json"
# A loss function returns the loss, or the loss and a dict of its parts (logged beside it, e.g. hidden, attention).
LossFn = Callable[[object, object | None, dict], torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]]
SaveModel = Callable[[nn.Module, Path], None]


def get_dataloaders(ctx: Context) -> tuple[DataLoader, DataLoader]:
    """Unprepared train (shuffled) and dev DataLoaders that pad each batch to its longest example."""
    collator = DataCollatorWithPadding(ctx.tokenizer)
    train_dataloader = DataLoader(ctx.tokenized["train"], shuffle=True, collate_fn=collator,
                                  batch_size=ctx.args.per_device_train_batch_size)
    eval_dataloader = DataLoader(ctx.tokenized["validation"], shuffle=False, collate_fn=collator,
                                 batch_size=ctx.args.per_device_eval_batch_size)
    return train_dataloader, eval_dataloader


def _model_inputs(batch: dict) -> dict:
    return {key: value for key, value in batch.items() if key != "labels"}


def pad_to_global_length(accelerator: Accelerator, batch: dict, tokenizer) -> dict:
    """``batch`` with its sequences padded to the longest sequence of every process's batch (the global batch).

    Each process's collator pads to its own longest example, one process pads the global batch to its longest:
    padded positions count in the hidden-state and attention-score losses (their mean over all positions) and in
    per-tensor activation scales (their min / max), so without this N processes would not train as one process does
    on the same global batch. One process: ``batch`` itself.
    """
    if accelerator.num_processes == 1:
        return batch
    pad_first = tokenizer.padding_side == "left"
    pad_values = {"input_ids": tokenizer.pad_token_id, "token_type_ids": tokenizer.pad_token_type_id}
    return {key: accelerator.pad_across_processes(value, dim=1, pad_index=pad_values.get(key, 0), pad_first=pad_first)
            if isinstance(value, torch.Tensor) and value.dim() >= 2 else value for key, value in batch.items()}


@torch.no_grad()
def predict(accelerator: Accelerator, model: nn.Module, eval_dataloader, spec: TaskSpec) -> tuple[dict, dict]:
    """Dev metrics of ``model`` over every process's shard, each example counted once (``gather_for_metrics``),
    and its predictions: ``{"labels": [...], "predictions": [...]}`` in dev-set order (the paired tests compare
    models example by example)."""
    was_training = model.training
    model.eval()
    predictions, references = [], []
    for batch in eval_dataloader:
        with accelerator.autocast():
            logits = model(**_model_inputs(batch)).logits.float()
        batch_predictions = logits.squeeze(-1) if spec.is_regression else logits.argmax(dim=-1)
        batch_predictions, labels = accelerator.gather_for_metrics((batch_predictions, batch["labels"]))
        predictions.append(batch_predictions.cpu())
        references.append(labels.cpu())
    model.train(was_training)
    predictions, references = torch.cat(predictions), torch.cat(references)
    metrics = compute_metrics(spec.metrics, predictions.numpy(), references.numpy())
    return ({**metrics, "eval_samples": int(references.numel())},
            {"labels": references.tolist(), "predictions": predictions.tolist()})


def evaluate(accelerator: Accelerator, model: nn.Module, eval_dataloader, spec: TaskSpec) -> dict:
    """Dev metrics of ``model`` (``predict`` without the predictions)."""
    return predict(accelerator, model, eval_dataloader, spec)[0]


def predict_model(ctx: Context, model: nn.Module) -> tuple[dict, dict]:
    """``predict`` for an unprepared model (no training in this stage): the dev loader is prepared and released."""
    _, eval_dataloader = get_dataloaders(ctx)
    eval_dataloader = ctx.accelerator.prepare(eval_dataloader)
    result = predict(ctx.accelerator, model, eval_dataloader, ctx.spec)
    ctx.accelerator.free_memory()
    return result


def evaluate_model(ctx: Context, model: nn.Module) -> dict:
    """Dev metrics of an unprepared model (``predict_model`` without the predictions)."""
    return predict_model(ctx, model)[0]


def _parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    # Decay matrices only: biases, LayerNorm and quantizer clips/steps keep their scale.
    parameters = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in parameters if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in parameters if p.ndim < 2], "weight_decay": 0.0},
    ]


def _resumed_batches(accelerator: Accelerator, train_dataloader, skip: int) -> Iterable[dict]:
    """The batches of an epoch after its first ``skip``, with the random state left as ``load_state`` set it.

    Starting a DataLoader iterator draws a seed from the global torch generator. An uninterrupted run drew it at
    the start of the epoch, before the checkpoint's random state was saved, so the resumed run must not draw again.
    """
    state = torch.get_rng_state()
    iterator = iter(accelerator.skip_first_batches(train_dataloader, skip))
    first = next(iterator, None)
    torch.set_rng_state(state)
    return itertools.chain([] if first is None else [first], iterator)


@dataclasses.dataclass
class TrainerState:
    """A stage's training progress, saved with every checkpoint (``trainer_state.json``)."""

    global_step: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    wall_seconds: float = 0.0


@dataclasses.dataclass
class LogWindow:
    """Sums over the training steps since the last log line (tokens of this process, seconds, loss)."""

    tokens: int = 0
    seconds: float = 0.0
    loss: torch.Tensor | float = 0.0
    steps: int = 0
    parts: dict = dataclasses.field(default_factory=dict)

    def add(self, tokens: int, seconds: float, loss: torch.Tensor, parts: dict[str, torch.Tensor]) -> None:
        self.tokens += tokens
        self.seconds, self.loss, self.steps = self.seconds + seconds, self.loss + loss, self.steps + 1
        for name, value in parts.items():
            self.parts[name] = self.parts.get(name, 0.0) + value.detach().float()

    def to_json(self) -> dict:
        return {"tokens": self.tokens, "seconds": self.seconds, "loss": float(self.loss), "steps": self.steps,
                "parts": {name: float(value) for name, value in self.parts.items()}}

    @classmethod
    def from_json(cls, payload: dict, device: torch.device) -> LogWindow:
        # float32 sums written as floats come back exactly: the resumed sums continue bit for bit.
        def tensor(value: float) -> torch.Tensor:
            return torch.tensor(value, dtype=torch.float32, device=device)
        return cls(payload["tokens"], payload["seconds"], tensor(payload["loss"]) if payload["steps"] else 0.0,
                   payload["steps"], {name: tensor(value) for name, value in payload["parts"].items()})


@dataclasses.dataclass
class StageLoop:
    """One stage's training: the prepared model, optimizer, schedule and loaders, and what the loop updates.

    ``state`` is the resumable progress, ``best`` the best dev evaluation so far (``{"metrics", "step"}``, also
    in ``best/best_state.json``), ``window`` the sums of the current log interval, ``history`` the stage's
    ``history.jsonl`` and trackers.
    """

    ctx: Context
    stage: Stage
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_dataloader: DataLoader
    eval_dataloader: DataLoader
    loss_fn: LossFn
    save_model: SaveModel
    teacher: nn.Module | None = None
    forward_kwargs: dict = dataclasses.field(default_factory=dict)
    state: TrainerState = dataclasses.field(default_factory=TrainerState)
    best: dict | None = None
    window: LogWindow = dataclasses.field(default_factory=LogWindow)
    history: History | None = None
    wall_start: float = 0.0
    wall_before: float = 0.0

    @property
    def accelerator(self) -> Accelerator:
        return self.ctx.accelerator

    @property
    def partial(self) -> Path:
        return self.ctx.partial_dir(self.stage.name)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_dataloader)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.ctx.args.num_train_epochs

    def eval_points(self) -> set[int]:
        """Steps (1-based, within an epoch) after which the dev set is evaluated; the last is the epoch's end."""
        evals = self.ctx.args.evals_per_epoch
        return {math.ceil(k * self.steps_per_epoch / evals) for k in range(1, evals + 1)}

    def restore(self) -> None:
        """Load the checkpoint to resume from (``--resume_from_checkpoint``), if any, and the best so far."""
        checkpoint = resume_checkpoint(self.ctx, self.stage)
        if checkpoint is not None:
            self.accelerator.load_state(str(checkpoint))
            self.state = TrainerState(**json.loads((checkpoint / TRAINER_STATE_FILE).read_text()))
            window_file = checkpoint / WINDOW_FILE.format(self.accelerator.process_index)
            if window_file.is_file():
                self.window = LogWindow.from_json(json.loads(window_file.read_text()), self.accelerator.device)
            self.ctx.console.write(f"[{self.stage.name}] resumed from {checkpoint} at step {self.state.global_step}")
        best_file = self.partial / BEST_DIR / BEST_STATE_FILE
        self.best = json.loads(best_file.read_text()) if best_file.is_file() else None
        self.history = History(self.accelerator, self.stage.name, self.partial,
                               self.ctx.console.step_offset(self.stage.name))
        self.history.truncate(self.state.global_step)
        self.accelerator.wait_for_everyone()

    def run(self) -> None:
        """Train from the current step to the end of the last epoch, then make sure a best model was saved."""
        args, start_step = self.ctx.args, self.state.global_step
        self.ctx.console.open_bar(self.total_steps, start_step)
        self.wall_start, self.wall_before = time.perf_counter(), self.state.wall_seconds
        eval_points = self.eval_points()
        self.model.train()
        for epoch in range(start_step // self.steps_per_epoch, args.num_train_epochs):
            self.train_dataloader.set_epoch(epoch)
            skip = start_step - epoch * self.steps_per_epoch
            if skip > 0:
                batches = _resumed_batches(self.accelerator, self.train_dataloader, skip)
            else:
                batches = self.train_dataloader
            for batch in batches:
                loss, parts, elapsed = self.train_step(batch)
                self.after_step(batch, loss, parts, elapsed, eval_points)
            start_step = self.state.global_step
        self.ctx.console.close_bar()
        if self.best is None:
            self.evaluate_and_keep_best()
        self.update_wall_seconds()

    def train_step(self, batch: dict) -> tuple[torch.Tensor, dict, float]:
        """One optimizer step on ``batch``; returns the loss, its parts and the step's seconds."""
        accelerator = self.accelerator
        step_start = time.perf_counter()
        batch = pad_to_global_length(accelerator, batch, self.ctx.tokenizer)
        teacher_outputs = None
        if self.teacher is not None:
            with torch.no_grad(), accelerator.autocast():
                teacher_outputs = self.teacher(**batch, **self.forward_kwargs)
        outputs = self.model(**batch, **self.forward_kwargs)
        loss = self.loss_fn(outputs, teacher_outputs, batch)
        loss, parts = loss if isinstance(loss, tuple) else (loss, {})
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(self.model.parameters(), self.ctx.args.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()
        return loss, parts, time.perf_counter() - step_start

    def after_step(self, batch: dict, loss: torch.Tensor, parts: dict, elapsed: float, eval_points: set[int]) -> None:
        """Count the step, then log, evaluate and checkpoint when their step comes."""
        args = self.ctx.args
        self.state.global_step += 1
        self.state.train_seconds += elapsed
        self.window.add(int(batch["attention_mask"].sum()), elapsed, loss.detach().float(), parts)
        step = self.state.global_step
        self.ctx.console.step(step)
        if step % args.logging_steps == 0 or step == self.total_steps:
            self.log(step)
        if (step - 1) % self.steps_per_epoch + 1 in eval_points:
            self.evaluate_and_keep_best()
        self.update_wall_seconds()
        if args.checkpointing_steps and step % args.checkpointing_steps == 0 and step < self.total_steps:
            self.save_checkpoint()

    def update_wall_seconds(self) -> None:
        self.state.wall_seconds = self.wall_before + time.perf_counter() - self.wall_start

    def epoch_at(self, step: int) -> float:
        return step / self.steps_per_epoch

    def log(self, step: int) -> None:
        """Log the mean loss (and its parts) and tokens/s of the steps since the last log (all processes) to the
        console and the history, and start a new window."""
        accelerator, window, console = self.accelerator, self.window, self.ctx.console
        tokens = int(accelerator.reduce(torch.tensor(window.tokens, device=accelerator.device), "sum"))
        mean_loss = float(accelerator.reduce(window.loss / window.steps, "mean"))
        parts = {name: float(accelerator.reduce(total / window.steps, "mean")) for name, total in window.parts.items()}
        self.state.tokens += tokens
        rate = tokens / max(window.seconds, 1e-9)
        lr = self.scheduler.get_last_lr()[0]
        self.update_wall_seconds()
        self.history.train(step, self.epoch_at(step), {"loss": mean_loss, **parts, "lr": lr,
                                                       "tokens_per_second": rate,
                                                       "wall_seconds": self.state.wall_seconds})
        eta = console.run_eta(step)
        run_left = "" if eta is None else f", run ETA {format_seconds(eta)}"
        console.show(loss=f"{mean_loss:.4f}", tok_s=f"{rate:.0f}",
                     **({} if eta is None else {"run_left": format_seconds(eta)}))
        part_text = "" if not parts else " (" + ", ".join(f"{name} {value:.4f}" for name, value in parts.items()) + ")"
        console.write(f"[{self.stage.name}] step {step}/{self.total_steps} loss {mean_loss:.4f}{part_text} "
                      f"lr {lr:.2e} tokens/s {rate:.0f}{run_left}")
        self.window = LogWindow()

    def evaluate_and_keep_best(self) -> None:
        """Evaluate on the dev set; on an improvement of the main metric save the model to ``best/``."""
        accelerator, spec, console, step = self.accelerator, self.ctx.spec, self.ctx.console, self.state.global_step
        started = time.perf_counter()
        with console.status("evaluating on dev"):
            metrics, predictions = predict(accelerator, self.model, self.eval_dataloader, spec)
        line = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "eval_samples")
        previous = None if self.best is None else self.best["metrics"][spec.main_metric]
        improved = is_better(metrics[spec.main_metric], previous)
        self.history.evaluation(step, self.epoch_at(step), metrics, improved)
        if improved:
            self.best = {"metrics": metrics, "step": step}
            with console.status("saving the best model"):
                self.save_best(predictions)
        console.write(f"[{self.stage.name}] step {step}/{self.total_steps} dev {line}"
                      f"{' (best, saved)' if improved else ''} in {time.perf_counter() - started:.1f} s")

    def save_best(self, predictions: dict) -> None:
        """Replace ``best/`` with the current model, ``best_state.json`` and its dev ``predictions.json`` (main
        process)."""
        accelerator = self.accelerator
        if accelerator.is_main_process:
            staging = self.partial / f"{BEST_DIR}.tmp"
            if staging.exists():
                shutil.rmtree(staging)
            self.save_model(accelerator.unwrap_model(self.model), staging)
            write_json(staging / BEST_STATE_FILE, self.best)
            write_json(staging / PREDICTIONS_FILE, predictions)
            keep_umask_modes(staging)
            replace_dir(staging, self.partial / BEST_DIR)
        accelerator.wait_for_everyone()

    def save_checkpoint(self) -> None:
        """``accelerator.save_state`` to ``checkpoints/step_N``, then the trainer state; older checkpoints go."""
        accelerator, checkpoints = self.accelerator, self.partial / CHECKPOINTS_DIR
        directory = checkpoints / f"step_{self.state.global_step}"
        started = time.perf_counter()
        with self.ctx.console.status("saving a checkpoint"):
            accelerator.save_state(str(directory))
            write_json(directory / WINDOW_FILE.format(accelerator.process_index), self.window.to_json())
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                keep_umask_modes(directory)
                # Written last: a checkpoint with its trainer state is complete.
                write_json(directory / TRAINER_STATE_FILE, dataclasses.asdict(self.state))
                for old in checkpoints.glob("step_*"):
                    if old != directory:
                        shutil.rmtree(old)
            accelerator.wait_for_everyone()
        self.ctx.console.write(f"[{self.stage.name}] checkpoint {directory.name} saved in "
                               f"{time.perf_counter() - started:.1f} s")

    def record(self) -> dict:
        """The stage's training record: best metrics and step, steps, tokens, seconds and tokens/s."""
        state = self.state
        return {
            "best_step": self.best["step"],
            "best_metrics": self.best["metrics"],
            "steps": state.global_step,
            "tokens": state.tokens,
            "train_seconds": state.train_seconds,
            "train_wall_seconds": state.wall_seconds,
            "tokens_per_second": state.tokens / max(state.train_seconds, 1e-9),
            "previous_wall_seconds": self.wall_before,
        }


def train_stage(
    ctx: Context,
    stage: Stage,
    model: nn.Module,
    *,
    loss_fn: LossFn,
    save_model: SaveModel,
    teacher: nn.Module | None = None,
    forward_kwargs: dict | None = None,
    optimizer_hook: Callable[[torch.optim.Optimizer], None] | None = None,
) -> dict:
    """Train ``model`` for one stage and keep its best dev checkpoint in ``<stage>.partial/best``.

    Each step runs ``teacher`` (frozen, eval mode, no grad; optional) and ``model`` on the batch with
    ``forward_kwargs`` and minimises ``loss_fn(model_outputs, teacher_outputs, batch)`` (the loss, or the loss and a
    dict of its parts, which the history logs) with AdamW (weight decay on
    matrices), linear warm-up over ``--warmup_ratio`` of the steps then linear decay, and gradient clipping.
    The dev set is evaluated ``--evals_per_epoch`` times per epoch; every improvement of the task's main metric is
    saved with ``save_model(unwrapped_model, directory)`` (main process). ``optimizer_hook`` receives the torch
    optimizer after it is built (loss-aware ternarization reads its second moments). Checkpoints for
    ``--resume_from_checkpoint`` go to ``<stage>.partial/checkpoints/step_N``.

    Returns the stage's training record (``StageLoop.record``).
    """
    accelerator, args = ctx.accelerator, ctx.args
    train_dataloader, eval_dataloader = get_dataloaders(ctx)
    # The schedule counts optimizer steps of the global batch (warm-up rounded up in those), as one process running
    # every process's batches would; Accelerate steps a prepared scheduler once per process for each optimizer step.
    processes = accelerator.num_processes
    optimizer_steps = math.ceil(len(train_dataloader) / processes) * args.num_train_epochs
    # The fused AdamW kernel (CPU and CUDA) is one pass over the parameters instead of a dozen per tensor. The
    # parameters are still on the CPU here: accelerator.prepare moves them, so the accelerator's device decides.
    optimizer = torch.optim.AdamW(_parameter_groups(model, args.weight_decay), lr=stage.learning_rate,
                                  fused=accelerator.device.type in ("cpu", "cuda"))
    if optimizer_hook is not None:
        optimizer_hook(optimizer)
    scheduler = get_linear_schedule_with_warmup(
        optimizer, num_warmup_steps=math.ceil(args.warmup_ratio * optimizer_steps) * processes,
        num_training_steps=optimizer_steps * processes,
    )
    model, optimizer, train_dataloader, eval_dataloader, scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader, scheduler
    )
    if teacher is not None:
        teacher.to(accelerator.device).eval().requires_grad_(False)
    loop = StageLoop(ctx, stage, model, optimizer, scheduler, train_dataloader, eval_dataloader, loss_fn, save_model,
                     teacher=teacher, forward_kwargs=forward_kwargs or {})
    loop.restore()
    loop.run()
    accelerator.free_memory()
    return loop.record()
