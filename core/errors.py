"""The one error type moedec raises for user-facing problems.

The CLI prints a :class:`MoedecError` as a single line on stderr and exits non-zero; anything else
that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class MoedecError(Exception):
    """A problem the user can fix: unknown strategy, bad option, missing model, broken plugin, ...

    The message is one line and names what is wrong (and, for plugin problems, which plugin and
    which hook).
    """


class PluginError(MoedecError):
    """A plugin misbehaved: it failed to import, registered a duplicate name, or a hook returned
    something invalid. The message names the plugin and the hook."""
