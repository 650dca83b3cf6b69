"""Packed models out of the training code: the format (``format``), true sizes (``size``) and files (``io``)."""
