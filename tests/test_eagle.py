"""eagle: the head format (save/load, quantized), lossless drafting with random heads, the head's
cache, sampling, errors, CLI."""

import json
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from typer.testing import CliRunner

import moedec
from moedec.cli import app
from moedec.errors import MoedecError
from moedec.models import build_model, randomize
from moedec.strategies.eagle import (
    NO_HEAD, Eagle, EagleHead, eagle_config_for, head_files, load_eagle_head, random_eagle_head,
    save_eagle_head,
)
from moedec.testing import ARCHS, assert_lossless, tiny_moe, tiny_models

from helpers import CacheChecker
from test_mtp import PROMPTS, check_features_from_scratch, chi_square_check, narrow_lm_head, recording

runner = CliRunner()


def params(module):
    return dict(tree_flatten(module.parameters()))


@pytest.fixture(scope="module")
def narrowed():
    """A tiny glm4_moe whose lm_head favours a few tokens: a random head's drafts are often right."""
    return narrow_lm_head(tiny_moe("glm4_moe", seed=21))


@pytest.fixture(scope="module")
def narrowed8():
    """As ``narrowed`` with 8 favoured tokens: at top-k 3 the target's and the head's supports overlap."""
    return narrow_lm_head(tiny_moe("glm4_moe", seed=21), keep=8)


# -- lossless -------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_lossless_with_a_random_head(arch):
    model = tiny_models()[ARCHS.index(arch)]
    head = random_eagle_head(model, seed=1)
    for k in (1, 3):
        assert_lossless("eagle", model=model, prompts=PROMPTS, max_tokens=24, head=head, num_draft=k)


def test_accepted_drafts_and_the_heads_cache(narrowed):
    head = random_eagle_head(narrowed, seed=2)
    for k in (1, 2, 4):
        assert_lossless("eagle", model=narrowed, prompts=PROMPTS, max_tokens=24, head=head, num_draft=k)
    for k, temp in ((3, 0.0), (2, 1.0)):
        s = recording(Eagle)(head=head, num_draft=k)
        g = check_features_from_scratch(s, narrowed, PROMPTS[0], max_tokens=30, temperature=temp, top_k=4,
                                        seed=3, plugins=[CacheChecker()])
        assert 0 < g.stats.accepted < g.stats.drafted and g.stats.tokens_per_forward > 1.0


def test_a_head_that_copies_the_target_drafts_well():
    """A head that redoes a one-layer llama target's computation (fc passes the embedding through,
    its layer is the target's, its norm the target's) sees every token but the first: its drafts
    are mostly right -- if features, tokens and cache entries are paired right."""
    cfg = dict(model_type="llama", hidden_size=64, num_hidden_layers=1, intermediate_size=128,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
               vocab_size=256, rope_theta=10000.0, tie_word_embeddings=False)
    model = randomize(build_model(cfg), 24)
    head = EagleHead(eagle_config_for(model))
    head.layer.update(model.model.layers[0].parameters())
    head.fc.weight = mx.concatenate([mx.eye(64), mx.zeros((64, 64))], axis=1)
    head.norm.weight = model.model.norm.weight
    for k in (1, 4):
        assert_lossless("eagle", model=model, prompts=PROMPTS[:2], max_tokens=32, head=head, num_draft=k)
        g = moedec.generate(model, PROMPTS[0], "eagle", max_tokens=32, head=head, num_draft=k)
        assert g.stats.acceptance_rate > 0.6, g.stats


def test_head_with_its_own_embedding_and_fc_bias():
    model = tiny_models()[0]
    head = random_eagle_head(model, seed=4, embed=True, fc_bias=True, intermediate_size=48)
    assert "embed_tokens" in head and "bias" in head.fc
    assert_lossless("eagle", model=model, prompts=PROMPTS, max_tokens=16, head=head, num_draft=2)


def test_sampled_runs(narrowed, narrowed8):
    head = random_eagle_head(narrowed, seed=5)
    kw = dict(max_tokens=20, temperature=0.8, top_p=0.9, seed=7, head=head, num_draft=3)
    a = moedec.generate(narrowed, PROMPTS[1], "eagle", plugins=[CacheChecker()], **kw)
    b = moedec.generate(narrowed, PROMPTS[1], "eagle", **kw)
    assert a.tokens == b.tokens and len(a.tokens) == 20
    assert a.stats.accepted <= a.stats.drafted <= 3 * a.stats.forwards
    chi_square_check(narrowed8, "eagle", 300, head=random_eagle_head(narrowed8, seed=6), num_draft=2)


# -- the format -----------------------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path):
    model = tiny_models()[0]
    head = random_eagle_head(model, seed=6)
    for target in (tmp_path / "dir", tmp_path / "h.safetensors", tmp_path / "j.json"):
        st = save_eagle_head(head, target)
        cfg_path, st_path = head_files(target)
        assert st == st_path and cfg_path.is_file() and st_path.is_file()
        cfg = json.loads(cfg_path.read_text())
        assert cfg["format"] == "moedec-eagle" and cfg["version"] == 1 and cfg["hidden_size"] == 64
        assert set(mx.load(str(st_path))) == set(params(head))
        back = load_eagle_head(target, model)
        assert back.config == head.config
        for k, v in params(head).items():
            assert mx.array_equal(params(back)[k], v), k
    by_path = moedec.generate(model, PROMPTS[0], "eagle", max_tokens=16, head=str(tmp_path / "h.safetensors"))
    by_obj = moedec.generate(model, PROMPTS[0], "eagle", max_tokens=16, head=head)
    assert by_path.tokens == by_obj.tokens and by_path.stats.drafted == by_obj.stats.drafted


def test_quantized_head(tmp_path):
    model = tiny_models()[0]
    head = random_eagle_head(model, seed=8)
    nn.quantize(head, group_size=32, bits=4)
    save_eagle_head(head, tmp_path / "q.safetensors")
    back = load_eagle_head(tmp_path / "q.safetensors", model)
    assert type(back.fc).__name__ == "QuantizedLinear" and back.fc.bits == 4
    assert_lossless("eagle", model=model, prompts=PROMPTS[:2], max_tokens=16, head=str(tmp_path / "q.safetensors"))


def test_errors_are_one_line(tmp_path):
    model = tiny_models()[0]
    cases = []
    with pytest.raises(MoedecError) as e:
        moedec.generate(model, [1, 2], "eagle", max_tokens=4)
    assert str(e.value) == NO_HEAD
    cases.append(({"head": str(tmp_path / "missing.safetensors")}, "missing.json does not exist"))
    other = random_eagle_head(tiny_moe("glm4_moe", hidden_size=32, head_dim=8), seed=0)
    save_eagle_head(other, tmp_path / "small")
    cases.append(({"head": str(tmp_path / "small")}, "has hidden size 32 but the model's is 64"))
    cases.append(({"head": other}, "has hidden size 32 but the model's is 64"))
    good = save_eagle_head(random_eagle_head(model, seed=0), tmp_path / "bad")
    cfg_path = head_files(tmp_path / "bad")[0]
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "intermediate_size": 99}))
    cases.append(({"head": str(good)}, "does not fit its config: Expected shape"))
    for name, edit, message in (("fmt", {"format": "eagle-v9"}, "is not a moedec-eagle version 1 config"),
                                ("typo", {"hiden_size": 64}, "unknown field 'hiden_size'")):
        save_eagle_head(random_eagle_head(model, seed=0), tmp_path / name)
        (tmp_path / name / "eagle.json").write_text(json.dumps({**cfg, **edit}))
        cases.append(({"head": str(tmp_path / name)}, message))
    cases.append(({"head": str(tmp_path / "small"), "num_draft": 0}, "bad option num_draft=0"))
    for options, message in cases:
        with pytest.raises(MoedecError, match=message) as e:
            moedec.generate(model, [1, 2], "eagle", max_tokens=4, **options)
        assert "\n" not in str(e.value), options


def test_config_shaped_like_the_target():
    for model in tiny_models():
        c = eagle_config_for(model)
        assert c.hidden_size == model.args.hidden_size and c.vocab_size == model.args.vocab_size
        assert c.num_attention_heads * c.head_dim > 0 and isinstance(EagleHead(c), EagleHead)


# -- CLI ------------------------------------------------------------------------------------------


def test_cli_with_a_head_reports_acceptance(tmp_path):
    model, _ = moedec.load()  # the model `moedec generate` uses without --model
    path = save_eagle_head(random_eagle_head(model, seed=0), tmp_path / "builtin.safetensors")
    prompt = "def add(a, b):"
    r = runner.invoke(app, ["generate", prompt, "--strategy", "eagle", "-o", f"head={path}", "-n", "12"])
    assert r.exit_code == 0, r.output
    assert "[eagle] 12 tokens" in r.output and "acceptance" in r.output
    ref = runner.invoke(app, ["generate", prompt, "-n", "12", "--json"])
    got = runner.invoke(app, ["generate", prompt, "--strategy", "eagle", "-o", f"head={path}", "-n", "12", "--json"])
    assert json.loads(got.stdout.splitlines()[-1])["tokens"] == json.loads(ref.stdout.splitlines()[-1])["tokens"]


def test_cli_without_a_head_fails_with_one_line():
    p = subprocess.run([sys.executable, "-m", "moedec.cli", "generate", "hi", "--strategy", "eagle"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    errors = [l for l in p.stderr.splitlines() if l.startswith("moedec: error:")]
    assert errors == [f"moedec: error: {NO_HEAD}"], p.stderr
