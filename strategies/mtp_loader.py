"""A checkpoint's multi-token-prediction (MTP) layers: find them, load them, save them.

DeepSeek-V3 and GLM-4.5-class checkpoints store ``num_nextn_predict_layers`` MTP layers after the
decoder layers, under ``model.layers.{num_hidden_layers + i}.``:

* ``enorm.weight``, ``hnorm.weight`` (RMSNorm of the next token's embedding / of the hidden state),
  ``eh_proj.weight`` (``[D, 2D]``, applied to ``concat(enorm(embed), hnorm(hidden))``);
* a full decoder block: ``input_layernorm``, ``self_attn.*``, ``post_attention_layernorm`` and
  ``mlp.*``: a MoE with its own router ``mlp.gate.weight`` (+ ``mlp.gate.e_score_correction_bias``),
  routed experts either per expert ``mlp.experts.{e}.{gate,up,down}_proj.*`` (checkpoint layout) or
  stacked ``mlp.switch_mlp.{gate,up,down}_proj.*`` (mlx layout), and ``mlp.shared_experts.*``;
  or a dense ``mlp.{gate,up,down}_proj``;
* ``shared_head.norm.weight`` and ``shared_head.head.weight`` (the target's final norm / lm_head are
  used when absent), sometimes ``embed_tokens.weight`` (else the target's embedding).

mlx-lm drops these keys on load, so they are read here straight from the safetensors files (lazily:
only the MTP tensors are read, whatever the shard layout). The block's expert count, expert width and
shared-expert width come from its own weight shapes, never from the main config, so a main model
pruned to fewer experts keeps its un-pruned MTP head. Quantized tensors (``.scales``/``.biases``
next to ``.weight``) are recognised per module, with bits and group size inferred from the shapes.
"""

from __future__ import annotations

import dataclasses
import json
import re
import weakref
from pathlib import Path
from typing import Any, Optional, Sequence

import attrs
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.base import create_attention_mask

from moedec.errors import MoedecError
from moedec.forward import head_of

#: Architectures whose MTP layers this module knows: model_type -> the block needs an array mask
ARCHS = {"glm4_moe": False, "deepseek_v3": True}
#: Parameter prefixes that belong to the MTP layer itself; everything else is the decoder block
OWN = ("enorm.", "hnorm.", "eh_proj.", "shared_head.", "embed_tokens.")
NO_MTP = "--strategy mtp needs MTP weights; this checkpoint has none"

_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT_KEY = re.compile(r"^mlp\.experts\.(\d+)\.(.+)$")
_SWITCH_KEY = re.compile(r"^mlp\.switch_mlp\.(\w+)\.(weight|scales|biases)$")


@attrs.frozen
class MTPSpec:
    """What one MTP layer's weight shapes say about it (``experts`` None: a dense MLP)."""

    index: int  # the checkpoint's layer number (num_hidden_layers + i)
    hidden_size: int
    experts: Optional[int]
    intermediate: int  # routed expert width (moe_intermediate_size), or the dense MLP's width
    shared_intermediate: Optional[int]  # shared experts' total width, None when absent
    head_norm: bool  # has shared_head.norm
    head: bool  # has shared_head.head
    embed: bool  # has its own embed_tokens
    quantized: bool


class SharedHead(nn.Module):
    def __init__(self, dims: int, vocab: int, eps: float, norm: bool, head: bool):
        super().__init__()
        if norm:
            self.norm = nn.RMSNorm(dims, eps=eps)
        if head:
            self.head = nn.Linear(dims, vocab, bias=False)


class MTPLayer(nn.Module):
    """One MTP layer: ``out = block(eh_proj(concat(enorm(embed(t)), hnorm(h))))``, logits
    ``head(norm(out))``. Parameter names are the checkpoint's, with the block under ``block.``."""

    def __init__(self, block: nn.Module, dims: int, vocab: int, eps: float, *, head_norm: bool = True,
                 head: bool = True, embed: bool = False, mask_array: bool = False):
        super().__init__()
        self.enorm = nn.RMSNorm(dims, eps=eps)
        self.hnorm = nn.RMSNorm(dims, eps=eps)
        self.eh_proj = nn.Linear(2 * dims, dims, bias=False)
        self.block = block
        if head_norm or head:
            self.shared_head = SharedHead(dims, vocab, eps, head_norm, head)
        if embed:
            self.embed_tokens = nn.Embedding(vocab, dims)
        self.mask_array = mask_array

    def embed(self, tokens: mx.array, target) -> mx.array:
        emb = self.embed_tokens if "embed_tokens" in self else target.model.embed_tokens
        return emb(tokens)

    def __call__(self, hidden: mx.array, tokens: mx.array, target, cache=None) -> mx.array:
        """``hidden`` ``[B, T, D]`` (the target's final hidden states, or this layer's own output
        when chaining) and ``tokens`` ``[B, T]`` (the token after each position) -> the block's
        output ``[B, T, D]``. ``cache``: this layer's KV cache (one mlx-lm cache object) or None."""
        e = self.embed(tokens, target)  # [B, T, D]
        x = self.eh_proj(mx.concatenate([self.enorm(e), self.hnorm(hidden.astype(e.dtype))], axis=-1))
        mask = create_attention_mask(x, cache, return_array=self.mask_array)
        return self.block(x, mask, cache)  # [B, T, D]

    def logits(self, out: mx.array, target) -> mx.array:
        """``[..., D]`` block output -> ``[..., V]`` logits (shared_head, or the target's)."""
        sh = self.shared_head if "shared_head" in self else {}
        norm = sh["norm"] if "norm" in sh else target.model.norm
        head = sh["head"] if "head" in sh else head_of(target)
        return head(norm(out))


# -- finding the weights ----------------------------------------------------------------------------


def _config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise MoedecError(f"cannot read {path / 'config.json'}: {one_line(e)}") from None


def find_mtp_weights(path: str | Path, num_hidden_layers: int) -> dict[int, dict[str, mx.array]]:
    """``{layer number: {key under the layer: lazy array}}`` for every layer numbered
    ``>= num_hidden_layers`` in the directory's ``*.safetensors`` files (sharded or not)."""
    path = Path(path)
    if not path.is_dir():
        raise MoedecError(f"checkpoint directory {str(path)!r} does not exist")
    out: dict[int, dict[str, mx.array]] = {}
    for f in sorted(path.glob("*.safetensors")):
        try:
            arrays = mx.load(str(f))  # lazy: only the header is read here
        except Exception as e:
            raise MoedecError(f"cannot read {f}: {type(e).__name__}: {one_line(e)}") from None
        for key, value in arrays.items():
            m = _LAYER_KEY.match(key)
            if m and int(m[1]) >= num_hidden_layers:
                out.setdefault(int(m[1]), {}).setdefault(m[2], value)
    return out


def inspect_mtp(index: int, w: dict[str, mx.array], target) -> MTPSpec:
    """Read an MTP layer's structure from its weight shapes; inconsistent shapes are one-line errors."""
    where = f"MTP layer {index}"
    for key in ("enorm.weight", "hnorm.weight", "eh_proj.weight"):
        _need(w, key, where)
    dims, main_dims = int(w["enorm.weight"].shape[0]), int(target.args.hidden_size)
    if dims != main_dims:
        raise MoedecError(f"{where} has hidden size {dims} but the model's is {main_dims}; it belongs to another model")
    main_experts = getattr(target.args, "n_routed_experts", None)
    ids = {int(m[1]) for m in map(_EXPERT_KEY.match, w) if m}
    experts: Optional[int]
    if ids:
        experts = max(ids) + 1
        if len(ids) != experts:
            gap = min(set(range(experts)) - ids)
            raise MoedecError(f"{where} has experts up to {experts - 1} but no expert {gap}")
        inter = int(_need(w, "mlp.experts.0.gate_proj.weight", where).shape[0])
    elif "mlp.switch_mlp.gate_proj.weight" in w:
        shape = w["mlp.switch_mlp.gate_proj.weight"].shape
        experts, inter = int(shape[0]), int(shape[1])
    elif "mlp.gate_proj.weight" in w:
        experts, inter = None, int(w["mlp.gate_proj.weight"].shape[0])
    else:
        raise MoedecError(f"{where} has neither routed experts nor a dense MLP (no mlp.*gate_proj weights)")
    if experts is not None:
        _need(w, "mlp.gate.weight", where)
        for key in ("mlp.gate.weight", "mlp.gate.e_score_correction_bias"):
            n = w[key].shape[0] if key in w else experts
            if int(n) != experts:
                raise MoedecError(
                    f"{where} does not fit: its router {key} has {int(n)} experts but its expert weights have "
                    f"{experts} (main model: {main_experts})"
                )
    shared = w.get("mlp.shared_experts.gate_proj.weight")
    return MTPSpec(
        index=index, hidden_size=dims, experts=experts, intermediate=inter,
        shared_intermediate=None if shared is None else int(shared.shape[0]),
        head_norm="shared_head.norm.weight" in w, head="shared_head.head.weight" in w,
        embed="embed_tokens.weight" in w, quantized=any(k.endswith(".scales") for k in w),
    )


def _need(w: dict, key: str, where: str) -> mx.array:
    if key not in w:
        raise MoedecError(f"{where} is incomplete: it has no {key}")
    return w[key]


# -- building and loading ---------------------------------------------------------------------------


def _model_type(target) -> str:
    return getattr(target, "model_type", None) or getattr(target.args, "model_type", "?")


def block_args(target, spec: MTPSpec):
    """The target's config with the MTP block's own MoE shape (expert count from its weights)."""
    args = target.args
    fields = {f.name for f in dataclasses.fields(args)}
    over: dict[str, Any] = {"num_hidden_layers": 1}
    if spec.experts is None:
        over.update(first_k_dense_replace=1, intermediate_size=spec.intermediate)
    else:
        over.update(n_routed_experts=spec.experts, moe_intermediate_size=spec.intermediate,
                    first_k_dense_replace=0, n_shared_experts=1 if spec.shared_intermediate else None)
        over["num_experts_per_tok"] = min(int(args.num_experts_per_tok), spec.experts)
        groups = int(getattr(args, "n_group", 1) or 1)
        if spec.experts % groups:  # the main model's grouping cannot apply: route over all experts
            over.update(n_group=1, topk_group=1)
        if "moe_layer_freq" in fields:
            over["moe_layer_freq"] = 1
    return dataclasses.replace(args, **{k: v for k, v in over.items() if k in fields})


def build_mtp_layer(target, spec: MTPSpec) -> MTPLayer:
    """An (unloaded) :class:`MTPLayer` shaped like ``spec`` for ``target`` (glm4_moe, deepseek_v3)."""
    mtype = _model_type(target)
    if mtype not in ARCHS:
        raise MoedecError(f"--strategy mtp supports {' and '.join(ARCHS)} checkpoints, not {mtype}")
    args = block_args(target, spec)
    block = type(target.model.layers[0])(args, 0)
    if spec.experts is not None and spec.shared_intermediate:
        sh = block.mlp.shared_experts
        block.mlp.shared_experts = type(sh)(args, intermediate_size=spec.shared_intermediate)
    return MTPLayer(block, spec.hidden_size, int(args.vocab_size), float(args.rms_norm_eps),
                    head_norm=spec.head_norm, head=spec.head, embed=spec.embed, mask_array=ARCHS[mtype])


class _WithArgs:
    """The target seen with other args: lets the architecture's own ``sanitize`` (expert stacking
    with the right count, fp8 dequantisation, MLA weight splitting) run on an MTP layer."""

    def __init__(self, model, args):
        self._model, self.args = model, args

    def __getattr__(self, name):
        return getattr(self._model, name)


def _sanitize(target, spec: MTPSpec, w: dict[str, mx.array]) -> dict[str, mx.array]:
    """Checkpoint keys of one layer -> :class:`MTPLayer` parameter names, through the arch's sanitize."""
    sanitize = getattr(type(target), "sanitize", None)
    if sanitize is not None:
        renamed = {f"model.layers.0.{k}": v for k, v in w.items()}
        try:
            renamed = sanitize(_WithArgs(target, block_args(target, spec)), renamed)
        except Exception as e:
            raise MoedecError(f"MTP layer {spec.index} could not be converted: {type(e).__name__}: {one_line(e)}") from None
        w = {k[len("model.layers.0."):]: v for k, v in renamed.items() if k.startswith("model.layers.0.")}
    return {(k if k.startswith(OWN) else f"block.{k}"): v for k, v in w.items()}


def one_line(e: BaseException) -> str:
    return " ".join(str(e).replace(",\n", ", ").split())


def load_mtp_layer(target, index: int, w: dict[str, mx.array]) -> MTPLayer:
    """Build, quantize (where the weights are) and load one MTP layer; shapes must fit exactly."""
    from mlx_lm.utils import infer_quant_config

    spec = inspect_mtp(index, w, target)
    layer = build_mtp_layer(target, spec)
    weights = _sanitize(target, spec, w)

    def quantized(p, m):
        if not hasattr(m, "to_quantized") or f"{p}.scales" not in weights:
            return False
        return infer_quant_config(p, m, weights)

    main = getattr(target.args, "n_routed_experts", None)
    try:
        if any(k.endswith(".scales") for k in weights):
            nn.quantize(layer, class_predicate=quantized)
        layer.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise MoedecError(
            f"MTP layer {index} does not fit (its weights say {spec.experts} experts of width "
            f"{spec.intermediate}; main model: {main}): {one_line(e)}"
        ) from None
    mx.eval(layer.parameters())
    layer.eval()
    return layer


def load_mtp(target, path: str | Path) -> list[MTPLayer]:
    """All MTP layers of the checkpoint at ``path`` for the loaded ``target``, in order."""
    path = Path(path).expanduser()
    cfg = _config(path)
    n = int(cfg.get("num_hidden_layers", target.args.num_hidden_layers))
    found = find_mtp_weights(path, n)
    if not found:
        declared = cfg.get("num_nextn_predict_layers")
        why = f" (config.json declares {declared} but no weights are stored; conversions often drop them)" if declared else ""
        raise MoedecError(NO_MTP + why)
    if head_of(target) is None:
        raise MoedecError(f"--strategy mtp needs the target's hidden states, which {_model_type(target)} models do not expose")
    numbers = sorted(found)
    if numbers != list(range(n, n + len(numbers))):
        raise MoedecError(f"MTP layers must be numbered from num_hidden_layers ({n}); found {numbers}")
    return [load_mtp_layer(target, i, found[i]) for i in numbers]


_LOADED: dict[tuple[int, str], tuple[Any, list[MTPLayer]]] = {}


def cached_mtp(target, path: str | Path) -> list[MTPLayer]:
    """:func:`load_mtp`, once per (model object, checkpoint directory)."""
    key = (id(target), str(Path(path).expanduser().resolve()))
    hit = _LOADED.get(key)
    if hit is not None and hit[0]() is target:
        return hit[1]
    layers = load_mtp(target, path)
    for k in [k for k, (ref, _) in _LOADED.items() if ref() is None]:
        del _LOADED[k]
    _LOADED[key] = (weakref.ref(target), layers)
    return layers


# -- saving -----------------------------------------------------------------------------------------


def mtp_checkpoint_weights(layer: MTPLayer, index: int, *, per_expert: bool = True) -> dict[str, mx.array]:
    """``layer``'s parameters under ``model.layers.{index}.`` in the checkpoint key layout (routed
    experts one by one when ``per_expert``, else stacked ``mlp.switch_mlp``)."""
    out = {}
    for name, value in tree_flatten(layer.parameters()):
        key = name[len("block."):] if name.startswith("block.") else name
        m = _SWITCH_KEY.match(key)
        if per_expert and m:
            for e in range(value.shape[0]):
                out[f"model.layers.{index}.mlp.experts.{e}.{m[1]}.{m[2]}"] = value[e]
        else:
            out[f"model.layers.{index}.{key}"] = value
    return out


def save_mtp_layers(path: str | Path, layers: Sequence[MTPLayer], num_hidden_layers: Optional[int] = None, *,
                    per_expert: bool = True, filename: str = "mtp.safetensors") -> Path:
    """Write MTP layers into the model directory ``path`` as layers ``num_hidden_layers + i`` (read
    from ``config.json`` when not given), in the checkpoint key layout, to ``filename``. Updates
    ``config.json``'s ``num_nextn_predict_layers`` and, if the checkpoint is sharded, the index's
    ``weight_map``. The default file name is not one mlx-lm's loader reads (``model*.safetensors``),
    so the main model still loads with mlx-lm whatever its architecture's sanitize drops."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg_file = path / "config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else None
    if num_hidden_layers is None:
        if cfg is None:
            raise MoedecError(f"{path} has no config.json: pass num_hidden_layers")
        num_hidden_layers = int(cfg["num_hidden_layers"])
    weights: dict[str, mx.array] = {}
    for i, layer in enumerate(layers):
        weights.update(mtp_checkpoint_weights(layer, num_hidden_layers + i, per_expert=per_expert))
    out = path / filename
    mx.save_safetensors(str(out), weights, metadata={"format": "mlx"})
    if cfg is not None:
        cfg["num_nextn_predict_layers"] = len(layers)
        cfg_file.write_text(json.dumps(cfg, indent=2))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        wm = {k: v for k, v in data.get("weight_map", {}).items() if not _is_mtp(k, num_hidden_layers)}
        wm.update({k: filename for k in weights})
        data["weight_map"] = dict(sorted(wm.items()))
        index.write_text(json.dumps(data, indent=2))
    return out


def _is_mtp(key: str, num_hidden_layers: int) -> bool:
    m = _LAYER_KEY.match(key)
    return bool(m) and int(m[1]) >= num_hidden_layers
