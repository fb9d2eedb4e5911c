"""Shared test fixtures: paths to the shared assets, and a skip that says why when they are absent."""
import os
import pathlib

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
REAL_TOKENIZER = SHARED / "assets" / "internlm2_tokenizer.model"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def real_tokenizer_path():
    if not REAL_TOKENIZER.exists():
        pytest.skip(f"the real InternLM2 tokenizer is not at {REAL_TOKENIZER} (../shared is absent)")
    return REAL_TOKENIZER


def pytest_configure(config):
    config.addinivalue_line("markers", "waits: spends most of its time waiting out a timeout (scheduled first)")


def pytest_collection_modifyitems(config, items):
    # The SIGSTOP tests sleep through --dist-timeout and torchrun's 30 s grace period: started first, under
    # pytest-xdist they overlap with the CPU-bound tests instead of trailing after them.
    items.sort(key=lambda item: item.get_closest_marker("waits") is None)
