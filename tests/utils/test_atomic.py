"""Atomic directory writes (ochat.utils.atomic): swap in, never delete what ochat did not write, clean leftovers."""
import json
import os
import socket
import subprocess
import sys

import pytest

from ochat.utils.atomic import MARKER, RefusedOverwrite, atomic_directory, clean_stale_temporaries, read_marker


def write(target, text, kind="dataset", **kw):
    real = target.resolve()  # a symbolic link is written through
    with atomic_directory(target, kind, **kw) as tmp:
        assert tmp.parent == real.parent and tmp.name.startswith(f".{real.name}.tmp-{os.getpid()}-")
        assert read_marker(tmp)["kind"] == kind  # recognisable from the start
        (tmp / "data.txt").write_text(text)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "x.bin").write_bytes(os.urandom(100))


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_write_then_replace(tmp_path):
    target = tmp_path / "out"
    write(target, "one")
    assert listing(target) == [MARKER, "data.txt", "sub"] and (target / "data.txt").read_text() == "one"
    marker = read_marker(target)
    assert marker == {"written_by": "ochat", "kind": "dataset", "pid": os.getpid(), "host": socket.gethostname()}
    write(target, "two")
    assert (target / "data.txt").read_text() == "two" and listing(tmp_path) == ["out"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o777 & ~umask  # like a plain mkdir, not mkdtemp's 0700


def test_exception_leaves_target_as_it_was(tmp_path):
    target = tmp_path / "out"
    write(target, "one")
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(target, "dataset") as tmp:
            (tmp / "data.txt").write_text("partial")
            raise KeyboardInterrupt
    assert (target / "data.txt").read_text() == "one" and listing(tmp_path) == ["out"]


def test_refuses_what_ochat_did_not_write(tmp_path):
    target = tmp_path / "project"
    target.mkdir()
    (target / "meta.json").write_text("{}")
    with pytest.raises(RefusedOverwrite, match="is not empty and was not written by ochat"):
        write(target, "x")
    assert listing(target) == ["meta.json"] and listing(tmp_path) == ["project"]
    # a marker of another kind, or a forged one, is not enough either
    (target / MARKER).write_text(json.dumps({"written_by": "ochat", "kind": "checkpoint"}))
    with pytest.raises(RefusedOverwrite, match="holds an ochat checkpoint, not a dataset"):
        write(target, "x")
    (target / MARKER).write_text("not json")
    with pytest.raises(RefusedOverwrite):
        write(target, "x")
    write(target, "x", overwrite=True)
    assert listing(target) == [MARKER, "data.txt", "sub"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(RefusedOverwrite, match="exists and is not a directory"):
        write(tmp_path / "file", "x", overwrite=True)
    (tmp_path / "empty").mkdir()
    write(tmp_path / "empty", "x")


def dead_pid():
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def fake_temporary(parent, name, pid, marker=True, host=None):
    folder = parent / f".{name}.tmp-{pid}-abc123"
    folder.mkdir()
    if marker:
        (folder / MARKER).write_text(json.dumps({"written_by": "ochat", "kind": "dataset", "pid": pid,
                                                 "host": host or socket.gethostname()}))
    (folder / "train.arrow").write_bytes(b"\0" * 1000)
    return folder


def test_stale_temporaries(tmp_path):
    target = tmp_path / "out"
    dead = fake_temporary(tmp_path, "out", dead_pid())
    running = fake_temporary(tmp_path, "out", os.getpid())
    elsewhere = fake_temporary(tmp_path, "out", dead_pid(), host="other-host")
    unmarked = fake_temporary(tmp_path, "out", dead_pid(), marker=False)
    other_target = fake_temporary(tmp_path, "other", dead_pid())
    notes = []
    assert clean_stale_temporaries(target, notes.append) == [dead]
    assert not dead.exists() and running.exists() and elsewhere.exists() and unmarked.exists() and other_target.exists()
    assert len(notes) == 4
    assert any(f"removed {dead}" in n for n in notes) and any("still running" in n for n in notes)
    assert any("'other-host'" in n for n in notes) and any(f"{unmarked} looks like a temporary folder" in n for n in notes)
    # a write to the target cleans first
    dead = fake_temporary(tmp_path, "out", dead_pid())
    write(target, "x", notify=notes.append)
    assert not dead.exists() and (target / "data.txt").exists()


def test_symlinked_target_stays_a_link(tmp_path):
    real = tmp_path / "disk" / "data"
    real.parent.mkdir()
    write(real, "one")
    (tmp_path / "data").symlink_to(real)
    write(tmp_path / "data", "two")
    assert (tmp_path / "data").is_symlink() and (real / "data.txt").read_text() == "two"
    assert listing(real.parent) == ["data"]


def test_overwrite_never_replaces_a_foreign_folder_through_a_link(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep")
    link = tmp_path / "final"
    link.symlink_to(foreign)
    with pytest.raises(RefusedOverwrite, match="was not written by ochat"):
        write(link, "checkpoint", kind="checkpoint", overwrite=True)
    assert listing(foreign) == ["precious.txt"] and link.is_symlink()


def test_files_get_the_users_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "out", "checkpoint") as tmp:
            fd = os.open(tmp / "private.bin", os.O_CREAT | os.O_WRONLY, 0o600)  # as some writers make them
            os.close(fd)
    finally:
        os.umask(old)
    assert (tmp_path / "out" / "private.bin").stat().st_mode & 0o777 == 0o644
