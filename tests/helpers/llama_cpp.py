"""llama.cpp's Hugging Face -> GGUF converter for the tests, taken from the llama-cpp-python source distribution
on PyPI (its `vendor/llama.cpp`): only the converter script and the Python packages it imports are unpacked."""
import json
import os
import tarfile
import urllib.parse
import urllib.request
from pathlib import Path

LLAMA_CPP_PYTHON = "0.3.36"  # pinned: the converter's behaviour is part of what the test checks
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "gguf-py", "conversion")


def fetch_converter(into: Path) -> Path:
    """Download the pinned sdist, unpack the converter's parts under `into`; returns the llama.cpp folder.
    Raises OSError when PyPI cannot be reached."""
    index = "https://pypi.org/pypi/llama-cpp-python/json"
    with urllib.request.urlopen(index, timeout=30) as r:
        files = json.load(r)["releases"].get(LLAMA_CPP_PYTHON, [])
    sdist = next((f for f in files if f["packagetype"] == "sdist"), None)
    if sdist is None:
        raise OSError(f"PyPI lists no source distribution of llama-cpp-python {LLAMA_CPP_PYTHON}")
    archive = into / sdist["filename"]
    urllib.request.urlretrieve(urllib.parse.urljoin(index, sdist["url"]), archive)
    with tarfile.open(archive) as tar:
        parts = [m for m in tar.getmembers()
                 if (p := m.name.split("/"))[1:3] == ["vendor", "llama.cpp"] and len(p) > 3 and p[3] in CONVERTER_PARTS]
        tar.extractall(into, members=parts, filter="data")
    os.remove(archive)
    return into / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
