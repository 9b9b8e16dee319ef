"""Strategy ``batched``: every row lossless against mlx-lm's single-stream greedy decode, refill,
per-row stop conditions and settings, seeded rows independent of their batch, CLI and benchmark."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs
from typer.testing import CliRunner

import moedec
from moedec import sampling
from moedec.batch import BatchDecoder, bench_batch_sizes, make_rows
from moedec.cli import app
from moedec.testing import ARCHS, compare_greedy, default_prompts, oracle_greedy, tiny_models
from moedec.testing import st as mst
from moedec.tokenizer import ByteTokenizer


def assert_rows_lossless(model, prompts, gens, max_tokens, atol=1e-4):
    """Each row equals the oracle's greedy decode of its prompt (near-tie rule)."""
    for i, (p, g, n) in enumerate(zip(prompts, gens, max_tokens)):
        div = compare_greedy(oracle_greedy(model, p, n), g.tokens, atol)
        assert div is None or div.near_tie, f"{model.args.model_type} row {i} prompt {p}: {div.describe()}"
        assert len(g.tokens) == n and g.stats.finish_reason == "length"


# -- lossless per row, with refill ------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_rows_equal_single_stream_greedy_with_refill(arch):
    model = tiny_models()[ARCHS.index(arch)]
    prompts = default_prompts() + [[9, 8, 7, 6] * 5, [200, 201]]
    max_tokens = [8, 20, 3, 14, 11, 6, 17]  # staggered finishes: rows leave and others take their place
    done = []
    gens = moedec.generate_batch(model, prompts, batch_size=3, max_tokens=max_tokens, eos_token_ids=[],
                                 on_result=lambda i, g: done.append(i))
    assert_rows_lossless(model, prompts, gens, max_tokens)
    assert sorted(done) == list(range(len(prompts))) and done != list(range(len(prompts)))  # finished out of order
    assert all(g.stats.strategy == "batched" and g.stats.extra["batch_size"] == 3 for g in gens)


@settings(max_examples=30, deadline=None)
@given(
    data=hs.data(),
    model=mst.models(),
    n_prompts=hs.integers(1, 7),
    batch_size=hs.integers(1, 4),
)
def test_lossless_property(data, model, n_prompts, batch_size):
    prompts = [data.draw(mst.prompts(max_size=20), label=f"prompt{i}") for i in range(n_prompts)]
    max_tokens = data.draw(hs.lists(hs.integers(1, 10), min_size=n_prompts, max_size=n_prompts), label="max_tokens")
    gens = moedec.generate_batch(model, prompts, batch_size=batch_size, max_tokens=max_tokens, eos_token_ids=[])
    assert_rows_lossless(model, prompts, gens, max_tokens)


def test_batching_really_shares_forwards():
    model = tiny_models()[0]
    prompts = default_prompts()
    rows = make_rows(prompts, max_tokens=10, temperature=0.0, top_p=1.0, top_k=0, seed=0)
    dec = BatchDecoder(model, rows, batch_size=4)
    gens = dict(dec)
    # 5 rows x 9 decode tokens; with 4 rows a step and refill the steps are far fewer than tokens
    assert dec.decode_tokens == 5 * 9 and dec.steps == 18
    assert [len(gens[i].tokens) for i in range(5)] == [10] * 5
    s = dec.summary()
    assert s["decode_seconds"] > 0 and s["decode_tok_s"] > 0 and s["prefill_seconds"] > 0


def test_single_prompt_and_plain_generate_with_batched():
    model = tiny_models()[1]
    p = default_prompts()[0]
    ref = oracle_greedy(model, p, 12)
    g = moedec.generate(model, p, "batched", max_tokens=12, eos_token_ids=[])
    assert compare_greedy(ref, g.tokens) is None or compare_greedy(ref, g.tokens).near_tie
    (b,) = moedec.generate_batch(model, [p], max_tokens=12, eos_token_ids=[], batch_size=1)
    assert compare_greedy(ref, b.tokens) is None or compare_greedy(ref, b.tokens).near_tie


def test_other_strategies_run_sequentially_in_order():
    model = tiny_models()[2]
    prompts = default_prompts()[:3]
    gens = moedec.generate_batch(model, prompts, "single", max_tokens=[5, 7, 3], eos_token_ids=[])
    assert [g.stats.strategy for g in gens] == ["single"] * 3
    assert_rows_lossless(model, prompts, gens, [5, 7, 3])


# -- stop conditions ----------------------------------------------------------------------------------


def test_per_row_eos_leaves_other_rows_alone():
    model = tiny_models()[0]
    prompts = default_prompts()
    refs = [oracle_greedy(model, p, 16).tokens for p in prompts]
    eos = refs[1][5]  # row 1 stops at its 6th token; other rows may stop too if they produce it
    gens = moedec.generate_batch(model, prompts, batch_size=2, max_tokens=16, eos_token_ids=[eos])
    for ref, g in zip(refs, gens):
        expect = list(ref[: ref.index(eos)]) if eos in ref else list(ref)
        assert list(g.tokens) == expect
        assert g.stats.finish_reason == ("eos" if eos in ref else "length")
    assert gens[1].stats.finish_reason == "eos" and len(gens[1].tokens) <= 5


def test_stop_strings_match_the_engine():
    model, tok = tiny_models()[0], ByteTokenizer()
    prompts = [p for p in default_prompts() if all(t < 256 for t in p)]
    texts = [tok.decode(oracle_greedy(model, p, 20).tokens) for p in prompts]
    stop = [texts[0][6:8], texts[2][3:5]]  # strings that occur in some rows' output
    gens = moedec.generate_batch(model, prompts, batch_size=2, max_tokens=20, tokenizer=tok, stop=stop,
                                 eos_token_ids=[])
    stopped = 0
    for p, g in zip(prompts, gens):
        one = moedec.generate(model, p, max_tokens=20, tokenizer=tok, stop=stop, eos_token_ids=[])
        assert (g.tokens, g.text, g.stats.finish_reason) == (one.tokens, one.text, one.stats.finish_reason)
        stopped += g.stats.finish_reason == "stop"
        assert not any(s in g.text for s in stop)
    assert stopped >= 2


def test_text_without_stop_strings_is_the_decoded_tokens():
    model, tok = tiny_models()[0], ByteTokenizer()
    gens = moedec.generate_batch(model, [[65, 66], [67]], tokenizer=tok, max_tokens=9, eos_token_ids=[])
    assert [g.text for g in gens] == [tok.decode(g.tokens) for g in gens]


def test_zero_max_tokens_and_per_row_lengths():
    model = tiny_models()[0]
    gens = moedec.generate_batch(model, [[1, 2], [3], [4, 5, 6]], max_tokens=[0, 4, 1], eos_token_ids=[])
    assert [len(g.tokens) for g in gens] == [0, 4, 1]
    assert all(g.stats.finish_reason == "length" for g in gens)


# -- seeded sampling: a row depends on its own seed only ------------------------------------------------


def _sampled_divergence_is_near_tie(model, prompt, tokens, other, seed, params, atol=1e-4) -> bool:
    """At the first difference of two sampled rows, both tokens must be within ``atol`` of the
    maximum of (processed log-probabilities + the row's Gumbel noise at that draw): a near-tie of
    the categorical draw, which last-bit differences between batched and single-row matmuls can
    flip. Recomputes the reference logits with one plain forward (no cache)."""
    i = next(j for j, (a, b) in enumerate(zip(tokens, other)) if a != b)
    logits = model(mx.array(list(prompt) + list(tokens[:i]))[None])[0, -1]
    key = mx.random.key(seed)
    for _ in range(i + 1):
        key, sub = mx.random.split(key)
    perturbed = np.array(mx.log(sampling.probs(logits, params)) + mx.random.gumbel(logits.shape, key=sub))
    top = perturbed.max()
    return top - perturbed[tokens[i]] <= atol and top - perturbed[other[i]] <= atol


def _same_or_near_tie(model, prompt, a, b, seed, params):
    a, b = list(a), list(b)
    if a == b:
        return True
    return len(a) == len(b) and _sampled_divergence_is_near_tie(model, prompt, a, b, seed, params)


@settings(max_examples=15, deadline=None)
@given(
    data=hs.data(),
    model=mst.models(),
    n_prompts=hs.integers(2, 6),
    batch_size=hs.integers(2, 4),
    seed=hs.integers(0, 2**31),
    top_p=hs.sampled_from([1.0, 0.9]),
)
def test_seeded_row_is_independent_of_its_batch(data, model, n_prompts, batch_size, seed, top_p):
    prompts = [data.draw(mst.prompts(max_size=16), label=f"prompt{i}") for i in range(n_prompts)]
    n = n_prompts
    temps = data.draw(hs.lists(hs.sampled_from([0.0, 0.7, 1.0, 1.5]), min_size=n, max_size=n), label="temps")
    lengths = data.draw(hs.lists(hs.integers(1, 8), min_size=n, max_size=n), label="max_tokens")
    batch = moedec.generate_batch(model, prompts, batch_size=batch_size, seed=seed, temperature=temps,
                                  top_p=top_p, max_tokens=lengths, eos_token_ids=[])
    for i, p in enumerate(prompts):
        kw = dict(max_tokens=lengths[i], temperature=temps[i], top_p=top_p, eos_token_ids=[])
        params = moedec.SamplingParams(temperature=temps[i], top_p=top_p)
        (alone,) = moedec.generate_batch(model, [p], batch_size=1, seed=[seed + i], **kw)
        single = moedec.generate(model, p, seed=seed + i, **kw)  # the engine's single-token path
        if temps[i] == 0.0:
            for g in (batch[i], alone):
                div = compare_greedy(oracle_greedy(model, p, lengths[i]), g.tokens)
                assert div is None or div.near_tie, div.describe()
            continue
        assert _same_or_near_tie(model, p, batch[i].tokens, alone.tokens, seed + i, params), (i, batch[i].tokens, alone.tokens)
        assert _same_or_near_tie(model, p, alone.tokens, single.tokens, seed + i, params), (i, alone.tokens, single.tokens)


def test_mixed_settings_in_one_batch():
    model = tiny_models()[0]
    prompts = default_prompts()
    temps = [0.0, 0.8, 0.0, 1.2, 0.8]
    lengths = [4, 10, 7, 9, 3]  # rows leave one by one while the batch mixes greedy and sampled rows
    gens = moedec.generate_batch(model, prompts, batch_size=3, temperature=temps, top_k=[0, 0, 0, 20, 0],
                                 seed=[11, 12, 13, 14, 15], max_tokens=lengths, eos_token_ids=[])
    for i, p in enumerate(prompts):
        alone = moedec.generate(model, p, temperature=temps[i], top_k=[0, 0, 0, 20, 0][i], seed=11 + i,
                                max_tokens=lengths[i], eos_token_ids=[])
        assert len(gens[i].tokens) == lengths[i]
        if temps[i] == 0.0:
            div = compare_greedy(oracle_greedy(model, p, lengths[i]), gens[i].tokens)
            assert div is None or div.near_tie
        else:
            params = moedec.SamplingParams(temperature=temps[i], top_k=[0, 0, 0, 20, 0][i])
            assert _same_or_near_tie(model, p, gens[i].tokens, alone.tokens, 11 + i, params)
    kw = dict(max_tokens=10, eos_token_ids=[], temperature=1.0)
    first, again = (moedec.generate_batch(model, prompts[:2], seed=3, **kw) for _ in range(2))
    assert [g.tokens for g in first] == [g.tokens for g in again]  # seeded: repeatable
    other = moedec.generate_batch(model, prompts[:2], seed=[3, 99], **kw)
    assert other[0].tokens == first[0].tokens and other[1].tokens != first[1].tokens  # row 1's own seed


# -- errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompts=[[1], []]), "prompt 1 is empty"),
        (dict(prompts=[[1], [999]]), "prompt 1: token 999 is outside the vocabulary"),
        (dict(prompts=[[1], [2]], max_tokens=[3]), "max_tokens has 1 entries for 2 prompts"),
        (dict(prompts=[[1]], batch_size=0), "bad option batch_size=0: must be in [1, 4096]"),
        (dict(prompts=[[1]], batch_size=2.5), "batch_size"),
        (dict(prompts=[[1]], temperature=[-1.0]), "bad sampling setting for prompt 0"),
        (dict(prompts=[[1]], plugins=[object()]), "cannot take plugins="),
        (dict(prompts=["text"]), "needs a tokenizer"),
        (dict(prompts=[[1]], stop=["x"]), "stop strings need a tokenizer"),
        (dict(prompts=[[1]], nope=1), "has no option 'nope'"),
    ],
)
def test_errors_are_moedec_errors(kwargs, message):
    model = tiny_models()[0]
    with pytest.raises(moedec.MoedecError) as e:
        moedec.generate_batch(model, **kwargs)
    assert message in str(e.value)


def test_registered_with_validated_option():
    from moedec.cli import strategy_rows

    row = next(r for r in strategy_rows() if r["name"] == "batched")
    assert row["package"] == "moedec" and any("batch_size" in o and "[1, 4096]" in o for o in row["options"])
    assert moedec.generate_batch(tiny_models()[0], []) == []


# -- CLI -----------------------------------------------------------------------------------------------

runner = CliRunner()


def test_cli_prompts_jsonl_in_prompt_order(tmp_path):
    f = tmp_path / "p.jsonl"
    lines = [{"prompt": "hello", "id": "a"}, {"prompt": "the quick brown fox", "max_tokens": 3},
             {"prompt": [256, 65, 66], "temperature": 0.9, "seed": 4}, {"prompt": "z"}]
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    r = runner.invoke(app, ["generate", "--strategy", "batched", "-o", "batch_size=2", "--prompts", str(f), "-n", "6"])
    assert r.exit_code == 0, r.output
    out = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert [o["index"] for o in out] == [0, 1, 2, 3] and out[0]["id"] == "a"
    assert [len(o["tokens"]) for o in out] == [6, 3, 6, 6]
    assert all(o["stats"]["strategy"] == "batched" for o in out)
    model, tok = moedec.load()
    ref = moedec.generate_batch(model, ["hello", "z"], tokenizer=tok, max_tokens=6)
    assert [out[0]["tokens"], out[3]["tokens"]] == [list(g.tokens) for g in ref]
    again = moedec.generate(model, [256, 65, 66], tokenizer=tok, max_tokens=6, temperature=0.9, seed=4)
    assert out[2]["tokens"] == list(again.tokens)
    assert "4/4" in r.stderr and "tok/s" in r.stderr


def test_cli_plain_text_prompts_and_errors(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("hello\n\nworld wide\n")
    r = runner.invoke(app, ["generate", "--strategy", "batched", "--prompts", str(f), "-n", "4"])
    assert r.exit_code == 0, r.output
    out = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert [o["prompt"] for o in out] == ["hello", "world wide"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"prompt": "b", "temp": 1}\n')
    cases = [
        (["--prompts", str(bad)], "bad.jsonl:2: unknown key 'temp'"),
        (["--prompts", str(tmp_path / "none")], "does not exist"),
        (["hi", "--prompts", str(f)], "not both"),
        (["--prompts", str(f), "-o", "batch_size=0"], "must be in [1, 4096]"),
    ]
    for args, msg in cases:
        r = runner.invoke(app, ["generate", "--strategy", "batched", *args])
        assert r.exit_code == 2 and msg in r.output, (args, r.output)


# -- benchmark -----------------------------------------------------------------------------------------


def test_bench_batch_sizes_shape():
    model = tiny_models()[0]
    rows = bench_batch_sizes(model, default_prompts()[:2], [2, 4], max_tokens=4, rounds=1, stock=True)
    assert [r["batch_size"] for r in rows] == [1, 2, 4]
    for r in rows:
        assert {"batch_size", "tokens", "seconds", "tok_s", "ratio_vs_b1", "stock_tok_s", "vs_stock"} <= set(r)
        assert r["tokens"] == 4 * 3 and r["tok_s"] > 0 and r["stock_tok_s"] > 0
    assert rows[0]["ratio_vs_b1"] == 1.0 and rows[2]["steps"] == 3 and rows[0]["steps"] == 12
    with pytest.raises(moedec.MoedecError):
        bench_batch_sizes(model, [[1]], [0], max_tokens=4)
