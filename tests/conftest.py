"""Shared pytest setup: Triton kernels run interpreted on the CPU; the `gpu` marker skips without CUDA."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Before any module imports triton: `triton.jit` decides at decoration time whether a kernel is
    # interpreted, so setting this later (in one test module) breaks kernels imported earlier.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
