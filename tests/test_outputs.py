"""The output primitives: publish complete or nothing, never over what appeared meanwhile, never onto an input;
sweep what killed runs left; OSErrors and signals as one line."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from lightning_tools import outputs
from lightning_tools.errors import Interrupted, OutputError, UserError
from lightning_tools.outputs import (MARKER, check_containment, deferred_interrupts, signals_as_errors, locked,
                                     os_error, output, stale_temps, sweep_stale, temp_path)


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- publishing ----------------------------------------------------------------------------------------------------

def test_file_and_folder_are_published_whole(tmp_path):
    with output(tmp_path / "out.bin") as tmp:
        assert tmp.parent == tmp_path and MARKER in tmp.name and str(os.getpid()) in tmp.name
        tmp.write_bytes(b"data")
        assert not (tmp_path / "out.bin").exists()
    with output(tmp_path / "folder") as tmp:
        tmp.mkdir()
        (tmp / "inner").mkdir()
        (tmp / "inner" / "f").write_text("x")
    assert (tmp_path / "out.bin").read_bytes() == b"data" and (tmp_path / "folder/inner/f").read_text() == "x"
    assert _entries(tmp_path) == ["folder", "out.bin"]


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_failure_leaves_nothing_and_no_temp(tmp_path, kind):
    with pytest.raises(RuntimeError):
        with output(tmp_path / "out") as tmp:
            tmp.mkdir() if kind == "folder" else tmp.write_bytes(b"partial")
            raise RuntimeError("killed")
    assert _entries(tmp_path) == []


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    (tmp_path / "out").write_text("old")
    with pytest.raises(OutputError, match="already exists; pass --overwrite"):
        with output(tmp_path / "out"):
            pass
    with output(tmp_path / "out", overwrite=True) as tmp:
        tmp.write_text("new")
    assert (tmp_path / "out").read_text() == "new" and _entries(tmp_path) == ["out"]


@pytest.mark.parametrize("old_kind, new_kind", [("file", "folder"), ("folder", "file"), ("folder", "folder")])
def test_overwrite_replaces_across_kinds(tmp_path, old_kind, new_kind):
    out = tmp_path / "out"
    if old_kind == "folder":
        out.mkdir()
        (out / "old").write_text("old")
    else:
        out.write_text("old")
    with output(out, overwrite=True) as tmp:
        if new_kind == "folder":
            tmp.mkdir()
            (tmp / "new").write_text("new")
        else:
            tmp.write_text("new")
    assert (out / "new" if new_kind == "folder" else out).read_text() == "new"
    assert _entries(tmp_path) == ["out"]


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_output_that_appears_meanwhile_is_kept_and_this_run_fails(tmp_path, kind):
    """Two runs to one output: the first to finish publishes; the other fails, leaving the first's result."""
    out = tmp_path / "out"
    with pytest.raises(OutputError, match="appeared while this run was writing it"):
        with output(out) as first:
            with output(out) as second:  # started later, finishes first
                second.mkdir() if kind == "folder" else second.write_text("second")
                if kind == "folder":
                    (second / "f").write_text("second")
            first.mkdir() if kind == "folder" else first.write_text("first")
    assert (out / "f" if kind == "folder" else out).read_text() == "second"
    assert _entries(tmp_path) == ["out"]


def test_concurrent_writers_exactly_one_wins(tmp_path):
    out = tmp_path / "out"
    ready = threading.Barrier(6)
    results: dict[int, str] = {}

    def run(i: int) -> None:
        try:
            with output(out) as tmp:
                tmp.write_text(f"writer {i}")
                ready.wait()
            results[i] = "published"
        except OutputError as e:
            results[i] = str(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, r in results.items() if r == "published"]
    assert len(winners) == 1 and out.read_text() == f"writer {winners[0]}"
    assert all("appeared while" in r for i, r in results.items() if i != winners[0])
    assert _entries(tmp_path) == ["out"]


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_portable_fallbacks_never_clobber(tmp_path, kind):
    """Where renameat2 is missing: a hard link (file) or a checked rename (folder)."""
    tmp, out = tmp_path / "tmp", tmp_path / "out"
    for path in (tmp, out):
        path.mkdir() if kind == "folder" else path.write_text(path.name)
    if kind == "folder":
        (out / "keep").write_text("out")
    with pytest.raises(FileExistsError):
        outputs._publish_new_portably(tmp, out)
    assert (out / "keep" if kind == "folder" else out).read_text() == "out"
    outputs._replace_portably(tmp, out)
    assert not tmp.exists() and (out.is_dir() if kind == "folder" else out.read_text() == "tmp")
    assert _entries(tmp_path) == ["out"]
    fresh = tmp_path / "fresh"
    fresh.mkdir() if kind == "folder" else fresh.write_text("fresh")
    outputs._publish_new_portably(fresh, tmp_path / "new")
    assert _entries(tmp_path) == ["new", "out"]


def test_data_reaches_the_disk_before_the_name(tmp_path, monkeypatch):
    """fsync of the data before the publishing rename, and of the folder after it: a crash never leaves a short
    file under the final name."""
    out = tmp_path / "out"
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append((os.fstat(fd).st_ino, out.exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with output(out) as tmp:
        tmp.write_bytes(b"x" * 1000)
        inode = tmp.stat().st_ino
    assert (inode, False) in synced
    assert (tmp_path.stat().st_ino, True) == synced[-1]


def test_temp_names_are_unique_and_fit_the_filesystem(tmp_path):
    long = tmp_path / ("n" * 250 + ".safetensors")
    names = {temp_path(long).name for _ in range(50)}
    assert len(names) == 50
    assert all(len(os.fsencode(n)) <= 255 and MARKER in n for n in names)
    with pytest.raises(OutputError, match="longer than the filesystem allows"):
        with output(tmp_path / ("n" * 300)):
            pass


# --- containment ---------------------------------------------------------------------------------------------------

@pytest.fixture
def model(tmp_path) -> Path:
    folder = tmp_path / "base"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "w.safetensors").write_bytes(b"weights")
    return folder


@pytest.mark.parametrize("out, why", [
    ("base", "is an input"),
    ("base/unet/w.safetensors", "lies inside the input"),
    ("base/new.safetensors", "lies inside the input"),
    (".", "contains the input"),
    ("link/unet/w.safetensors", "lies inside the input"),  # through a symlink to the input
    ("hardlink.safetensors", "is an input"),
])
def test_output_may_not_be_hold_or_lie_inside_an_input(tmp_path, model, out, why):
    (tmp_path / "link").symlink_to(model)
    os.link(model / "unet" / "w.safetensors", tmp_path / "hardlink.safetensors")
    inputs = [model, model / "unet" / "w.safetensors"] if out == "hardlink.safetensors" else [model]
    with pytest.raises(OutputError, match=why):
        check_containment(tmp_path / out, inputs)
    assert (model / "unet" / "w.safetensors").read_bytes() == b"weights"


def test_sibling_of_an_input_is_fine(tmp_path, model):
    check_containment(tmp_path / "base-merged", [model, None])
    check_containment(tmp_path / "base.safetensors", [model])


# --- stale temporaries ---------------------------------------------------------------------------------------------

def test_sweep_removes_only_temps_of_dead_runs(tmp_path, caplog):
    dead = _dead_pid()
    (tmp_path / f".a.safetensors{MARKER}{dead}-0123abcd").write_bytes(b"x" * 1000)
    folder = tmp_path / f".pipe{MARKER}{dead}-89abcdef"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "w").write_bytes(b"y" * 500)
    (tmp_path / f".old.safetensors.{dead}.partial").write_bytes(b"z" * 10)  # what earlier versions left
    alive = tmp_path / f".b.safetensors{MARKER}{os.getpid()}-0123abcd"
    alive.write_bytes(b"mine")
    keep = [tmp_path / "notes.txt", tmp_path / f".c{MARKER}{dead}-nothex!", tmp_path / f".d.{dead}.old"]
    for path in keep:
        path.write_text("user's")

    assert sorted(s.nbytes for s in stale_temps(tmp_path)) == [10, 500, 1000]
    with caplog.at_level(logging.INFO, logger="lightning_tools"):
        with output(tmp_path / "new") as tmp:
            tmp.write_text("new")
    assert "removed 3 partial outputs of interrupted runs" in caplog.text and "1.5 kB freed" in caplog.text
    assert _entries(tmp_path) == sorted([alive.name, "new", *(p.name for p in keep)])
    assert sweep_stale(tmp_path) == (0, 0)


def test_a_folder_another_writer_holds_is_not_swept(tmp_path):
    """A run in another container has a pid we cannot see; its lock on the folder says it is alive."""
    temp = tmp_path / f".x{MARKER}{_dead_pid()}-0123abcd"
    temp.write_text("theirs")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        assert stale_temps(tmp_path) == [] and sweep_stale(tmp_path) == (0, 0)
    finally:
        os.close(fd)
    assert sweep_stale(tmp_path) == (1, 6)


def test_locked_serialises_read_modify_write(tmp_path):
    counter = tmp_path / "count"
    counter.write_text("0")

    def bump() -> None:
        for _ in range(50):
            with locked(tmp_path / ".lock"):
                value = int(counter.read_text())
                counter.write_text(str(value + 1))

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counter.read_text() == "200"


# --- errors and signals --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("code, words", [
    (errno.ENOSPC, "no space left"), (errno.EDQUOT, "quota"), (errno.EFBIG, "ulimit -f"),
    (errno.EROFS, "read-only"), (errno.EACCES, "permission denied"), (errno.EIO, "input/output error"),
    (errno.ENAMETOOLONG, "shorter name"), (errno.ENOTDIR, "not a folder"),
])
def test_os_errors_are_one_line_with_the_file_and_what_to_do(code, words):
    error = os_error(OSError(code, os.strerror(code), "/x/.out.safetensors.lt-partial-12-0123abcd/unet/w"))
    assert isinstance(error, UserError) and words in str(error) and "\n" not in str(error)
    assert str(error).startswith("/x/out.safetensors/unet/w: ")  # the path the user asked for, not the temp


def test_write_error_names_the_output_and_cleans_up(tmp_path):
    with pytest.raises(UserError, match=r"out\.bin: no space left on the device"):
        with output(tmp_path / "out.bin") as tmp:
            tmp.write_text("partial")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert _entries(tmp_path) == []


@pytest.mark.parametrize("signum, kind", [(signal.SIGTERM, "file"), (signal.SIGHUP, "folder"),
                                          (signal.SIGINT, "file")])
def test_signal_cleans_up_and_exits_128_plus_its_number(tmp_path, signum, kind):
    # The suite may run with the signal ignored (under nohup, or in a shell's background): start from the default.
    inherited = signal.signal(signum, signal.SIG_DFL)
    try:
        with pytest.raises(Interrupted) as caught:
            with signals_as_errors():
                with output(tmp_path / "out") as tmp:
                    if kind == "folder":
                        tmp.mkdir()
                        tmp = tmp / "weights"
                    tmp.write_text("partial")
                    os.kill(os.getpid(), signum)
                    signal.pthread_sigmask(signal.SIG_BLOCK, [])  # a point where Python runs the handler
                    raise AssertionError("the signal did not interrupt")
        restored = signal.getsignal(signum)
    finally:
        signal.signal(signum, inherited)
    assert caught.value.exit_code == 128 + signum and caught.value.name == signal.Signals(signum).name
    assert _entries(tmp_path) == [] and restored == signal.SIG_DFL


def test_signal_while_publishing_waits_for_the_publish(tmp_path):
    with pytest.raises(Interrupted):
        with signals_as_errors():
            with deferred_interrupts():
                os.kill(os.getpid(), signal.SIGTERM)
                signal.pthread_sigmask(signal.SIG_BLOCK, [])
                (tmp_path / "published").write_text("whole")  # still runs
    assert (tmp_path / "published").read_text() == "whole"


def test_ignored_signal_stays_ignored(tmp_path):
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
    try:
        with signals_as_errors():
            with output(tmp_path / "out") as tmp:
                tmp.write_text("done")
                os.kill(os.getpid(), signal.SIGHUP)
                signal.pthread_sigmask(signal.SIG_BLOCK, [])
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert (tmp_path / "out").read_text() == "done"
