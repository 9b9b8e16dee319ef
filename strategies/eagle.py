"""``eagle``: EAGLE-style feature-level drafting with a small trained head.

The head (format: docs/eagle-head.md) maps the target's final hidden state ``h_i`` and the next
token ``t_{i+1}`` to a predicted next feature, ``f = norm(layer(fc(concat(embed(t_{i+1}), h_i))))``,
read out with the target's own lm_head. Drafting is autoregressive in feature space: the predicted
feature and the drafted token feed the next step. The head's one decoder layer keeps its own KV
cache, managed exactly as the MTP drafter's (:class:`~moedec.strategies.mtp.FeatureDrafter`).
Lossless with any head weights: the target verifies every draft.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import attrs
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.base import create_attention_mask, scaled_dot_product_attention

import moedec
from moedec.errors import MoedecError
from moedec.forward import head_of

from .mtp import FeatureDrafter
from .mtp_loader import one_line

FORMAT, VERSION = "moedec-eagle", 1
NO_HEAD = (
    "--strategy eagle needs a head and none was given: pass -o head=PATH (a .safetensors file with "
    "its .json config; docs/eagle-head.md says how to make one, moedec.strategies.eagle.save_eagle_head writes one)"
)


@attrs.frozen
class EagleConfig:
    """The head's JSON config (besides ``format`` and ``version``); see docs/eagle-head.md."""

    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    fc_bias: bool = False
    embed: bool = False  # the head carries its own embed_tokens (else the target's is used)
    vocab_size: Optional[int] = None  # checked against the target when given
    target_model_type: Optional[str] = None  # informational

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, **attrs.asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str) -> "EagleConfig":
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise MoedecError(f"{where} is not a {FORMAT} version {VERSION} config (format={data.get('format')!r}, version={data.get('version')!r})")
        fields = {f.name for f in attrs.fields(cls)}
        body = {k: v for k, v in data.items() if k not in ("format", "version")}
        unknown = sorted(set(body) - fields)
        if unknown:
            raise MoedecError(f"{where}: unknown field {unknown[0]!r}")
        try:
            return cls(**body)
        except TypeError as e:
            raise MoedecError(f"{where}: {e}") from None


class Attention(nn.Module):
    """Multi-head attention with grouped KV heads and RoPE (non-interleaved, full head dim)."""

    def __init__(self, c: EagleConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.scale = c.head_dim ** -0.5
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=False)
        self.rope = nn.RoPE(c.head_dim, traditional=False, base=c.rope_theta)

    def __call__(self, x: mx.array, mask, cache=None) -> mx.array:
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.n_heads, -1).transpose(0, 2, 1, 3)  # [B, H, T, hd]
        k = self.k_proj(x).reshape(b, t, self.n_kv, -1).transpose(0, 2, 1, 3)  # [B, KV, T, hd]
        v = self.v_proj(x).reshape(b, t, self.n_kv, -1).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        o = scaled_dot_product_attention(q, k, v, cache=cache, scale=self.scale, mask=mask)
        return self.o_proj(o.transpose(0, 2, 1, 3).reshape(b, t, -1))  # [B, T, D]


class MLP(nn.Module):
    def __init__(self, c: EagleConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm: ``h = x + attn(norm1(x))``, ``y = h + mlp(norm2(h))``."""

    def __init__(self, c: EagleConfig):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = nn.RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.mlp = MLP(c)

    def __call__(self, x: mx.array, mask, cache=None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class EagleHead(nn.Module):
    """``feature = norm(layer(fc(concat(embed(tokens), hidden))))``; logits = target lm_head(feature)."""

    def __init__(self, config: EagleConfig):
        super().__init__()
        if config.embed and not config.vocab_size:
            raise MoedecError("an EAGLE head with its own embed_tokens needs vocab_size in its config")
        self.config = config
        d = config.hidden_size
        self.fc = nn.Linear(2 * d, d, bias=config.fc_bias)
        self.layer = DecoderLayer(config)
        self.norm = nn.RMSNorm(d, eps=config.rms_norm_eps)
        if config.embed:
            self.embed_tokens = nn.Embedding(config.vocab_size, d)

    def __call__(self, hidden: mx.array, tokens: mx.array, target, cache=None) -> mx.array:
        """``hidden`` ``[B, T, D]`` target (or predicted) features, ``tokens`` ``[B, T]`` the next
        tokens -> predicted next features ``[B, T, D]``."""
        emb = self.embed_tokens if "embed_tokens" in self else target.model.embed_tokens
        e = emb(tokens)  # [B, T, D]
        x = self.fc(mx.concatenate([e, hidden.astype(e.dtype)], axis=-1))  # [B, T, D]
        mask = create_attention_mask(x, cache)
        return self.norm(self.layer(x, mask, cache))

    def logits(self, feature: mx.array, target) -> mx.array:
        return head_of(target)(feature)


# -- files --------------------------------------------------------------------------------------------


def head_files(path: str | Path) -> tuple[Path, Path]:
    """``(config .json, weights .safetensors)`` for a head path: a directory (``eagle.json`` +
    ``eagle.safetensors``), or either file of a same-stem pair."""
    p = Path(path).expanduser()
    if p.suffix == ".safetensors":
        return p.with_suffix(".json"), p
    if p.suffix == ".json":
        return p, p.with_suffix(".safetensors")
    return p / "eagle.json", p / "eagle.safetensors"


def save_eagle_head(head: EagleHead, path: str | Path) -> Path:
    """Write ``head`` as its JSON config plus safetensors weights; returns the weights' path."""
    cfg_path, st_path = head_files(path)
    st_path.parent.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(st_path), dict(tree_flatten(head.parameters())), metadata={"format": "mlx"})
    cfg_path.write_text(json.dumps(head.config.to_json(), indent=2))
    return st_path


def check_head_path(path: str | Path) -> None:
    for f in head_files(path):
        if not f.is_file():
            raise MoedecError(f"EAGLE head {str(path)!r}: {f} does not exist (a head is a .safetensors file plus its .json config)")


def load_eagle_head(path: str | Path, target=None) -> EagleHead:
    """Read a head; with ``target``, check that it fits (hidden size, vocabulary). One-line errors."""
    from mlx_lm.utils import infer_quant_config

    check_head_path(path)
    cfg_path, st_path = head_files(path)
    try:
        config = EagleConfig.from_json(json.loads(cfg_path.read_text()), str(cfg_path))
        weights = mx.load(str(st_path))
    except (OSError, ValueError, RuntimeError) as e:
        raise MoedecError(f"EAGLE head {str(path)!r} cannot be read: {one_line(e)}") from None
    if target is not None:
        d, v = int(target.args.hidden_size), int(target.args.vocab_size)
        if config.hidden_size != d:
            raise MoedecError(f"EAGLE head {str(path)!r} has hidden size {config.hidden_size} but the model's is {d}")
        if config.vocab_size is not None and config.vocab_size != v:
            raise MoedecError(f"EAGLE head {str(path)!r} has vocabulary {config.vocab_size} but the model's is {v}")
    head = EagleHead(config)

    def quantized(p, m):
        return hasattr(m, "to_quantized") and f"{p}.scales" in weights and infer_quant_config(p, m, weights)

    try:
        if any(k.endswith(".scales") for k in weights):
            nn.quantize(head, class_predicate=quantized)
        head.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise MoedecError(f"EAGLE head {str(path)!r} does not fit its config: {one_line(e)}") from None
    mx.eval(head.parameters())
    head.eval()
    return head


def eagle_config_for(target, **overrides: Any) -> EagleConfig:
    """A head config shaped like ``target``'s attention and dense MLP (``overrides`` win)."""
    a = target.args
    heads = int(a.num_attention_heads)
    base = dict(
        hidden_size=int(a.hidden_size), num_attention_heads=heads,
        num_key_value_heads=int(getattr(a, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(a, "head_dim", None) or a.hidden_size // heads),
        intermediate_size=int(getattr(a, "intermediate_size", None) or 4 * a.hidden_size),
        rms_norm_eps=float(getattr(a, "rms_norm_eps", 1e-5)), rope_theta=float(getattr(a, "rope_theta", 10000.0)),
        vocab_size=int(a.vocab_size), target_model_type=getattr(a, "model_type", None),
    )
    return EagleConfig(**{**base, **overrides})


def random_eagle_head(target, seed: int = 0, **overrides: Any) -> EagleHead:
    """An untrained head with seeded random weights for ``target`` (tests; a training start)."""
    from moedec.models import randomize

    return randomize(EagleHead(eagle_config_for(target, **overrides)), seed)


# -- the strategy -------------------------------------------------------------------------------------

_HEADS: dict[tuple, EagleHead] = {}


def _cached_head(path: str | Path, target) -> EagleHead:
    files = head_files(path)
    check_head_path(path)
    key = tuple((str(f.resolve()), f.stat().st_mtime_ns) for f in files)
    head = _HEADS.get(key)
    if head is None:
        head = _HEADS[key] = load_eagle_head(path, target)
        while len(_HEADS) > 8:
            _HEADS.pop(next(iter(_HEADS)))
    elif head.config.hidden_size != int(target.args.hidden_size):
        raise MoedecError(f"EAGLE head {str(path)!r} has hidden size {head.config.hidden_size} but the model's is {target.args.hidden_size}")
    return head


@attrs.define
class Eagle(FeatureDrafter):
    """EAGLE-style drafting in feature space with a small head (-o head=PATH).

    ``head``: the head's .safetensors (or .json, or a directory holding eagle.json and
    eagle.safetensors); from Python also an :class:`EagleHead` object.
    """

    name = "eagle"
    head: Optional[str] = None
    num_draft: int = attrs.field(default=3, validator=moedec.in_range(1, 16))
    _head: Optional[EagleHead] = attrs.field(default=None, init=False)
    _target: Any = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        if self.head is None or (isinstance(self.head, str) and not self.head.strip()):
            raise MoedecError(NO_HEAD)
        if isinstance(self.head, (str, Path)):
            check_head_path(self.head)
        elif not isinstance(self.head, EagleHead):
            raise MoedecError(f"strategy 'eagle': head must be a path or an EagleHead, not {type(self.head).__name__}")

    def setup(self, state) -> None:
        model = state.model
        if head_of(model) is None:
            mtype = getattr(model, "model_type", type(model).__name__)
            raise MoedecError(f"--strategy eagle needs the target's lm_head and hidden states, which {mtype} models do not expose")
        if isinstance(self.head, EagleHead):
            self._head = self.head
            if self._head.config.hidden_size != int(model.args.hidden_size):
                raise MoedecError(f"the EAGLE head has hidden size {self._head.config.hidden_size} but the model's is {model.args.hidden_size}")
        else:
            self._head = _cached_head(self.head, model)
        self._target = model

    def advance(self, hidden: mx.array, tokens: mx.array) -> mx.array:
        return self._head(hidden[None], tokens[None], self._target, self._cache[0])[0]  # [m, D]

    def logits(self, feature: mx.array) -> mx.array:
        return self._head.logits(feature, self._target)


@moedec.hookimpl
def register_strategies(register):
    register(Eagle)
