"""Shared pytest setup: Triton kernels run interpreted on the CPU; the `gpu` marker skips without CUDA; the inputs of
the tests that run the real trainer (the bundled sample pre-tokenized and a tiny random Llama), made once."""
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


@pytest.fixture(scope="session")
def tiny_inputs(tmp_path_factory) -> tuple[str, str]:
    """(dataset folder, model folder), read-only: the first 250 conversations of the bundled ShareGPT sample (2
    epochs on 2 ranks are 9 steps: enough for every resume case, half the CPU time of the whole sample) and a tiny
    Llama (4 query heads, 2 KV heads, vocabulary 32001), made once per session."""
    from ochat.demo import make_tiny_llama
    from tests.helpers.train import make_sample_dataset

    root = tmp_path_factory.mktemp("inputs")
    data, model = make_sample_dataset(str(root / "data"), conversations=250), str(root / "tiny")
    make_tiny_llama(model)
    return data, model
