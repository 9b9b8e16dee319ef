"""The MoE kernel: grouping logic and reference path on CPU; the fused CUDA kernel on the GPU."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from hypothesis import given, settings, strategies as hs
from mlx_lm.models.switch_layers import SwitchGLU

import moedec
from moedec import kernels
from moedec.errors import MoedecError
from moedec.kernels.grouping import grouped_switch_glu, slot_table, sort_pairs

on_gpu = kernels.device_backend() in kernels.BACKENDS
gpu = pytest.mark.skipif(not on_gpu, reason="needs MLX on a GPU with a fused backend (CUDA)")


def make_switch(d=128, n=128, e=8, bits=None, group=64, dtype=mx.float32, seed=0):
    mx.random.seed(seed)
    sw = SwitchGLU(d, n, e)
    sw.set_dtype(dtype)
    if bits:
        nn.quantize(sw, group_size=group, bits=bits)
    mx.eval(sw.parameters())
    return sw


@given(
    t=hs.integers(1, 16), k=hs.integers(1, 8), e=hs.integers(1, 12), seed=hs.integers(0, 2**16),
)
@settings(max_examples=60, deadline=None)
def test_slot_table_covers_every_pair_once(t, k, e, seed):
    rng = np.random.default_rng(seed)
    idx = mx.array(rng.integers(0, e, size=(t, k)))  # repeats across tokens (and within, if k > e)
    sorted_e, order = sort_pairs(idx)
    table = slot_table(sorted_e)
    flat = np.array(idx).reshape(-1)
    assert [s[0] for s in table] == sorted(set(flat.tolist()))  # one slot per distinct expert
    seen = []
    for expert, start, end in table:
        pairs = np.array(order)[start:end].tolist()
        assert all(flat[p] == expert for p in pairs)
        seen += pairs
    assert sorted(seen) == list(range(t * k))  # every pair exactly once


@pytest.mark.parametrize("bits,group", [(None, 64), (4, 32), (4, 64), (8, 128), (8, 64)])
@given(t=hs.integers(1, 6), k=hs.integers(1, 4), seed=hs.integers(0, 1000))
@settings(max_examples=15, deadline=None)
def test_grouped_reference_equals_switch_glu(bits, group, t, k, seed):
    sw = make_switch(bits=bits, group=group)
    rng = np.random.default_rng(seed)
    idx = mx.array(np.stack([rng.choice(8, size=k, replace=False) for _ in range(t)]))[None]  # [1, T, K]
    x = mx.random.normal((1, t, 128), key=mx.random.key(seed))
    ref = sw(x, idx)
    got = grouped_switch_glu(sw, x, idx)
    assert got.shape == ref.shape == (1, t, k, 128)
    atol = 2e-3 if on_gpu else 1e-4  # CUDA's quantized matmuls accumulate in another order
    assert mx.allclose(got, ref, atol=atol, rtol=1e-3).item()


def test_patch_on_cpu_keeps_the_stock_path():
    from moedec.testing import tiny_moe

    model = tiny_moe("qwen3_moe")
    assert kernels.device_backend() is None or on_gpu
    if not on_gpu:
        assert kernels.patch(model, "auto") == 0
        with pytest.raises(MoedecError, match="fused MoE kernel needs MLX's CUDA backend"):
            kernels.patch(model, "fused")
    assert kernels.patch(model, "stock") == 0
    assert all(type(m) is SwitchGLU for m in kernels.switch_layers(model))
    with pytest.raises(MoedecError, match="unknown kernel"):
        kernels.patch(model, "fast")


def test_fused_eligibility_reasons():
    from moedec.kernels.fused import why_not_fused

    x = mx.zeros((1, 1, 128))
    idx = mx.zeros((1, 1, 2), dtype=mx.int32)
    assert "not quantized" in why_not_fused(make_switch(), x, idx)
    assert why_not_fused(make_switch(bits=4), x, idx) is None
    assert "tokens" in why_not_fused(make_switch(bits=4), mx.zeros((1, 17, 128)), mx.zeros((1, 17, 2), dtype=mx.int32))
    assert "pairs" in why_not_fused(make_switch(bits=4), mx.zeros((1, 16, 128)), mx.zeros((1, 16, 17), dtype=mx.int32))
    assert "bits" in why_not_fused(make_switch(bits=2, group=64), x, idx)
    assert "tokens" in why_not_fused(make_switch(bits=4), mx.zeros((1, 2, 128)), idx)


def _glm_block(seed=0, bits=4, dtype=mx.float32, **cfg):
    """One glm4_moe MoE block (d=128, expert width 128, 8 experts top-2, one shared expert)."""
    from mlx_lm.models import glm4_moe

    from moedec.models import model_config

    fields = dict(hidden_size=128, moe_intermediate_size=128, n_routed_experts=8, num_experts_per_tok=2,
                  n_shared_experts=1, n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5)
    args = glm4_moe.ModelArgs.from_dict(model_config("glm4_moe", **{**fields, **cfg}))
    mx.random.seed(seed)
    block = glm4_moe.MoE(args)
    block.gate.weight = mx.random.normal(block.gate.weight.shape) * 0.1
    block.gate.e_score_correction_bias = mx.random.normal((8,)) * 0.01
    block.set_dtype(dtype)
    if bits:
        nn.quantize(block, group_size=64, bits=bits, class_predicate=lambda p, m: hasattr(m, "to_quantized"))
    mx.eval(block.parameters())
    return block


def test_patched_block_without_backend_equals_stock():
    """The plumbing of the fused block (router, then experts + combine + shared expert inside the
    switch) with no backend falls back to exactly mlx-lm's computation, and accounting still sees
    every routing."""
    from moedec.accounting import ExpertTrace
    from moedec.kernels.patching import set_call

    block = _glm_block()
    x = mx.random.normal((1, 5, 128), key=mx.random.key(3))
    ref = block(x)
    set_call(block, kernels._moe_call, "_moedec_fused_block", True)  # the patched call, no backend
    block.switch_mlp.__class__ = kernels.DispatchingSwitchGLU
    with ExpertTrace(block, [("switch_mlp", block.switch_mlp)]) as trace:
        got = block(x)
        calls = trace.take()
    assert mx.array_equal(got, ref).item()
    assert len(calls) == 1 and calls[0][1].shape == (1, 5, 2)


def test_patch_is_idempotent_and_undone():
    from moedec.synthetic import synthetic_glm

    model = synthetic_glm(scale=0.03125, num_hidden_layers=2)
    kernels.patch(model, "stock")
    blocks = kernels.moe_blocks(model)
    assert blocks and all(not getattr(type(b), "_moedec_fused_block", False) for b in blocks)
    if on_gpu:
        assert kernels.patch(model, "fused") == kernels.patch(model, "fused") == 1
        assert all(type(b)._moedec_fused_block for b in blocks)
        kernels.patch(model, "stock")
        assert all(type(b).__mro__[0].__module__.endswith("glm4_moe") and not hasattr(type(b), "_moedec_fused_block")
                   for b in blocks)


# -- GPU ------------------------------------------------------------------------------------------


def _routings(rng, t, k, pool, e):
    """[1, T, K] routings with repeats across tokens (experts from a small pool) and a few tokens
    that take any expert."""
    rows = [rng.choice(pool if i % 3 else e, size=k, replace=False) for i in range(t)]
    return mx.array(np.stack(rows).astype(np.uint32))[None]


# Each (bits, group, dtype, width) variant is JIT-compiled once; T is a runtime size. Expert width 768
# takes the tensor-core kernels for 4-bit 16-bit-float experts, 384 (no whole 256-input slices) and
# 8-bit or float32 the CUDA-core ones.
VARIANTS = [(4, 32, mx.bfloat16, 768), (4, 64, mx.bfloat16, 768), (4, 128, mx.bfloat16, 768), (4, 64, mx.float16, 768),
            (4, 64, mx.bfloat16, 384), (8, 32, mx.bfloat16, 384), (8, 64, mx.bfloat16, 384), (8, 128, mx.bfloat16, 384),
            (4, 64, mx.float32, 384)]


def _path(sw, x) -> str:
    from moedec.kernels.fused import expert_kernels

    g = sw.gate_proj
    return expert_kernels(x.dtype, g.scales.dtype, g.bits, x.shape[-1], g.weight.shape[1], g.group_size).gate_up_name


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("bits,group,dtype,n", VARIANTS, ids=lambda v: str(v).replace("mlx.core.", ""))
def test_fused_matches_reference(bits, group, dtype, n):
    from mlx_lm.models.glm4_moe import MLP

    from moedec.kernels.fused import fused_moe, fused_switch_glu, why_not_shared

    d, e, k = 512, 16, 4
    sw = make_switch(d=d, n=n, e=e, bits=bits, group=group, dtype=dtype)
    mma = bits == 4 and dtype != mx.float32 and n == 768
    assert _path(sw, mx.zeros((1, d), dtype)) == ("gate_up_mma" if mma else "gate_up")
    shared = MLP(None, hidden_size=d, intermediate_size=n)
    shared.set_dtype(dtype)
    nn.quantize(shared, group_size=group, bits=bits)
    mx.eval(shared.parameters())
    assert why_not_shared(sw, shared) is None
    rng = np.random.default_rng(bits * group)
    for t in (1, 2, 3, 5, 8, 16):
        idx = _routings(rng, t, k, 6, e)
        x = (mx.random.normal((1, t, d), key=mx.random.key(t)) * 0.5).astype(dtype)
        scores = mx.array(rng.random((1, t, k)).astype(np.float32))
        ref_pairs = SwitchGLU.__call__(sw, x, idx).astype(mx.float32)  # [1, T, K, D]
        ref = (ref_pairs * scores[..., None]).sum(axis=-2) + shared(x).astype(mx.float32)
        tol = 2e-2 * float(mx.abs(ref_pairs).max()) + 1e-3
        err = float(mx.abs(fused_switch_glu(sw, x, idx).astype(mx.float32) - ref_pairs).max())
        assert err <= tol, f"pairs T={t} bits={bits} group={group} {dtype}: max error {err} > {tol}"
        got = fused_moe(sw, x, idx, scores, shared)
        assert got.shape == x.shape and got.dtype == dtype
        err = float(mx.abs(got.astype(mx.float32) - ref).max())
        assert err <= 4 * tol, f"block T={t} bits={bits} group={group} {dtype}: max error {err} > {4 * tol}"
        h = (mx.random.normal((1, t, d), key=mx.random.key(99 + t))).astype(dtype)  # a residual, added as h + block
        assert mx.array_equal(fused_moe(sw, x, idx, scores, shared, residual=h), h + got).item()


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("n", [768, 384])  # tensor cores, CUDA cores
def test_fused_token_results_do_not_depend_on_the_other_tokens(n):
    """What makes verify == single on the fused path: a token's output is bit-identical whether it
    is alone in the forward or one of 16."""
    from moedec.kernels.fused import fused_moe

    sw = make_switch(d=512, n=n, e=16, bits=4, group=64, dtype=mx.bfloat16)
    rng = np.random.default_rng(0)
    idx = _routings(rng, 16, 4, 6, 16)
    x = (mx.random.normal((1, 16, 512)) * 0.5).astype(mx.bfloat16)
    scores = mx.array(rng.random((1, 16, 4)).astype(np.float32))
    whole = fused_moe(sw, x, idx, scores)
    for t in (0, 7, 15):
        one = fused_moe(sw, x[:, t:t + 1], idx[:, t:t + 1], scores[:, t:t + 1])
        assert mx.array_equal(one[0, 0], whole[0, t]).item()


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("n", [768, 384])  # tensor cores, CUDA cores
def test_fused_single_token_slots_with_and_without_repeats(n):
    """A one-token forward's slot table (distinct experts: slot k is pair k; an expert more than once:
    the general build) gives SwitchGLU's pairs, and the same bits as that token beside another."""
    from moedec.kernels.fused import fused_moe, fused_switch_glu

    sw = make_switch(d=512, n=n, e=16, bits=4, group=64, dtype=mx.bfloat16)
    x = (mx.random.normal((1, 2, 512), key=mx.random.key(5)) * 0.5).astype(mx.bfloat16)
    scores = mx.array([[[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]]], mx.float32)
    for row in ([9, 2, 14, 5], [3, 7, 3, 3]):
        idx = mx.array([[row, [2, 0, 9, 11]]], mx.uint32)
        ref = SwitchGLU.__call__(sw, x[:, :1], idx[:, :1]).astype(mx.float32)  # [1, 1, K, D]
        err = float(mx.abs(fused_switch_glu(sw, x[:, :1], idx[:, :1]).astype(mx.float32) - ref).max())
        assert err <= 2e-2 * float(mx.abs(ref).max()) + 1e-3, (row, err)
        one = fused_moe(sw, x[:, :1], idx[:, :1], scores[:, :1])
        assert mx.array_equal(one[0, 0], fused_moe(sw, x, idx, scores)[0, 0]).item(), row


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("n_group,topk_group", [(1, 1), (4, 2)])
def test_fused_router_is_a_top_k_of_the_gate(n_group, topk_group):
    """Same experts as mlx-lm's gate up to near-ties, and weights that are exactly the normalised,
    scaled sigmoid scores of the experts chosen."""
    from moedec.kernels.router import fused_router

    block = _glm_block(bits=None, dtype=mx.bfloat16, n_group=n_group, topk_group=topk_group)
    gate = block.gate
    x = (mx.random.normal((1, 16, 128), key=mx.random.key(1))).astype(mx.bfloat16)
    for t in (1, 16, 3):  # two launches in one graph (MLX may run them at once): each its own block counter
        first = fused_router(gate, x[:, :t])
        again = fused_router(gate, x[:, :t])
        assert all(mx.array_equal(a, b).item() for a, b in zip(first, again)), t
    assert all(mx.array_equal(a, b[:, :3]).item() for a, b in zip(first, fused_router(gate, x)))  # tokens alone
    inds, scores = fused_router(gate, x)
    ref_inds, ref_scores = gate(x)
    logits = (x @ gate.weight.T).astype(mx.float32)
    sig = np.array(mx.sigmoid(logits))[0]  # [T, E]
    sel = sig + np.array(gate.e_score_correction_bias.astype(mx.float32))
    inds, scores = np.array(inds)[0], np.array(scores)[0]
    same = 0
    for t in range(16):
        chosen = set(inds[t].tolist())
        same += chosen == set(np.array(ref_inds)[0, t].tolist())
        if n_group == 1:
            rest = [sel[t, e] for e in range(8) if e not in chosen]
            assert min(sel[t, list(chosen)]) >= max(rest) - 1e-3
        w = sig[t, inds[t]]
        assert np.allclose(scores[t], w / w.sum() * 2.5, rtol=1e-5, atol=1e-6)
    assert same >= 14, f"only {same}/16 tokens chose the same experts as mlx-lm's gate"


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,d,n_group,topk_group", [(mx.bfloat16, 4096, 1, 1), (mx.float16, 128, 4, 2),
                                                        (mx.float32, 1000, 1, 1)])
def test_add_norm_router_is_the_add_norm_then_the_router(dtype, d, n_group, topk_group):
    """One kernel for the residual add, the RMSNorm and the router: ``h`` is ``x + r``, ``n`` the norm
    of it (the sum of squares in another order than MLX's), and the routing is bit for bit the router
    kernel's of that ``n``, for 1 to 16 tokens (decode forwards take it: ADD_NORM_ROUTER_TOKENS)."""
    from moedec.kernels.router import ADD_NORM_ROUTER_TOKENS, add_norm_router, fused_router, why_not_add_norm_router

    gate = _glm_block(bits=None, dtype=dtype, hidden_size=d, n_group=n_group, topk_group=topk_group).gate
    x, r = ((mx.random.normal((1, 16, d), key=mx.random.key(i))).astype(dtype) for i in (1, 2))
    w = (1 + 0.1 * mx.random.normal((d,), key=mx.random.key(3))).astype(dtype)
    tol = {mx.bfloat16: 1e-2, mx.float16: 2e-3, mx.float32: 1e-5}[dtype]
    for t in (1, 5, 16):
        xt, rt = x[:, :t], r[:, :t]
        assert (why_not_add_norm_router(gate, xt, rt, w) is None) == (t <= ADD_NORM_ROUTER_TOKENS)
        h, n, inds, scores = add_norm_router(gate, xt, rt, w, 1e-5)
        assert mx.array_equal(h, xt + rt).item()
        assert mx.allclose(n, mx.fast.rms_norm(xt + rt, w, 1e-5), rtol=tol, atol=tol).item()
        ref_inds, ref_scores = fused_router(gate, n)
        assert mx.array_equal(inds, ref_inds).item() and mx.array_equal(scores, ref_scores).item(), t


@gpu
@pytest.mark.gpu
def test_fused_kernel_is_lossless_end_to_end():
    """float32 activations and scales; the fused kernels make each token's MoE output independent
    of the forward it is in, so verify == single holds on the MoE side (near-ties aside)."""
    from moedec.synthetic import synthetic_glm
    from moedec.testing import compare_greedy, oracle_greedy

    model = synthetic_glm(scale=0.125, num_hidden_layers=3, dtype=mx.float32)
    kernels.patch(model, "stock")
    prompts = [[1, 2, 3, 4], [7] * 9, list(range(100, 140))]
    refs = [oracle_greedy(model, p, 24) for p in prompts]  # stock mlx-lm path
    assert kernels.patch(model, "fused") > 0
    try:
        for p, ref in zip(prompts, refs):
            for strategy in ("single", "prompt-lookup"):
                got = moedec.generate(model, p, max_tokens=24, strategy=strategy, eos_token_ids=[])
                div = compare_greedy(ref, got.tokens, atol=5e-3)
                assert div is None or div.near_tie, div.describe()
    finally:
        kernels.patch(model, "stock")


def _reference_block_ops(calls: list):
    """A CPU stand-in backend's ``moe`` and ``add_norm``: mlx-lm's computation, each call recorded
    in ``calls`` (``block``, ``block + residual``, ``add_norm``)."""

    def moe(sw, x, inds, scores, shared, residual=None):
        calls.append("block" if residual is None else "block + residual")
        y = (grouped_switch_glu(sw, x, inds) * scores[..., None]).sum(axis=-2).astype(x.dtype)
        y = y if shared is None else y + shared(x)
        return y if residual is None else residual + y

    def add_norm(x, r, w, eps):
        calls.append("add_norm")
        return x + r, mx.fast.rms_norm(x + r, w, eps)

    return moe, add_norm


def _use_stand_in(monkeypatch, backend) -> None:
    """``backend`` as this device's (``stand-in``), and one that ``auto`` picks."""
    monkeypatch.setitem(kernels.BACKENDS, "stand-in", backend)
    monkeypatch.setattr(kernels, "AUTO_BACKENDS", frozenset({"stand-in"}))
    monkeypatch.setattr(kernels, "device_backend", lambda: "stand-in")


def test_auto_takes_over_the_measured_blocks_only(monkeypatch):
    """With a backend present (a CPU stand-in computing the reference), ``auto`` routes the GLM MoE
    blocks through its block op (combine and shared expert included; under kernels.joined also the
    decoder layer's residual add, after the backend's add + norm) and leaves other models'
    SwitchGLU layers on the stock path; ``fused`` takes those too. Outputs stay mlx-lm's."""
    from moedec.testing import compare_greedy, oracle_greedy, tiny_moe

    calls = []
    moe, add_norm = _reference_block_ops(calls)

    def pairs(sw, x, inds):
        calls.append("pairs")
        return grouped_switch_glu(sw, x, inds)

    fake = kernels.Backend(why_not=lambda sw, x, i: None, switch_glu=pairs, moe=moe,
                           why_not_shared=lambda sw, sh: None, why_not_router=lambda g, x: "stand-in has no router",
                           router=None, why_not_add_norm=lambda x, r, w: None, add_norm=add_norm)
    _use_stand_in(monkeypatch, fake)
    glm, qwen = tiny_moe("glm4_moe"), tiny_moe("qwen3_moe")
    prompt = [3, 1, 4, 1, 5]
    try:
        assert kernels.patch(glm, "auto") == len(kernels.moe_blocks(glm)) > 0
        assert kernels.patch(qwen, "auto") == 0
        got = moedec.generate(glm, prompt, max_tokens=12, eos_token_ids=[], kernel="auto")
        kernels.patch(glm, "stock")
        div = compare_greedy(oracle_greedy(glm, prompt, 12), got.tokens, atol=1e-4)
        assert div is None or div.near_tie, div.describe()
        assert "block" in calls and "pairs" not in calls and "add_norm" not in calls
        calls.clear()
        ids = mx.array([prompt])
        kernels.patch(glm, "auto")
        with kernels.joined(glm):  # the compiled step's joins: add + norm, then the block adds the residual
            joined = glm(ids)
        assert "add_norm" in calls and "block + residual" in calls
        assert mx.allclose(joined, glm(ids), atol=1e-4).item()
        assert kernels.patch(qwen, "fused") == len(kernels.switch_layers(qwen))
        qwen(mx.array([prompt]))
        assert "pairs" in calls
    finally:
        kernels.patch(glm, "stock")
        kernels.patch(qwen, "stock")


def test_add_norm_and_router_join_where_the_backend_has_it(monkeypatch):
    """Under ``kernels.joined`` a decoder layer with a fused MoE block hands the add, the norm and the
    router to the backend's ``add_norm_router`` where it has one (and ``layer.JOIN_ROUTER``), and its
    block takes that routing: outputs as mlx-lm's (a CPU stand-in computing the reference)."""
    from moedec.kernels import layer
    from moedec.testing import tiny_moe

    calls = []
    moe, add_norm = _reference_block_ops(calls)

    def add_norm_router(gate, x, r, w, eps):
        calls.append("add_norm_router")
        n = mx.fast.rms_norm(x + r, w, eps)
        return (x + r, n, *gate(n))

    def router(gate, x):
        calls.append("router")
        return gate(x)

    fake = kernels.Backend(why_not=lambda sw, x, i: None, switch_glu=None, moe=moe,
                           why_not_shared=lambda sw, sh: None, why_not_router=lambda g, x: None, router=router,
                           why_not_add_norm=lambda x, r, w: None, add_norm=add_norm,
                           why_not_add_norm_router=lambda g, x, r, w: None, add_norm_router=add_norm_router)
    _use_stand_in(monkeypatch, fake)
    glm = tiny_moe("glm4_moe")
    ids = mx.array([[3, 1, 4, 1, 5]])
    ref = glm(ids)
    kernels.patch(glm, "auto")
    try:
        blocks = len(kernels.moe_blocks(glm))
        for join in (True, False):
            monkeypatch.setattr(layer, "JOIN_ROUTER", join)
            calls.clear()
            with kernels.joined(glm):
                got = glm(ids)
            joined = calls.count("add_norm_router")
            assert (joined, calls.count("router"), calls.count("block + residual")) == ((blocks, 0, blocks) if join else (0, blocks, blocks))
            assert mx.allclose(got, ref, atol=1e-4).item()
    finally:
        kernels.patch(glm, "stock")


@pytest.mark.parametrize("bits,group,d,n,dtype,path", [
    (4, 64, 4096, 1536, "bfloat16", "_mma"),  # the synthetic GLM model
    (4, 128, 7168, 2048, "float16", "_mma"),  # DeepSeek-V3 widths
    (4, 64, 2048, 1408, "bfloat16", ""),  # 1408 inputs per down row: no whole 256-input slices
    (8, 64, 4096, 1536, "bfloat16", ""),
    (4, 64, 4096, 1536, "float32", ""),
])
def test_expert_kernel_choice_and_shared_memory(bits, group, d, n, dtype, path):
    """Which kernels run a shape, and a shared-memory request MLX honours: above 48000 bytes (MLX
    opts a kernel in to more than 48 KB only then; static tables plus rings exceed 48 KB) and within
    the budget."""
    from moedec.kernels import fused

    rings = set()
    for tokens in range(1, fused.MAX_TOKENS + 1):
        ek = fused.expert_kernels(getattr(mx, dtype), mx.bfloat16, bits, d, n, group, tokens)
        assert (ek.gate_up_name, ek.down_name) == ("gate_up" + path, "down" + path)
        assert ek.fits
        for smem in (ek.gate_up_smem, ek.down_smem):
            assert fused.OPT_IN <= smem <= max(fused.SMEM_BUDGET, fused.OPT_IN)
        if path:
            gate_up = dict(ek.gate_up)
            assert gate_up["GROUP"] == group and d % gate_up["KS"] == 0 and n % dict(ek.down)["KS"] == 0
            ring = max(r for r in fused.GATE_UP_RING if r[0] <= tokens)  # the ring row for this many tokens
            assert (gate_up["KS"], gate_up["STAGES"]) == ring[1:]
            rings.add(ring)
    assert not path or rings == set(fused.GATE_UP_RING)


@pytest.mark.skipif(__import__("shutil").which("nvcc") is None, reason="needs nvcc")
@pytest.mark.parametrize("bits,group,d,n,dtype,path", [
    (4, 64, 512, 768, "bfloat16", "_mma"),  # tensor cores: slices of 512 and 256 inputs
    (4, 32, 1024, 512, "float16", "_mma"),
    (4, 128, 512, 256, "bfloat16", "_mma"),
    (4, 64, 512, 384, "bfloat16", ""),  # 384 inputs per down row: no whole slices, CUDA cores
    (4, 64, 512, 768, "float32", ""),
    (8, 64, 512, 384, "bfloat16", ""),
])
def test_kernel_sources_compile_for_hopper_without_spills(bits, group, d, n, dtype, path):
    """The CUDA sources as mx.fast.cuda_kernel assembles them compile for sm_90a (a CUDA error shows
    up here, before any GPU run) and keep everything in registers, on both kernel paths."""
    from moedec.kernels.resources import resources, variants

    for name, (source, _) in variants(bits, d, n, 16, 4, group, getattr(mx, dtype)).items():
        if name in ("gate_up", "down"):
            assert f"void {name}{path}(" in source
        report = resources(source)
        assert "Used" in report and "registers" in report, f"{name}: {report}"
        assert " 0 bytes stack frame, 0 bytes spill stores" in report, f"{name} spills: {report}"


@pytest.mark.skipif(__import__("shutil").which("nvcc") is None, reason="needs nvcc")
@pytest.mark.parametrize("name", ["attention", "attention_write", "attention_qkv"])
def test_decode_attention_kernels_compile_for_hopper_without_spills(name):
    """The decode-attention kernels (reading the cache, writing the new one, and taking the joined
    q/k/v row before RoPE) compile for sm_90a as MLX assembles them, with everything in registers."""
    from moedec.kernels.ops import attention_template
    from moedec.kernels.resources import kernel_dtypes, kernel_source, resources

    for dtype, d, h, hkv in ((mx.bfloat16, 128, 32, 8), (mx.float32, 64, 4, 4), (mx.float16, 32, 8, 2)):
        template = attention_template(dtype, d, h, hkv)
        if name == "attention_qkv":
            template += [("R", d // 2), ("TRAD", dtype == mx.float32)]
        report = resources(kernel_source(name, template, kernel_dtypes(dtype)))
        assert "Used" in report and " 0 bytes stack frame, 0 bytes spill stores" in report, f"{name} {dtype} {d}: {report}"


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,d,h,hkv", [(mx.bfloat16, 128, 32, 8), (mx.float32, 64, 4, 4), (mx.float16, 32, 8, 2)])
def test_decode_attention_equals_sdpa_over_the_valid_positions(dtype, d, h, hkv):
    """The compiled step's attention: positions 0..offset of a fixed-capacity cache, the rest (NaN
    here) ignored, as MLX's attention over exactly those positions computes it. The variant that
    takes the new token's key and value apart from the cache gives the same bits and writes them at
    position offset of the cache it was given, in place, leaving every other row as it was."""
    from moedec.kernels.ops import decode_attention, decode_attention_write, why_not_decode_attention

    c = 300  # several runs of positions per warp
    q = mx.random.normal((1, h, 1, d), key=mx.random.key(1)).astype(dtype)
    k = mx.random.normal((1, hkv, c, d), key=mx.random.key(2)).astype(dtype)
    v = mx.random.normal((1, hkv, c, d), key=mx.random.key(3)).astype(dtype)
    assert why_not_decode_attention(q, k) is None
    for offset in (0, 1, 17, 63, 64, 130, c - 1):
        past = mx.arange(c)[:, None] > offset  # [C, 1]: positions not written yet
        kp, vp = mx.where(past, float("nan"), k).astype(dtype), mx.where(past, float("nan"), v).astype(dtype)
        got = decode_attention(q, kp, vp, mx.array(offset, dtype=mx.int32), d**-0.5).astype(mx.float32)
        n = offset + 1
        ref = mx.fast.scaled_dot_product_attention(q, k[:, :, :n], v[:, :, :n], scale=d**-0.5).astype(mx.float32)
        tol = 1e-5 if dtype == mx.float32 else 1e-2
        assert mx.allclose(got, ref, atol=tol, rtol=tol).item(), (offset, float(mx.abs(got - ref).max()))
        stale = mx.arange(c)[:, None] == offset  # [C, 1]: the new position, not yet in the cache
        noise = mx.random.normal(k.shape, key=mx.random.key(4 + offset)).astype(dtype)
        kw, vw = mx.where(stale, noise, kp), mx.where(stale, noise, vp)
        mx.eval(kw, vw)  # the cache the kernel writes into (its own buffers)
        o, kc, vc = decode_attention_write(q, kw, vw, k[:, :, offset:offset + 1], v[:, :, offset:offset + 1],
                                           mx.array(offset, dtype=mx.int32), d**-0.5)
        mx.eval(o)
        assert kc is kw and vc is vw
        assert mx.array_equal(o.astype(mx.float32), got).item(), offset
        assert mx.array_equal(kc[:, :, :n], k[:, :, :n]).item() and mx.array_equal(vc[:, :, :n], v[:, :, :n]).item(), offset
        assert mx.isnan(kc[:, :, n:]).all().item() and mx.isnan(vc[:, :, n:]).all().item(), offset  # left as they were


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,d,h,hkv,dims,traditional", [(mx.bfloat16, 128, 32, 8, 64, False),
                                                             (mx.float32, 64, 4, 4, 64, True),
                                                             (mx.float16, 32, 8, 2, 16, False)])
def test_decode_attention_qkv_equals_rope_then_the_writing_kernel(dtype, d, h, hkv, dims, traditional):
    """The kernel that takes the joined q/k/v row before RoPE: the same output and cache bits as
    mlx.nn.RoPE on the query and key heads followed by decode_attention_write (float32: within an
    ulp or so of them), both writing the new row into the cache they are given, in place."""
    import mlx.nn as nn

    from moedec.kernels.ops import decode_attention_qkv, decode_attention_write, rope_spec, why_not_attention_qkv

    c = 300
    qkv = mx.random.normal((1, 1, h + 2 * hkv, d), key=mx.random.key(1)).astype(dtype)
    k = mx.random.normal((1, hkv, c, d), key=mx.random.key(2)).astype(dtype)
    v = mx.random.normal((1, hkv, c, d), key=mx.random.key(3)).astype(dtype)
    rope = nn.RoPE(dims, traditional=traditional, base=1e6 if traditional else 1e4, scale=0.5 if traditional else 1.0)
    assert why_not_attention_qkv(qkv, k, h, rope_spec(rope)) is None
    heads = qkv.transpose(0, 2, 1, 3)  # [1, H + 2 HKV, 1, D]
    for offset in (0, 1, 17, 130, c - 1):
        at = mx.array(offset, dtype=mx.int32)
        q, kn, vn = rope(heads[:, :h], offset=at), rope(heads[:, h:h + hkv], offset=at), heads[:, h + hkv:]
        past = mx.arange(c)[:, None] > offset  # [C, 1]: positions not written yet (NaN: never read)
        kp, vp = mx.where(past, float("nan"), k).astype(dtype), mx.where(past, float("nan"), v).astype(dtype)
        kr, vr = k * 1, v * 1  # the reference's own cache, written in place too
        mx.eval(kp, vp, kr, vr, q, kn, vn)
        ref = decode_attention_write(q, kr, vr, kn, vn, at, d**-0.5)
        got = decode_attention_qkv(qkv, kp, vp, at, d**-0.5, h, rope_spec(rope))
        mx.eval(ref[0], got[0])
        n = offset + 1
        pairs = [(got[0].reshape(ref[0].shape), ref[0]), (got[1][:, :, :n], ref[1][:, :, :n]),
                 (got[2][:, :, :n], ref[2][:, :, :n])]
        assert got[0].shape == (1, 1, h * d) and got[1] is kp and got[2] is vp
        assert mx.isnan(got[1][:, :, n:]).all().item() and mx.isnan(got[2][:, :, n:]).all().item(), offset  # untouched
        if dtype == mx.float32:  # MLX's RoPE kernel is built by another compiler: the angle's last bit may differ
            assert all(mx.allclose(g, r, rtol=1e-6, atol=1e-6).item() for g, r in pairs), offset
        else:
            assert all(mx.array_equal(g, r).item() for g, r in pairs), offset


def test_decode_attention_eligibility():
    """The compiled step's attention kernel takes one query position and heads of 32..256 (pure
    Python checks; the kernel itself is checked on the GPU above)."""
    from moedec.kernels.ops import why_not_decode_attention

    q, k = mx.zeros((1, 8, 1, 128), mx.bfloat16), mx.zeros((1, 2, 64, 128), mx.bfloat16)
    assert why_not_decode_attention(q, k) is None
    assert why_not_decode_attention(mx.zeros((1, 8, 2, 128), mx.bfloat16), k) is not None  # two positions
    assert why_not_decode_attention(q, k.astype(mx.float16)) is not None
    assert why_not_decode_attention(mx.zeros((1, 8, 1, 48), mx.bfloat16), mx.zeros((1, 2, 64, 48), mx.bfloat16)) is not None
    # 96 = 3 * 32: a lane's three elements are no aligned load (the kernel does not compile)
    assert why_not_decode_attention(mx.zeros((1, 8, 1, 96), mx.bfloat16), mx.zeros((1, 2, 64, 96), mx.bfloat16)) is not None


def test_router_eligibility():
    """The router kernel takes decode and verify forwards; prefill keeps mlx-lm's gate (one block
    selects for every token). Pure Python checks."""
    from moedec.kernels.fused import MAX_TOKENS
    from moedec.kernels.router import why_not_router

    gate = _glm_block(bits=None, dtype=mx.bfloat16).gate
    assert why_not_router(gate, mx.zeros((1, MAX_TOKENS, 128), mx.bfloat16)) is None
    assert "prefill" in why_not_router(gate, mx.zeros((1, MAX_TOKENS + 1, 128), mx.bfloat16))
    assert why_not_router(gate, mx.zeros((1, 1, 64), mx.bfloat16)) is not None  # not the router's width
    from moedec.kernels.router import why_not_add_norm_router

    one, two, w = mx.zeros((1, 1, 128), mx.bfloat16), mx.zeros((1, 2, 128), mx.bfloat16), mx.ones((128,), mx.bfloat16)
    assert why_not_add_norm_router(gate, one, one, w) is None  # decode: add + norm + router in one kernel
    assert "apart are faster" in why_not_add_norm_router(gate, two, two, w)
    wide = _glm_block(bits=None, dtype=mx.bfloat16, n_routed_experts=600).gate  # the selection's tables would not fit
    assert "at most 512 experts" in why_not_router(wide, one)


def test_no_small_kernel_input_lands_in_mlxs_host_pool(monkeypatch):
    """MLX keeps arrays of at most 8 bytes in one unified-memory pool that the host reads too, and a
    kernel reaches them across the bus (docs/benchmarks.md, session 8: an atomic counter there cost
    ~20 us per router launch). Every input of the small kernels (their scalars, the router's block
    counter, the offset as the compiled step passes it) is larger. Launches are recorded, not run."""
    import mlx.nn as nn

    from moedec import compiled
    from moedec.kernels import ops, router

    launched = []

    def recorder(name, shared_memory=0):
        def launch(inputs, output_shapes, output_dtypes, **_):
            launched.append((name, inputs))
            return [mx.zeros(shape, dtype) for shape, dtype in zip(output_shapes, output_dtypes)]
        return launch

    monkeypatch.setattr(ops, "_kernel", recorder)
    monkeypatch.setattr(router, "_kernel", recorder)
    bf = mx.bfloat16
    cache = compiled.StaticKVCache(mx.zeros((1, 2, 16, 32), bf), mx.zeros((1, 2, 16, 32), bf),
                                   {"offset": compiled.offset_array(3)})
    at = cache.kernel_offset
    assert at.dtype == mx.int32 and at[0].item() == 3 and at is cache.pos["offset"]  # the state itself, no op
    assert cache.offset.shape == () and cache.offset.item() == 3
    q, k, one = mx.zeros((1, 4, 1, 32), bf), cache.state["keys"], mx.zeros((1, 2, 1, 32), bf)
    ops.add_rms_norm(mx.zeros((1, 64), bf), mx.zeros((1, 64), bf), mx.ones((64,), bf), 1e-5)
    ops.decode_attention(q, k, k, at, 0.1)
    ops.decode_attention_write(q, k, k, one, one, at, 0.1)
    ops.decode_attention_qkv(mx.zeros((1, 1, 8, 32), bf), k, k, at, 0.1, 4, ops.rope_spec(nn.RoPE(16)))
    router.fused_router(_glm_block(bits=None, dtype=bf).gate, mx.zeros((1, 1, 128), bf))
    x128 = mx.zeros((1, 1, 128), bf)
    router.add_norm_router(_glm_block(bits=None, dtype=bf).gate, x128, x128, mx.ones((128,), bf), 1e-5)
    assert {name for name, _ in launched} == {"add_norm", "attention", "attention_write", "attention_qkv", "router",
                                              "router_norm"}
    for name, inputs in launched:
        assert all(a.nbytes > 8 for a in inputs), (name, [(a.shape, a.dtype) for a in inputs if a.nbytes <= 8])


def test_rope_kernel_gets_the_log2_of_the_base_that_mlx_computes(monkeypatch):
    """MLX's RoPE kernel gets std::log2(float(base)) from the host; the joined attention kernel gets
    the same float32 (checked against the C library's log2f, for a base where numpy's float32 log2
    is one ulp off), so both rotate by the same angles."""
    import ctypes
    import ctypes.util

    import mlx.nn as nn

    from moedec.kernels import ops

    libm = ctypes.util.find_library("m")
    if libm is None:
        pytest.skip("no C math library")
    log2f = ctypes.CDLL(libm).log2f
    log2f.restype, log2f.argtypes = ctypes.c_float, [ctypes.c_float]
    got = []
    monkeypatch.setattr(ops, "_kernel", lambda name: lambda inputs, **_: got.append(inputs[5]) or [None])  # the kernel has one output, o
    k = mx.zeros((1, 2, 16, 32), mx.bfloat16)
    for base in (1e4, 1e6, 91369088.0):
        ops.decode_attention_qkv(mx.zeros((1, 1, 8, 32), mx.bfloat16), k, k, mx.zeros((4,), mx.int32), 0.1, 4,
                                 ops.rope_spec(nn.RoPE(16, base=base)))
        assert got[-1].tolist()[:2] == [log2f(float(np.float32(base))), 1.0], base
    assert np.log2(np.float32(91369088.0)) != np.float32(log2f(91369088.0))  # the case numpy gets wrong


def test_joined_attention_kernel_eligibility():
    """decode_attention_qkv takes a plain mlx.nn.RoPE of an even number of dimensions up to the head
    size, and one position of exactly the cache's heads (pure Python checks)."""
    import mlx.nn as nn
    from mlx_lm.models.rope_utils import Llama3RoPE

    from moedec.kernels.ops import rope_spec, why_not_attention_qkv

    k = mx.zeros((1, 2, 64, 128), mx.bfloat16)
    spec = rope_spec(nn.RoPE(64, base=1e4))
    assert spec == (64, False, 1e4, 1.0)
    assert why_not_attention_qkv(mx.zeros((1, 1, 12, 128), mx.bfloat16), k, 8, spec) is None
    assert rope_spec(Llama3RoPE(64, 8192, False, 1e4, {"factor": 8.0})) is None  # its own frequencies
    assert why_not_attention_qkv(mx.zeros((1, 1, 12, 128), mx.bfloat16), k, 8, None) is not None
    assert why_not_attention_qkv(mx.zeros((1, 2, 12, 128), mx.bfloat16), k, 8, spec) is not None  # two positions
    assert why_not_attention_qkv(mx.zeros((1, 1, 14, 128), mx.bfloat16), k, 8, spec) is not None  # not H + 2 Hkv rows
    assert why_not_attention_qkv(mx.zeros((1, 1, 12, 128), mx.bfloat16), k, 8, (130, False, 1e4, 1.0)) is not None
    assert why_not_attention_qkv(mx.zeros((1, 1, 12, 128), mx.float16), k, 8, spec) is not None  # dtypes differ


@pytest.mark.skipif(__import__("shutil").which("nvcc") is None, reason="needs nvcc")
def test_kernel_harness_builds(tmp_path):
    """examples/kernel_harness/build.py turns the working tree's tensor-core kernels (experts and the
    dense kernel) and a revision's into a standalone CUDA-event timer (what docs/benchmarks.md's
    kernel-by-kernel tables ran)."""
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "kernel_harness" / "build.py"
    spec = importlib.util.spec_from_file_location("harness_build", script)
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    probes = sorted(build.PROBES)  # every probe: their substitutions must still apply to the kernels
    run = subprocess.run([sys.executable, str(script), "--rev", "HEAD", *(a for p in probes for a in ("--probe", p)),
                          "-o", str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "work (working tree): Used" in run.stdout
    assert all(f"{p} (probe {p}): Used" in run.stdout for p in probes)
    source = (tmp_path / "work.cu").read_text()
    assert all(f"work{t}_gate_up_mma(" in source for t, *_ in build.fused.GATE_UP_RING) and "work_down_mma(" in source
    dense = (tmp_path / "dense.cu").read_text()
    assert all(f"dense_{shape}_work_s{s}_dense_mma(" in dense for shape in build.DENSE_SHAPES for s in build.SPLITS)
    assert "dense_qkv_r0_s" in dense and '"work s2*"' in (tmp_path / "variants.inc").read_text()  # q/k/v's own split
    assert (tmp_path / "harness").stat().st_size > 0
