"""The default model's pipeline (examples/default-model) at a micro scale on CPU: the training forward
matches mlx-lm's, training resumes exactly, the export loads with mlx-lm, moedec and the mtp/eagle
loaders (whose outputs equal the training forwards), moedec.load(None) picks a bundled model, and the
wheel carries it. If core/default_model/ ships, ``moedec generate`` with no --model uses it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "default-model"
sys.path.insert(0, str(EXAMPLE))

import dm_model  # noqa: E402
import train as dm_train  # noqa: E402
from dm_train_lib import Interrupted, Phase  # noqa: E402

import moedec  # noqa: E402
import moedec.models  # noqa: E402

HAS_MTP_LOADER = (ROOT / "strategies" / "mtp_loader.py").is_file()

MICRO = dict(
    vocab=300, seq=24, batch=2,
    target=dict(hidden_size=64, num_hidden_layers=2, intermediate_size=64, moe_intermediate_size=64,
                n_routed_experts=16, num_experts_per_tok=2, num_attention_heads=2, num_key_value_heads=1,
                head_dim=32),
    draft=dict(hidden_size=64, num_hidden_layers=1, intermediate_size=64, num_attention_heads=2,
               num_key_value_heads=1, head_dim=32),
    eagle=dict(intermediate_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=32),
)
MICRO_HYPER = dict(lr=3e-3, heads_lr=3e-3, warmup=4, heads_warmup=4, cal=(1, 3), min_steps=2, max_steps=50,
                   log_every=1, valid_points=1, ckpt_every_s=1e9)


@pytest.fixture(scope="module")
def micro():
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(dm_model.SIZES, "micro", MICRO)
        mp.setitem(dm_train.HYPER, "micro", MICRO_HYPER)
        yield


@pytest.fixture(scope="module")
def built(micro, tmp_path_factory):
    """A micro corpus, tokenizer, 3+2 training steps and an unquantized and an 8-bit export."""
    import build_corpus
    import train_tokenizer
    from export import export

    d = tmp_path_factory.mktemp("dm")
    corpus, tok, work = d / "corpus", d / "tok", d / "work"
    build_corpus.build(corpus, valid_percent=20, max_files=12)
    train_tokenizer.train(corpus, tok, MICRO["vocab"])
    run = dm_train.train(work, corpus, tok, size="micro", target_steps=3, heads_steps=2)
    exports = {bits: export(work, d / f"export{bits}", tok, bits=bits, group_size=32) for bits in (0, 8)}
    return {"dir": d, "corpus": corpus, "tok": tok, "work": work, "run": run, "exports": exports}


def test_dense_moe_training_forward_equals_mlx_lm(micro):
    t = dm_train.build_target("micro", 300, seed=3)
    for gate in [l.mlp.gate for l in t.lm.model.layers[1:]]:  # spread the router's selection bias
        gate.e_score_correction_bias = 0.05 * mx.random.normal(gate.e_score_correction_bias.shape, key=mx.random.key(1))
    x = mx.random.randint(0, 300, (2, 11), key=mx.random.key(0))
    ref = t.lm.model(x)  # mlx-lm's own forward (SwitchGLU, gather_mm)
    assert mx.allclose(dm_model.target_hidden(t.lm, x, "dense"), ref, atol=1e-5)
    assert mx.allclose(dm_model.target_hidden(t.lm, x, "switch"), ref, atol=1e-5)


def test_rebalance_moves_bias_towards_underused_experts(micro):
    t = dm_train.build_target("micro", 300, seed=0)
    counts = mx.zeros((2, 16)).at[:, 0].add(10.0)  # expert 0 overloaded in both MoE layers
    dm_model.rebalance(t, counts, 0.01)
    b = t.lm.model.layers[1].mlp.gate.e_score_correction_bias
    assert float(b[0]) < 0 < float(b[1]) and float(t.mtp.mlp.gate.e_score_correction_bias[0]) < 0
    assert not any("e_score_correction_bias" in k for k, _ in _flat(t.trainable_parameters()))


def _flat(tree):
    from mlx.utils import tree_flatten

    return tree_flatten(tree)


def test_phase_resumes_bit_exactly(micro, tmp_path):
    data = {"train": np.arange(5000, dtype=np.int32) % 300, "valid": np.arange(500, dtype=np.int32) % 300}

    def phase(work, deadline=None):
        t = dm_train.build_target("micro", 300, seed=0)
        return t, Phase("target", t, lambda m, b, k: dm_model.target_loss(m, b, 0.3), ["main", "mtp"],
                        work=work, data=data, seed=0, batch=2, seq=16, lr=1e-2, warmup=2, steps=5,
                        budget_s=None, min_steps=1, max_steps=10, after_step=lambda m, a: dm_model.rebalance(m, a[2], 1e-3),
                        deadline=deadline, log_every=1)

    t1, p1 = phase(tmp_path / "a")
    p1.run(tmp_path / "a.csv")
    _, p2 = phase(tmp_path / "b", deadline=0.0)  # stops (with a checkpoint) after every step
    stops = 0
    while True:
        try:
            p2.run(tmp_path / "b.csv")
            break
        except Interrupted:
            stops += 1
            _, p2 = phase(tmp_path / "b", deadline=0.0)
    assert stops == 4
    t2, p3 = phase(tmp_path / "b")
    p3.run(tmp_path / "b.csv")  # done: reloads the final weights
    for (k, a), (_, b) in zip(_flat(t1.parameters()), _flat(t2.parameters())):
        assert mx.array_equal(a, b), k
    rows = (tmp_path / "b.csv").read_text().splitlines()
    assert [r.split(",")[1] for r in rows[1:] if r.endswith("train")] == ["1", "2", "3", "4", "5"]


def test_export_loads_with_mlx_lm_and_moedec(built):
    from mlx_lm.utils import load as mlx_load
    from mlx_lm.utils import load_model

    for bits, summary in built["exports"].items():
        out = built["dir"] / f"export{bits}"
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["model_type"] == "glm4_moe" and cfg["num_nextn_predict_layers"] == 1
        assert ("quantization" in cfg) == bool(bits)
        assert cfg["n_routed_experts"] >= 16 and cfg["num_experts_per_tok"] >= 2 and cfg["n_shared_experts"] == 1
        model, tok = mlx_load(str(out))  # mlx-lm drops the MTP keys and loads the rest strictly
        assert tok.encode("def f(x):\n") and tok.eos_token_id == 0
        load_model(out / "draft")
        m, t = moedec.load(out)
        g = moedec.generate(m, "def f(x):", max_tokens=6, tokenizer=t, eos_token_ids=[])
        assert len(g.tokens) == 6 and isinstance(g.text, str)
        n = cfg["num_hidden_layers"]
        keys = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"])
        for k in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                  "shared_head.head.weight", "mlp.gate.weight", "self_attn.q_proj.weight"):
            assert f"model.layers.{n}.{k}" in keys
        assert all(int(v) < 16 << 20 for v in summary["files"].values())


@pytest.mark.skipif(not HAS_MTP_LOADER, reason="strategies/mtp_loader.py not present yet")
def test_mtp_loader_finds_the_trained_layer_and_matches_training(built):
    from moedec.strategies.mtp_loader import load_mtp

    trained, _, run = dm_train.load_trained(built["work"])
    out = built["dir"] / "export0"
    model, _ = moedec.load(out)
    (layer,) = load_mtp(model, out)
    x = mx.array([[5, 17, 42, 7, 99, 3, 12, 64]])
    h = model.model(x[:, :-1])  # [1, T, D]
    got = layer.logits(layer(h, x[:, 1:], model), model)
    want = dm_model.mtp_logits(trained, dm_model.target_hidden(trained.lm, x[:, :-1]), x[:, 1:], "dense", [])
    assert mx.allclose(got, want, atol=1e-4)
    q = built["dir"] / "export8"
    qm, _ = moedec.load(q)
    (ql,) = load_mtp(qm, q)
    assert ql.logits(ql(qm.model(x[:, :-1]), x[:, 1:], qm), qm).shape == want.shape


def test_eagle_head_and_draft_load_with_the_strategies(built):
    eagle = pytest.importorskip("moedec.strategies.eagle")
    _, heads, _ = dm_train.load_trained(built["work"])
    out = built["dir"] / "export0"
    model, _ = moedec.load(out)
    head = eagle.load_eagle_head(out / "eagle", model)
    h = model.model(mx.array([[5, 17, 42, 7, 99]]))
    toks = mx.array([[17, 42, 7, 99, 3]])
    assert mx.allclose(head(h, toks, model), heads.eagle(h, toks, model), atol=1e-5)
    eagle.load_eagle_head(built["dir"] / "export8" / "eagle", model)  # quantized head


@pytest.mark.parametrize("strategy", ["mtp", "eagle", "draft-model"])
def test_strategies_run_losslessly_on_the_export(built, strategy):
    from moedec.plugins import get_manager
    from moedec.testing import assert_lossless

    if strategy not in get_manager().strategies:
        pytest.skip(f"{strategy} is not registered")
    out = built["dir"] / "export8"
    model, _ = moedec.load(out)
    opts = {"mtp": {"checkpoint": str(out)}, "eagle": {"head": str(out / "eagle")},
            "draft-model": {"draft_model": str(out / "draft")}}[strategy]
    assert_lossless(strategy, model=model, prompts=[[5, 17, 42, 7], [1, 2, 3, 1, 2, 3, 1]], max_tokens=12, **opts)


def test_load_none_prefers_a_bundled_model(built, monkeypatch):
    out = built["dir"] / "export8"
    monkeypatch.setattr(moedec.models, "BUNDLED_DIR", out)
    model, tok = moedec.load(None)
    assert model.moedec_label == moedec.models.BUNDLED_LABEL and model.args.model_type == "glm4_moe"
    assert Path(model.moedec_path) == out.resolve()
    monkeypatch.setattr(moedec.models, "BUNDLED_DIR", built["dir"] / "absent")
    model, _ = moedec.load(None)
    assert model.moedec_label == moedec.models.DEFAULT_LABEL  # the random fallback


def test_wheel_ships_the_bundled_model(built, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, src / name)
    for pkg in ("core", "strategies", "kernels", "plugins"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__", "default_model"))
    shutil.copytree(built["dir"] / "export8", src / "core" / "default_model")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path / "whl"), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (whl,) = (tmp_path / "whl").glob("moedec-*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    shipped = {f"moedec/default_model/{p.relative_to(src / 'core' / 'default_model').as_posix()}"
               for p in (src / "core" / "default_model").rglob("*") if p.is_file()}
    assert shipped <= names, sorted(shipped - names)
    assert "moedec/default_model/eagle/eagle.safetensors" in names and "moedec/default_model/draft/config.json" in names
    # installed from the wheel, `moedec generate` with no --model decodes with the shipped model
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(whl)],
                   check=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    p = subprocess.run([str(venv / "bin" / "moedec"), "generate", "def fib(n):", "-n", "5", "--json"],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    out = json.loads([l for l in p.stdout.splitlines() if l.startswith("{")][-1])
    assert out["model"] == moedec.models.BUNDLED_LABEL and out["stats"]["generated_tokens"] == 5


BUNDLED = ROOT / "core" / "default_model"


@pytest.mark.skipif(not (BUNDLED / "config.json").is_file(), reason="no trained model in core/default_model")
def test_generate_without_model_uses_the_bundled_model():
    from typer.testing import CliRunner

    from moedec.cli import app

    r = CliRunner().invoke(app, ["generate", "def fibonacci(n):", "--max-tokens", "16"])
    assert r.exit_code == 0, r.output
    assert "bundled default model" in r.output and "16 tokens" in r.output
    weights = sum(p.stat().st_size for p in BUNDLED.rglob("*.safetensors"))
    assert weights <= 25e6
