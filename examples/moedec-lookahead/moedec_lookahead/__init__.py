"""moedec-lookahead: lookahead (Jacobi + n-gram pool) decoding as a moedec strategy plugin.

Installed, it publishes this module in the ``moedec`` entry-point group; moedec then calls
:func:`register_strategies` and ``--strategy lookahead`` selects :class:`Lookahead`.
"""

from __future__ import annotations

import moedec

from .pool import NgramPool
from .strategy import Lookahead

__version__ = "0.1.0"
__all__ = ["Lookahead", "NgramPool", "register_strategies"]


@moedec.hookimpl
def register_strategies(register):
    register(Lookahead)
