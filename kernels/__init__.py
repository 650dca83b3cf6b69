"""Private Triton kernels and their launchers, installed as ``triton_bq.kernels``."""
