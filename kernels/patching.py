"""Giving an mlx-lm module moedec's call, and mlx-lm's back, by changing its class (never its
weights): the MoE blocks, the joined attention and the joined decoder layers all go this way."""

from __future__ import annotations

import functools
import importlib
from typing import Callable, Optional


@functools.lru_cache(maxsize=None)
def patched_class(cls: type, call: Callable, marker: str) -> type:
    """A subclass of ``cls`` whose ``__call__`` is ``call``; it keeps mlx-lm's call as
    ``_moedec_stock_call`` and its architecture module as ``_moedec_module``, and is recognised by
    the class attribute ``marker``."""
    return type(cls.__name__, (cls,), {"__call__": call, "_moedec_stock_call": cls.__call__, marker: True,
                                       "moedec_backend": None, "__module__": cls.__module__,
                                       "_moedec_module": importlib.import_module(cls.__module__)})


def set_call(module, call: Callable, marker: str, on: bool, backend: Optional[str] = None) -> None:
    """Give ``module`` ``call`` (``on``; ``backend``, if given, as ``module.moedec_backend``), or
    mlx-lm's call back."""
    patched = getattr(type(module), marker, False)
    if not on:
        if patched:
            module.__class__ = type(module).__mro__[1]
            module.__dict__.pop("moedec_backend", None)
        return
    if not patched:
        module.__class__ = patched_class(type(module), call, marker)
    if backend is not None:
        module.moedec_backend = backend
