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
    now, later = (compiled.StaticKVCache(keys, values, {"offset": mx.array(3, dtype=mx.int32)}) for _ in range(2))
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
