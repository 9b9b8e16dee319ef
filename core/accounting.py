"""Expert accounting: which experts every forward reads, and how many bytes that costs.

Every MoE layer of an mlx-lm model routes through an *expert module* — ``SwitchGLU`` (or
``SwitchMLP``) called as ``module(x, indices)`` with ``indices`` ``[..., T, k]``. While an
:class:`ExpertTrace` is active, each expert module of one model records the (lazy) indices of every
call; after the forward, :func:`layer_use` turns them into tokens ``T``, selections ``T·k`` and the
union ``U`` of distinct experts.

:class:`ModelBytes` is the static inventory of a model's weights *as stored* (quantized weights,
scales and biases included): bytes per expert of every expert layer, and the bytes a forward reads
whatever its routing — attention, shared experts, dense layers (dense MLPs, routers, norms), the
lm_head (the embedding table when tied) — plus one embedding row per distinct input token.
A forward then reads::

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
import re
from typing import Any, Iterable, Optional, Sequence

import attrs
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import SwitchGLU, SwitchMLP

from .errors import MoedecError
from .hookspecs import hookimpl

EXPERT_MODULE_TYPES = (SwitchGLU, SwitchMLP)
KERNELS = ("pair", "union")


def is_expert_module(module: Any) -> bool:
    return isinstance(module, EXPERT_MODULE_TYPES) or bool(getattr(type(module), "moedec_expert_module", False))


def _natural_key(path: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path)]


def expert_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` of every expert module, in layer order."""
    found = [(p, m) for p, m in model.named_modules() if is_expert_module(m)]
    return sorted(found, key=lambda pm: _natural_key(pm[0]))


def model_type(model: Any) -> str:
    return str(
        getattr(model, "model_type", None)
        or getattr(getattr(model, "args", None), "model_type", None)
        or type(model).__name__
    )


@functools.lru_cache(maxsize=1)
def unaccountable_architectures() -> tuple[str, ...]:
    """mlx-lm architectures (as installed) that have experts but no SwitchGLU/SwitchMLP layers,
    so their expert traffic cannot be traced (found by reading the model sources)."""
    import pathlib

    import mlx_lm.models as pkg

    root = pathlib.Path(pkg.__file__).parent
    src = {p.stem: p.read_text(errors="ignore") for p in root.glob("*.py")}
    deps = {k: set(re.findall(r"^from \.(\w+) import", v, re.M)) | set(re.findall(r"^from \. import ([\w, ]+)", v, re.M))
            for k, v in src.items()}
    deps = {k: {d.strip() for item in v for d in item.split(",")} for k, v in deps.items()}

    @functools.lru_cache(maxsize=None)
    def switched(name: str, depth: int = 0) -> bool:
        text = src.get(name, "")
        if "SwitchGLU" in text or "SwitchMLP" in text:
            return True
        return depth < 4 and any(switched(d, depth + 1) for d in deps.get(name, ()) if d != "switch_layers")

    moe = [k for k, v in src.items() if re.search(r"experts", v) and "class Model" in v]
    return tuple(sorted(k for k in moe if not switched(k)))


def cannot_account(model: Any) -> str:
    arch = model_type(model)
    known = ", ".join(unaccountable_architectures()) or "none"
    return (
        f"cannot account expert traffic of {arch!r}: it has no SwitchGLU/SwitchMLP expert layers "
        f"(a dense model, or experts run some other way; mlx-lm MoE architectures without them: {known})"
    )


# -- the static inventory -------------------------------------------------------------------------


@attrs.frozen
class ExpertLayer:
    """One expert module: ``num_experts`` experts of ``bytes_per_expert`` each (weights, scales and
    biases as stored), plus ``fixed_bytes`` of parameters not indexed by expert."""

    path: str
    num_experts: int
    bytes_per_expert: int
    fixed_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return self.num_experts * self.bytes_per_expert + self.fixed_bytes


@attrs.frozen
class ModelBytes:
    """Where a model's parameter bytes are, as stored. ``lm_head`` is what the head reads per
    forward (the embedding table when tied); ``embedding_row`` the bytes of one token's row."""

    model_type: str
    layers: tuple[ExpertLayer, ...]
    top_k: Optional[int]
    attention: int
    shared_experts: int
    dense: int
    embedding: int
    embedding_row: int
    lm_head: int
    tied: bool
    total: int

    @property
    def expert_bytes(self) -> int:
        return sum(l.total_bytes for l in self.layers)

    @property
    def fixed(self) -> int:
        """Bytes every forward reads whatever its tokens and routing (KV cache excluded)."""
        return self.attention + self.shared_experts + self.dense + self.lm_head + sum(l.fixed_bytes for l in self.layers)

    @property
    def num_experts(self) -> int:
        return max((l.num_experts for l in self.layers), default=0)

    def expert_read(self, units: Sequence[int]) -> int:
        """Expert bytes for ``units[i]`` expert slices read in layer ``i``."""
        if len(units) != len(self.layers):
            raise MoedecError(f"{len(units)} layer counts for {len(self.layers)} expert layers")
        return int(sum(u * l.bytes_per_expert for u, l in zip(units, self.layers)))

    def forward_bytes(self, units: Sequence[int], distinct_tokens: int, kv: int = 0) -> int:
        """Bytes of one forward reading ``units`` expert slices per layer."""
        return self.fixed + self.embedding_row * int(distinct_tokens) + self.expert_read(units) + int(kv)

    def as_dict(self) -> dict[str, Any]:
        d = attrs.asdict(self)
        d["layers"] = [attrs.asdict(l) for l in self.layers]
        d["expert_bytes"] = self.expert_bytes
        d["fixed"] = self.fixed
        d["num_experts"] = self.num_experts
        return d


def _expert_layer(path: str, module: nn.Module) -> ExpertLayer:
    params = tree_flatten(module.parameters())
    big = [a for _, a in params if a.ndim >= 3]
    if not big:
        raise MoedecError(f"expert module {path!r} has no [experts, out, in] weight")
    e = int(big[0].shape[0])
    per = sum(a.nbytes for _, a in params if a.ndim >= 1 and a.shape[0] == e)
    fixed = sum(a.nbytes for _, a in params if not (a.ndim >= 1 and a.shape[0] == e))
    return ExpertLayer(path=path, num_experts=e, bytes_per_expert=per // e, fixed_bytes=int(fixed))


def _top_k(model: Any) -> Optional[int]:
    args = getattr(model, "args", None)
    for name in ("num_experts_per_tok", "moe_top_k", "top_k", "num_activated_experts"):
        v = getattr(args, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def model_bytes(model: nn.Module) -> ModelBytes:
    """The byte inventory of ``model``; a model without expert modules is an error naming it."""
    experts = expert_modules(model)
    if not experts:
        raise MoedecError(cannot_account(model))
    layers = tuple(_expert_layer(p, m) for p, m in experts)
    prefixes = tuple(p + "." for p, _ in experts)
    embeds = [(p, m) for p, m in model.named_modules() if isinstance(m, (nn.Embedding, nn.QuantizedEmbedding))]
    embed_prefixes = tuple(p + "." for p, _ in embeds)
    attention = shared = dense = embedding = head = total = 0
    for name, a in tree_flatten(model.parameters()):
        b = int(a.nbytes)
        total += b
        segs = name.split(".")
        if name.startswith(prefixes):
            continue
        if name.startswith(embed_prefixes):
            embedding += b
        elif "lm_head" in segs:
            head += b
        elif any("shared_expert" in s for s in segs):
            shared += b
        elif any(("attn" in s or "attention" in s) and "norm" not in s for s in segs[:-1]):
            attention += b
        else:
            dense += b
    row = 0
    tables = []
    for p, m in embeds:
        nbytes = sum(int(a.nbytes) for _, a in tree_flatten(m.parameters()))
        rows = int(m.weight.shape[0])
        row += nbytes // max(rows, 1)
        tables.append(nbytes)
    tied = head == 0 and bool(tables)
    if tied:
        head = max(tables)
    return ModelBytes(
        model_type=model_type(model), layers=layers, top_k=_top_k(model), attention=attention,
        shared_experts=shared, dense=dense, embedding=embedding, embedding_row=row, lm_head=head,
        tied=tied, total=total,
    )


def kv_bytes(cache: Optional[Iterable]) -> int:
    """Bytes of the KV cache entries a forward reads (filled positions only; SSM-style states whole)."""
    total = 0
    for c in cache or ():
        if hasattr(c, "caches"):  # CacheList
            total += kv_bytes(c.caches)
            continue
        keys = getattr(c, "keys", None)
        if keys is not None:
            n = _filled(c)
            for _, a in tree_flatten((c.keys, c.values)):
                if isinstance(a, mx.array) and a.ndim >= 2:
                    s = int(a.shape[-2])
                    total += int(a.nbytes) * min(n if n is not None else s, s) // max(s, 1)
        elif not hasattr(c, "keys"):
            try:
                total += sum(int(a.nbytes) for _, a in tree_flatten(c.state) if isinstance(a, mx.array))
            except Exception:  # a cache type with no readable state: count nothing rather than guess
                pass
    return total


def _filled(c: Any) -> Optional[int]:
    try:
        n = c.size()
        if isinstance(n, int) and n > 0:
            return n
    except Exception:
        pass
    for attr in ("_idx", "offset"):
        v = getattr(c, attr, None)
        if isinstance(v, int):
            return v
    return None


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
