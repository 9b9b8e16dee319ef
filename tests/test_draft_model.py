"""draft-model: lossless greedy decoding, the drafter's own cache, Draft.probs, errors, CLI."""

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings, strategies as hs
from mlx.utils import tree_unflatten
from mlx_lm.models.cache import RotatingKVCache
from typer.testing import CliRunner

import moedec
from moedec.cli import app
from moedec.forward import forward, new_cache
from moedec.models import build_model, model_config, randomize
from moedec.plugins import get_manager
from moedec.strategies import draft_model as dm_module
from moedec.strategies.draft_model import DraftModel
from moedec.testing import ARCHS, assert_lossless, tiny_moe, tiny_models
from moedec.testing import st

from helpers import DraftRecorder

runner = CliRunner()

_DRAFTERS: dict = {}


def near_drafter(arch: str, noise: float = 0.03):
    """The tiny target of ``arch`` with a noisy lm_head: it agrees with the target often, not always,
    so steps see every outcome (all rejected, partly accepted, all accepted)."""
    key = (arch, noise)
    if key not in _DRAFTERS:
        m = tiny_moe(arch, 0)
        w = m.lm_head.weight
        m.update(tree_unflatten([("lm_head.weight", w + noise * mx.random.normal(w.shape, key=mx.random.key(7)))]))
        mx.eval(m.parameters())
        _DRAFTERS[key] = m
    return _DRAFTERS[key]


def mamba_config(vocab: int) -> dict:
    return dict(model_type="mamba", vocab_size=vocab, hidden_size=16, intermediate_size=32, state_size=4,
                num_hidden_layers=1, conv_kernel=4, use_bias=False, use_conv_bias=True, time_step_rank=2,
                tie_word_embeddings=True)


def save_model_dir(path, config: dict, seed: int = 0):
    """Write a random model as an mlx-lm directory (config.json + safetensors) with mlx-lm's savers."""
    from mlx_lm.utils import save_config, save_model

    model = randomize(build_model(config), seed)
    save_model(path, model)
    save_config(dict(config), path / "config.json")
    return path


class DrafterCheck:
    """Observer: every draft equals what the drafter computes from scratch over the committed tokens
    (so its cache was rewound by exactly the rejected tokens), and after every step the drafter's cache
    holds the committed tokens but the pending one (or but two, after an all-accepted step)."""

    def __init__(self, strategy: DraftModel, drafter):
        self.strategy, self.drafter = strategy, drafter
        self.outcomes = set()  # ("none" | "some" | "all") accepted

    @moedec.hookimpl(wrapper=True)
    def draft(self, state):
        d = yield
        self.k = 0 if d is None else len(d)
        if self.k:
            ids = list(state.tokens) + list(d.tokens[:-1])
            logits, _ = forward(self.drafter, ids, new_cache(self.drafter))  # [L + K - 1, V]
            rows = logits[len(state.tokens) - 1 :]  # [K, V]: the distributions of the K draft positions
            if state.sampling.greedy:
                assert d.probs is None
                margin = np.array(rows.max(axis=-1) - rows[mx.arange(self.k), mx.array(d.tokens)])
                assert (margin <= 1e-4).all(), (margin, d.tokens)
            else:
                np.testing.assert_allclose(np.array(d.probs), np.array(state.probs(rows)), atol=1e-5)
                assert (np.array(d.probs)[np.arange(self.k), list(d.tokens)] > 0).all()
        return d

    @moedec.hookimpl(trylast=True)  # after the strategy has rewound its drafter
    def on_accept(self, state, acceptance):
        n, k = acceptance.num_accepted, self.k
        if not k:
            return
        everything = n == k  # the last draft token was never fed to the drafter
        assert self.strategy.cache_length() == len(state.tokens) - (2 if everything else 1)
        self.outcomes.add("all" if everything else ("none" if n == 0 else "some"))


def test_registered_and_listed():
    info = get_manager().strategy("draft-model")
    assert info.cls is DraftModel and info.plugin == "moedec.strategies.draft_model"
    r = runner.invoke(app, ["strategies", "--json"])
    row = next(x for x in json.loads(r.stdout) if x["name"] == "draft-model")
    assert row["options"] == ["draft_model: path_or_model = None", "num_draft: int = 4 [1, 64]"]


def test_lossless_on_the_three_archs_default_prompts():
    for arch, model in zip(ARCHS, tiny_models()):
        assert_lossless("draft-model", model=model, max_tokens=24, draft_model=near_drafter(arch))


@settings(max_examples=24, deadline=None)
@given(i=hs.integers(0, len(ARCHS) - 1), prompt=st.prompts(max_size=20), num_draft=hs.integers(1, 8),
       drafter=hs.sampled_from(["near", "self", "other"]))
def test_lossless_property(i, prompt, num_draft, drafter):
    model = tiny_models()[i]
    d = {"near": near_drafter(ARCHS[i]), "self": model, "other": tiny_models(seed=1)[i]}[drafter]
    assert_lossless("draft-model", model=model, prompts=[prompt], max_tokens=20, draft_model=d, num_draft=num_draft)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_drafter_cache_follows_every_outcome(temperature):
    model, drafter = tiny_models()[0], near_drafter(ARCHS[0])
    outcomes = set()
    for num_draft in (1, 3, 6):
        s = DraftModel(draft_model=drafter, num_draft=num_draft)
        check = DrafterCheck(s, drafter)
        g = moedec.generate(model, [3, 1, 4, 1, 5, 9, 2, 6], s, max_tokens=40, temperature=temperature,
                            top_k=20, seed=11, plugins=[check])
        assert len(g.tokens) == 40
        assert g.stats.extra["draft_forwards"] >= g.stats.drafted > 0
        outcomes |= check.outcomes
    assert outcomes == {"none", "some", "all"}


def test_self_draft_accepts_everything_at_temperature_0():
    for model in tiny_models():
        for prompt in ([1, 2, 3, 4, 5, 1, 2, 3], [42], list(range(30, 50))):
            g = moedec.generate(model, prompt, "draft-model", max_tokens=41, draft_model=model, num_draft=4)
            s = g.stats  # 1 token from the prefill, then 8 steps of 4 drafts + 1
            assert s.acceptance_rate == 1.0 and s.drafted == 32 and s.forwards == 8
            assert s.tokens_per_forward == 5.0


def test_sampling_is_seeded_and_carries_q():
    model, drafter = tiny_models()[1], near_drafter(ARCHS[1])
    spy = DraftRecorder()
    kw = dict(max_tokens=24, temperature=1.0, top_p=0.9, seed=5, draft_model=drafter, num_draft=3)
    g1 = moedec.generate(model, [7, 7, 8], "draft-model", plugins=[spy], **kw)
    seen = spy.drafts
    g2 = moedec.generate(model, [7, 7, 8], "draft-model", **kw)
    assert g1.tokens == g2.tokens and len(g1.tokens) == 24
    assert len([d for d in seen if d is not None]) >= 5
    for d in filter(None, seen):
        q = np.array(d.probs)
        assert q.shape == (len(d), 256)
        np.testing.assert_allclose(q.sum(-1), 1.0, atol=1e-5)


def test_respects_max_tokens_and_max_draft():
    model, drafter = tiny_models()[2], near_drafter(ARCHS[2])
    for n in (1, 2, 3, 9):
        g = moedec.generate(model, [4, 5], "draft-model", max_tokens=n, max_draft=2, draft_model=drafter, num_draft=6)
        assert len(g.tokens) == n


def test_missing_or_bad_draft_model_is_a_one_line_error(tmp_path):
    cases = [
        ({}, r"strategy 'draft-model' needs the option draft_model: a local model directory"),
        ({"draft_model": str(tmp_path / "nope")}, r"draft model path '.*nope' does not exist"),
        ({"draft_model": str(tmp_path)}, r"has no config.json"),
        ({"draft_model": 3}, r"draft_model must be a model directory or a model object, got int"),
        ({"draft_model": tiny_models()[0], "num_draft": 0}, r"bad option num_draft=0: must be in \[1, 64\]"),
    ]
    for opts, match in cases:
        with pytest.raises(moedec.MoedecError, match=match) as e:
            moedec.generate(tiny_models()[0], [1, 2], "draft-model", max_tokens=4, **opts)
        assert "\n" not in str(e.value)


def test_vocab_mismatch_names_both_sizes():
    small = tiny_moe("qwen3_moe", 0, vocab_size=128)
    with pytest.raises(moedec.MoedecError) as e:
        moedec.generate(tiny_models()[0], [1, 2], "draft-model", max_tokens=4, draft_model=small)
    msg = str(e.value)
    assert "\n" not in msg and "vocabulary size (128) differs from the target's (256)" in msg


def test_non_trimmable_drafter_cache_names_the_type(monkeypatch):
    mamba = randomize(build_model(mamba_config(256)), 0)
    with pytest.raises(moedec.MoedecError, match=r"the draft model's cache \(ArraysCache\) cannot be rewound") as e:
        moedec.generate(tiny_models()[0], [1, 2], "draft-model", max_tokens=4, draft_model=mamba)
    assert "\n" not in str(e.value)
    # a rotating cache can be trimmed until it wraps: the prompt already filled it here
    monkeypatch.setattr(dm_module, "new_cache", lambda m: [RotatingKVCache(max_size=4, keep=0) for _ in m.layers])
    with pytest.raises(moedec.MoedecError, match=r"draft model's cache \(RotatingKVCache\) cannot be rewound"):
        moedec.generate(tiny_models()[0], list(range(10)), "draft-model", max_tokens=4, draft_model=tiny_models()[0])


DEFAULT_VOCAB = moedec.load()[0].args.vocab_size  # the model `moedec generate` uses without --model


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("drafters")
    out = {"vocab": DEFAULT_VOCAB}
    for name, cfg in [
        ("ok", model_config("glm4_moe", vocab_size=DEFAULT_VOCAB, num_hidden_layers=2)),  # the default target's vocab
        ("small_vocab", model_config("glm4_moe", vocab_size=DEFAULT_VOCAB - 2, num_hidden_layers=2)),
        ("mamba", mamba_config(DEFAULT_VOCAB)),
    ]:
        (root / name).mkdir()
        out[name] = save_model_dir(root / name, cfg)
    return out


def test_cli_generate_with_a_saved_draft_model(model_dirs):
    r = runner.invoke(app, ["generate", "def add(a, b):", "--strategy", "draft-model", "-o", f"draft_model={model_dirs['ok']}",
                            "-o", "num_draft=3", "--max-tokens", "16", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads([l for l in r.stdout.splitlines() if l.startswith("{")][-1])
    s = out["stats"]
    assert s["strategy"] == "draft-model" and s["generated_tokens"] >= 8 and s["drafted"] > 0
    assert s["extra"]["draft_forwards"] >= s["drafted"]
    # the greedy text is the target's own, whatever the drafter
    r2 = runner.invoke(app, ["generate", "def add(a, b):", "--max-tokens", "16", "--json"])
    assert json.loads(r2.stdout.splitlines()[-1])["tokens"] == out["tokens"]


def test_cli_errors_are_one_line_without_traceback(model_dirs):
    cases = [
        (["-o", f"draft_model={model_dirs['small_vocab']}"],
         f"vocabulary size ({DEFAULT_VOCAB - 2}) differs from the target's ({DEFAULT_VOCAB})"),
        (["-o", f"draft_model={model_dirs['mamba']}"], "the draft model's cache (ArraysCache) cannot be rewound"),
        ([], "needs the option draft_model"),
    ]
    for extra, msg in cases:
        r = runner.invoke(app, ["generate", "hi", "--strategy", "draft-model", "--max-tokens", "4", *extra])
        assert r.exit_code == 2, r.output
        errors = [l for l in r.output.splitlines() if l.startswith("moedec: error:")]
        assert len(errors) == 1 and msg in errors[0], r.output
    # and as a real process: exit status, stderr, no traceback
    p = subprocess.run([sys.executable, "-m", "moedec.cli", "generate", "hi", "--strategy", "draft-model", "-o",
                        f"draft_model={model_dirs['small_vocab']}"], capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert [l for l in p.stderr.splitlines() if l.startswith("moedec: error:")] == [
        f"moedec: error: strategy 'draft-model': the draft model's vocabulary size ({DEFAULT_VOCAB - 2}) differs "
        f"from the target's ({DEFAULT_VOCAB}); they must share a tokenizer"
    ]
