"""GPU kernel tests: marked `gpu`; skipped when CUDA is unavailable, and tests that use the `ext` fixture
also when orthrus_ext is not importable or was built without its CUDA kernels."""

import random

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (and, through `ext`, orthrus_ext built with CUDA)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="CUDA is not available")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ext():
    try:
        import orthrus_ext
    except ImportError as error:
        pytest.skip(f"orthrus_ext is not importable: {error}")
    if not orthrus_ext.has_cuda():
        pytest.skip("orthrus_ext was built without CUDA kernels")
    return orthrus_ext


@pytest.fixture(autouse=True)
def _fresh_seed():
    # Fresh random inputs every run; pytest shows this line for a failing test, so it can be replayed.
    seed = torch.seed() % (2**31)
    torch.manual_seed(seed)
    random.seed(seed)
    print(f"random seed: {seed}")
