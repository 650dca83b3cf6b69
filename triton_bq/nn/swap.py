"""In-place class swap onto a quantized subclass of a third-party module's own class, picklable.

Quantized attention and quantized ``nn.Embedding`` subclasses (BART's scaled word embedding) keep the module object,
its Parameters and its own behaviour, and change only its class to one that combines the module's class with a
``triton_bq`` class. Those combined classes are made on demand, one per pair, so they are not module-level names and
``pickle`` could not find them by name; each carries a ``__reduce_ex__`` that rebuilds the instance from its bases
(module-level classes, pickled by reference), so ``torch.save(model)``, ``pickle`` and ``copy.deepcopy`` work and the
unpickled module has the same combined class as one swapped in this process.
"""

from __future__ import annotations

from torch import nn

__all__ = ["original_class", "swap_class", "swapped_class", "unswap_class"]

_CLASSES: dict[tuple[type, ...], type] = {}


def _rebuild(bases: tuple[type, ...], original: type) -> nn.Module:
    """Unpickling entry point: an empty instance of the combined class (pickle then restores its state)."""
    return object.__new__(swapped_class(bases, original))


def _reduce_ex(self, protocol):
    return _rebuild, (type(self).__bases__, type(self)._swap_original), self.__getstate__()


def swapped_class(bases: tuple[type, ...], original: type) -> type:
    """The class with ``bases`` (one per tuple, cached) that ``original`` instances are swapped to."""
    key = (*bases, original)
    if key not in _CLASSES:
        name = f"Quant{original.__name__}"
        namespace = {"__module__": __name__, "__qualname__": name, "_swap_original": original,
                     "__reduce_ex__": _reduce_ex}
        _CLASSES[key] = type(name, bases, namespace)
    return _CLASSES[key]


def swap_class(module: nn.Module, bases: tuple[type, ...]) -> nn.Module:
    """Change ``module``'s class in place to ``swapped_class(bases, type(module))`` and return it."""
    module.__class__ = swapped_class(bases, type(module))
    return module


def original_class(module: nn.Module) -> type | None:
    """The class ``module`` had before ``swap_class`` (``None`` when it was not swapped)."""
    return getattr(type(module), "_swap_original", None)


def unswap_class(module: nn.Module) -> nn.Module:
    """Undo ``swap_class``: give ``module`` its original class back."""
    original = original_class(module)
    if original is None:
        raise TypeError(f"module was not swapped by triton_bq, got {type(module).__name__}")
    module.__class__ = original
    return module
