"""The stages of the pipeline: what each one is, which ones ``--quant`` runs, and in what order.

``plan_stages`` lists them; each stage's directory, learning rate, quantizer, loss and starting point are fields
of its ``Stage``. The report is not a stage of the plan: it always runs last.
"""

from __future__ import annotations

import argparse
import dataclasses

# The first word of every stage name (``--stop_after`` takes one of them).
STAGE_PREFIXES = ("teacher", "ternary", "tws", "binary", "bwn")


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of the pipeline.

    Attributes:
        name: directory name under ``--output_dir``.
        kind: ``"teacher"`` (full-precision fine-tuning), ``"distill"`` (student from teacher) or ``"split"`` (TWS).
        bits: W-E-A label for the report.
        weight_method: the student's weight quantizer (``"twn"``, ``"bwn"``), ``None`` for the teacher.
        loss: ``"task"``, ``"hidden"`` (hidden states + attention scores) or ``"logits"``.
        init_from: the stage whose best model initialises this one (``None``: the pretrained model).
        learning_rate: peak learning rate (0 for stages without training).
    """

    name: str
    kind: str
    bits: str
    weight_method: str | None = None
    loss: str | None = None
    init_from: str | None = None
    learning_rate: float = 0.0


def distillation_stages(
    prefix: str, weight_method: str, bits: str, init_from: str, base_lr: float, args: argparse.Namespace
) -> list[Stage]:
    """The two sub-stages of one distillation: hidden states and attention scores first, then logits only."""
    a = args.act_bits
    return [
        Stage(f"{prefix}_a{a}_hidden", "distill", bits, weight_method, "hidden", init_from,
              base_lr * args.hidden_lr_multiplier),
        Stage(f"{prefix}_a{a}_logits", "distill", bits, weight_method, "logits", f"{prefix}_a{a}_hidden", base_lr),
    ]


def plan_stages(args: argparse.Namespace) -> list[Stage]:
    """The stages ``--quant`` runs, in order (the report stage is not listed: it always runs last)."""
    a = args.act_bits
    stages = [Stage("teacher", "teacher", "32-32-32", loss="task", learning_rate=args.learning_rate)]
    if args.quant in ("ternary", "binary"):
        stages += distillation_stages("ternary", "twn", f"2-2-{a}", "teacher", args.ternary_learning_rate, args)
    if args.quant == "binary":
        stages.append(Stage(f"tws_a{a}", "split", f"1-1-{a}", "bwn", None, f"ternary_a{a}_logits"))
        stages += distillation_stages("binary", "bwn", f"1-1-{a}", f"tws_a{a}", args.binary_learning_rate, args)
    if args.quant == "bwn" or (args.quant == "binary" and args.bwn_baseline):
        stages += distillation_stages("bwn", "bwn", f"1-1-{a}", "teacher", args.binary_learning_rate, args)
    if args.stop_after is not None:
        last = [i for i, stage in enumerate(stages) if stage.name.split("_")[0] == args.stop_after]
        if not last:
            raise ValueError(f"--stop_after {args.stop_after!r} names no stage of --quant {args.quant} "
                             f"({', '.join(stage.name for stage in stages)})")
        stages = stages[: last[-1] + 1]
    return stages
