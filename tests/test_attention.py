"""GLM-4.x attention with its q/k/v projections and RoPEs joined (moedec.kernels.attention): the
same outputs as mlx-lm's, no memory added, prefill left alone."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import moedec
from moedec import compiled, kernels
from moedec.kernels.attention import MAX_TOKENS, QKVPlan, attention_layers, patch_attention
from moedec.testing import tiny_moe

from helpers import quantized_glm

on_gpu = kernels.device_backend() in kernels.BACKENDS


def decode_logits(model, prompt, steps, feed=None, cache=None):
    """Prefill ``prompt``, then ``steps`` single-token forwards of the greedy tokens (or of ``feed``):
    every forward's last logits (through ``cache``, default mlx-lm's)."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model) if cache is None else cache
    out = [model(mx.array([prompt]), cache=cache)[0, -1]]
    for i in range(steps):
        y = mx.argmax(out[-1]) if feed is None else mx.array(feed[i])
        out.append(model(y.reshape(1, 1), cache=cache)[0, -1])
    mx.eval(out)
    return out


@pytest.mark.parametrize("overrides", [
    {"use_qk_norm": False},  # one RoPE over the query and key heads (the synthetic model's case)
    {"use_qk_norm": False, "attention_bias": True, "partial_rotary_factor": 1.0},
    {"use_qk_norm": True},  # norms between projection and RoPE: two RoPEs
    {"use_qk_norm": True, "attention_bias": True, "head_dim": 32, "num_attention_heads": 4, "num_key_value_heads": 2},
])
def test_joined_attention_gives_mlx_lm_outputs(overrides):
    model = quantized_glm(**overrides)
    prompts = [[1, 2, 3], list(range(5, 5 + MAX_TOKENS + 4))]  # the long one's prefill keeps mlx-lm's call
    ref = [decode_logits(model, p, 6) for p in prompts]
    assert patch_attention(model, True) == len(attention_layers(model)) > 0
    got = [decode_logits(model, p, 6) for p in prompts]
    for r, g in zip(ref, got):
        for a, b in zip(r, g):
            assert mx.allclose(a, b, atol=1e-5, rtol=1e-5).item()  # the same dot products, rows side by side
    patch_attention(model, False)
    assert not any(hasattr(type(m), "_moedec_fused_attention") for m in attention_layers(model))


def test_a_cache_that_attends_the_joined_row_gets_it_before_rope():
    """A one-token forward whose cache offers ``attend_qkv`` (the compiled step's on CUDA, which hands
    it to one kernel) passes it the joined q/k/v output before RoPE, the query heads and the layer's
    RoPE, and feeds what it returns to o_proj: with a reference ``attend_qkv`` (RoPE, cache write,
    attention in MLX) the logits are mlx-lm's."""
    from mlx_lm.models.cache import KVCache

    calls = []

    class Reference(KVCache):
        def attend_qkv(self, qkv, heads, rope, scale):  # qkv [B, 1, H + 2 Hkv, D]
            hkv = (qkv.shape[2] - heads) // 2
            x = qkv.transpose(0, 2, 1, 3)  # [B, H + 2 Hkv, 1, D]
            q, k = rope(x[:, :heads], offset=self.offset), rope(x[:, heads:heads + hkv], offset=self.offset)
            keys, values = self.update_and_fetch(k, x[:, heads + hkv:])
            calls.append(qkv.shape)
            o = mx.fast.scaled_dot_product_attention(q, keys, values, scale=scale)  # [B, H, 1, D]
            return o.transpose(0, 2, 1, 3).reshape(qkv.shape[0], 1, -1)

    model = quantized_glm(use_qk_norm=False)
    ref = decode_logits(model, [1, 2, 3, 4], 5)
    patch_attention(model, True)
    got = decode_logits(model, [1, 2, 3, 4], 5, cache=[Reference() for _ in model.layers])
    assert len(calls) == 5 * len(model.layers)  # the decode forwards only; prefill keeps update_and_fetch
    assert all(mx.allclose(a, b, atol=1e-5, rtol=1e-5).item() for a, b in zip(ref, got))


def test_projections_keep_their_weights_and_no_memory_is_added():
    import gc

    model = quantized_glm(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    before = {k: v for k, v in tree_flatten(model.parameters())}
    joined_bytes = sum(v.nbytes for k, v in before.items() if ".self_attn." in k and "o_proj" not in k)
    values = {k: np.array(v.astype(mx.float32)) for k, v in before.items()}
    del before
    gc.collect()
    active = mx.get_active_memory()
    patch_attention(model, True)
    gc.collect()
    assert mx.get_active_memory() - active < joined_bytes // 2  # views of the joined arrays; the old ones freed
    after = dict(tree_flatten(model.parameters()))
    assert after.keys() == values.keys()
    assert all(np.array_equal(np.array(after[k].astype(mx.float32)), values[k]) for k in values)
    attn = attention_layers(model)[0]
    plan = attn.__dict__["_moedec_plan"]
    assert plan.reason is None and plan.weight.shape[0] == sum(l.weight.shape[0] for l in (attn.q_proj, attn.k_proj, attn.v_proj))


def test_unquantized_projections_keep_mlx_lm_call():
    model = tiny_moe("glm4_moe")
    patch_attention(model, True)
    assert attention_layers(model)[0].__dict__["_moedec_plan"].reason == "q/k/v projections are not quantized"
    ref = decode_logits(tiny_moe("glm4_moe"), [1, 2, 3], 3)
    assert all(mx.array_equal(a, b).item() for a, b in zip(ref, decode_logits(model, [1, 2, 3], 3)))


@pytest.mark.parametrize("qk_norm", [False, True])
def test_compiled_step_traces_the_joined_attention(monkeypatch, qk_norm):
    """The compiled step is traced under kernels.joined(): same tokens as the plain step, the
    projections' rows joined (views), and mlx-lm's classes back afterwards."""
    monkeypatch.setattr(compiled, "CHUNK", 8)
    model = quantized_glm(use_qk_norm=qk_norm)
    ref = moedec.generate(model, [4, 5, 6], max_tokens=20, eos_token_ids=[], compile_step=False).tokens
    projected = []
    project = QKVPlan.project
    monkeypatch.setattr(QKVPlan, "project", lambda plan, x, *a: projected.append(x.shape) or project(plan, x, *a))
    dec = moedec.stream_generate(model, [4, 5, 6], max_tokens=20, eos_token_ids=[], compile_step=True)
    got = tuple(t for c in dec for t in c.tokens)
    assert dec.compile_reason is None and got == tuple(ref)
    assert projected and all(shape[1] == 1 for shape in projected)  # the joined projection, traced once per layer
    attn = attention_layers(model)[0]
    assert attn.__dict__["_moedec_plan"].reason is None  # joined for the trace
    assert not any(hasattr(type(m), "_moedec_fused_attention") for m in attention_layers(model))


@pytest.mark.skipif(not on_gpu, reason="needs MLX on a GPU with a fused backend (CUDA)")
@pytest.mark.gpu
def test_compiled_step_on_the_gpu_applies_rope_in_the_attention_kernel(monkeypatch):
    """On CUDA the compiled step hands each joined layer's q/k/v row to one kernel (RoPE, attention
    and the cache write): float32, the same tokens as the plain step."""
    from moedec.kernels import ops

    monkeypatch.setattr(compiled, "CHUNK", 8)  # several traces, and steps across the growth
    model = quantized_glm(use_qk_norm=False, head_dim=32, num_attention_heads=4, num_key_value_heads=2)
    ref = moedec.generate(model, [4, 5, 6], max_tokens=20, eos_token_ids=[], compile_step=False).tokens
    calls = []
    kernel = ops.decode_attention_qkv
    monkeypatch.setattr(ops, "decode_attention_qkv", lambda *a: calls.append(a[0].shape) or kernel(*a))
    dec = moedec.stream_generate(model, [4, 5, 6], max_tokens=20, eos_token_ids=[], compile_step=True)
    got = tuple(t for c in dec for t in c.tokens)
    assert dec.compile_reason is None and got == tuple(ref)
    assert calls and len(calls) % len(model.layers) == 0  # every layer, in every trace


@pytest.mark.skipif(not on_gpu, reason="needs MLX on a GPU with a fused backend (CUDA)")
@pytest.mark.gpu
def test_compiled_step_as_the_first_fused_forward_leaves_a_clean_cache():
    """bfloat16, the synthetic model at 1/8, the compiled step straight after a stock prefill, fed an
    int32 id first and argmax's uint32 ids after: every step's logits are finite and every layer's
    cache holds zeros past the decoded positions. Before the fix the new dtype made mx.compile trace
    again outside the kernel path, and mlx-lm's attention read the rows the kernel had left
    unwritten: NaN from the second step (and the routed experts' indices out of range)."""
    from mlx_lm.models.cache import make_prompt_cache

    from moedec.synthetic import synthetic_glm

    model = synthetic_glm(scale=0.125, num_hidden_layers=3)
    kernels.patch(model, "fused")
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([list(range(1, 33))]), cache=cache))  # 32 tokens: mlx-lm's path
    steps = compiled.CompiledSteps(model, cache)
    y = mx.array([[5]])
    for _ in range(4):
        logits = steps(y)
        mx.eval(logits)
        assert mx.isfinite(logits).all().item()
        for c in steps.layers:
            assert not mx.any(c.state["keys"][:, :, steps.length:]).item()
            assert not mx.any(c.state["values"][:, :, steps.length:]).item()
        y = mx.argmax(logits, axis=-1).reshape(1, 1)
    kernels.patch(model, "stock")


def test_patch_does_not_join_attention():
    model = quantized_glm()
    kernels.patch(model, "auto")
    assert not any(hasattr(type(m), "_moedec_fused_attention") for m in attention_layers(model))
    with kernels.joined(model):
        assert all(hasattr(type(m), "_moedec_fused_attention") for m in attention_layers(model))
    assert not any(hasattr(type(m), "_moedec_fused_attention") for m in attention_layers(model))


@pytest.mark.skipif(not on_gpu, reason="needs MLX on a GPU with a fused backend (CUDA)")
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,d", [(mx.bfloat16, 4096), (mx.float16, 1000), (mx.float32, 256)])
def test_add_norm_kernel_equals_add_then_rms_norm(dtype, d):
    from moedec.kernels.ops import add_rms_norm, why_not_add_norm

    x, r = (mx.random.normal((1, 3, d), key=mx.random.key(i)).astype(dtype) for i in (1, 2))
    w = (1 + 0.1 * mx.random.normal((d,), key=mx.random.key(3))).astype(dtype)
    assert why_not_add_norm(x, r, w) is None
    h, n = add_rms_norm(x, r, w, 1e-5)
    assert mx.array_equal(h, x + r).item()
    ref = mx.fast.rms_norm(x + r, w, 1e-5)
    tol = {mx.bfloat16: 1e-2, mx.float16: 2e-3, mx.float32: 1e-5}[dtype]  # the sum of squares in another order
    assert mx.allclose(n, ref, rtol=tol, atol=tol).item()


@pytest.mark.skipif(not on_gpu, reason="needs MLX on a GPU with a fused backend (CUDA)")
@pytest.mark.gpu
def test_fused_layers_on_the_gpu_decode_like_stock(monkeypatch):
    """bfloat16, the synthetic GLM model's shapes at 1/8: with the fused kernels, the joined
    attention and decoder layers and the dense kernel (kernels.joined) a forward's logits stay within
    bfloat16 noise of the stock path's, for every forward up to the first whose top-k routing differs
    (a near-tie among a random router's scores flips on noise; the forwards after it see another
    cache). Where a prompt's own forward routes differently, each expert chosen instead must have been
    a near-tie in the stock forward (selection score within ROUTE_TIE of the k-th), and the next prompt
    is tried; one of them must route alike."""
    import attrs
    from mlx_lm.models import glm4_moe

    from moedec.kernels.layer import decoder_layers
    from moedec.synthetic import synthetic_glm

    routes, selection = [], []
    stock_gate, be = glm4_moe.MoEGate.__call__, kernels.BACKENDS["cuda"]

    def recorded(route):  # a router, or the add + norm + router op: (.., inds, scores)
        def call(*args):
            out = route(*args)
            inds = out[-2]
            routes.append(mx.sort(inds.reshape(-1, inds.shape[-1]), axis=-1).tolist())
            return out
        return call

    def stock(gate, x):  # also the scores the stock gate selects by (sigmoid + correction bias)
        s = mx.sigmoid((x @ gate.weight.T).astype(mx.float32)) + gate.e_score_correction_bias
        selection.append(s.reshape(-1, s.shape[-1]).tolist())
        return recorded(stock_gate)(gate, x)

    monkeypatch.setattr(glm4_moe.MoEGate, "__call__", stock)
    monkeypatch.setitem(kernels.BACKENDS, "cuda", attrs.evolve(be, router=recorded(be.router),
                                                               add_norm_router=recorded(be.add_norm_router)))
    model = synthetic_glm(scale=0.125, num_hidden_layers=3)
    per_forward = len(kernels.moe_blocks(model))
    for prompt in ([1, 2, 3, 4], [5, 6, 7, 8], [11, 12, 13]):
        routes[:], selection[:] = [], []
        kernels.patch(model, "stock")
        ref = decode_logits(model, prompt, 4, feed=[9, 8, 7, 6])
        ref_routes, scores, routes[:] = routes[:], selection[:], []
        try:
            kernels.patch(model, "auto")
            with kernels.joined(model):
                assert all(hasattr(type(m), "_moedec_fused_layer") for m in decoder_layers(model))
                assert all(hasattr(type(m), "_moedec_fused_attention") for m in attention_layers(model))
                got = decode_logits(model, prompt, 4, feed=[9, 8, 7, 6])
        finally:
            kernels.patch(model, "stock")
        assert len(routes) == len(ref_routes) == len(ref) * per_forward
        alike = next((f for f in range(len(ref)) if routes[f * per_forward:(f + 1) * per_forward]
                      != ref_routes[f * per_forward:(f + 1) * per_forward]), len(ref))
        if alike == 0:  # the prompt's forward routed differently: only on near-ties
            call = next(c for c in range(per_forward) if routes[c] != ref_routes[c])
            for want, have, s in zip(ref_routes[call], routes[call], scores[call]):
                kth = min(s[e] for e in want)
                assert all(s[e] >= kth - ROUTE_TIE for e in set(have) - set(want)), (prompt, call, want, have)
            continue
        for a, b in zip(ref[:alike], got[:alike]):
            scale = float(mx.abs(a.astype(mx.float32)).max())
            assert float(mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max()) <= 0.05 * scale + 0.05
        return
    pytest.fail("no prompt's own forward routed alike")


#: How far below the k-th selection score (sigmoid + bias, stock forward) an expert the fused forward
#: chose instead may be: bfloat16 noise in the router's input, not a wrong choice.
ROUTE_TIE = 0.02


def test_add_norm_takes_only_a_weight_of_the_activations_dtype():
    """MLX's rms_norm promotes a bf16 row with a float32 weight to float32; the kernel writes the
    activations' dtype, so that case keeps MLX's add and norm."""
    from moedec.kernels.ops import why_not_add_norm

    x = mx.zeros((1, 1, 64), mx.bfloat16)
    assert why_not_add_norm(x, x, mx.ones((64,), mx.bfloat16)) is None
    assert why_not_add_norm(x, x, mx.ones((64,), mx.float32)) is not None
    assert why_not_add_norm(x, x.astype(mx.float16), mx.ones((64,), mx.bfloat16)) is not None
    assert why_not_add_norm(mx.zeros((1, 1, 60), mx.bfloat16), mx.zeros((1, 1, 60), mx.bfloat16), mx.ones((60,), mx.bfloat16)) is not None


def test_joined_attention_takes_the_input_norm():
    """A decoder layer under kernels.joined hands its input norm to the joined attention (which, on
    CUDA, computes it in the q/k/v kernel): the same output as the attention of the normed input."""
    from moedec.kernels import layer
    from moedec.kernels.layer import decoder_layers

    model = quantized_glm()
    kernels.patch(model, "auto")
    try:
        with kernels.joined(model):
            lay = decoder_layers(model)[0]
            x = mx.random.normal((1, 3, model.args.hidden_size), key=mx.random.key(4))
            got = lay.self_attn(x, None, None, norm=lay.input_layernorm)
            ref = lay.self_attn(lay.input_layernorm(x), None, None)
            assert mx.array_equal(got, ref).item()
            assert layer.JOIN_INPUT_NORM
    finally:
        kernels.patch(model, "stock")


def _quantized_embedding(bits, dtype, group=64, vocab=300, d=512):
    emb = nn.QuantizedEmbedding.from_embedding(nn.Embedding(vocab, d), group_size=group, bits=bits)
    emb.set_dtype(dtype)
    return emb


def test_embedding_kernel_eligibility_and_patch():
    """The embedding kernel takes 4- or 8-bit affine rows and integer ids; under kernels.joined a
    CUDA model's quantized embeddings get its call (elsewhere mlx-lm's stays)."""
    from moedec.kernels.ops import why_not_embed

    emb = _quantized_embedding(4, mx.bfloat16)
    ids = mx.array([[3, 1, 4]], mx.uint32)
    assert why_not_embed(emb, ids) is None
    assert "ids" in why_not_embed(emb, ids.astype(mx.float32))
    assert "4- or 8-bit" in why_not_embed(_quantized_embedding(2, mx.bfloat16), ids)
    model = quantized_glm()
    kernels.patch(model, "auto")
    try:
        with kernels.joined(model):
            patched = [hasattr(type(m), "_moedec_embed") for _, m in model.named_modules()
                       if isinstance(m, nn.QuantizedEmbedding)]
            assert patched and (all(patched) if on_gpu else not any(patched))
        assert not any(hasattr(type(m), "_moedec_embed") for _, m in model.named_modules())
    finally:
        kernels.patch(model, "stock")


@pytest.mark.skipif(not on_gpu, reason="needs MLX on a GPU with a fused backend (CUDA)")
@pytest.mark.gpu
@pytest.mark.parametrize("bits,dtype,group", [(4, mx.bfloat16, 64), (8, mx.float16, 32), (4, mx.float32, 128)])
def test_embedding_kernel_equals_quantized_embedding(bits, dtype, group):
    from moedec.kernels.ops import embed

    emb = _quantized_embedding(bits, dtype, group)
    ids = mx.array([[0, 299, 7], [7, 42, 1]], mx.int32)
    got, ref = embed(emb, ids), nn.QuantizedEmbedding.__call__(emb, ids)
    assert got.dtype == ref.dtype and got.shape == ref.shape
    assert mx.array_equal(got, ref).item()
