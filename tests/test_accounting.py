"""Expert accounting: the union counter, the byte inventory, KV bytes, the tracer and the observer."""

import attrs
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import SwitchGLU

import moedec
from moedec.accounting import ExpertAccounting, ExpertTrace, layer_use, make_record, merge_uses
from moedec.inventory import ModelBytes, expert_modules, kv_bytes, model_bytes, unaccountable_architectures
from moedec.forward import forward, new_cache
from moedec.models import build_model, randomize
from moedec.testing import tiny_moe


@attrs.define
class RepeatLast:
    """Drafts the last token ``num_draft`` times (mostly rejected: exercises T > 1 forwards)."""

    name = "test-repeat-last"
    num_draft: int = 3

    @moedec.hookimpl
    def draft(self, state):
        return [state.tokens[-1]] * self.num_draft


def _nbytes(model, prefix=""):
    return sum(a.nbytes for k, a in tree_flatten(model.parameters()) if k.startswith(prefix))


# -- the union counter ---------------------------------------------------------------------------


def test_layer_use_counts_tokens_selections_and_union_by_hand():
    idx = np.array([[[0, 1], [1, 2], [5, 0]]])  # [B=1, T=3, k=2]: experts {0, 1, 2, 5}
    u = layer_use(3, idx)
    assert (u.layer, u.tokens, u.selections, u.union) == (3, 3, 6, 4)
    u = layer_use(0, np.array([[[4, 7]], [[7, 4]]]))  # two rows of one token: {4, 7}
    assert (u.tokens, u.selections, u.union) == (2, 4, 2)
    merged = merge_uses([layer_use(1, idx), layer_use(1, idx)], num_layers=3)
    assert [m.union for m in merged] == [0, 8, 0] and merged[1].selections == 12


def test_union_of_a_router_with_fixed_weights():
    """A qwen3_moe block whose router is the identity on the first 8 dims: the top-2 experts of each
    token are its two largest coordinates, chosen by hand."""
    model = tiny_moe("qwen3_moe")
    block = model.model.layers[0].mlp
    e, d = 8, model.args.hidden_size
    block.gate.weight = mx.concatenate([mx.eye(e), mx.zeros((e, d - e))], axis=1)
    x = np.zeros((1, 3, d), np.float32)
    for t, (a, b) in enumerate([(0, 1), (1, 2), (5, 0)]):
        x[0, t, a], x[0, t, b] = 3.0, 2.0
    with ExpertTrace(model) as trace:
        mx.eval(block(mx.array(x)))
    calls = trace.take()
    assert len(calls) == 1 and calls[0][0] == 0  # layer 0 of the model's expert layers
    assert sorted(map(sorted, np.asarray(calls[0][1]).reshape(-1, 2).tolist())) == [[0, 1], [0, 5], [1, 2]]
    u = layer_use(*calls[0])
    assert (u.tokens, u.selections, u.union) == (3, 6, 4)


def test_whole_model_routing_fixed_by_router_bias():
    """glm4_moe with zero router weights routes by the correction bias alone: every token picks
    experts {3, 6}, so every verify forward's union is 2 and its selections are 2T."""
    model = tiny_moe("glm4_moe")
    for layer in model.model.layers[1:]:
        layer.mlp.gate.weight = mx.zeros_like(layer.mlp.gate.weight)
        bias = np.zeros(8, np.float32)
        bias[[3, 6]] = 1.0
        layer.mlp.gate.e_score_correction_bias = mx.array(bias)
    acct = ExpertAccounting()
    g = moedec.generate(model, [5, 6, 7, 8], RepeatLast(num_draft=3), max_tokens=12, plugins=[acct])
    recs = acct.records
    assert len(recs) == g.stats.forwards and any(r.tokens == 4 for r in recs)
    for r in recs:
        assert len(r.layers) == 2
        assert all(l.union == 2 and l.selections == 2 * r.tokens and l.tokens == r.tokens for l in r.layers)


# -- bytes ------------------------------------------------------------------------------------------


def _check_partition(inv: ModelBytes, model):
    assert inv.total == _nbytes(model)
    head = 0 if inv.tied else inv.lm_head
    parts = inv.attention + inv.shared_experts + inv.dense + inv.embedding + head + inv.expert_bytes
    assert parts == inv.total
    for layer in inv.layers:
        assert layer.num_experts * layer.bytes_per_expert + layer.fixed_bytes == _nbytes(model, layer.path + ".")


def test_bytes_float32_match_parameter_sizes():
    model = tiny_moe("glm4_moe")  # hidden 64, expert width 32, 8 experts, layers 1-2 MoE
    inv = model_bytes(model)
    _check_partition(inv, model)
    assert [l.path for l in inv.layers] == ["model.layers.1.mlp.switch_mlp", "model.layers.2.mlp.switch_mlp"]
    assert all(l.bytes_per_expert == 3 * 32 * 64 * 4 and l.num_experts == 8 for l in inv.layers)
    assert inv.attention == sum(_nbytes(model, f"model.layers.{i}.self_attn.") for i in range(3))
    assert inv.shared_experts == sum(_nbytes(model, f"model.layers.{i}.mlp.shared_experts.") for i in (1, 2))
    assert inv.lm_head == 256 * 64 * 4 and inv.embedding_row == 64 * 4 and not inv.tied
    assert inv.top_k == 2 and inv.num_experts == 8


@pytest.mark.parametrize("dtype,bits,group,per_expert", [
    # gate/up [32, 64] and down [64, 32]: packed weight + scales + biases per projection
    (mx.float32, 4, 32, 3 * (32 * 64 // 2 + 2 * (32 * 64 // 32) * 4)),
    (mx.bfloat16, 8, 32, 3 * (32 * 64 + 2 * (32 * 64 // 32) * 2)),
])
def test_bytes_quantized_match_parameter_sizes(dtype, bits, group, per_expert):
    model = randomize(build_model(moedec.models.model_config("glm4_moe")), 0, dtype)
    nn.quantize(model, group_size=group, bits=bits)
    inv = model_bytes(model)
    _check_partition(inv, model)
    assert all(l.bytes_per_expert == per_expert for l in inv.layers)
    row = model.model.embed_tokens
    assert inv.embedding_row == (row.weight.nbytes + row.scales.nbytes + row.biases.nbytes) // 256


def test_tied_embeddings_count_the_table_as_the_head():
    model = tiny_moe("qwen3_moe", tie_word_embeddings=True)
    inv = model_bytes(model)
    assert inv.tied and inv.lm_head == inv.embedding == 256 * 64 * 4
    _check_partition(inv, model)


def test_forward_bytes_and_kv_bytes():
    model = tiny_moe("mixtral")  # 2 layers, 2 KV heads of 16, float32
    inv = model_bytes(model)
    cache = new_cache(model)
    tokens = [3, 4, 3, 9, 10]
    with ExpertTrace(model) as trace:
        logits, _ = forward(model, tokens, cache)
        mx.eval(logits)
    kv = kv_bytes(cache)
    assert kv == 2 * 2 * (2 * 5 * 16 * 4)  # layers x (keys, values) x [H, T, D] float32
    rec = make_record(inv, trace.take(), tokens, kv)
    assert rec.tokens == 5 and rec.distinct_tokens == 4
    unions = [l.union for l in rec.layers]
    assert rec.bytes_union == inv.fixed + 4 * inv.embedding_row + sum(u * l.bytes_per_expert for u, l in zip(unions, inv.layers)) + kv
    assert rec.bytes_pair == inv.fixed + 4 * inv.embedding_row + sum(10 * l.bytes_per_expert for l in inv.layers) + kv
    assert rec.bytes_pair >= rec.bytes_union
    with pytest.raises(moedec.MoedecError, match="no expert-layer call was seen"):
        make_record(inv, [], tokens, kv)  # e.g. a compiled forward: refuse to report zero experts


def test_models_without_expert_layers_are_named():
    cfg = dict(model_type="llama", hidden_size=32, num_hidden_layers=1, intermediate_size=64,
               num_attention_heads=2, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=64)
    dense = build_model(cfg)
    with pytest.raises(moedec.MoedecError, match="cannot account expert traffic of 'llama'.*dbrx"):
        model_bytes(dense)
    bad = unaccountable_architectures()
    assert "dbrx" in bad and not {"glm4_moe", "qwen3_moe", "mixtral", "deepseek_v3"} & set(bad)


# -- tracing --------------------------------------------------------------------------------------


def test_trace_restores_classes_nests_and_ignores_other_models():
    a, b = tiny_moe("glm4_moe", seed=0), tiny_moe("glm4_moe", seed=1)
    with ExpertTrace(a) as outer:
        with ExpertTrace(a) as inner:
            mx.eval(a(mx.array([[1, 2]])), b(mx.array([[1, 2]])))
        mx.eval(a(mx.array([[3]])))
    assert len(inner.calls) == 2 and len(outer.calls) == 4
    assert all(type(m) is SwitchGLU for _, m in expert_modules(a) + expert_modules(b))


def test_trace_sees_a_patched_kernel_class():
    kernels = pytest.importorskip("moedec.kernels")
    model = tiny_moe("glm4_moe")
    cls = getattr(kernels, "DispatchingSwitchGLU", None)
    if cls is None:
        pytest.skip("moedec.kernels has no DispatchingSwitchGLU")
    for _, m in expert_modules(model):
        m.__class__ = cls
    with ExpertTrace(model) as trace:
        mx.eval(model(mx.array([[1, 2, 3]])))
    assert len(trace.calls) == 2
    assert all(type(m) is cls for _, m in expert_modules(model))


def test_observer_leaves_the_output_unchanged():
    model = tiny_moe("qwen3_moe")
    plain = moedec.generate(model, [1, 2, 3, 1, 2], RepeatLast(), max_tokens=10)
    acct = ExpertAccounting()
    seen = moedec.generate(model, [1, 2, 3, 1, 2], RepeatLast(), max_tokens=10, plugins=[acct])
    assert plain.tokens == seen.tokens and len(acct.records) == seen.stats.forwards
    assert [r.tokens for r in acct.records][0] == 4
