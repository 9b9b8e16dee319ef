"""Phase 2: the draft model and the EAGLE head, trained together on the frozen target's outputs.

One target forward per batch gives the final hidden states ``H`` [B, T, D] and logits ``Z`` [B, T, V];
both students learn from it:

* draft (mlx-lm ``llama``): ``(1 - a) * CE(data) + a * KL(softmax(Z) || draft)`` — distillation raises
  how often its greedy token equals the target's, which is what speculative acceptance measures.
* EAGLE head (``moedec.strategies.eagle.EagleHead``, the strategy's own module, so the trained
  weights are in its format by construction): at position ``i`` it reads the target's hidden ``h_i`` and the embedding of token
  ``i+1`` and predicts the target's next feature ``h_{i+1}`` (smooth-L1) and, through the target's
  ``lm_head``, the target's distribution at ``i+1`` (soft cross-entropy, weight ``eagle_ce``).
  Uniform noise on the input features (EAGLE) makes chained drafting from its own features robust.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from moedec.strategies.eagle import EagleConfig, EagleHead

from dm_model import SIZES, build_draft, target_hidden


class Heads(nn.Module):
    """The trainable container of phase 2."""

    def __init__(self, draft_cfg: dict[str, Any], eagle_cfg: dict[str, Any]):
        super().__init__()
        self.draft = build_draft(draft_cfg)
        self.eagle = EagleHead(EagleConfig(**eagle_cfg))


def soft_ce(logits: mx.array, target_logp: mx.array) -> mx.array:
    """Mean over positions of ``-sum p log q`` with ``p = exp(target_logp)``."""
    logq = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return -(mx.exp(target_logp) * logq).sum(axis=-1).mean()


def smooth_l1(x: mx.array, y: mx.array, beta: float = 1.0) -> mx.array:
    d = mx.abs(x - y)
    return mx.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta).mean()


def make_heads_loss(target, *, distill: float, eagle_ce: float, noise: float, moe_impl: str):
    """``loss_fn(heads, batch [B, T+1], key) -> (loss, (draft_ce, draft_kl, eagle_l1, eagle_ce, eagle_acc))``."""
    lm = target.lm

    def loss_fn(heads: Heads, batch: mx.array, key: mx.array):
        x, y = batch[:, :-1], batch[:, 1:]  # [B, T]
        h = mx.stop_gradient(target_hidden(lm, x, moe_impl))  # [B, T, D]
        z = mx.stop_gradient(lm.lm_head(h).astype(mx.float32))  # [B, T, V]
        logp = z - mx.logsumexp(z, axis=-1, keepdims=True)
        # draft
        dl = heads.draft(x).astype(mx.float32)  # [B, T, V]
        d_ce = nn.losses.cross_entropy(dl, y, reduction="mean")
        d_kl = soft_ce(dl, logp) + (mx.exp(logp) * logp).sum(axis=-1).mean()
        # EAGLE: inputs at i = (h_i (+noise), t_{i+1}); targets h_{i+1}, p(. | ..t_{i+1})
        h_in = h[:, :-1]
        if noise > 0:
            h_in = h_in + noise * mx.random.uniform(-1.0, 1.0, h_in.shape, key=key)
        f = heads.eagle(h_in, y[:, :-1], lm)  # [B, T-1, D]: the strategy's own forward
        e_l1 = smooth_l1(f, h[:, 1:])
        el = lm.lm_head(f).astype(mx.float32)  # [B, T-1, V]
        e_ce = soft_ce(el, logp[:, 1:])
        e_acc = (mx.argmax(el, axis=-1) == mx.argmax(z[:, 1:], axis=-1)).astype(mx.float32).mean()
        loss = (1 - distill) * d_ce + distill * d_kl + e_l1 + eagle_ce * e_ce
        return loss, (d_ce, d_kl, e_l1, e_ce, mx.stop_gradient(e_acc))

    return loss_fn


HEADS_COLUMNS = ["draft_ce", "draft_kl", "eagle_l1", "eagle_ce", "eagle_top1"]


def heads_eagle_config(size: str, target_cfg: dict[str, Any]) -> dict[str, Any]:
    """The EAGLE head's config (docs/eagle-head.md fields) for a target config."""
    return dict(hidden_size=target_cfg["hidden_size"], rms_norm_eps=target_cfg["rms_norm_eps"],
                rope_theta=target_cfg["rope_theta"], vocab_size=target_cfg["vocab_size"],
                target_model_type=target_cfg["model_type"], fc_bias=False, embed=False,
                **SIZES[size]["eagle"])
