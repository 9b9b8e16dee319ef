import os

import pytest
from hypothesis import HealthCheck, settings

# CI's profile: the property tests run >= 200 examples; "dev" is quicker for local iteration.
settings.register_profile(
    "ci", max_examples=200, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev", max_examples=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` are skipped unless MLX runs on a GPU with a fused backend."""
    from moedec.kernels import BACKENDS, device_backend

    if device_backend() in BACKENDS:
        return
    skip = pytest.mark.skip(reason="needs MLX on a GPU (CUDA); run on the device machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_compiled_steps():
    """Each test traces its own compiled steps (tests patch what a kept trace was traced with)."""
    from moedec import compiled

    compiled.clear_traces()
    yield
    compiled.clear_traces()
