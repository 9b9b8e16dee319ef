"""Fixtures of moedec's test kit. Loaded only when asked: ``pytest -p moedec.testing`` (or
``addopts = "-p moedec.testing"`` in the project's pytest configuration).

Why not a ``pytest11`` entry point: pytest imports every ``pytest11`` plugin into *every* test run
in the environment, and importing anything under ``moedec`` imports ``moedec`` itself, hence MLX.
An opt-in ``-p`` keeps unrelated projects' test runs untouched.
"""

from __future__ import annotations

import pytest

from moedec.testing import ARCHS, check_strategy, small_vocab_model, tiny_models


@pytest.fixture(params=ARCHS)
def tiny_model(request):
    """Each tiny random MoE model in turn (glm4_moe, qwen3_moe, mixtral; vocabulary 256)."""
    return tiny_models()[ARCHS.index(request.param)]


@pytest.fixture
def tiny_model_list():
    """All the tiny models at once, in :data:`moedec.testing.ARCHS` order."""
    return tiny_models()


@pytest.fixture
def sampling_model():
    """The small-vocabulary (16) glm4_moe the temperature > 0 checks use."""
    return small_vocab_model()


@pytest.fixture
def register_strategy(monkeypatch):
    """``register_strategy(cls)``: make a strategy class selectable by name (``moedec.generate(...,
    cls.name)``, ``check_strategy(cls.name)``) for this test only, as if a plugin registered it."""
    from moedec.plugins import StrategyInfo, get_manager

    host = get_manager()
    monkeypatch.setattr(host, "strategies", dict(host.strategies))

    def register(cls: type, package: str = "test") -> type:
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise ValueError(f"{cls!r} has no string `name`")
        if name in host.strategies:
            raise ValueError(f"strategy {name!r} is already registered by {host.strategies[name].package}")
        host.strategies[name] = StrategyInfo(name, cls, f"test:{cls.__module__}", package, "0")
        return cls

    return register


@pytest.fixture
def conformance():
    """:func:`moedec.testing.check_strategy` (raises ``ConformanceError`` naming each violation)."""
    return check_strategy
