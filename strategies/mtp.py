"""``mtp``: self-speculation from the checkpoint's own multi-token-prediction layers.

Also home of :class:`FeatureDrafter`, the bookkeeping shared with ``eagle``: a drafter that reads
the target's final hidden states and keeps its own one-layer KV cache.

Alignment. Let ``H_i`` be the target's hidden state at position ``i`` (the one that predicted
``t_{i+1}``). The drafter's cache entry ``i`` is built from the pair ``(H_i, t_{i+1})`` and its
output predicts ``t_{i+2}``. Between steps, with ``n + 1`` committed tokens (``t_n`` pending), the
drafter's cache holds entries ``0 .. n-2`` (some of them possibly still queued in ``_pend``). A
draft feeds entry ``n-1`` = ``(state.hidden, t_n)`` — exact — and then chains: entry ``n + j - 1`` =
``(its own output, d_j)``, an approximation. After the target's verdict the chained entries are
rewound and the accepted draft tokens' entries are queued with the *target's* hidden states
(``Acceptance.hidden``), so the cache again holds exactly what a from-scratch pass over the
committed tokens would hold.
"""

from __future__ import annotations

from typing import Any, Optional

import attrs
import mlx.core as mx
from mlx_lm.models.cache import KVCache

import moedec
from moedec.errors import MoedecError
from moedec.forward import rewind
from moedec.records import Draft

from .mtp_loader import NO_MTP, MTPLayer, cached_mtp

PREFILL_CHUNK = 2048


@attrs.define
class FeatureDrafter:
    """Base class: subclasses implement :meth:`setup`, :meth:`advance` and :meth:`logits`, and
    have ``name`` and a ``num_draft`` option."""

    _cache: Optional[list] = attrs.field(default=None, init=False)
    _pend_h: Optional[mx.array] = attrs.field(default=None, init=False)  # [m, D] queued hidden states
    _pend_t: list = attrs.field(factory=list, init=False)  # [m] the tokens that follow them
    _chained: int = attrs.field(default=-1, init=False)  # chained entries fed by the last draft

    # -- what a subclass provides ---------------------------------------------------------------

    def setup(self, state) -> None:
        """Load the drafter for ``state.model`` (called once, at prefill)."""
        raise NotImplementedError

    def advance(self, hidden: mx.array, tokens: mx.array) -> mx.array:
        """Feed ``m`` entries (hidden ``[m, D]``, next tokens ``[m]``) into ``self._cache``;
        return the features ``[m, D]`` used for logits and for chaining. Lazy."""
        raise NotImplementedError

    def logits(self, feature: mx.array) -> mx.array:
        """``[..., D]`` feature -> ``[..., V]`` logits."""
        raise NotImplementedError

    # -- hooks ------------------------------------------------------------------------------------

    def _need_hidden(self, state) -> None:
        if state.hidden is None:
            mtype = getattr(state.model, "model_type", type(state.model).__name__)
            raise MoedecError(f"--strategy {self.name} needs the target's hidden states, which {mtype} models do not expose")

    @moedec.hookimpl
    def prefill(self, state) -> None:
        self._need_hidden(state)
        self.setup(state)
        self._cache = [KVCache()]
        p = state.prompt_length
        hidden = state.prompt_hidden[: p - 1]  # [P-1, D]: H_0 .. H_{P-2}
        nxt = state.tokens[1:p]  # t_1 .. t_{P-1}
        for s in range(0, p - 1, PREFILL_CHUNK):
            out = self.advance(hidden[s : s + PREFILL_CHUNK], mx.array(nxt[s : s + PREFILL_CHUNK]))
            mx.eval(out, [c.state for c in self._cache])
        self._pend_h, self._pend_t, self._chained = None, [], -1

    @moedec.hookimpl
    def draft(self, state) -> Optional[Draft]:
        self._need_hidden(state)
        k = min(self.num_draft, state.max_draft, state.remaining - 1)
        h = state.hidden[None]  # [1, D]
        if self._pend_h is not None:
            h = mx.concatenate([self._pend_h, h.astype(self._pend_h.dtype)], axis=0)  # [m+1, D]
        t = [*self._pend_t, state.tokens[-1]]
        if k <= 0:  # nothing to draft (the last token, or max_draft 0): just feed the entries
            mx.eval(self.advance(h, mx.array(t)))
            self._pend_h, self._pend_t, self._chained = None, [], 0
            return None
        feature = self.advance(h, mx.array(t))[-1]  # [D]
        self._pend_h, self._pend_t = None, []
        tokens, qs = [], []
        for j in range(k):
            logits = self.logits(feature[None])[0]  # [V]; a [1, D] input: MLX CUDA's quantized matmul rejects 1-D ("SmallVector out of range")
            tok, q = state.draw(logits)  # q: [V] processed like the target's p (None when greedy)
            if q is not None:
                qs.append(q)
            tokens.append(tok)
            if j + 1 < k:
                feature = self.advance(feature[None], tok.reshape(1))[-1]
        self._chained = k - 1
        drafted = mx.stack(tokens)  # [k]
        probs = mx.stack(qs) if qs else None  # [k, V]
        mx.eval(drafted, *qs)
        return Draft(drafted.tolist(), probs=probs)

    @moedec.hookimpl
    def on_accept(self, state, acceptance) -> None:
        if self._chained > 0:
            rewind(self._cache, self._chained)  # drop the entries built on the drafter's own features
        self._chained = -1
        a = acceptance.num_accepted
        if a == 0:
            return
        if acceptance.hidden is None:
            raise MoedecError(f"--strategy {self.name} needs the target's hidden states in each Acceptance")
        h = acceptance.hidden[:a]  # [a, D]: H_n .. H_{n+a-1}
        self._pend_h = h if self._pend_h is None else mx.concatenate([self._pend_h, h], axis=0)
        self._pend_t = [*self._pend_t, *acceptance.tokens[:a]]  # d_1 .. d_a


@attrs.define
class MTP(FeatureDrafter):
    """Self-speculation from the checkpoint's own multi-token-prediction (MTP) layers.

    Drafts ``num_draft`` tokens with the first MTP layer (chained on its own output beyond one).
    The MTP weights are read from ``checkpoint`` (default: the directory the model was loaded from).
    """

    name = "mtp"
    num_draft: int = attrs.field(default=1, validator=moedec.in_range(1, 16))
    checkpoint: Optional[str] = None
    _layer: Optional[MTPLayer] = attrs.field(default=None, init=False)
    _target: Any = attrs.field(default=None, init=False)

    def setup(self, state) -> None:
        model = state.model
        path = self.checkpoint or getattr(model, "moedec_path", None)
        if path is None:
            if getattr(model, "moedec_label", None):
                raise MoedecError(NO_MTP + " (the built-in model); pass --model DIR of a checkpoint with MTP layers")
            raise MoedecError(
                "--strategy mtp reads the MTP layers from the checkpoint directory: load the model "
                "with moedec.load(DIR) (--model DIR) or pass -o checkpoint=DIR"
            )
        layers = cached_mtp(model, path)
        self._layer, self._target = layers[0], model
        mlp = getattr(self._layer.block, "mlp", None)
        gate = getattr(mlp, "gate", None)
        state.extra["mtp_layers"] = len(layers)
        state.extra["mtp_experts"] = int(gate.weight.shape[0]) if gate is not None and "weight" in gate else 0

    def advance(self, hidden: mx.array, tokens: mx.array) -> mx.array:
        return self._layer(hidden[None], tokens[None], self._target, self._cache[0])[0]  # [m, D]

    def logits(self, feature: mx.array) -> mx.array:
        return self._layer.logits(feature, self._target)


@moedec.hookimpl
def register_strategies(register):
    register(MTP)
