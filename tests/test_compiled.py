"""The compiled single-token step (moedec.compiled): same tokens and same cache as the plain step."""

import mlx.core as mx
import pytest

import moedec
from moedec import compiled
from moedec.testing import compare_greedy, oracle_greedy, tiny_moe

PROMPTS = [[1, 2, 3, 4, 5], [9] * 12]


@pytest.mark.parametrize("arch", sorted(compiled.COMPILABLE))
def test_compiled_step_decodes_like_mlx_lm(arch, monkeypatch):
    monkeypatch.setattr(compiled, "CHUNK", 8)  # the buffers grow (and the step is traced again) often
    _assert_compiled_decodes_like_mlx_lm(tiny_moe(arch), 30)


def _assert_compiled_decodes_like_mlx_lm(model, tokens: int) -> None:
    for p in PROMPTS:
        dec = moedec.stream_generate(model, p, max_tokens=tokens, eos_token_ids=[], compile_step=True)
        got = [t for chunk in dec for t in chunk.tokens]
        assert dec.compile_reason is None
        div = compare_greedy(oracle_greedy(model, p, tokens), got, atol=1e-4)
        assert div is None or div.near_tie, div.describe()


def test_cache_written_back_equals_the_plain_one():
    model = tiny_moe("glm4_moe")
    caches = {}
    for on in (False, True):
        dec = moedec.stream_generate(model, PROMPTS[0], max_tokens=20, eos_token_ids=[], compile_step=on)
        for _ in dec:
            pass
        caches[on] = dec.state.cache
    for plain, comp in zip(caches[False], caches[True]):
        assert comp.offset == plain.offset == len(PROMPTS[0]) + 19  # the last token is not fed back
        n = plain.offset
        assert mx.allclose(comp.keys[..., :n, :], plain.keys[..., :n, :], atol=1e-5).item()
        assert mx.allclose(comp.values[..., :n, :], plain.values[..., :n, :], atol=1e-5).item()


def test_uncompilable_models_and_failed_traces_take_the_plain_step(monkeypatch):
    model = tiny_moe("glm4_moe")
    ref = moedec.generate(model, PROMPTS[1], max_tokens=12, eos_token_ids=[]).tokens
    monkeypatch.setattr(compiled, "COMPILABLE", frozenset())
    dec = moedec.stream_generate(model, PROMPTS[1], max_tokens=12, eos_token_ids=[], compile_step=True)
    assert tuple(t for c in dec for t in c.tokens) == tuple(ref)
    assert "not among the compilable" in dec.compile_reason
    monkeypatch.setattr(compiled, "COMPILABLE", frozenset({"glm4_moe"}))

    def broken(self, n, return_array=False, window_size=None):
        raise RuntimeError("no mask here")

    monkeypatch.setattr(compiled.StaticKVCache, "make_mask", broken)
    dec = moedec.stream_generate(model, PROMPTS[1], max_tokens=12, eos_token_ids=[], compile_step=True)
    assert tuple(t for c in dec for t in c.tokens) == tuple(ref)
    assert dec.compile_reason.startswith("tracing failed: RuntimeError")


def test_on_by_default_with_cuda_only():
    from moedec.kernels import device_backend

    dec = moedec.stream_generate(tiny_moe("glm4_moe"), PROMPTS[0], max_tokens=4, eos_token_ids=[])
    for _ in dec:
        pass
    assert dec.compile_reason == (None if device_backend() == "cuda" else "compile_step is off")


@pytest.mark.parametrize("arch", ["glm4_moe", "qwen3_moe"])
def test_compiled_step_with_wide_heads_decodes_like_mlx_lm(arch, monkeypatch):
    """Heads of 32: on CUDA the compiled step's attention is moedec's decode-attention kernel over
    the fixed-capacity cache (elsewhere the masked attention); tokens as mlx-lm's."""
    monkeypatch.setattr(compiled, "CHUNK", 16)
    _assert_compiled_decodes_like_mlx_lm(tiny_moe(arch, head_dim=32, num_attention_heads=4, num_key_value_heads=2), 24)


def test_a_deferred_cache_write_equals_the_select():
    """The write the CUDA attention kernel takes over (``defer``) and, for a call it cannot take,
    ``write_pending``: the same cache as the select writes at once."""
    keys = mx.random.normal((1, 2, 8, 4), key=mx.random.key(0))
    values = mx.random.normal((1, 2, 8, 4), key=mx.random.key(1))
    new_keys, new_values = mx.ones((1, 2, 1, 4)), 2 * mx.ones((1, 2, 1, 4))
    now, later = (compiled.StaticKVCache(keys, values, {"offset": compiled.offset_array(3)}) for _ in range(2))
    now.update_and_fetch(new_keys, new_values)
    later.defer = True
    got = later.update_and_fetch(new_keys, new_values)
    assert got[0] is keys and got[1] is values and later.pending is not None  # nothing written yet
    later.write_pending()
    assert later.pending is None
    for name in ("keys", "values"):
        assert mx.array_equal(later.state[name], now.state[name]).item()
    assert mx.array_equal(now.state["keys"][:, :, 3:4], new_keys).item()


def test_a_deferred_write_no_attention_takes_fails_the_trace(monkeypatch):
    """If no attention call takes a layer's deferred write, the trace fails (the engine then decodes
    with the plain step) instead of leaving the cache without the new position."""
    import contextlib

    @contextlib.contextmanager
    def defer_only(model, layers):  # the layers defer, but the attention is the stock one
        for c in layers:
            c.defer = True
        try:
            yield
        finally:
            for c in layers:
                c.defer = False

    monkeypatch.setattr(compiled, "_decode_attention", defer_only)
    model = tiny_moe("glm4_moe")
    ref = moedec.generate(model, PROMPTS[1], max_tokens=12, eos_token_ids=[]).tokens
    dec = moedec.stream_generate(model, PROMPTS[1], max_tokens=12, eos_token_ids=[], compile_step=True)
    assert tuple(t for c in dec for t in c.tokens) == tuple(ref)
    assert "deferred cache write was not taken" in dec.compile_reason


def test_every_trace_takes_the_kernel_path_and_reads_no_row_past_the_offset(monkeypatch):
    """The compiled step as on CUDA, with the attention kernel replaced by an MLX reference that
    leaves NaN in the cache rows past the new position (rows no step may read). Token ids come as
    int32 first and uint32 after (``mx.array([[t]])``, then argmax): one trace, every step's logits
    equal to the plain step's. A trace taken outside the kernel path (it was, on mx.compile's second
    trace for the new dtype) attends over the whole cache through mlx-lm's attention: NaN."""
    from mlx_lm.models.cache import make_prompt_cache

    from moedec import kernels
    from moedec.kernels import ops

    from helpers import quantized_glm

    def reference_qkv(qkv, keys, values, offset, scale, heads, rope):  # as ops.decode_attention_qkv
        b, _, _, d = qkv.shape
        hkv, c = keys.shape[1], keys.shape[2]
        dims, traditional, base, rope_scale = rope
        at = offset[0]
        x = qkv.transpose(0, 2, 1, 3)  # [B, H + 2 Hkv, 1, D]
        q, k = (mx.fast.rope(x[:, a:z], dims, traditional=traditional, base=base, scale=rope_scale, offset=at)
                for a, z in ((0, heads), (heads, heads + hkv)))
        pos = mx.arange(c)[:, None]  # [C, 1]
        kc = mx.where(pos == at, k, keys)
        vc = mx.where(pos == at, x[:, heads + hkv:], values)
        seen = pos <= at
        o = mx.fast.scaled_dot_product_attention(q, mx.where(seen, kc, 0), mx.where(seen, vc, 0), scale=scale,
                                                 mask=seen.reshape(1, 1, 1, c))
        nan = mx.array(float("nan"), keys.dtype)
        return o.transpose(0, 2, 1, 3).reshape(b, 1, heads * d), mx.where(seen, kc, nan), mx.where(seen, vc, nan)

    monkeypatch.setattr(kernels, "device_backend", lambda: "cuda")
    monkeypatch.setattr(ops, "decode_attention_qkv", reference_qkv)
    monkeypatch.setattr(ops, "why_not_attention_qkv", lambda *a: None)
    model = quantized_glm(use_qk_norm=False)
    prompt = [1, 2, 3, 4]
    ref_cache, cache = make_prompt_cache(model), make_prompt_cache(model)
    for c in (ref_cache, cache):
        mx.eval(model(mx.array([prompt]), cache=c))
    steps = compiled.CompiledSteps(model, cache)
    y = mx.array([[7]], dtype=mx.int32)
    for _ in range(4):
        got = steps(y)
        ref = model(y, cache=ref_cache)[:, -1, :]
        assert mx.isfinite(got).all().item() and mx.allclose(got, ref, atol=1e-4, rtol=1e-4).item()
        y = mx.argmax(got, axis=-1).reshape(1, 1)  # uint32
    assert steps.traces == 1


def _steps_logits(model, prompt, n, reuse=True):
    """``n`` compiled greedy steps after ``prompt``: (the CompiledSteps, closed; the logits)."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([prompt]), cache=cache))
    steps = compiled.CompiledSteps(model, cache, reuse=reuse)
    y, out = mx.array([[prompt[-1]]], dtype=mx.uint32), []
    for _ in range(n):
        out.append(steps(y))
        y = mx.argmax(out[-1], axis=-1).reshape(1, 1)
    steps.close()
    return steps, out


def test_a_closed_step_is_taken_again_by_the_next_generation_of_the_same_model(monkeypatch):
    """``reuse``: the next ``CompiledSteps`` of the same model and capacity replays the closed one's
    trace (no new trace), with its own cache; the logits are those of a freshly traced step. A
    changed parameter, or another kernel setting, is traced again; the kept trace holds no cache."""
    monkeypatch.setattr(compiled, "CHUNK", 16)
    model = tiny_moe("glm4_moe")
    first, a = _steps_logits(model, [1, 2, 3], 6)
    assert first.traces == 1
    kept = compiled._KEPT[id(model)]
    assert len(kept) == 1 and all(c.state["keys"] is None for c in kept[0][1].layers)
    again, b = _steps_logits(model, [1, 2, 3], 6)
    fresh, c = _steps_logits(model, [1, 2, 3], 6, reuse=False)
    assert (again.traces, fresh.traces) == (0, 1)
    for x, y, z in zip(a, b, c):
        assert mx.array_equal(x, y).item() and mx.array_equal(y, z).item()
    other, d = _steps_logits(model, [4, 5, 6, 7, 8, 9], 14)  # another prompt, across a growth (16 -> 32)
    assert other.traces == 1  # capacity 16 kept, 32 traced
    assert len(compiled._KEPT[id(model)]) == 2
    monkeypatch.setattr(compiled, "FUSED_ROPE", False)
    assert _steps_logits(model, [1, 2, 3], 2)[0].traces == 1
    monkeypatch.setattr(compiled, "FUSED_ROPE", True)
    layer = model.layers[1].mlp.switch_mlp.down_proj
    layer.weight = layer.weight * 2
    changed, e = _steps_logits(model, [1, 2, 3], 6)
    assert changed.traces == 1 and not mx.array_equal(e[1], b[1]).item()
    assert [k[0][0][0][2] for k, _ in compiled._KEPT[id(model)]] == [16]  # the stale ones are gone
    compiled.clear_traces()
    assert not compiled._KEPT


def test_generations_of_one_model_share_the_compiled_step(monkeypatch):
    """The engine keeps its compiled step for the next generation: tokens as without it."""
    taken = []
    acquire = compiled._acquire
    monkeypatch.setattr(compiled, "_acquire", lambda model, key: taken.append(acquire(model, key)) or taken[-1])
    model = tiny_moe("glm4_moe")
    runs = [moedec.generate(model, p, max_tokens=10, eos_token_ids=[], compile_step=True).tokens for p in PROMPTS * 2]
    assert runs[:2] == runs[2:]
    assert taken[0] is None and all(t is not None for t in taken[1:])


def test_patching_again_keeps_the_joined_qkv_weights_until_they_change():
    """``kernels.patch`` drops a module's kernel plan only when its weights changed: the q/k/v
    projections are joined once, not again on every generation."""
    from moedec import kernels

    from helpers import quantized_glm

    model = quantized_glm(use_qk_norm=False)
    attn = model.model.layers[0].self_attn
    with kernels.joined(model):
        plan = attn._moedec_plan
    kernels.patch(model, "stock")
    weight = attn.q_proj.weight  # a view of the joined array
    with kernels.joined(model):
        assert attn._moedec_plan is plan and attn.q_proj.weight is weight
    q = attn.q_proj
    q.scales = q.scales * 1  # new weights for the projection
    kernels.patch(model, "stock")
    with kernels.joined(model):
        assert attn._moedec_plan is not plan
        assert mx.array_equal(attn._moedec_plan.scales, plan.scales).item()
