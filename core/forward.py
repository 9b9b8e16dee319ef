"""One target forward that returns logits *and* the final hidden states, and cache helpers."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import mlx.core as mx
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache

from .errors import MoedecError

# Architectures whose ``Model.__call__`` is exactly ``head(model.model(x, cache))`` (no logit
# soft-capping or scaling after the head), so splitting the call yields the hidden states for free.
SPLIT_ARCHS = frozenset(
    {
        "glm4_moe", "qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v2", "deepseek_v3",
        "olmoe", "llama", "qwen2", "qwen3", "mistral", "phimoe", "granitemoe", "dots1",
        "ernie4_5_moe", "hunyuan", "bailing_moe",
    }
)


def _model_type(model) -> Optional[str]:
    return getattr(model, "model_type", None) or getattr(getattr(model, "args", None), "model_type", None)


def head_of(model):
    """The function mapping final hidden states to logits, or ``None`` if not known to be exact."""
    if _model_type(model) not in SPLIT_ARCHS or not hasattr(model, "model"):
        return None
    if hasattr(model, "lm_head"):
        return model.lm_head
    if getattr(getattr(model, "args", None), "tie_word_embeddings", False):
        return model.model.embed_tokens.as_linear
    return None


def forward(model, tokens: Sequence[int] | mx.array, cache: Any) -> tuple[mx.array, Optional[mx.array]]:
    """Feed ``tokens`` (``T`` ids) into ``cache``; return logits ``[T, V]`` and hidden ``[T, D]``
    (``None`` when the model's structure does not expose them). Lazy: nothing is evaluated."""
    x = tokens if isinstance(tokens, mx.array) else mx.array(list(tokens), dtype=mx.int32)
    x = x.reshape(1, -1)  # [1, T]
    head = head_of(model)
    if head is None:
        return model(x, cache=cache)[0], None
    hidden = model.model(x, cache)  # [1, T, D]
    return head(hidden)[0], hidden[0]


def new_cache(model) -> list:
    return make_prompt_cache(model)


def cache_length(cache: list) -> Optional[int]:
    """Tokens held by the cache (from its first layer), or ``None`` if the cache has no offset."""
    if not cache:
        return None
    off = getattr(cache[0], "offset", None)
    return int(off) if isinstance(off, (int,)) else None


def cache_types(cache: list) -> str:
    return ", ".join(sorted({type(c).__name__ for c in cache}))


def require_trimmable(cache: list, who: str) -> None:
    if not can_trim_prompt_cache(cache):
        bad = sorted({type(c).__name__ for c in cache if not c.is_trimmable()})
        raise MoedecError(
            f"{who} drafts tokens, but the model's cache ({', '.join(bad)}) cannot be rewound; "
            "speculative strategies need a trimmable KV cache"
        )


def rewind(cache: list, n: int) -> None:
    """Drop the last ``n`` tokens from every layer's cache."""
    if n > 0:
        trimmed = trim_prompt_cache(cache, n)
        if trimmed != n:
            raise MoedecError(f"cache rewind failed: asked for {n} tokens, trimmed {trimmed}")
