"""The BinaryBERT / TernaryBERT training pipeline: ``glue.py`` (the Accelerate script), its data and metrics."""
