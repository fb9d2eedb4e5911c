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
