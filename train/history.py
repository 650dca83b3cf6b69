"""A stage's history: one JSON line per logged training step and per dev evaluation, in
``<stage>.partial/history.jsonl`` (``<stage>/history.jsonl`` once the stage is finished), and the same values sent
to the experiment trackers of ``--report_to`` (``accelerator.log``).

A training line is ``{"step", "epoch", "loss", <the loss's parts>, "lr", "tokens_per_second", "wall_seconds"}``
(``loss`` and its parts are means over the steps since the previous line), an evaluation line ``{"step", "epoch",
"eval": {metric: value}, "best"}``. A resumed stage first drops the lines after its checkpoint's step, which it
trains again. Trackers see the values under ``<stage>/train/<name>`` and ``<stage>/eval/<metric>`` at the run's
step (the steps of the earlier planned stages plus the stage's), so that every tracker's steps only grow.
"""

from __future__ import annotations

import json
from pathlib import Path

from accelerate import Accelerator

HISTORY_FILE = "history.jsonl"


def read_history(path: Path) -> list[dict]:
    """The records of a ``history.jsonl`` (empty if there is none)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class History:
    """Appends a stage's records to its ``history.jsonl`` (main process) and logs them to the trackers."""

    def __init__(self, accelerator: Accelerator, stage: str, directory: Path, step_offset: int):
        self.accelerator, self.stage, self.step_offset = accelerator, stage, step_offset
        self.path = directory / HISTORY_FILE

    def truncate(self, step: int) -> None:
        """Drop the records after ``step`` (a resumed stage trains them again); without a checkpoint, all."""
        if not self.accelerator.is_main_process or not self.path.is_file():
            return
        kept = [record for record in read_history(self.path) if record["step"] <= step]
        self.path.write_text("".join(json.dumps(record) + "\n" for record in kept))

    def append(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")

    def train(self, step: int, epoch: float, values: dict) -> None:
        """A logged training step: ``values`` holds the loss, its parts, lr, tokens/s and wall seconds."""
        self.append({"step": step, "epoch": round(epoch, 4), **values})
        if self.accelerator.log_with:
            self.accelerator.log({f"{self.stage}/train/{key}": value for key, value in values.items()},
                                 step=self.step_offset + step)

    def evaluation(self, step: int, epoch: float, metrics: dict, best: bool) -> None:
        """A dev evaluation at ``step``."""
        self.append({"step": step, "epoch": round(epoch, 4), "eval": metrics, "best": best})
        if self.accelerator.log_with:
            self.accelerator.log({f"{self.stage}/eval/{key}": value for key, value in metrics.items()},
                                 step=self.step_offset + step)
