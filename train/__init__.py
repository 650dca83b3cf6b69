"""The BinaryBERT / TernaryBERT training pipeline, run by ``glue.py`` (the Accelerate script), in parts:

- ``glue.py``: the entry point, the command-line options and ``main``.
- ``runner.py``: what each kind of stage does (teacher, width, distill, split), the run of every planned stage, and
  the runs of ``--seeds``.
- ``export.py``: every final model as a packed Hugging Face folder with its tokenizer and model card, under
  ``<output_dir>/export/<stage>/``.
- ``launch.py``: the CPU re-launch of ``accelerate launch --cpu`` and the setup of a run's ``Context``.
- ``report.py``: ``report.json``, ``report.md`` and the run folder's size.
- ``seeds.py``: the report over seeds (``seeds.md``, ``seeds.json``): mean and std per stage, TWS against BWN.
- ``significance.py``: the paired tests (exact McNemar, paired bootstrap over dev examples).
- ``plots.py``: the report's figures (training curves, metric against size).
- ``loop.py``: the training loop of one stage (keep-best, checkpoints, exact resume) and dev evaluation.
- ``history.py``: a stage's ``history.jsonl`` (logged steps and evaluations) and the trackers of ``--report_to``.
- ``models.py``: teacher and quantized students (build, width, split, save, load, size) and distillation losses;
  the one module that imports ``triton_bq``.
- ``resume.py``: starting, finishing, reusing and resuming stage folders; removing the models no stage needs.
- ``options.py``: option defaults that depend on the task, and the checks of every value.
- ``stages.py``: which stages ``--quant`` runs, in what order, with what settings.
- ``context.py``: the ``Context`` every stage shares and the names of the files a run writes.
- ``console.py``: what a run prints: stage headers, progress bars, log lines, the run's remaining time.
- ``data.py`` and ``metrics.py``: tasks and their data, GLUE metrics.

A module imports only modules below it in this list.
"""
