"""Write a directory atomically: fill a temporary folder next to the target, then swap it in.

    with atomic_directory("data/mix", kind="dataset") as tmp:
        (tmp / "train.arrow").write_bytes(...)
    # data/mix now holds exactly what was written, or (on any exception) is untouched

Every folder written this way carries a marker file, `.ochat.json` ({"written_by": "ochat", "kind", "pid",
"host"}), from its first moment as a temporary folder `.NAME.tmp-PID-XXXXXXXX`. The marker is how ochat
recognises its own folders: an existing target is replaced without `overwrite=True` only when it holds a
marker of the same kind, and a later run deletes a leftover temporary folder (a process killed with SIGKILL
cannot clean up) only when its marker names this host and a process that no longer runs. Nothing else is
ever deleted: other leftovers are reported through `notify`.

On exit the files are fsynced, then the folder takes the target's place: on Linux in one
`renameat2(RENAME_EXCHANGE)` (readers see the old or the new folder, never none), elsewhere by two
renames; the replaced folder is removed afterwards.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator

MARKER = ".ochat.json"


class RefusedOverwrite(Exception):
    """The target exists, is not empty and was not written by ochat (or holds another kind of output)."""


def read_marker(folder) -> dict | None:
    """The folder's ochat marker ({"written_by": "ochat", "kind", ...}), or None when it has none."""
    try:
        with open(Path(folder) / MARKER) as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("written_by") == "ochat" else None


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def clean_stale_temporaries(target, notify: Callable[[str], None] = lambda msg: None) -> list[Path]:
    """Delete temporary folders that an earlier, killed write to `target` left behind; returns them.

    Deleted: `.NAME.tmp-PID...` folders whose marker names this host and a PID that no longer runs.
    Reported through `notify` and kept: ones that hold no marker (older ochat versions wrote none) or belong
    to a running process or another host."""
    target = Path(target)
    pattern = re.compile(rf"\.{re.escape(target.name)}\.tmp-(\d+)(-\w+)?")
    removed = []
    try:
        siblings = list(target.parent.iterdir())
    except OSError:
        return removed
    for path in sorted(siblings):
        match = pattern.fullmatch(path.name)
        if not match or not path.is_dir() or path.is_symlink():
            continue
        marker = read_marker(path)
        if marker is None:
            notify(f"{path} looks like a temporary folder of an interrupted run but holds no ochat marker; "
                   "delete it by hand if it is not in use")
        elif marker.get("host") != socket.gethostname():
            notify(f"{path} is a temporary folder of a run on host {marker.get('host')!r}; delete it by hand if "
                   "that run has ended")
        elif _pid_running(int(match.group(1))):
            notify(f"{path} belongs to process {match.group(1)}, which is still running (another write to "
                   f"{target}?); left alone")
        else:
            shutil.rmtree(path)
            removed.append(path)
            notify(f"removed {path}, left behind by process {match.group(1)}, which no longer runs")
    return removed


def check_replaceable(target, kind: str, overwrite: bool = False) -> None:
    """Raise RefusedOverwrite unless `target` is absent, empty, ochat's own output of `kind`, or `overwrite`."""
    target = Path(target)
    if not target.exists():
        return
    if not target.is_dir():
        raise RefusedOverwrite(f"{target} exists and is not a directory")
    if overwrite or not any(target.iterdir()):
        return
    marker = read_marker(target)
    if marker is None:
        raise RefusedOverwrite(f"{target} is not empty and was not written by ochat (no {MARKER}); "
                               "choose another folder or pass --overwrite to replace it")
    if marker.get("kind") != kind:
        raise RefusedOverwrite(f"{target} holds an ochat {marker.get('kind')}, not a {kind}; choose another "
                               "folder or pass --overwrite to replace it")


def fsync_path(path) -> None:
    """fsync a file or a folder (a folder: its entries, e.g. after a rename into it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            fsync_path(Path(folder) / name)
        fsync_path(Path(folder))


def _plain_modes(root: Path) -> None:
    """Give every file the mode a plain open() gives under the user's umask (some writers make private files:
    a serving account must be able to read the weights)."""
    mode = 0o666 & ~_umask()
    for folder, _, files in os.walk(root):
        for name in files:
            os.chmod(Path(folder) / name, mode)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2); False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except AttributeError:  # glibc < 2.28
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: file system or kernel without it
        return False
    raise OSError(errno, os.strerror(errno), str(a))


@contextlib.contextmanager
def atomic_directory(target, kind: str, *, overwrite: bool = False,
                     notify: Callable[[str], None] = lambda msg: None) -> Iterator[Path]:
    """Yield an empty temporary folder next to `target`; on normal exit it replaces `target` atomically,
    on an exception (KeyboardInterrupt included) it is deleted and `target` is left as it was.

    `kind` names what the folder holds ("dataset", "checkpoint"): an existing non-empty `target` is replaced
    only when ochat wrote it as the same kind, or with `overwrite=True` (else RefusedOverwrite, raised before
    anything is written). Stale temporary folders of earlier killed writes are cleaned first (see
    `clean_stale_temporaries`); `notify` receives one line per folder removed or left. A `target` that is a
    symbolic link stays one: the folder it points to is replaced."""
    target = Path(target)
    through_link = target.is_symlink()
    if through_link:  # a link stays one; what it points to is replaced only when ochat wrote it
        target = target.resolve()
        overwrite = False
    check_replaceable(target, kind, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(target, notify)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the output gets a plain mkdir's mode
        with open(tmp / MARKER, "w") as f:
            json.dump({"written_by": "ochat", "kind": kind, "pid": os.getpid(), "host": socket.gethostname()}, f)
        yield tmp
        _plain_modes(tmp)
        _fsync_tree(tmp)
        check_replaceable(target, kind, overwrite)  # it may have changed while we wrote
        if target.exists() and _exchange(tmp, target):
            shutil.rmtree(tmp)  # now the replaced folder
        else:
            if target.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-{os.getpid()}-", dir=target.parent))
                os.replace(target, old)
                os.replace(tmp, target)
                shutil.rmtree(old)
            else:
                os.replace(tmp, target)
        fsync_path(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
