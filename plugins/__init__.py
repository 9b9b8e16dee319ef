"""The plugin manager: built-in strategies and third-party packages, loaded the same way.

Built-ins are the modules in :data:`DEFAULT_PLUGINS`; third parties publish an entry point in the
``moedec`` group. Both implement ``register_strategies`` with ``@moedec.hookimpl``. Nothing happens at
import time: the manager is built on first use by :func:`get_manager`.

``MOEDEC_LOAD_PLUGINS``: when set, only the entry points it names (comma separated, by entry-point
name or distribution name) are loaded; set to an empty string to load none. Built-ins always load.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import warnings
from typing import Optional

import attrs
import pluggy

from moedec import hookspecs
from moedec.errors import MoedecError, PluginError

ENTRY_POINT_GROUP = "moedec"
ENV_LOAD = "MOEDEC_LOAD_PLUGINS"

#: Built-in strategy plugins, registered through the same hook third parties use.
DEFAULT_PLUGINS: tuple[str, ...] = ("moedec.strategies.single", "moedec.strategies.prompt_lookup", "moedec.strategies.draft_model", "moedec.strategies.batched", "moedec.strategies.mtp", "moedec.strategies.eagle")


@attrs.frozen
class StrategyInfo:
    """A registered strategy: its ``name``, class, and where it came from."""

    name: str
    cls: type
    plugin: str  # the plugin (module / entry point) that registered it
    package: str  # distribution name
    version: str


@attrs.frozen
class PluginFailure:
    """A plugin that could not be loaded; the others still are."""

    plugin: str
    package: str
    error: str

    def message(self) -> str:
        return f"plugin {self.plugin!r} (package {self.package}) failed to load: {self.error}"


@attrs.define
class PluginHost:
    """The loaded plugin modules, the strategies they registered, and the plugins that failed."""

    pm: pluggy.PluginManager
    strategies: dict[str, StrategyInfo] = attrs.field(factory=dict)
    failures: list[PluginFailure] = attrs.field(factory=list)
    sources: dict[str, tuple[str, str]] = attrs.field(factory=dict)  # plugin -> (package, version)

    def strategy(self, name: str) -> StrategyInfo:
        """The strategy called ``name``; an unknown name is an error that lists the available ones."""
        try:
            return self.strategies[name]
        except KeyError:
            avail = ", ".join(sorted(self.strategies)) or "none"
            raise MoedecError(f"unknown strategy {name!r}; available: {avail}") from None

    def observers(self) -> list[object]:
        """Plugin modules that wrap strategy-level hooks (metrics, accounting)."""
        out = []
        for name, plugin in self.pm.list_name_plugin():
            if strategy_hooks(plugin):
                out.append(plugin)
        return out


def _own_version() -> str:
    try:
        return md.version("moedec")
    except md.PackageNotFoundError:
        return "0+local"


def new_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


def _allowed(ep: md.EntryPoint, allow: Optional[set[str]]) -> bool:
    if allow is None:
        return True
    dist = getattr(ep, "dist", None)
    names = {ep.name, ep.value.split(":")[0]}
    if dist is not None:
        names.add(dist.metadata["Name"])
        names.add(dist.metadata["Name"].replace("_", "-").lower())
    return bool(names & allow)


def _check_wrappers_only(pm: pluggy.PluginManager, plugin: object, name: str) -> None:
    """A plugin module may observe strategy-level hooks, not implement them (that is a strategy's job)."""
    for hook in hookspecs.STRATEGY_HOOKS:
        for impl in getattr(pm.hook, hook).get_hookimpls():
            if impl.plugin is plugin and not (impl.wrapper or impl.hookwrapper) and hook in ("draft", "verify", "accept"):
                raise PluginError(
                    f"plugin {name!r} implements hook {hook!r} at module level; strategy hooks "
                    "belong on a strategy class (module-level implementations must be wrapper=True)"
                )


def build_host(load_entry_points: bool = True, extra_plugins: tuple[str, ...] = ()) -> PluginHost:
    """Build a fresh plugin host: built-ins, then entry points (subject to ``MOEDEC_LOAD_PLUGINS``)."""
    pm = new_plugin_manager()
    host = PluginHost(pm=pm)
    version = _own_version()

    def add(plugin_name: str, loader, package: str, pkg_version: str) -> None:
        try:
            plugin = loader()
            pm.register(plugin, name=plugin_name)
        except Exception as e:  # a broken plugin must not take the others down
            host.failures.append(PluginFailure(plugin_name, package, f"{type(e).__name__}: {e}"))
            return
        try:
            _check_wrappers_only(pm, plugin, plugin_name)
        except PluginError as e:
            pm.unregister(plugin)
            host.failures.append(PluginFailure(plugin_name, package, str(e)))
            return
        host.sources[plugin_name] = (package, pkg_version)

    for mod in (*DEFAULT_PLUGINS, *extra_plugins):
        add(mod, lambda mod=mod: importlib.import_module(mod), "moedec", version)

    if load_entry_points:
        env = os.environ.get(ENV_LOAD)
        allow = None if env is None else {p.strip() for p in env.split(",") if p.strip()}
        for ep in md.entry_points(group=ENTRY_POINT_GROUP):
            if not _allowed(ep, allow):
                continue
            dist = getattr(ep, "dist", None)
            package = dist.metadata["Name"] if dist is not None else ep.value.split(":")[0]
            pkg_version = dist.version if dist is not None else "?"
            if pm.has_plugin(ep.name) or ep.value in DEFAULT_PLUGINS:
                continue
            add(ep.name, ep.load, package, pkg_version)

    try:
        pm.check_pending()
    except pluggy.PluginValidationError as e:
        bad = pm.get_name(e.plugin) or repr(e.plugin)
        pm.unregister(e.plugin)
        package = host.sources.pop(bad, ("?", "?"))[0]
        host.failures.append(PluginFailure(bad, package, f"unknown hook: {e}"))

    for impl in pm.hook.register_strategies.get_hookimpls():
        plugin_name = impl.plugin_name
        package, pkg_version = host.sources.get(plugin_name, ("?", "?"))

        def register(cls: type, _plugin=plugin_name, _pkg=package, _ver=pkg_version) -> None:
            _register(host, cls, _plugin, _pkg, _ver)

        try:
            impl.function(register=register)
        except PluginError:
            raise
        except Exception as e:
            host.failures.append(
                PluginFailure(plugin_name, package, f"register_strategies raised {type(e).__name__}: {e}")
            )
    return host


def _register(host: PluginHost, cls: type, plugin: str, package: str, version: str) -> None:
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise PluginError(f"plugin {plugin!r} registered {cls!r} without a string `name` attribute")
    if name in host.strategies:
        first = host.strategies[name]
        raise PluginError(
            f"duplicate strategy name {name!r}: registered by plugin {first.plugin!r} "
            f"(package {first.package}) and by plugin {plugin!r} (package {package})"
        )
    host.strategies[name] = StrategyInfo(name, cls, plugin, package, version)


_HOST: Optional[PluginHost] = None


def get_manager() -> PluginHost:
    """The process-wide plugin host, built on first use. Load failures are warned about once."""
    global _HOST
    if _HOST is None:
        host = build_host()
        for f in host.failures:
            warnings.warn(f.message(), RuntimeWarning, stacklevel=2)
        _HOST = host
    return _HOST


def reset_manager() -> None:
    """Forget the cached host (tests; after installing a plugin in-process)."""
    global _HOST
    _HOST = None


def strategy_hooks(cls: object) -> list[str]:
    """Which strategy-level hooks a strategy class (or plugin module) implements."""
    return [h for h in hookspecs.STRATEGY_HOOKS if hasattr(getattr(cls, h, None), f"{hookspecs.PROJECT}_impl")]
