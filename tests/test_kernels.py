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
    assert mx.allclose(got, ref, atol=1e-4, rtol=1e-3).item()  # GPU matmuls may differ in the last bits


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
    assert "bits" in why_not_fused(make_switch(bits=2, group=64), x, idx)


# -- GPU ------------------------------------------------------------------------------------------


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_fused_matches_reference(bits, group, dtype):
    """Each (bits, group, dtype, MAXC) variant is JIT-compiled once: keep the T list short."""
    from moedec.kernels.fused import fused_switch_glu

    sw = make_switch(d=512, n=384, e=16, bits=bits, group=group, dtype=dtype)
    rng = np.random.default_rng(bits * group)
    for t in (1, 3, 8, 16):
        k = 4
        # random routings with repeats across tokens: experts drawn from a small pool
        idx = mx.array(np.stack([rng.choice(6, size=k, replace=False) for _ in range(t)]).astype(np.uint32))[None]
        x = (mx.random.normal((1, t, 512)) * 0.5).astype(dtype)
        ref = SwitchGLU.__call__(sw, x, idx).astype(mx.float32)
        got = fused_switch_glu(sw, x, idx).astype(mx.float32)
        tol = 2e-2 * float(mx.abs(ref).max()) + 1e-3
        err = float(mx.abs(got - ref).max())
        assert err <= tol, f"T={t} bits={bits} group={group} {dtype}: max error {err} > {tol}"


@gpu
@pytest.mark.gpu
def test_fused_kernel_is_lossless_end_to_end():
    """float32 activations and scales, so the near-tie rule of DESIGN.md applies as on CPU."""
    from moedec.synthetic import synthetic_glm
    from moedec.testing import compare_greedy, oracle_greedy

    model = synthetic_glm(scale=0.125, num_hidden_layers=3, dtype=mx.float32)
    kernels.patch(model, "stock")
    prompts = [[1, 2, 3, 4], [7] * 9, list(range(100, 140))]
    refs = [oracle_greedy(model, p, 24) for p in prompts]  # stock mlx-lm path
    assert kernels.patch(model, "fused") > 0
    try:
        for p, ref in zip(prompts, refs):
            got = moedec.generate(model, p, max_tokens=24, eos_token_ids=[])
            div = compare_greedy(ref, got.tokens, atol=1e-4)
            assert div is None or div.near_tie, div.describe()
    finally:
        kernels.patch(model, "stock")
