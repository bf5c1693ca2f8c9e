"""Files of a pinned release from PyPI for tests that need what a package ships without installing it (and its
dependencies): the JSON index, then the file. Raises OSError when PyPI cannot be reached."""
import json
import urllib.parse
import urllib.request
from pathlib import Path

INDEX = "https://pypi.org/pypi/{project}/json"


def download_release(project: str, version: str, packagetype: str, into: Path) -> Path:
    """Download `project` `version`'s file of `packagetype` ("sdist" or "bdist_wheel") into `into`; returns it."""
    index = INDEX.format(project=project)
    with urllib.request.urlopen(index, timeout=30) as r:
        files = json.load(r)["releases"].get(version, [])
    found = next((f for f in files if f["packagetype"] == packagetype), None)
    if found is None:
        raise OSError(f"PyPI lists no {packagetype} of {project} {version}")
    path = into / found["filename"]
    urllib.request.urlretrieve(urllib.parse.urljoin(index, found["url"]), path)
    return path
