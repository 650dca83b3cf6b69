"""The stages of the pipeline: what each one is, which ones ``--quant`` runs, and in what order.

``plan_stages`` lists them; each stage's directory, learning rate, quantizer, loss, teacher and starting point are
fields of its ``Stage``. The report is not a stage of the plan: it always runs last.
"""

from __future__ import annotations

import argparse
import dataclasses

# The first word of every stage name (``--stop_after`` takes one of them).
STAGE_PREFIXES = ("teacher", "width", "ternary", "tws", "binary", "bwn")
# The teachers a distillation stage can have: the full-width teacher, or the width stage's narrow model.
TEACHERS = ("teacher", "width")


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of the pipeline.

    Attributes:
        name: directory name under ``--output_dir``.
        kind: ``"teacher"`` (full-precision fine-tuning), ``"width"`` (full-precision narrowing by distillation),
            ``"distill"`` (quantized student from teacher) or ``"split"`` (TWS).
        bits: W-E-A label for the report.
        weight_method: the student's weight quantizer (``"twn"``, ``"lat"``, ``"bwn"``), ``None`` in full precision.
        loss: ``"task"``, ``"width"`` (logits + hidden states, DynaBERT), ``"hidden"`` (hidden states + attention
            scores) or ``"logits"``.
        init_from: the stage whose best model initialises this one (``None``: the pretrained model).
        learning_rate: peak learning rate (0 for stages without training).
        act_bits: the student's activation bits (``None``: full precision).
        teacher: the stage whose model teaches this one (``"teacher"`` or ``"width"``; ``None`` without teacher).
    """

    name: str
    kind: str
    bits: str
    weight_method: str | None = None
    loss: str | None = None
    init_from: str | None = None
    learning_rate: float = 0.0
    act_bits: int | None = None
    teacher: str | None = None


def distillation_stages(
    prefix: str, weight_method: str, bits: str, init_from: str, base_lr: float, act_bits: int, teacher: str,
    args: argparse.Namespace,
) -> list[Stage]:
    """The two sub-stages of one distillation: hidden states and attention scores first, then logits only."""
    a = act_bits
    return [
        Stage(f"{prefix}_a{a}_hidden", "distill", bits, weight_method, "hidden", init_from,
              base_lr * args.hidden_lr_multiplier, a, teacher),
        Stage(f"{prefix}_a{a}_logits", "distill", bits, weight_method, "logits", f"{prefix}_a{a}_hidden", base_lr,
              a, teacher),
    ]


def has_width_stage(args: argparse.Namespace) -> bool:
    """Whether the plan narrows the teacher first (a ternary student below full width)."""
    return args.quant in ("ternary", "binary") and args.ternary_width < 1


def plan_stages(args: argparse.Namespace) -> list[Stage]:
    """The stages ``--quant`` runs, in order (the report stage is not listed: it always runs last).

    With ``--ternary_width`` below 1 the ``width`` stage (a full-precision copy of the teacher narrowed to that
    width and distilled from it) initialises the ternary students and, with ``--ternary_teacher width`` (the
    default), teaches them and the binary students split from them. Every activation bit-width of ``--act_bits``
    gets its own ternary, TWS, binary and BWN stages after the shared teacher and width stages.
    """
    stages = [Stage("teacher", "teacher", "32-32-32", loss="task", learning_rate=args.learning_rate)]
    narrow = has_width_stage(args)
    if narrow:
        stages.append(Stage("width", "width", "32-32-32", None, "width", "teacher", args.learning_rate, None,
                            "teacher"))
    ternary_start = "width" if narrow else "teacher"
    ternary_teacher = args.ternary_teacher if narrow else "teacher"
    for a in args.act_bits:
        if args.quant in ("ternary", "binary"):
            stages += distillation_stages("ternary", args.weight_method, f"2-2-{a}", ternary_start,
                                          args.ternary_learning_rate, a, ternary_teacher, args)
        if args.quant == "binary":
            stages.append(Stage(f"tws_a{a}", "split", f"1-1-{a}", "bwn", None, f"ternary_a{a}_logits", act_bits=a))
            stages += distillation_stages("binary", "bwn", f"1-1-{a}", f"tws_a{a}", args.binary_learning_rate, a,
                                          ternary_teacher, args)
        if args.quant == "bwn" or (args.quant == "binary" and args.bwn_baseline):
            stages += distillation_stages("bwn", "bwn", f"1-1-{a}", "teacher", args.binary_learning_rate, a,
                                          "teacher", args)
    if args.stop_after is not None:
        last = [i for i, stage in enumerate(stages) if stage.name.split("_")[0] == args.stop_after]
        if not last:
            raise ValueError(f"--stop_after {args.stop_after!r} names no stage of --quant {args.quant} "
                             f"({', '.join(stage.name for stage in stages)})")
        stages = stages[: last[-1] + 1]
    return stages


def needed_by(stage: Stage, stages: list[Stage]) -> list[Stage]:
    """The planned stages that start from ``stage``'s model or are taught by it."""
    return [other for other in stages if stage.name in (other.init_from, other.teacher)]
