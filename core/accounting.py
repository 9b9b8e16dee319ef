"""Expert accounting: which experts every forward reads, and how many bytes that costs.

Every MoE layer of an mlx-lm model routes through an *expert module* — ``SwitchGLU`` (or
``SwitchMLP``) called as ``module(x, indices)`` with ``indices`` ``[..., T, k]``. While an
:class:`ExpertTrace` is active, each expert module of one model records the (lazy) indices of every
call; after the forward, :func:`layer_use` turns them into tokens ``T``, selections ``T·k`` and the
union ``U`` of distinct experts.

With :class:`~moedec.inventory.ModelBytes`, the static inventory of the model's weights as stored
(:mod:`moedec.inventory`), a forward then reads::

    fixed + rows * distinct_tokens + sum_layers(units * bytes_per_expert) + KV cache bytes

with ``units = U`` for the union kernel (each active expert once) and ``units = T·k`` for the
per-pair kernel (stock ``gather_qmm``: one expert slice per (token, expert) pair).

:class:`ExpertAccounting` is the pluggy observer: pass it to ``moedec.generate(..., plugins=[acct])``;
it wraps ``verify`` and keeps a :class:`ForwardRecord` per verify forward.

A fused kernel module that replaces ``SwitchGLU`` is traced too if it subclasses it, or if its class
sets ``moedec_expert_module = True`` and keeps the ``(x, indices)`` call signature.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, Optional, Sequence

import attrs
import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .errors import MoedecError
from .hookspecs import hookimpl
from .inventory import KERNELS, ModelBytes, expert_modules, kv_bytes, model_bytes

# -- tracing --------------------------------------------------------------------------------------

_SINKS: dict[int, list] = {}  # id(module) -> callbacks(layer, indices)
_ORIGINAL: dict[int, type] = {}  # id(module) -> its class before tracing


@functools.lru_cache(maxsize=None)
def _observed_class(cls: type) -> type:
    def __call__(self, x, indices, *args, **kwargs):
        for sink in _SINKS.get(id(self), ()):
            sink(self, indices)
        return cls.__call__(self, x, indices, *args, **kwargs)

    return type(cls.__name__, (cls,), {"__call__": __call__, "_moedec_observed": True, "__module__": cls.__module__})


class ExpertTrace:
    """Context manager: while active, every call of ``model``'s expert modules records its routing
    indices (lazily; nothing is evaluated). ``calls`` holds ``(layer, indices)`` in call order;
    :meth:`take` returns them and starts afresh. Other models' expert modules are not affected;
    traces nest (each gets every call)."""

    def __init__(self, model: nn.Module, modules: Optional[list[tuple[str, nn.Module]]] = None):
        self.modules = [m for _, m in (modules if modules is not None else expert_modules(model))]
        self.index = {id(m): i for i, m in enumerate(self.modules)}
        self.calls: list[tuple[int, mx.array]] = []

    def _sink(self, module, indices) -> None:
        self.calls.append((self.index[id(module)], indices))

    def __enter__(self) -> "ExpertTrace":
        for m in self.modules:
            key = id(m)
            if key not in _SINKS:
                _ORIGINAL[key] = type(m)
                m.__class__ = _observed_class(type(m))
                _SINKS[key] = []
            _SINKS[key].append(self._sink)
        return self

    def __exit__(self, *exc) -> None:
        for m in self.modules:
            key = id(m)
            sinks = _SINKS.get(key, [])
            if self._sink in sinks:
                sinks.remove(self._sink)
            if not sinks and key in _ORIGINAL:
                m.__class__ = _ORIGINAL.pop(key)
                _SINKS.pop(key, None)

    def take(self) -> list[tuple[int, mx.array]]:
        calls, self.calls = self.calls, []
        return calls


# -- per-forward records --------------------------------------------------------------------------


@attrs.frozen
class LayerUse:
    """Routing of one expert layer in one forward: ``tokens`` routed, ``selections`` (token, expert)
    pairs (``tokens * k``) and ``union`` distinct experts."""

    layer: int
    tokens: int
    selections: int
    union: int


def layer_use(layer: int, indices: Any) -> LayerUse:
    """Count one call's routing; ``indices`` ``[..., k]`` (any leading batch/token dims)."""
    idx = np.asarray(indices)
    k = int(idx.shape[-1]) if idx.ndim else 1
    flat = idx.reshape(-1)
    return LayerUse(layer=layer, tokens=flat.size // max(k, 1), selections=int(flat.size), union=int(np.unique(flat).size))


def merge_uses(uses: Iterable[LayerUse], num_layers: int) -> tuple[LayerUse, ...]:
    """One :class:`LayerUse` per layer (a layer called twice in a forward counts both calls;
    a layer not called counts zero)."""
    by = {i: [] for i in range(num_layers)}
    for u in uses:
        by[u.layer].append(u)
    out = []
    for i in range(num_layers):
        us = by[i]
        out.append(LayerUse(i, sum(u.tokens for u in us), sum(u.selections for u in us), sum(u.union for u in us)))
    return tuple(out)


@attrs.frozen
class ForwardRecord:
    """One traced forward: ``tokens`` fed, ``distinct_tokens`` among them, per-layer routing, the
    KV bytes it read, and its total bytes under each kernel."""

    tokens: int
    distinct_tokens: int
    layers: tuple[LayerUse, ...]
    kv_bytes: int
    bytes_pair: int
    bytes_union: int

    @property
    def mean_union(self) -> float:
        return float(np.mean([l.union for l in self.layers])) if self.layers else 0.0

    @property
    def mean_selections(self) -> float:
        return float(np.mean([l.selections for l in self.layers])) if self.layers else 0.0

    def bytes(self, kernel: str) -> int:
        if kernel not in KERNELS:
            raise MoedecError(f"unknown kernel {kernel!r}; use one of {', '.join(KERNELS)}")
        return self.bytes_pair if kernel == "pair" else self.bytes_union


def make_record(inv: ModelBytes, calls: Sequence[tuple[int, Any]], inputs: Optional[Sequence[int]], kv: int) -> ForwardRecord:
    """A :class:`ForwardRecord` from a forward's traced calls (evaluates their indices)."""
    if inv.layers and not calls:
        raise MoedecError(
            "no expert-layer call was seen during a forward: it is compiled (mx.compile) or bypasses "
            "SwitchGLU, and expert accounting needs the layers' Python calls"
        )
    layers = merge_uses((layer_use(i, idx) for i, idx in calls), len(inv.layers))
    tokens = max((l.tokens for l in layers), default=0)
    if inputs is not None:
        tokens = max(tokens, len(inputs))
    distinct = len(set(int(t) for t in inputs)) if inputs is not None else tokens
    return ForwardRecord(
        tokens=tokens, distinct_tokens=distinct, layers=layers, kv_bytes=int(kv),
        bytes_pair=inv.forward_bytes([l.selections for l in layers], distinct, kv),
        bytes_union=inv.forward_bytes([l.union for l in layers], distinct, kv),
    )


class ExpertAccounting:
    """Observer plugin: records a :class:`ForwardRecord` for every verify forward of a generation.

    ``moedec.generate(model, prompt, strategy, plugins=[acct])``; then ``acct.records``. The prefill
    forward is not recorded, nor are a drafter's own forwards (only the target's verify). Reuse one
    instance across generations of the same model to accumulate records.
    """

    def __init__(self, inventory: Optional[ModelBytes] = None):
        self.inventory = inventory
        self._model_id: Optional[int] = None
        self._modules: Optional[list] = None
        self._pending: list[tuple[list, Optional[tuple], int]] = []
        self._records: list[ForwardRecord] = []

    def _setup(self, model) -> None:
        if self._model_id == id(model):
            return
        if self._model_id is not None:
            raise MoedecError("one ExpertAccounting observer cannot account two different models")
        self._modules = expert_modules(model)
        if self.inventory is None:
            self.inventory = model_bytes(model)
        self._model_id = id(model)

    @hookimpl(wrapper=True)
    def verify(self, state, draft):
        self._setup(state.model)
        with ExpertTrace(state.model, self._modules) as trace:
            result = yield
        inputs = getattr(result, "inputs", None)
        self._pending.append((trace.take(), tuple(inputs) if inputs is not None else None, kv_bytes(state.cache)))
        return result

    @hookimpl
    def on_accept(self, state, acceptance) -> None:
        self.flush()  # the accept hook has evaluated the logits, so the indices are computed

    def flush(self) -> None:
        assert self.inventory is not None or not self._pending
        for calls, inputs, kv in self._pending:
            self._records.append(make_record(self.inventory, calls, inputs, kv))
        self._pending.clear()

    @property
    def records(self) -> list[ForwardRecord]:
        self.flush()
        return list(self._records)
