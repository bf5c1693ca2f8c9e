"""llama.cpp's Hugging Face -> GGUF converter for the tests, taken from the llama-cpp-python source distribution
on PyPI (its `vendor/llama.cpp`): only the converter script and the Python packages it imports are unpacked."""
import os
import tarfile
from pathlib import Path

from tests.helpers.pypi import download_release

LLAMA_CPP_PYTHON = "0.3.36"  # pinned: the converter's behaviour is part of what the test checks
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "gguf-py", "conversion")


def fetch_converter(into: Path) -> Path:
    """Download the pinned sdist, unpack the converter's parts under `into`; returns the llama.cpp folder.
    Raises OSError when PyPI cannot be reached."""
    archive = download_release("llama-cpp-python", LLAMA_CPP_PYTHON, "sdist", into)
    with tarfile.open(archive) as tar:
        parts = [m for m in tar.getmembers()
                 if (p := m.name.split("/"))[1:3] == ["vendor", "llama.cpp"] and len(p) > 3 and p[3] in CONVERTER_PARTS]
        tar.extractall(into, members=parts, filter="data")
    os.remove(archive)
    return into / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
