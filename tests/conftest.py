"""Test configuration shared by the whole suite: marker registration only."""


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "gpu: needs a CUDA GPU (and NCCL for the NCCL tests); skipped with the reason when there is none",
    )
