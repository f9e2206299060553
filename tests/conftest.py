"""Shared test set-up: CPU only, x64 fixture, slow-test switch."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests check mathematics, not speed: skip XLA's expensive CPU back-end
# optimisations (2-3x faster compiles; same operations, so the same results
# up to floating-point reassociation).  DUALFLOW_TEST_FULL_XLA=1 keeps them.
if not os.environ.get("DUALFLOW_TEST_FULL_XLA"):
    _fast = (
        "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    )
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_fast}".strip()

import jax  # noqa: E402
import pytest  # noqa: E402


def pytest_addoption(parser):
    parser.addoption(
        "--runslow", action="store_true", default=False, help="run tests marked slow"
    )


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def x64():
    """Run the test body with 64-bit floats enabled."""
    with jax.enable_x64(True):
        yield
