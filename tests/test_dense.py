"""The dense 4-bit linear kernel (moedec.kernels.dense): eligibility and patching on CPU, the
kernel against MLX's quantized matmul on the GPU."""

import mlx.core as mx
import mlx.nn as nn
import pytest

from moedec import kernels
from moedec.kernels import dense
from moedec.kernels.dense import (patch_linears, qlinear, qlinear_norm, quantized_linears, why_not_dense,
                                  why_not_dense_norm)
from helpers import quantized_glm

on_gpu = kernels.device_backend() == "cuda"


def quantized(din, nout, dtype=mx.bfloat16, group=64, bits=4, seed=0):
    w = (mx.random.normal((nout, din), key=mx.random.key(seed)) * din**-0.5).astype(dtype)
    return mx.quantize(w, group_size=group, bits=bits)


def test_dense_eligibility_reasons():
    """Shape, dtype and quantization checks come before the device check, so they hold on any machine."""
    w, s, b = quantized(512, 272)
    x = mx.zeros((3, 512), mx.bfloat16)
    reason = why_not_dense(x, w, s, b, 4, 64)
    assert reason is None if on_gpu else reason == "needs MLX's CUDA backend"
    assert "4-bit" in why_not_dense(x, *quantized(512, 272, bits=8), 8, 64)
    assert "4-bit" in why_not_dense(x, w, s, None, 4, 64)
    assert "dtype" in why_not_dense(x.astype(mx.float32), w, s, b, 4, 64)
    assert "dtype" in why_not_dense(x, w, s.astype(mx.float16), b, 4, 64)
    assert "tokens" in why_not_dense(mx.zeros((17, 512), mx.bfloat16), w, s, b, 4, 64)
    assert "wide" in why_not_dense(mx.zeros((1, 256), mx.bfloat16), w, s, b, 4, 64)
    assert "multiple of 16" in why_not_dense(x, *quantized(512, 264), 4, 64)  # 264 rows
    w3, s3, b3 = quantized(384, 64)  # 384 inputs: no whole 256-input slices
    assert "multiple of 256" in why_not_dense(mx.zeros((1, 384), mx.bfloat16), w3, s3, b3, 4, 64)


def test_dense_norm_eligibility_reasons():
    """The joined input norm takes an RMSNorm of the activations' width and dtype and at most
    NORM_TOKENS tokens, on top of the dense kernel's own conditions."""
    w, s, b = quantized(512, 272)
    x = mx.zeros((2, 512), mx.bfloat16)
    norm = nn.RMSNorm(512)
    norm.set_dtype(mx.bfloat16)
    reason = why_not_dense_norm(x, norm, w, s, b, 4, 64)
    assert reason is None if on_gpu else reason == "needs MLX's CUDA backend"
    if on_gpu:
        assert "RMSNorm" in why_not_dense_norm(x, nn.LayerNorm(512), w, s, b, 4, 64)
        assert "RMSNorm" in why_not_dense_norm(x, nn.RMSNorm(512), w, s, b, 4, 64)  # a float32 weight
        many = mx.zeros((dense.NORM_TOKENS + 1, 512), mx.bfloat16)
        assert "tokens" in why_not_dense_norm(many, norm, w, s, b, 4, 64)
    t, smem = dense.dense_norm_kernel(mx.bfloat16, 4096, 6144, 64)
    plain = dense.dense_kernel(mx.bfloat16, 4096, 6144, 64)
    assert t == plain[0] and smem >= dense.NORM_TOKENS * 4096 * 2 + 40960  # the ring, then the normalised tokens
    assert dense.dense_norm_kernel(mx.bfloat16, 16384, 256, 64)[1] == 0  # 4 x 16384 values do not fit


@pytest.mark.parametrize("din,group,split,want", [(4096, 64, 4, 4), (512, 32, 4, 2), (1024, 128, 8, 4), (768, 64, 4, 1)])
def test_dense_kernel_template(din, group, split, want):
    """Whole slices per warp (the split falls back to one that divides them), and a shared-memory
    request above MLX's 48 KB opt-in."""
    from moedec.kernels.fused import OPT_IN

    template, smem = dense.dense_kernel(mx.bfloat16, din, 256, group, split)
    t = dict(template)
    assert smem >= OPT_IN and din % t["KS"] == 0 and t["KS"] % group == 0
    assert (din // t["KS"]) % t["SPLIT"] == 0 and t["SPLIT"] == want  # 768 = 3 slices of 256: one warp


def test_dense_split_and_inputs_in_shared_memory():
    """Without a split asked for, the one whose busiest SM has the fewest rows to stream (DENSE_SMS SMs,
    each block's fixed cost counted): the LM head's 2000 tiles one warp each (250 blocks, not 1000 in
    four rounds), the o projection's 256 four. Inputs of up to XT tokens go to shared memory first, as
    many as fit next to the ring."""
    def kernel(din, nout):
        t, smem = dense.dense_kernel(mx.bfloat16, din, nout, 64)
        return dict(t), smem

    assert [kernel(4096, n)[0]["SPLIT"] for n in (32000, 10944, 6144, 4096)] == [1, 4, 2, 4]
    assert kernel(768, 256)[0]["SPLIT"] == 1  # 3 slices: only 1 divides them
    assert dict(dense.dense_kernel(mx.bfloat16, 4096, 32000, 64, 4)[0])["SPLIT"] == 4  # asked for
    t, smem = kernel(4096, 4096)
    ring = t["STAGES"] * 8 * (8 * t["KS"] + 2 * t["KS"])
    assert t["XT"] == dense.X_TOKENS and smem == ring + dense.X_TOKENS * 4096 * 2 <= dense.X_SMEM
    t, smem = kernel(16384, 256)
    assert t["XT"] == 1 and smem == ring + 16384 * 2


def test_patch_linears_swaps_and_restores_the_class():
    model = quantized_glm()
    layers = quantized_linears(model)
    assert layers and patch_linears(model, True) == len(layers)
    assert all(hasattr(type(m), "_moedec_dense") and isinstance(m, nn.QuantizedLinear) for m in layers)
    x = mx.random.normal((1, 2, layers[0].weight.shape[1] * 8))
    assert mx.array_equal(layers[0](x), nn.QuantizedLinear.__call__(layers[0], x)).item()  # float32: MLX's call
    assert patch_linears(model, False) == 0
    assert all(type(m) is nn.QuantizedLinear for m in layers)


def test_joined_patches_dense_layers_only_with_the_cuda_backend():
    model = quantized_glm()
    kernels.patch(model, "auto")
    try:
        with kernels.joined(model):
            patched = [hasattr(type(m), "_moedec_dense") for m in quantized_linears(model)]
        assert all(patched) if on_gpu else not any(patched)
        assert not any(hasattr(type(m), "_moedec_dense") for m in quantized_linears(model))
    finally:
        kernels.patch(model, "stock")


@pytest.mark.skipif(not on_gpu, reason="needs MLX's CUDA backend")
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,group,din,nout", [
    (mx.bfloat16, 64, 4096, 6144),  # the synthetic model's joined q/k/v
    (mx.float16, 32, 512, 272),
    (mx.bfloat16, 128, 1536, 1024),  # 6 slices: a split of 2
])
def test_dense_kernel_equals_quantized_matmul(dtype, group, din, nout):
    """Within float32-sum noise of MLX's quantized matmul for 1..16 tokens, and a token's row the same
    bits alone as among 16 (the partial dots are added in one order whatever T is)."""
    w, s, b = quantized(din, nout, dtype, group)
    x = mx.random.normal((16, din), key=mx.random.key(7)).astype(dtype)
    alone = qlinear(x[:1], w, s, b, group)
    for t in (1, 2, 7, 8, 9, 16):
        assert why_not_dense(x[:t], w, s, b, 4, group) is None
        got = qlinear(x[:t], w, s, b, group).astype(mx.float32)
        ref = mx.quantized_matmul(x[:t], w, s, b, transpose=True, group_size=group, bits=4).astype(mx.float32)
        err = float(mx.abs(got - ref).max()) / float(mx.abs(ref).max())
        assert err < 2e-2, (t, err)
        assert mx.array_equal(got[0], alone[0].astype(mx.float32)).item(), t


@pytest.mark.skipif(not on_gpu, reason="needs MLX's CUDA backend")
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,group,din,nout", [(mx.bfloat16, 64, 4096, 6144), (mx.float16, 32, 512, 272)])
def test_dense_norm_kernel_equals_rms_norm_then_the_dense_kernel(dtype, group, din, nout):
    """qlinear_norm(x) is qlinear(rms_norm(x)) for 1..NORM_TOKENS tokens: the normalised values round
    as MLX's (the sum of squares in another order may move one of them by an ulp)."""
    w, s, b = quantized(din, nout, dtype, group)
    norm = nn.RMSNorm(din, eps=1e-5)
    norm.weight = (1 + 0.1 * mx.random.normal((din,), key=mx.random.key(3))).astype(dtype)
    x = (3 * mx.random.normal((dense.NORM_TOKENS, din), key=mx.random.key(8))).astype(dtype)
    for t in range(1, dense.NORM_TOKENS + 1):
        assert why_not_dense_norm(x[:t], norm, w, s, b, 4, group) is None
        got = qlinear_norm(x[:t], norm, w, s, b, group).astype(mx.float32)
        ref = qlinear(mx.fast.rms_norm(x[:t], norm.weight, norm.eps), w, s, b, group).astype(mx.float32)
        err = float(mx.abs(got - ref).max()) / float(mx.abs(ref).max())
        assert err < 1e-2, (t, err)


def _linear(din, nout, dtype=mx.bfloat16, group=64):
    lin = nn.QuantizedLinear(din, nout, bias=False, group_size=group, bits=4)
    lin.set_dtype(dtype)
    return lin


def test_padded_plan_pads_whole_slices_with_zero_weights():
    """Rows that are not whole slices (GLM-4.5's dense MLP: 10944 inputs) get a copy padded with zero
    words, scales and biases to whole slices for each warp of a tile: the padded inputs add nothing."""
    assert dense.padded_width(10944) == 11264 and dense.padded_width(1344) == 2048
    lin = _linear(1344, 32)
    plan = dense.padded_plan(lin)
    assert plan.reason is None and plan.weight.shape == (32, 2048 // 8) and plan.scales.shape == (32, 2048 // 64)
    w = mx.dequantize(plan.weight, plan.scales, plan.biases, group_size=64, bits=4)  # [32, 2048]
    ref = mx.dequantize(lin.weight, lin.scales, lin.biases, group_size=64, bits=4)
    assert mx.array_equal(w[:, :1344], ref).item() and not mx.any(w[:, 1344:]).item()
    assert "whole slices" in dense.padded_plan(_linear(1024, 32)).reason
    x = mx.zeros((1, 1344), mx.bfloat16)
    assert "dtype" in dense.why_not_padded(_linear(1344, 32, mx.float32), x)
    reason = dense.why_not_padded(lin, x)
    assert reason is None if on_gpu else reason == "needs MLX's CUDA backend"
    assert "tokens" in dense.why_not_padded(lin, mx.zeros((dense.PAD_TOKENS + 1, 1344), mx.bfloat16))


@pytest.mark.skipif(not on_gpu, reason="needs MLX's CUDA backend")
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,group,din,nout", [(mx.bfloat16, 64, 10944, 4096), (mx.float16, 32, 1344, 272)])
def test_padded_dense_kernel_equals_quantized_matmul(dtype, group, din, nout):
    """The padded kernel's rows are MLX's quantized matmul within float32-sum noise, and a patched
    layer takes it for 1 and 2 tokens."""
    lin = _linear(din, nout, dtype, group)
    x = mx.random.normal((dense.PAD_TOKENS, din), key=mx.random.key(5)).astype(dtype)
    for t in range(1, dense.PAD_TOKENS + 1):
        assert dense.why_not_padded(lin, x[:t]) is None
        got = dense.qlinear_padded(lin, x[:t]).astype(mx.float32)
        ref = nn.QuantizedLinear.__call__(lin, x[:t]).astype(mx.float32)
        err = float(mx.abs(got - ref).max()) / float(mx.abs(ref).max())
        assert err < 2e-2, (t, err)
    patch_linears_model = nn.Sequential(lin)
    patch_linears(patch_linears_model, True)
    try:
        assert mx.allclose(lin(x[:1]).astype(mx.float32), dense.qlinear_padded(lin, x[:1]).astype(mx.float32)).item()
    finally:
        patch_linears(patch_linears_model, False)
