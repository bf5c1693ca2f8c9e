"""The tests that run the real trainer: a fresh folder per test module for the runs, beside the session's inputs."""
import pytest


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_inputs):
    """(a folder for this module's runs, dataset folder, model folder)."""
    return (tmp_path_factory.mktemp("runs"), *tiny_inputs)
