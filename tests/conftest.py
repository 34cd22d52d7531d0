"""Test configuration shared by the whole suite: markers and shared fixtures."""

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "gpu: needs a CUDA GPU (and NCCL for the NCCL tests); skipped with the reason when there is none",
    )


@pytest.fixture
def one_thread():
    """Run a test with one intra-op thread: the same kernels, hence the same bits, as the rank
    processes (which run with one thread each)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
