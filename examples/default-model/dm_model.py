"""The default model's architectures and their training forwards.

* target: mlx-lm ``glm4_moe`` (first layer dense, the rest MoE with routed experts top-k plus one
  shared expert) and ONE multi-token-prediction (MTP) layer in DeepSeek-V3 style: at position ``i``
  it combines the target's final hidden state ``h_i`` (after the final norm: what moedec exposes as
  ``state.hidden``) with the embedding of token ``i+1`` and predicts token ``i+2``::

      u_i = eh_proj(concat(enorm(embed(t_{i+1})), hnorm(h_i)))    # [.., 2D] -> [.., D]
      g_i = decoder_block(u_i)                                   # a full glm4_moe MoE block
      logits_i = shared_head.head(shared_head.norm(g_i))         # head shared with lm_head

  The MTP layer is an :class:`MTPLayer`, a glm4_moe ``DecoderLayer`` plus ``enorm``, ``hnorm``,
  ``eh_proj`` and ``shared_head.norm``; exported under ``model.layers.{num_hidden_layers}.``.
* draft: a small dense mlx-lm ``llama`` on the same tokenizer.

Training runs the MoE layers through :func:`dense_moe`: every expert on every token, combined with
the router's weights (zero for unselected experts). It equals mlx-lm's ``SwitchGLU`` path exactly
(same parameters, same routing) but uses only plain matmuls, which train fast and reliably on every
backend. ``--moe-impl switch`` uses mlx-lm's own forward instead.
"""

from __future__ import annotations

from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import glm4_moe, llama

#: concat order of the MTP input: embedding first, then the hidden state (DeepSeek-V3 / GLM-4.5)
MTP_CONCAT = ("enorm(embed)", "hnorm(hidden)")

SIZES: dict[str, dict[str, Any]] = {
    # the shipped model (GPU). Widths are multiples of 128 so moedec's fused CUDA MoE kernel runs it.
    "default": dict(
        vocab=4096, seq=512, batch=64,
        target=dict(hidden_size=256, num_hidden_layers=5, intermediate_size=768,
                    moe_intermediate_size=128, n_routed_experts=16, num_experts_per_tok=4,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=64),
        draft=dict(hidden_size=256, num_hidden_layers=2, intermediate_size=768,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=64),
        eagle=dict(intermediate_size=768, num_attention_heads=4, num_key_value_heads=2, head_dim=64),
    ),
    # CPU smoke test: a real MoE shape (16 experts, shared expert, first layer dense), tiny widths
    "tiny": dict(
        vocab=512, seq=128, batch=8,
        target=dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                    moe_intermediate_size=32, n_routed_experts=16, num_experts_per_tok=2,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=32),
        draft=dict(hidden_size=64, num_hidden_layers=1, intermediate_size=128,
                   num_attention_heads=2, num_key_value_heads=1, head_dim=32),
        eagle=dict(intermediate_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=32),
    ),
}


def target_config(size: str, vocab_size: int) -> dict[str, Any]:
    t = SIZES[size]["target"]
    return dict(
        model_type="glm4_moe", vocab_size=vocab_size, max_position_embeddings=4096,
        norm_topk_prob=True, n_group=1, topk_group=1, n_shared_experts=1,
        routed_scaling_factor=1.0, first_k_dense_replace=1, rms_norm_eps=1e-5, rope_theta=10000.0,
        rope_scaling=None, use_qk_norm=True, tie_word_embeddings=False, attention_bias=False,
        partial_rotary_factor=0.5, scoring_func="sigmoid", topk_method="noaux_tc",
        num_nextn_predict_layers=1, **t,
    )


def draft_config(size: str, vocab_size: int) -> dict[str, Any]:
    d = SIZES[size]["draft"]
    return dict(model_type="llama", vocab_size=vocab_size, rms_norm_eps=1e-5, rope_theta=10000.0,
                max_position_embeddings=4096, tie_word_embeddings=True, **d)


class SharedHead(nn.Module):
    """The MTP layer's output norm; its ``head`` is the target's ``lm_head`` during training and is
    written out as a copy (``shared_head.head.weight``) at export."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.norm = nn.RMSNorm(dims, eps=eps)


class MTPLayer(glm4_moe.DecoderLayer):
    """One DeepSeek-V3-style MTP module around a full glm4_moe decoder block (with its MoE)."""

    def __init__(self, args: glm4_moe.ModelArgs):
        super().__init__(args, layer_idx=args.num_hidden_layers)
        D = args.hidden_size
        self.enorm = nn.RMSNorm(D, eps=args.rms_norm_eps)
        self.hnorm = nn.RMSNorm(D, eps=args.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * D, D, bias=False)
        self.shared_head = SharedHead(D, args.rms_norm_eps)

    def combine(self, emb: mx.array, hidden: mx.array) -> mx.array:
        """``emb`` [B, T, D] embeddings of the next tokens, ``hidden`` [B, T, D] target states."""
        return self.eh_proj(mx.concatenate([self.enorm(emb), self.hnorm(hidden)], axis=-1))


class Target(nn.Module):
    """The trainable pair: an mlx-lm glm4_moe model and its MTP layer."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        args = glm4_moe.ModelArgs.from_dict(config)
        self.lm = glm4_moe.Model(args)
        self.mtp = MTPLayer(args)


def build_draft(config: dict[str, Any]) -> nn.Module:
    return llama.Model(llama.ModelArgs.from_dict(config))


# -- forwards ------------------------------------------------------------------------------------

def route(moe, x: mx.array) -> tuple[mx.array, mx.array]:
    """Dense routing weights ``[N, E]`` (zero for unselected experts) and per-expert counts ``[E]``."""
    inds, scores = moe.gate(x)  # [N, k], [N, k]
    E = moe.gate.weight.shape[0]
    hit = (inds[..., None] == mx.arange(E)).astype(x.dtype)  # [N, k, E]
    weights = (scores[..., None].astype(x.dtype) * hit).sum(axis=-2)  # [N, E]
    return weights, mx.stop_gradient(hit.sum(axis=(0, 1)))


def dense_moe(moe, x: mx.array) -> tuple[mx.array, mx.array]:
    """glm4_moe ``MoE`` on ``x`` [..., D] with every expert computed densely; ``(y, counts)``."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])  # [N, D]
    w, counts = route(moe, x2)  # [N, E]
    sw = moe.switch_mlp
    E, I, D = sw.gate_proj.weight.shape  # SwitchLinear weights are [E, out, in]
    g = x2 @ sw.gate_proj.weight.reshape(E * I, D).T  # [N, E*I]
    u = x2 @ sw.up_proj.weight.reshape(E * I, D).T  # [N, E*I]
    h = (nn.silu(g) * u).reshape(-1, E, I) * w[..., None]  # [N, E, I]
    down = sw.down_proj.weight.transpose(0, 2, 1).reshape(E * I, D)  # [E*I, D]
    y = h.reshape(-1, E * I) @ down  # [N, D]
    y = y + moe.shared_experts(x2)
    return y.reshape(shape), counts


def block(layer, x: mx.array, moe_impl: str, counts: list) -> mx.array:
    """One glm4_moe decoder block over a whole causal sequence ``x`` [B, T, D] (no cache)."""
    h = x + layer.self_attn(layer.input_layernorm(x), "causal", None)
    z = layer.post_attention_layernorm(h)
    if isinstance(layer.mlp, glm4_moe.MoE):
        if moe_impl == "dense":
            y, c = dense_moe(layer.mlp, z)
        else:
            y = layer.mlp(z)
            inds, _ = layer.mlp.gate(z)
            c = mx.stop_gradient((inds[..., None] == mx.arange(layer.mlp.gate.weight.shape[0])).sum(axis=(0, 1, 2)))
        counts.append(c)
    else:
        y = layer.mlp(z)
    return h + y


def target_hidden(lm, x: mx.array, moe_impl: str = "dense", counts: Optional[list] = None) -> mx.array:
    """Final hidden states ``[B, T, D]`` (after the final norm, as ``moedec.forward`` returns)."""
    counts = [] if counts is None else counts
    h = lm.model.embed_tokens(x)
    for layer in lm.model.layers:
        h = block(layer, h, moe_impl, counts)
    return lm.model.norm(h)


def mtp_logits(target: Target, hidden: mx.array, next_tokens: mx.array, moe_impl: str,
               counts: list) -> mx.array:
    """MTP logits ``[B, T, V]`` for positions whose hidden is ``hidden`` [B, T, D] and whose next
    token is ``next_tokens`` [B, T]; they predict the token after ``next_tokens``."""
    m = target.mtp
    u = m.combine(target.lm.model.embed_tokens(next_tokens), hidden)
    g = block(m, u, moe_impl, counts)
    return target.lm.lm_head(m.shared_head.norm(g))


def target_loss(target: Target, batch: mx.array, mtp_weight: float, moe_impl: str = "dense"):
    """DeepSeek-V3-style joint loss on ``batch`` [B, T+1]: ``CE(main) + mtp_weight * CE(mtp)``.

    Returns ``(loss, (main_ce, mtp_ce, counts [L_moe, E]))``; the MTP term predicts token ``i+2``
    from ``h_i`` and token ``i+1`` at every position ``i`` with both known.
    """
    x, y = batch[:, :-1], batch[:, 1:]  # [B, T]
    counts: list = []
    h = target_hidden(target.lm, x, moe_impl, counts)  # [B, T, D]
    logits = target.lm.lm_head(h)  # [B, T, V]
    main = nn.losses.cross_entropy(logits.astype(mx.float32), y, reduction="mean")
    ml = mtp_logits(target, h[:, :-1], y[:, :-1], moe_impl, counts)  # [B, T-1, V]
    mtp = nn.losses.cross_entropy(ml.astype(mx.float32), y[:, 1:], reduction="mean")
    return main + mtp_weight * mtp, (main, mtp, mx.stack(counts))


def rebalance(target: Target, counts: mx.array, rate: float) -> None:
    """Auxiliary-loss-free load balancing (DeepSeek-V3): nudge each router's selection bias up for
    under-loaded experts and down for over-loaded ones. ``counts`` [L_moe, E] in forward order."""
    gates = [l.mlp.gate for l in target.lm.model.layers if isinstance(l.mlp, glm4_moe.MoE)]
    gates.append(target.mtp.mlp.gate)
    for gate, c in zip(gates, counts):
        c = c.astype(mx.float32)
        gate.e_score_correction_bias = gate.e_score_correction_bias + rate * mx.sign(c.mean() - c)


def freeze_router_bias(target: Target) -> None:
    """The selection bias is updated by :func:`rebalance`, never by the optimizer."""
    for _, m in target.named_modules():
        if isinstance(m, glm4_moe.MoEGate):
            m.freeze(keys=["e_score_correction_bias"], recurse=False)


def init_params(module: nn.Module, seed: int) -> None:
    """Seeded init: linear/expert weights N(0, 0.02) (output projections scaled down by depth),
    embeddings N(0, 0.02), norms 1, router bias 0."""
    from mlx.utils import tree_flatten, tree_unflatten

    key = mx.random.key(seed)
    params = tree_flatten(module.parameters())
    keys = mx.random.split(key, len(params))
    n_layers = max(1, sum(1 for n, _ in params if n.endswith("o_proj.weight")))
    new = []
    for k, (name, p) in zip(keys, params):
        if "norm" in name.split(".")[-2] or name.endswith("norm.weight"):
            v = mx.ones(p.shape)
        elif name.endswith("e_score_correction_bias") or name.endswith(".bias"):
            v = mx.zeros(p.shape)
        else:
            std = 0.02
            if name.endswith("o_proj.weight") or name.endswith("down_proj.weight"):
                std = 0.02 / (2 * n_layers) ** 0.5
            v = std * mx.random.normal(p.shape, key=k)
        new.append((name, v.astype(mx.float32)))
    module.update(tree_unflatten(new))
    mx.eval(module.parameters())
