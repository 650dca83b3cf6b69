"""The export stage: every final model as a packed Hugging Face folder under ``<output_dir>/export/<stage>/``.

The final model of each family the run trained (ternary: TernaryBERT; binary: BinaryBERT via ternary weight
splitting, the split model itself when the run stops after it; bwn: the baseline binarized from the teacher) is the
best model of its last finished stage. Its export folder holds what ``triton_bq.save_packed`` writes (``config.json``
with the packed modules as its quantization config, packed ``model.safetensors``, ``packed.json``), the tokenizer,
and ``README.md``, a short model card (task, recipe, W-E-A bits, dev metrics, stored size, how to load it). After
``import triton_bq`` it loads with ``transformers.AutoModelForSequenceClassification.from_pretrained``.
"""

from __future__ import annotations

from pathlib import Path

from train.context import BEST_DIR, Context, replace_dir
from train.models import load_student, save_packed_student
from train.stages import Stage

EXPORT_DIR = "export"
MODEL_CARD = "README.md"

# Stage-name prefix -> the family of final models it belongs to, and the family's recipe for the model card.
FAMILIES = {"ternary": "ternary", "tws": "binary", "binary": "binary", "bwn": "bwn"}
RECIPES = {
    "ternary": "TernaryBERT: a ternary (TWN) student distilled from the full-precision teacher, on hidden states and "
               "attention scores, then on logits",
    "binary": "BinaryBERT: ternary weight splitting of the ternary student into an equivalent binary one, then "
              "distillation from the teacher, on hidden states and attention scores, then on logits",
    "bwn": "binary (BWN) baseline: a binary student distilled directly from the full-precision teacher, on hidden "
           "states and attention scores, then on logits",
}
RECIPE_SPLIT_ONLY = ("BinaryBERT after ternary weight splitting of the ternary student (no binary distillation: the "
                     "run stopped after the split)")


def final_stages(ctx: Context, stages: list[Stage]) -> list[Stage]:
    """The last finished stage of each family of quantized students among ``stages``, in plan order."""
    last: dict[str, Stage] = {}
    for stage in stages:
        family = FAMILIES.get(stage.name.split("_")[0])
        if family is not None and ctx.done(stage.name) is not None:
            last[family] = stage
    return [stage for stage in stages if stage in last.values()]


def model_card(ctx: Context, stage: Stage, done: dict, stored_bytes: int, directory: Path) -> str:
    """The README.md of an exported model."""
    family = FAMILIES[stage.name.split("_")[0]]
    recipe = RECIPE_SPLIT_ONLY if stage.kind == "split" else RECIPES[family]
    metrics = {key: value for key, value in done["metrics"].items() if key != "eval_samples"}
    rows = "\n".join(f"| {name} | {value * 100:.2f} |" for name, value in metrics.items())
    width = done.get("width", 1.0)
    example = ", ".join(repr(text) for text in ("what a great flight", "the worst service ever"))
    return f"""---
library_name: transformers
tags: [triton_bq, quantization, {family}, text-classification]
---

# {ctx.spec.name}: {stage.name} ({stage.bits} W-E-A bits)

- Task: {ctx.spec.name} ({ctx.spec.num_labels} labels{", regression" if ctx.spec.is_regression else ""}), from
  {ctx.source}; base model {ctx.args.model_name_or_path}.
- Recipe: {recipe}.
- Bits (weights-embeddings-activations): {stage.bits}; width {width:g} of the teacher's attention heads and FFN
  neurons.
- Stored size: {stored_bytes} bytes of tensors ({stored_bytes / 1e6:.2f} MB: packed 1- or 2-bit weights, fp32 scales,
  everything else at its dtype).
- Dev metrics of this model ({done["metrics"].get("eval_samples", "all")} examples):

| metric | % |
|---|---|
{rows}

## Use

```python
import triton_bq  # registers the "triton_bq" quantization method with transformers
from transformers import AutoModelForSequenceClassification, AutoTokenizer

path = "{directory}"
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForSequenceClassification.from_pretrained(path)
inputs = tokenizer([{example}], padding=True, return_tensors="pt")
print(model(**inputs).logits.argmax(-1))
```

Without `import triton_bq` transformers does not know the quantization method: it warns and returns an
unquantized model with random weights in place of the packed layers.
"""


def export_final_models(ctx: Context, stages: list[Stage]) -> list[Path]:
    """Write the export folder of every final model (module docstring); returns the folders (main process writes)."""
    folders = []
    for stage in final_stages(ctx, stages):
        folder = ctx.output_dir / EXPORT_DIR / stage.name
        folders.append(folder)
        if ctx.accelerator.is_main_process:
            model = load_student(ctx.stage_dir(stage.name) / BEST_DIR).eval()
            temporary = folder.with_name(folder.name + ".tmp")
            sizes = save_packed_student(model, temporary)
            ctx.tokenizer.save_pretrained(temporary)
            card = model_card(ctx, stage, ctx.done(stage.name), sizes["packed_bytes"], folder)
            (temporary / MODEL_CARD).write_text(card)
            replace_dir(temporary, folder)
            ctx.accelerator.print(f"[export] {stage.name}: {folder} ({sizes['packed_bytes'] / 1e6:.2f} MB packed)")
    ctx.accelerator.wait_for_everyone()
    return folders
