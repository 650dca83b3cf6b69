"""What a run prints: a ``stage k/N: name`` header and one progress bar per training stage, with log lines, dev
evaluations and checkpoints as their own lines above the bar, and an estimate of the whole run's remaining time.

The bars are drawn only on a terminal (stdout and stderr both): with either redirected, for example to a log
file, every line is plain text without carriage returns or escape codes. Log lines go through ``tqdm.write``, and
while a run is under way (``cooperating_output``) so do Python warnings and the log records of transformers and
accelerate, so that a real warning prints as its own line instead of into the bar. The progress bars of the
libraries (transformers' "Loading weights" and "Writing model shards", datasets' and the hub's bars off a terminal)
are switched off: the stage bar is the one progress display.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
import warnings
from collections.abc import Iterator

import datasets
import huggingface_hub
import transformers
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

# Loggers whose console handlers write through tqdm while a run is under way.
LIBRARY_LOGGERS = ("transformers", "accelerate", "datasets")


def format_seconds(seconds: float) -> str:
    """``h:mm:ss`` (or ``m:ss`` under an hour) of a non-negative duration."""
    seconds = max(int(round(seconds)), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


@contextlib.contextmanager
def cooperating_output() -> Iterator[None]:
    """Within: Python warnings and the libraries' log records print through ``tqdm.write`` (on stderr), as their
    own lines above a progress bar."""
    previous = warnings.showwarning

    def show_warning(message, category, filename, lineno, file=None, line=None):
        text = warnings.formatwarning(message, category, filename, lineno, line).rstrip("\n")
        tqdm.write(text, file=sys.stderr)

    warnings.showwarning = show_warning
    try:
        with logging_redirect_tqdm(loggers=[logging.getLogger(name) for name in LIBRARY_LOGGERS]):
            yield
    finally:
        warnings.showwarning = previous


class Console:
    """The run's console output (main process only; the other processes print nothing).

    ``plan`` maps every planned stage's name to its number of training steps (0 for stages that do not train):
    with the seconds per step measured so far it gives the run's remaining time (``run_eta``).
    """

    def __init__(self, enabled: bool, plan: dict[str, int], interactive: bool | None = None):
        self.enabled = enabled
        self.interactive = (sys.stdout.isatty() and sys.stderr.isatty()) if interactive is None else interactive
        self.plan = dict(plan)
        self.finished: set[str] = set()
        self.stage: str | None = None
        self.bar: tqdm | None = None
        self.stage_started = 0.0
        self.steps_at_start = 0
        self.steps_done = 0
        self.rate_seconds: float | None = None

    def write(self, line: str) -> None:
        """Print one line (above the bar when there is one)."""
        if self.enabled:
            tqdm.write(line, file=sys.stdout)
            sys.stdout.flush()

    def quiet_library_bars(self) -> None:
        """Switch off transformers' bars (they would print inside the stage bar); datasets' and the hub's too off a
        terminal, where their carriage returns would end up in the log file."""
        transformers.utils.logging.disable_progress_bar()
        if self.interactive and self.enabled:
            huggingface_hub.utils.enable_progress_bars()
        else:
            datasets.disable_progress_bars()

    def step_offset(self, name: str) -> int:
        """The training steps of the planned stages before ``name`` (0 for a stage outside the plan)."""
        names = list(self.plan)
        return sum(self.plan[other] for other in names[: names.index(name)]) if name in self.plan else 0

    def mark_finished(self, name: str) -> None:
        """A stage that needs no more steps in this run (finished now or in an earlier run)."""
        self.finished.add(name)

    def start_stage(self, name: str, detail: str) -> None:
        """Print the ``stage k/N: name`` header with the run's remaining time, if known."""
        names = list(self.plan)
        self.stage, self.stage_started, self.steps_at_start, self.steps_done = name, time.perf_counter(), 0, 0
        eta = self.run_eta(0)
        known = "" if eta is None else f", run ETA {format_seconds(eta)}"
        self.write(f"stage {names.index(name) + 1}/{len(names)}: {name} ({detail}{known})")

    def open_bar(self, total: int, initial: int) -> None:
        """The stage's progress bar from step ``initial`` of ``total`` (drawn only on a terminal)."""
        self.steps_at_start = self.steps_done = initial
        self.stage_started = time.perf_counter()
        self.bar = tqdm(total=total, initial=initial, desc=self.stage, file=sys.stderr, dynamic_ncols=True,
                        disable=not (self.enabled and self.interactive))

    def step(self, step: int) -> None:
        """Step ``step`` of the stage is done."""
        self.steps_done = step
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def show(self, **values: str) -> None:
        """Values shown after the bar (loss, tokens/s, the run's remaining time)."""
        if self.bar is not None:
            self.bar.set_postfix(values, refresh=True)

    @contextlib.contextmanager
    def status(self, text: str) -> Iterator[None]:
        """A pause of the training (dev evaluation, saving): shown after the bar, not counted in its rate."""
        if self.bar is not None and not self.bar.disable:
            postfix = self.bar.postfix
            self.bar.set_postfix_str(text, refresh=True)
        try:
            yield
        finally:
            if self.bar is not None and not self.bar.disable:
                self.bar.set_postfix_str(postfix or "", refresh=False)
                self.bar.unpause()

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def run_eta(self, step: int) -> float | None:
        """Seconds left in the run at step ``step`` of the current stage: the remaining steps of every unfinished
        stage at the wall seconds per step (evaluations and saving included) of the current stage, else of the
        last stage that trained; ``None`` before any step was timed."""
        trained = self.steps_done - self.steps_at_start
        if self.stage is not None and trained > 0:
            self.rate_seconds = (time.perf_counter() - self.stage_started) / trained
        if self.rate_seconds is None:
            return None
        remaining = sum(steps for name, steps in self.plan.items()
                        if name not in self.finished and name != self.stage)
        if self.stage is not None and self.stage not in self.finished:
            remaining += max(self.plan.get(self.stage, 0) - step, 0)
        return remaining * self.rate_seconds
