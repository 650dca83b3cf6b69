"""Private Triton kernels and their launchers, installed as ``triton_bq.kernels``.

In a checkout this folder also sits on ``sys.path`` as a top-level ``kernels`` package whenever the repository root
does (``python -m`` or ``python -c`` run there, pytest's rootdir). That name belongs to Hugging Face's ``kernels``
distribution, which transformers imports. So when this file runs as top-level ``kernels`` it hands the import on to
the next ``kernels`` on the path (the installed one); with none, the module becomes what Python makes of a folder
without ``__init__.py`` (a PEP 420 namespace package: no ``__file__``, no version), which transformers' availability
checks read as not installed.
"""

import importlib.machinery as _machinery
import importlib.util as _util
import os as _os
import sys as _sys

if __name__ == "kernels":
    _here = _os.path.dirname(_os.path.realpath(__file__))
    _checkout = _os.path.dirname(_here)
    # Every spelling of the checkout on the path ("", a relative or a symlinked one) is left out.
    _path = [entry for entry in _sys.path if _os.path.realpath(entry or _os.getcwd()) != _checkout]
    _spec = _machinery.PathFinder.find_spec("kernels", _path)
    if _spec is None:
        _spec = _machinery.ModuleSpec("kernels", None, is_package=True)
        _spec.submodule_search_locations = [_here]
    _module = _util.module_from_spec(_spec)
    # The import system returns what sys.modules holds for the name once this file has run.
    _sys.modules["kernels"] = _module
    if _spec.loader is not None:
        _spec.loader.exec_module(_module)
