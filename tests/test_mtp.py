"""mtp: loading a checkpoint's MTP layers (any shard layout, quantized, pruned main model with an
un-pruned head, DeepSeek-V3), lossless drafting, the MTP cache's consistency, errors, CLI."""

import json
import subprocess
import sys

import attrs
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.cache import KVCache
from mlx_lm.utils import load as mlx_load
from typer.testing import CliRunner

import moedec
from moedec import sampling
from moedec.cli import app
from moedec.errors import MoedecError
from moedec.forward import forward, new_cache
from moedec.strategies.mtp import MTP
from moedec.strategies.mtp_loader import NO_MTP, MTPSpec, build_mtp_layer, load_mtp
from moedec.testing import assert_lossless, tiny_moe
from moedec.models import build_model, randomize
from moedec.testing.checkpoints import random_mtp_layer, save_checkpoint, tiny_config, write_checkpoint

from helpers import CacheChecker

runner = CliRunner()
PROMPTS = [[1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2, 3], [7, 8, 7, 8, 7], [42]]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Checkpoints written once: name -> directory."""
    root = tmp_path_factory.mktemp("mtp")
    return {
        # main model pruned to 8 experts, its MTP head un-pruned with 16; per-expert keys, MTP in the model file
        "pruned": write_checkpoint(root / "pruned", mtp_experts=16),
        # stacked expert layout, 3 shards, 2 MTP layers (mlx-lm would keep the 2nd: separate file)
        "sharded": write_checkpoint(root / "sharded", seed=3, per_expert=False, shards=3, mtp_layers=2),
        # MTP uses the target's lm_head (no shared_head.head)
        "nohead": write_checkpoint(root / "nohead", seed=5, mtp_head=False, mtp_embed=True),
        "quant": write_checkpoint(root / "quant", seed=7, quantize={"bits": 4, "group_size": 32}, mtp_experts=16),
        "none": write_checkpoint(root / "none", seed=9, mtp_layers=0),
    }


_MODELS: dict = {}


def loaded(path):
    if path not in _MODELS:
        _MODELS[path] = moedec.load(path)[0]
    return _MODELS[path]


def narrow_lm_head(model, keep: int = 4):
    """Shrink every lm_head row but the first ``keep`` 100x: argmaxes fall in a handful of tokens,
    so a drafter reading the same lm_head is often right (exercises accepted drafts at temperature
    0). Shrunk, not zeroed: exact logit ties would make top-k's choice implementation-defined."""
    w = model.lm_head.weight
    rows = mx.arange(w.shape[0])[:, None] < keep
    model.lm_head.weight = mx.where(rows, w, 0.01 * w)
    mx.eval(model.lm_head.weight)
    return model


# -- loading --------------------------------------------------------------------------------------


def test_layout_of_written_checkpoints(ckpts):
    files = sorted(p.name for p in ckpts["pruned"].iterdir())
    assert "mtp.safetensors" not in files  # glm4_moe: MTP keys live in the model file, mlx-lm drops them
    keys = mx.load(str(ckpts["pruned"] / "model.safetensors"))
    assert "model.layers.3.mlp.experts.15.down_proj.weight" in keys and "model.layers.3.eh_proj.weight" in keys
    assert json.loads((ckpts["pruned"] / "config.json").read_text())["num_nextn_predict_layers"] == 1
    index = json.loads((ckpts["sharded"] / "model.safetensors.index.json").read_text())["weight_map"]
    assert index["model.layers.4.mlp.switch_mlp.gate_proj.weight"] == "mtp.safetensors"
    assert len(set(index.values())) == 4


def test_unpruned_head_loads_with_its_own_expert_count(ckpts):
    model = loaded(ckpts["pruned"])
    assert model.args.n_routed_experts == 8
    (layer,) = load_mtp(model, ckpts["pruned"])
    assert layer.block.mlp.switch_mlp.gate_proj.weight.shape[0] == 16
    assert layer.block.mlp.gate.weight.shape == (16, 64)
    # exactly the weights that were written (write_checkpoint draws layer i with seed + 1 + i)
    want = dict(tree_flatten(random_mtp_layer(model, seed=1, experts=16).parameters()))
    got = dict(tree_flatten(layer.parameters()))
    assert set(got) == set(want)
    for k in want:
        assert mx.array_equal(got[k], want[k]), k


def test_sharded_stacked_multi_layer_and_own_embedding(ckpts):
    model = loaded(ckpts["sharded"])
    layers = load_mtp(model, ckpts["sharded"])
    assert len(layers) == 2 and layers[1].block.mlp.switch_mlp.up_proj.weight.shape == (8, 32, 64)
    (layer,) = load_mtp(loaded(ckpts["nohead"]), ckpts["nohead"])
    assert "embed_tokens" in layer and "head" not in layer.shared_head and "norm" in layer.shared_head


def test_quantized_mtp_weights(ckpts):
    model = loaded(ckpts["quant"])
    (layer,) = load_mtp(model, ckpts["quant"])
    sw = layer.block.mlp.switch_mlp.gate_proj
    assert type(sw).__name__ == "QuantizedSwitchLinear" and (sw.bits, sw.group_size) == (4, 32)
    assert sw.weight.shape[0] == 16
    assert type(layer.eh_proj).__name__ == "QuantizedLinear"
    assert type(layer.block.mlp.gate.weight) is mx.array and layer.block.mlp.gate.weight.dtype == mx.float32


def test_no_mtp_layers_is_one_clear_line(ckpts):
    model = loaded(ckpts["none"])
    with pytest.raises(MoedecError, match="needs MTP weights; this checkpoint has none") as e:
        moedec.generate(model, [1, 2, 3], "mtp", max_tokens=4)
    assert "\n" not in str(e.value)
    # config.json that declares MTP layers whose weights a conversion dropped
    cfg = json.loads((ckpts["none"] / "config.json").read_text())
    (ckpts["none"] / "config.json").write_text(json.dumps({**cfg, "num_nextn_predict_layers": 1}))
    try:
        with pytest.raises(MoedecError, match="has none.*declares 1"):
            load_mtp(model, ckpts["none"])
    finally:
        (ckpts["none"] / "config.json").write_text(json.dumps(cfg))
    from moedec.models import default_model

    with pytest.raises(MoedecError, match="the built-in model"):
        moedec.generate(default_model()[0], [1, 2, 3], "mtp", max_tokens=4)


def _corrupt(src, dst, edit):
    """Copy checkpoint ``src`` to ``dst`` with its MTP tensors changed by ``edit(dict)``."""
    import shutil

    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    w = dict(mx.load(str(f)))
    edit(w)
    mx.save_safetensors(str(f), w)
    return dst


@pytest.mark.parametrize(
    "name, edit, message",
    [
        ("router", lambda w: w.update({"model.layers.3.mlp.gate.weight": mx.zeros((12, 64))}),
         "does not fit: its router mlp.gate.weight has 12 experts but its expert weights have 16 \\(main model: 8\\)"),
        ("eh_proj", lambda w: w.update({"model.layers.3.eh_proj.weight": mx.zeros((64, 64))}),
         "MTP layer 3 does not fit .*16 experts.*main model: 8.*eh_proj"),
        ("expert", lambda w: [w.pop(k) for k in list(w) if ".mlp.experts.3." in k and k.startswith("model.layers.3.")],
         "MTP layer 3 has experts up to 15 but no expert 3"),
        ("hidden", lambda w: w.update({"model.layers.3.enorm.weight": mx.ones((32,))}),
         "MTP layer 3 has hidden size 32 but the model's is 64"),
        ("incomplete", lambda w: w.pop("model.layers.3.hnorm.weight"), "MTP layer 3 is incomplete: it has no hnorm.weight"),
    ],
)
def test_wrong_shapes_are_one_line_errors(ckpts, tmp_path, name, edit, message):
    path = _corrupt(ckpts["pruned"], tmp_path / name, edit)
    with pytest.raises(MoedecError, match=message) as e:
        load_mtp(loaded(ckpts["pruned"]), path)
    assert "\n" not in str(e.value)


def test_unsupported_architecture():
    spec = MTPSpec(index=2, hidden_size=64, experts=8, intermediate=32, shared_intermediate=None,
                   head_norm=True, head=True, embed=False, quantized=False)
    with pytest.raises(MoedecError, match="supports glm4_moe and deepseek_v3 checkpoints, not qwen3_moe"):
        build_mtp_layer(tiny_moe("qwen3_moe"), spec)


# -- lossless -------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_draft", [1, 2, 3])
def test_lossless_pruned_main_unpruned_head(ckpts, num_draft):
    assert_lossless("mtp", model=loaded(ckpts["pruned"]), prompts=PROMPTS, max_tokens=24, num_draft=num_draft)


@pytest.mark.parametrize("name", ["sharded", "nohead", "quant"])
def test_lossless_other_layouts(ckpts, name):
    assert_lossless("mtp", model=loaded(ckpts[name]), prompts=PROMPTS, max_tokens=20, num_draft=2)


def test_lossless_deepseek_v3(tmp_path):
    path = write_checkpoint(tmp_path / "dsv3", "deepseek_v3", mtp_experts=16, shards=2)
    model = moedec.load(path)[0]
    assert model.args.model_type == "deepseek_v3"
    (layer,) = load_mtp(model, path)
    assert layer.block.mlp.switch_mlp.gate_proj.weight.shape[0] == 16
    for k in (1, 3):
        assert_lossless("mtp", model=model, prompts=PROMPTS, max_tokens=20, num_draft=k)


def test_accepted_drafts_with_a_shared_lm_head(tmp_path):
    """With the target's (narrowed) lm_head the MTP drafts are often right: steps commit several
    tokens, and the output is still the oracle's."""
    path = write_checkpoint(tmp_path / "shared", seed=11, mtp_head=False)
    model = narrow_lm_head(moedec.load(path)[0])
    for k in (1, 2, 3):
        assert_lossless("mtp", model=model, prompts=PROMPTS, max_tokens=24, num_draft=k)
        g = moedec.generate(model, PROMPTS[0], "mtp", max_tokens=24, num_draft=k)
        assert g.stats.accepted > 0 and g.stats.tokens_per_forward > 1.0, g.stats


def test_an_mtp_layer_that_copies_the_target_drafts_well(tmp_path):
    """An MTP layer that redoes a one-layer target's computation (eh_proj passes the embedding
    through, the block is the target's layer, shared_head is the target's norm and lm_head) sees
    every token but the first, so its drafts are mostly right -- if the pairing of hidden states,
    tokens and cache entries is right."""
    cfg = tiny_config("glm4_moe", num_hidden_layers=1, first_k_dense_replace=0)
    model = randomize(build_model(cfg), 23)
    e = model.model.embed_tokens.weight  # unit-RMS rows: enorm(e) == e
    model.model.embed_tokens.weight = e * mx.rsqrt(mx.mean(e * e, axis=-1, keepdims=True))
    layer = build_mtp_layer(model, MTPSpec(index=1, hidden_size=64, experts=8, intermediate=32,
                                           shared_intermediate=32, head_norm=True, head=True, embed=False,
                                           quantized=False))
    layer.block.update(model.model.layers[0].parameters())
    layer.eh_proj.weight = mx.concatenate([mx.eye(64), mx.zeros((64, 64))], axis=1)
    layer.shared_head.norm.weight = model.model.norm.weight
    layer.shared_head.head.weight = model.lm_head.weight
    target = moedec.load(save_checkpoint(tmp_path / "copy", model, cfg, [layer]))[0]
    for k in (1, 3):
        assert_lossless("mtp", model=target, prompts=PROMPTS[:2], max_tokens=32, num_draft=k)
        g = moedec.generate(target, PROMPTS[0], "mtp", max_tokens=32, num_draft=k)
        assert g.stats.acceptance_rate > 0.6, g.stats


def test_dense_mtp_block(tmp_path):
    cfg = tiny_config("glm4_moe")
    model = randomize(build_model(cfg), 29)
    spec = MTPSpec(index=3, hidden_size=64, experts=None, intermediate=48, shared_intermediate=None,
                   head_norm=True, head=True, embed=False, quantized=False)
    path = save_checkpoint(tmp_path / "dense", model, cfg, [randomize(build_mtp_layer(model, spec), 30)])
    target = moedec.load(path)[0]
    (layer,) = load_mtp(target, path)
    assert layer.block.mlp.gate_proj.weight.shape == (48, 64)
    assert_lossless("mtp", model=target, prompts=PROMPTS[:2], max_tokens=16, num_draft=2)


def test_checkpoint_option_and_missing_path(ckpts):
    model, _ = mlx_load(str(ckpts["pruned"]))  # not through moedec.load: no recorded path
    with pytest.raises(MoedecError, match="-o checkpoint=DIR"):
        moedec.generate(model, [1, 2, 3], "mtp", max_tokens=4)
    got = moedec.generate(model, [1, 2, 3], "mtp", max_tokens=12, checkpoint=str(ckpts["pruned"]))
    ref = moedec.generate(model, [1, 2, 3], "single", max_tokens=12)
    assert got.tokens == ref.tokens and got.stats.extra["mtp_experts"] == 16


def test_max_draft_zero_still_keeps_the_cache(ckpts):
    model = loaded(ckpts["pruned"])
    got = moedec.generate(model, PROMPTS[0], "mtp", max_tokens=10, max_draft=0)
    assert got.tokens == moedec.generate(model, PROMPTS[0], "single", max_tokens=10).tokens


# -- the MTP cache ------------------------------------------------------------------------------------


def recording(cls):
    """``cls`` that records, at every draft, the committed tokens and its first feature."""

    @attrs.define
    class Recording(cls):
        records: list = attrs.field(factory=list)
        _first: object = attrs.field(default=None, init=False)
        _on: bool = attrs.field(default=False, init=False)

        @moedec.hookimpl
        def draft(self, state):
            self._on, self._first = True, None
            out = super().draft(state)
            self._on = False
            if self._first is not None:
                self.records.append((list(state.tokens), self._first))
            return out

        def advance(self, hidden, tokens):
            out = super().advance(hidden, tokens)
            if self._on and self._first is None:
                self._first = out[-1]
            return out

    return Recording


def check_features_from_scratch(strategy, model, prompt, atol=1e-4, **kwargs):
    """Run ``strategy``; at every draft its first feature must equal the one a fresh cache gives
    over the committed tokens and the target's from-scratch hidden states. Returns the generation."""
    g = moedec.generate(model, prompt, strategy, **kwargs)
    assert strategy.records, "no drafts were made"
    for tokens, feature in strategy.records:
        n = len(tokens) - 1  # tokens[n] is the pending token
        _, hidden = forward(model, tokens[:n], new_cache(model))  # [n, D]
        strategy._cache = [KVCache()]
        ref = strategy.advance(hidden, mx.array(tokens[1 : n + 1]))[-1]
        err = float(mx.abs(ref - feature).max())
        assert err <= atol, f"after {n + 1} tokens the drafter's feature differs by {err}"
    return g


def test_mtp_cache_holds_the_committed_entries(tmp_path):
    path = write_checkpoint(tmp_path / "c", seed=13, mtp_head=False)
    model = narrow_lm_head(moedec.load(path)[0])
    for k, temp in ((3, 0.0), (2, 1.0)):
        s = recording(MTP)(num_draft=k)
        g = check_features_from_scratch(s, model, PROMPTS[0], max_tokens=30, temperature=temp, top_k=4,
                                        seed=3, plugins=[CacheChecker()])
        assert 0 < g.stats.accepted < g.stats.drafted  # both accepted and rejected drafts happened


# -- sampling -------------------------------------------------------------------------------------


def test_sampled_runs_keep_invariants(ckpts):
    model = loaded(ckpts["pruned"])
    for k in (1, 3):
        kw = dict(max_tokens=20, temperature=0.8, top_p=0.9, seed=5, num_draft=k)
        a = moedec.generate(model, PROMPTS[0], "mtp", plugins=[CacheChecker()], **kw)
        b = moedec.generate(model, PROMPTS[0], "mtp", **kw)
        assert a.tokens == b.tokens and len(a.tokens) == 20
        assert all(0 <= t < 256 for t in a.tokens)
        assert a.stats.accepted <= a.stats.drafted <= k * a.stats.forwards


def exact_joint(model, prompt, params, depth):
    """The target's exact distribution of its next ``depth`` sampled tokens: {tuple: p}."""
    out = {(): 1.0}
    for _ in range(depth):
        nxt = {}
        for seq, p in out.items():
            logits, _ = forward(model, [*prompt, *seq], new_cache(model))
            probs = np.array(sampling.probs(logits[-1], params))
            for t in np.nonzero(probs > 0)[0]:
                nxt[(*seq, int(t))] = p * float(probs[t])
        out = nxt
    return out


class DraftLog:
    """Observer: every draft the strategy returned, with the tokens it followed."""

    def __init__(self):
        self.drafts = []

    @moedec.hookimpl(wrapper=True)
    def draft(self, state):
        result = yield
        self.drafts.append((tuple(state.tokens), result))
        return result


def _chi2(obs, exp):
    from scipy.stats import chisquare

    obs, exp = np.asarray(obs, float), np.asarray(exp, float) * sum(obs) / sum(exp)
    big = exp >= 5  # pool the rare outcomes into one cell
    obs, exp = np.append(obs[big], obs[~big].sum()), np.append(exp[big], exp[~big].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return chisquare(obs, exp * (obs.sum() / exp.sum())).pvalue


def chi_square_check(model, strategy, n, depth=3, **options):
    """Sampled generations of ``depth`` tokens follow the target's exact joint distribution, and
    the drafted tokens follow the ``Draft.probs`` the strategy reported (what rejection sampling
    relies on)."""
    params = sampling.SamplingParams(temperature=1.0, top_k=3)
    prompt = [5, 6, 7, 5, 6]
    joint = exact_joint(model, prompt, params, depth)
    counts = dict.fromkeys(joint, 0)
    log = DraftLog()
    drafted = accepted = 0
    for seed in range(n):
        g = moedec.generate(model, prompt, strategy, max_tokens=depth, temperature=1.0, top_k=3,
                            seed=seed, eos_token_ids=[], plugins=[log], **options)
        counts[tuple(g.tokens)] += 1  # KeyError: an outcome the target cannot produce
        drafted, accepted = drafted + g.stats.drafted, accepted + g.stats.accepted
    keys = sorted(joint)
    p = _chi2([counts[k] for k in keys], [joint[k] for k in keys])
    assert p > 1e-3, f"sampled outcomes do not follow the target's distribution (chi-square p={p:.2g})"
    assert 0 < accepted < drafted
    # the first drafted token, in the most frequent context: distributed as its reported q
    by_context: dict = {}
    for context, d in log.drafts:
        if d is not None and len(d):
            by_context.setdefault(context, []).append(d)
    context, ds = max(by_context.items(), key=lambda kv: len(kv[1]))
    q = np.array(ds[0].probs[0])
    for d in ds:
        assert np.allclose(np.array(d.probs[0]), q, atol=1e-6)  # same context, same q
    seen = np.bincount([d.tokens[0] for d in ds], minlength=q.size)
    assert seen[q == 0].sum() == 0, "drafted a token its own q gives probability 0"
    pq = _chi2(seen[q > 0], q[q > 0])
    assert pq > 1e-3, f"drafted tokens do not follow Draft.probs (chi-square p={pq:.2g}, {len(ds)} drafts)"
    return p, pq


def test_sampled_distribution_matches_the_target(tmp_path):
    path = write_checkpoint(tmp_path / "chi", seed=17, mtp_head=False)
    model = narrow_lm_head(moedec.load(path)[0])
    chi_square_check(model, "mtp", 300, num_draft=2)


# -- CLI ------------------------------------------------------------------------------------------


def test_cli_generate_reports_acceptance(ckpts):
    r = runner.invoke(app, ["generate", "hello", "--model", str(ckpts["pruned"]), "--strategy", "mtp",
                            "-o", "num_draft=2", "-n", "12"])
    assert r.exit_code == 0, r.output
    assert "[mtp] 12 tokens" in r.output and "acceptance" in r.output
    r = runner.invoke(app, ["generate", "hello", "--model", str(ckpts["pruned"]), "--strategy", "mtp",
                            "-n", "6", "--json"])
    stats = json.loads(r.stdout.splitlines()[-1])["stats"]
    assert stats["strategy"] == "mtp" and "acceptance_rate" in stats and stats["extra"]["mtp_experts"] == 16


def test_cli_no_mtp_fails_with_one_line(ckpts):
    p = subprocess.run([sys.executable, "-m", "moedec.cli", "generate", "hi", "--model", str(ckpts["none"]),
                        "--strategy", "mtp"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    errors = [l for l in p.stderr.splitlines() if l.startswith("moedec: error:")]
    assert errors == [f"moedec: error: {NO_MTP}"], p.stderr
