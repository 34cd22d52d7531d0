"""Test configuration shared by the whole suite: markers, the number of
pytest-xdist workers and shared fixtures."""

import os

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "gpu: needs a CUDA GPU (and NCCL for the NCCL tests); skipped with the reason when there is none",
    )


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker per core this process may run on, at most 4 (the
    multi-process tests start up to 5 rank processes of their own)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, 4))


@pytest.fixture
def one_thread():
    """Run a test with one intra-op thread: the same kernels, hence the same bits, as the rank
    processes (which run with one thread each)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def pipes():
    """``pipes(arch)``: the tiny pipeline of ``arch`` (seed 0), built once per test module."""
    from asyncdiff.testing import tiny

    built = {}

    def get(arch):
        if arch not in built:
            built[arch] = tiny.build_pipeline(arch, seed=0)
        return built[arch]

    return get
