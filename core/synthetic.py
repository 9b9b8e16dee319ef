"""The synthetic benchmark model of DESIGN.md, the same in every benchmark so figures compare.

mlx-lm ``glm4_moe``: hidden 4096, 10 layers (first dense), 77 routed experts top-8 + 1 shared,
expert width 1536, 32 heads (8 KV) of 128, vocab 32000, random bf16 weights quantized 4-bit group
64 (router left unquantized): ~7.9 GB, ~1.25 GB read per token at B=1. Built layer by layer so
that peak memory stays near the final size. ``scale`` < 1 shrinks widths for CPU smoke tests.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .models import build_model, model_config


def synthetic_config(scale: float = 1.0, **overrides: Any) -> dict[str, Any]:
    def s(v: int, q: int = 128) -> int:
        return max(q, int(round(v * scale / q)) * q)

    cfg = model_config(
        "glm4_moe", vocab_size=32000 if scale == 1.0 else 512, hidden_size=s(4096),
        intermediate_size=s(10944, 64), moe_intermediate_size=s(1536), num_hidden_layers=10,
        num_attention_heads=32 if scale == 1.0 else 4, num_key_value_heads=8 if scale == 1.0 else 2,
        head_dim=128 if scale == 1.0 else 32, n_routed_experts=77, num_experts_per_tok=8,
        n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
        norm_topk_prob=True, routed_scaling_factor=2.5, use_qk_norm=False,
        partial_rotary_factor=0.5, max_position_embeddings=8192,
    )
    cfg.update(overrides)
    return cfg


def quantizable(path: str, m: nn.Module) -> bool:
    """What the synthetic model quantizes: every layer that can be, but the MoE router."""
    return hasattr(m, "to_quantized") and not path.endswith("mlp.gate")


def synthetic_glm(seed: int = 0, scale: float = 1.0, bits: int = 4, group_size: int = 64,
                  dtype=mx.bfloat16, **overrides: Any) -> nn.Module:
    """Build, randomise (N(0, 1/fan_in)), cast and quantize the synthetic model, one layer at a time."""
    cfg = synthetic_config(scale, **overrides)
    mx.random.seed(seed)
    model = build_model(cfg)

    def finish(module: nn.Module) -> None:
        module.set_dtype(dtype)
        nn.quantize(module, group_size=group_size, bits=bits, class_predicate=quantizable)
        mx.eval(module.parameters())

    for layer in model.model.layers:
        gate = getattr(layer.mlp, "gate", None)
        if gate is not None:  # a router that actually routes: random, not all-zero
            gate.weight = mx.random.normal(gate.weight.shape) * cfg["hidden_size"] ** -0.5
            gate.e_score_correction_bias = mx.zeros_like(gate.e_score_correction_bias)
        finish(layer)
    for m in (model.model.embed_tokens, model.model.norm, model.lm_head):
        m.set_dtype(dtype)
    # quantized from the parent: nn.quantize() on a bare Linear / Embedding leaves it as it is
    nn.quantize(model, group_size=group_size, bits=bits,
                class_predicate=lambda path, m: path in ("model.embed_tokens", "lm_head"))
    mx.eval([m.parameters() for m in (model.model.embed_tokens, model.model.norm, model.lm_head)])
    model.eval()
    return model


def nbytes(model: nn.Module) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))
