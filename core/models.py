"""Loading mlx-lm models from local paths, and building small random MoE models in memory.

:func:`random_moe` builds a real mlx-lm model (``glm4_moe``, ``qwen3_moe``, ``mixtral``) with every
parameter drawn from a seeded generator, so that routers are not all-zero (a zero router makes
every expert tie) and the same seed always gives the same weights.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .errors import MoedecError

ARCHS = ("glm4_moe", "qwen3_moe", "mixtral")

_BASE: dict[str, dict[str, Any]] = {
    "glm4_moe": dict(
        model_type="glm4_moe", vocab_size=256, hidden_size=64, intermediate_size=128,
        max_position_embeddings=4096, moe_intermediate_size=32, norm_topk_prob=True,
        num_attention_heads=4, n_group=1, head_dim=16, topk_group=1, n_shared_experts=1,
        n_routed_experts=8, routed_scaling_factor=1.0, num_experts_per_tok=2,
        first_k_dense_replace=1, num_hidden_layers=3, num_key_value_heads=2, rms_norm_eps=1e-5,
        rope_theta=10000.0, rope_scaling=None, use_qk_norm=True, tie_word_embeddings=False,
        attention_bias=False, partial_rotary_factor=0.5,
    ),
    "qwen3_moe": dict(
        model_type="qwen3_moe", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
        num_attention_heads=4, num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1,
        mlp_only_layers=[], moe_intermediate_size=32, rms_norm_eps=1e-5, vocab_size=256,
        num_key_value_heads=2, head_dim=16, rope_theta=10000.0, tie_word_embeddings=False,
        max_position_embeddings=4096, norm_topk_prob=True,
    ),
    "mixtral": dict(
        model_type="mixtral", vocab_size=256, hidden_size=64, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_experts_per_tok=2,
        num_key_value_heads=2, num_local_experts=8, rms_norm_eps=1e-5, rope_theta=10000.0,
    ),
}


def model_config(arch: str, **overrides: Any) -> dict[str, Any]:
    """The config dict of a small model of ``arch`` with ``overrides`` applied."""
    if arch not in _BASE:
        raise MoedecError(f"unknown architecture {arch!r}; available: {', '.join(ARCHS)}")
    cfg = dict(_BASE[arch])
    unknown = set(overrides) - set(cfg) - {"n_routed_experts", "num_experts", "num_local_experts"}
    cfg.update(overrides)
    if unknown:
        # allow any field the mlx-lm ModelArgs knows about; reject typos loudly
        args_cls = importlib.import_module(f"mlx_lm.models.{arch}").ModelArgs
        fields = set(getattr(args_cls, "__dataclass_fields__", {}))
        bad = sorted(unknown - fields)
        if bad:
            raise MoedecError(f"{arch} has no config field {bad[0]!r}")
    return cfg


def build_model(config: dict[str, Any]) -> nn.Module:
    """An mlx-lm model object from a config dict (no weights loaded)."""
    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    args = module.ModelArgs.from_dict(config)
    return module.Model(args)


def randomize(model: nn.Module, seed: int, dtype=mx.float32) -> nn.Module:
    """Replace every parameter with seeded random values: weights ~ N(0, 1/fan_in), norms 1,
    router biases small; cast to ``dtype``."""
    key = mx.random.key(seed)
    params = tree_flatten(model.parameters())
    keys = mx.random.split(key, len(params))
    new = []
    for k, (name, p) in zip(keys, params):
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            v = mx.ones(p.shape)
        elif name.endswith("e_score_correction_bias") or name.endswith(".bias"):
            v = 0.02 * mx.random.normal(p.shape, key=k)
        elif p.ndim >= 2:
            fan_in = p.shape[-1]
            scale = 1.0 if "embed_tokens" in name else fan_in ** -0.5
            v = scale * mx.random.normal(p.shape, key=k)
        else:
            v = mx.random.normal(p.shape, key=k)
        new.append((name, v.astype(dtype)))
    model.update(tree_unflatten(new))
    mx.eval(model.parameters())
    model.eval()
    return model


def random_moe(arch: str = "glm4_moe", seed: int = 0, dtype=mx.float32, **overrides: Any) -> nn.Module:
    """A random mlx-lm MoE model of ``arch`` (small unless ``overrides`` say otherwise)."""
    model = build_model(model_config(arch, **overrides))
    return randomize(model, seed, dtype)


#: The built-in model used when no ``--model`` is given, until a trained one ships.
DEFAULT_LABEL = "built-in random MoE (glm4_moe, untrained: its output is noise; pass --model DIR for a real one)"


def default_model():
    """``(model, tokenizer)``: a deterministic random glm4_moe over a byte vocabulary."""
    from .tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    model = random_moe(
        "glm4_moe", seed=0, vocab_size=tok.vocab_size, hidden_size=256, intermediate_size=512,
        moe_intermediate_size=128, n_routed_experts=16, num_experts_per_tok=4,
        num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
    )
    model.moedec_label = DEFAULT_LABEL
    return model, tok


#: Where the trained default model ships, as package data (docs/default-model.md).
BUNDLED_DIR = Path(__file__).resolve().parent / "default_model"
BUNDLED_LABEL = "bundled default model (glm4_moe MoE + MTP layer, trained on the Python standard library; see docs/default-model.md)"


def bundled_model():
    """``(model, tokenizer)``: the trained model shipped in :data:`BUNDLED_DIR`."""
    model, tok = load(BUNDLED_DIR)
    model.moedec_label = BUNDLED_LABEL
    return model, tok


def load(path: Optional[str | Path] = None):
    """``(model, tokenizer)`` from a local mlx-lm model directory; ``None``: the bundled trained
    model when the package ships one (:data:`BUNDLED_DIR`), else the built-in random model.

    Never touches the network: a path that does not exist is an error.
    """
    if path is None:
        return bundled_model() if (BUNDLED_DIR / "config.json").is_file() else default_model()
    p = Path(path).expanduser()
    if not p.exists():
        raise MoedecError(f"model path {str(path)!r} does not exist (moedec only loads local models)")
    if not (p / "config.json").is_file():
        raise MoedecError(f"model path {str(path)!r} has no config.json; is it an mlx-lm model directory?")
    from mlx_lm.utils import load as mlx_load

    try:
        model, tokenizer = mlx_load(str(p))
    except Exception as e:
        raise MoedecError(f"could not load model from {str(path)!r}: {type(e).__name__}: {e}") from e
    model.moedec_path = str(p.resolve())  # where it came from: strategies that read more of it (mtp)
    return model, tokenizer
