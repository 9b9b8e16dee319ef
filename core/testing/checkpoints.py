"""Tiny model checkpoints on disk: a random mlx-lm model plus random MTP layers in the checkpoint
key layout, a byte-level tokenizer, and ``config.json`` — loadable by ``moedec.load(DIR)``.

Used by the MTP/EAGLE tests and reusable wherever a real model directory is needed::

    from moedec.testing.checkpoints import write_checkpoint
    path = write_checkpoint(tmp_path / "m", mtp_experts=16)   # MTP block with 2x the experts
    model, tok = moedec.load(path)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from moedec.models import ARCHS, build_model, model_config, randomize
from moedec.strategies.mtp_loader import (
    MTPLayer, MTPSpec, build_mtp_layer, mtp_checkpoint_weights, save_mtp_layers,
)

#: A tiny DeepSeek-V3 (MLA attention, sigmoid-routed MoE with a shared expert).
DEEPSEEK_V3: dict[str, Any] = dict(
    model_type="deepseek_v3", vocab_size=256, hidden_size=64, intermediate_size=128,
    moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
    n_shared_experts=1, n_routed_experts=8, routed_scaling_factor=1.0, kv_lora_rank=32,
    q_lora_rank=48, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16, topk_method="noaux_tc",
    scoring_func="sigmoid", norm_topk_prob=True, n_group=1, topk_group=1, num_experts_per_tok=2,
    moe_layer_freq=1, first_k_dense_replace=1, max_position_embeddings=4096, rms_norm_eps=1e-6,
    rope_theta=10000.0, rope_scaling=None, attention_bias=False,
)


def tiny_config(arch: str = "glm4_moe", **overrides: Any) -> dict[str, Any]:
    """The config of a tiny model: :func:`moedec.models.model_config` or the DeepSeek-V3 one."""
    if arch == "deepseek_v3":
        return {**DEEPSEEK_V3, **overrides}
    return model_config(arch, **overrides)


def random_mtp_layer(target, *, seed: int = 1, experts: Optional[int] = None,
                     intermediate: Optional[int] = None, shared: bool = True, head: bool = True,
                     head_norm: bool = True, embed: bool = False) -> MTPLayer:
    """A random MTP layer for ``target`` (same shapes as its MoE layers unless ``experts`` /
    ``intermediate`` say otherwise)."""
    args = target.args
    inter = intermediate or int(args.moe_intermediate_size)
    spec = MTPSpec(
        index=int(args.num_hidden_layers), hidden_size=int(args.hidden_size),
        experts=experts or int(args.n_routed_experts), intermediate=inter,
        shared_intermediate=inter * int(args.n_shared_experts or 1) if shared else None,
        head_norm=head_norm, head=head, embed=embed, quantized=False,
    )
    return randomize(build_mtp_layer(target, spec), seed)


def _quantizable(group_size: int):
    return lambda p, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % group_size == 0


def _unstack(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """mlx layout (``mlp.switch_mlp.*`` stacked) -> checkpoint layout (``mlp.experts.{e}.*``)."""
    out = {}
    for k, v in weights.items():
        if ".mlp.switch_mlp." in k:
            head, tail = k.split(".mlp.switch_mlp.")
            for e in range(v.shape[0]):
                out[f"{head}.mlp.experts.{e}.{tail}"] = v[e]
        else:
            out[k] = v
    return out


def _byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what a ByteLevel pre-tokenizer emits)."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), ord("ÿ") + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def write_tokenizer(path: str | Path) -> None:
    """A byte-level tokenizer (id == byte value, 256 ids, no merges) that mlx-lm loads offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: b for b, c in _byte_chars().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    path = Path(path)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))


def write_checkpoint(
    path: str | Path,
    arch: str = "glm4_moe",
    *,
    seed: int = 0,
    mtp_layers: int = 1,
    mtp_experts: Optional[int] = None,
    mtp_head: bool = True,
    mtp_embed: bool = False,
    per_expert: bool = True,
    shards: int = 1,
    quantize: Optional[dict] = None,
    mtp_in_model_files: Optional[bool] = None,
    **overrides: Any,
) -> Path:
    """Write a tiny random ``arch`` checkpoint (``glm4_moe``, ``deepseek_v3``, or any of
    :data:`moedec.models.ARCHS` without MTP) with ``mtp_layers`` random MTP layers to ``path``.

    ``mtp_experts``: the MTP block's routed expert count (default: the main model's; e.g. 2x to
    model a pruned main model with an un-pruned head). ``per_expert``: experts stored one by one
    (checkpoint layout) rather than stacked. ``shards``: number of ``model-*.safetensors`` files
    (with an index). ``quantize``: ``{"bits": 4, "group_size": 32}`` quantizes the main model and
    the MTP layers (router and norms stay float). ``mtp_in_model_files``: store the MTP keys in the
    model shards (as released checkpoints do) rather than a separate ``mtp.safetensors``; default:
    only where mlx-lm's loader drops them. ``overrides``: config fields. Returns ``path``.
    """
    cfg = tiny_config(arch, **overrides)
    model = randomize(build_model(cfg), seed)
    layers = [random_mtp_layer(model, seed=seed + 1 + i, experts=mtp_experts, head=mtp_head, embed=mtp_embed)
              for i in range(mtp_layers)]
    if quantize:
        q = dict(group_size=int(quantize.get("group_size", 64)), bits=int(quantize.get("bits", 4)))
        for m in (model, *layers):
            nn.quantize(m, **q, class_predicate=_quantizable(q["group_size"]))
        cfg["quantization"] = q
    return save_checkpoint(path, model, cfg, layers, per_expert=per_expert, shards=shards,
                           mtp_in_model_files=mtp_in_model_files)


def save_checkpoint(path: str | Path, model, config: dict, mtp_layers=(), *, per_expert: bool = True,
                    shards: int = 1, mtp_in_model_files: Optional[bool] = None, tokenizer: bool = True) -> Path:
    """Write an in-memory mlx-lm ``model`` (with its ``config`` dict, which must include
    ``quantization`` if the model is quantized) and its MTP layers as a checkpoint directory that
    ``moedec.load`` reads; see :func:`write_checkpoint` for the options. Returns ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = dict(config)
    weights = dict(tree_flatten(model.parameters()))
    if per_expert:
        weights = _unstack(weights)
    n = int(cfg["num_hidden_layers"])
    mtp_weights: dict[str, mx.array] = {}
    for i, layer in enumerate(mtp_layers):
        mtp_weights.update(mtp_checkpoint_weights(layer, n + i, per_expert=per_expert))
    if mtp_in_model_files is None:  # only where mlx-lm's sanitize removes the MTP keys
        probe = {k: mx.zeros((1,)) for k in mtp_weights if k.endswith("enorm.weight")}
        mtp_in_model_files = bool(probe) and not model.sanitize(dict(probe))
    if mtp_in_model_files and mtp_layers:
        cfg["num_nextn_predict_layers"] = len(mtp_layers)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    _write_shards(path, weights, mtp_weights if mtp_in_model_files else {}, shards)
    if mtp_layers and not mtp_in_model_files:
        save_mtp_layers(path, mtp_layers, n, per_expert=per_expert)
    if tokenizer:
        write_tokenizer(path)
    return path


def _write_shards(path: Path, weights: dict, mtp: dict, shards: int) -> list[str]:
    keys = sorted(weights)
    shards = max(1, min(shards, len(keys)))
    size = -(-len(keys) // shards)
    parts = [{k: weights[k] for k in keys[i * size:(i + 1) * size]} for i in range(shards)]
    parts[-1].update(mtp)  # released checkpoints keep the MTP layer in the last shard(s)
    if shards == 1:
        mx.save_safetensors(str(path / "model.safetensors"), parts[0], metadata={"format": "mlx"})
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    weight_map = {}
    for name, part in zip(names, parts):
        mx.save_safetensors(str(path / name), part, metadata={"format": "mlx"})
        weight_map.update({k: name for k in part})
    index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return names


__all__ = ["ARCHS", "DEEPSEEK_V3", "tiny_config", "random_mtp_layer", "write_tokenizer", "write_checkpoint",
           "save_checkpoint"]
