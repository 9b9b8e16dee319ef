"""The experts of an mlx-lm model and the bytes its weights take as stored.

Every MoE layer of an mlx-lm model routes through an *expert module* — ``SwitchGLU`` (or
``SwitchMLP``) called as ``module(x, indices)``; :func:`expert_modules` finds them (a fused kernel
module counts too if it subclasses ``SwitchGLU`` or its class sets ``moedec_expert_module = True``).

:class:`ModelBytes` is the static inventory of a model's weights *as stored* (quantized weights,
scales and biases included): bytes per expert of every expert layer, and the bytes a forward reads
whatever its routing — attention, shared experts, dense layers (dense MLPs, routers, norms), the
lm_head (the embedding table when tied) — plus one embedding row per distinct input token.
:func:`kv_bytes` is what a forward reads of the KV cache. :mod:`moedec.accounting` turns routings
into bytes with them.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Iterable, Optional, Sequence

import attrs
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import SwitchGLU, SwitchMLP

from .errors import MoedecError


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
