"""The BinaryBERT / TernaryBERT training pipeline, run by ``glue.py`` (the Accelerate script), in parts:

- ``glue.py``: the entry point, the command-line options and ``main``.
- ``runner.py``: what each kind of stage does (teacher, distill, split) and the run of every planned stage.
- ``export.py``: every final model as a packed Hugging Face folder with its tokenizer and model card, under
  ``<output_dir>/export/<stage>/``.
- ``launch.py``: the CPU re-launch of ``accelerate launch --cpu`` and the setup of a run's ``Context``.
- ``report.py``: ``report.json`` and ``report.md``.
- ``loop.py``: the training loop of one stage (keep-best, checkpoints, exact resume) and dev evaluation.
- ``models.py``: teacher and quantized students (build, width, split, save, load, size) and distillation losses;
  the one module that imports ``triton_bq``.
- ``resume.py``: starting, finishing, reusing and resuming stage folders.
- ``options.py``: option defaults that depend on the task, and the checks of every value.
- ``stages.py``: which stages ``--quant`` runs, in what order, with what settings.
- ``context.py``: the ``Context`` every stage shares and the names of the files a run writes.
- ``data.py`` and ``metrics.py``: tasks and their data, GLUE metrics.

A module imports only modules below it in this list.
"""
