"""Outputs that are complete and right, or absent: every file and folder this tool writes goes through `output`.

A run writes under a temporary name in the destination folder (`.NAME.lt-partial-<pid>-<random>`), flushes the
data to disk, and only then publishes it under the final name, without ever replacing a file that appeared
meanwhile (`--overwrite` replaces atomically). Whatever stops the run (an error, Ctrl-C, SIGTERM from
`docker stop` or systemd, SIGHUP) removes the temporary; what SIGKILL or a power cut leaves behind carries the
dead process's pid, and the next run writing to that folder sweeps it. Outputs never touch inputs: an output
may not be, contain or lie inside one. OSErrors become one line naming the file and what to do.

No torch import: `verify` and `inspect` use this module too.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import logging
import os
import re
import secrets
import shutil
import signal
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from lightning_tools.errors import Interrupted, OutputError, UserError

log = logging.getLogger(__name__)

MARKER = ".lt-partial-"
_TEMP = re.compile(r"\.(?P<name>.+)\.lt-partial-(?P<pid>\d+)-[0-9a-f]{8}")
# What versions before this module left behind (`.NAME.<pid>.partial`), swept by the same rule.
_OLD_TEMP = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.partial")
_PathLike = str | os.PathLike


# --- publishing --------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def output(path: _PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path` (the block creates a file or a folder there); publish it as `path`
    when the block completes, remove it whatever stops the block.

    Refuses an output that exists (unless `overwrite`) or that appears while the block runs. Before publishing,
    the data and the folder entries are flushed to disk, so a crash never leaves a short file under the final
    name. Stale temporaries of dead runs in the destination folder are removed first (one log line says how much
    was freed). Commands call `check_output` first, before any work.
    """
    path = Path(path)
    _refuse_existing(path, overwrite)
    _check_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _writing_in(path.parent):
            tmp = temp_path(path)
            try:
                yield tmp
                if not os.path.lexists(tmp):
                    raise FileNotFoundError(errno.ENOENT, "the run wrote nothing", str(tmp))
                _sync_tree(tmp)
                with deferred_interrupts():
                    _publish(tmp, path, overwrite)
                    _sync_folder(path.parent)
            except BaseException:
                with deferred_interrupts(), contextlib.suppress(OSError):
                    _remove(tmp)
                raise
    except OSError as e:
        raise os_error(e, path if e.filename is None else None) from e


def temp_path(path: _PathLike) -> Path:
    """A name beside `path` that no other run uses: the sweep recognises it, and its pid says whose it is."""
    path = Path(path)
    suffix = f"{MARKER}{os.getpid()}-{secrets.token_hex(4)}"
    room = _name_max(path.parent) - 1 - len(suffix)
    name = os.fsdecode(os.fsencode(path.name)[:room])  # a long name is cut, never the marker
    return path.with_name(f".{name}{suffix}")


def check_output(out: _PathLike, inputs: Iterable[_PathLike | None], *, overwrite: bool) -> None:
    """What `output` would refuse, checked by a command before any work: an output that is, holds or lies in an
    input, and one that exists (unless `overwrite`)."""
    check_containment(out, inputs)
    _refuse_existing(Path(out), overwrite)


def _refuse_existing(path: Path, overwrite: bool) -> None:
    if os.path.lexists(path) and not overwrite:
        raise OutputError("already exists; pass --overwrite to replace it", path=path)


def check_containment(out: _PathLike, inputs: Iterable[_PathLike | None]) -> None:
    """Refuse an output that is, contains or lies inside an input (symlinks resolved): writing or replacing it
    would destroy what is being read."""
    target = Path(os.path.realpath(out))
    for given in inputs:
        if given is None:
            continue
        source = Path(os.path.realpath(given))
        if target == source or _same_file(target, source):
            raise OutputError(f"is an input of this run ({given}); write to another path", path=out)
        if source in target.parents:
            raise OutputError(f"lies inside the input {given}; write outside it", path=out)
        if target in source.parents:
            raise OutputError(f"contains the input {given}; write somewhere that holds no input", path=out)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _check_name(path: Path) -> None:
    if len(os.fsencode(path.name)) > _name_max(path.parent):
        raise OutputError(f"the name is longer than the filesystem allows ({_name_max(path.parent)} bytes); "
                          "choose a shorter name", path=path)


def _name_max(folder: Path) -> int:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _publish(tmp: Path, path: Path, overwrite: bool) -> None:
    """Move `tmp` to `path` atomically and never over an existing entry; with `overwrite`, an existing entry is
    exchanged for the new one in one step, so the old output stays whole until the new one is in place."""
    try:
        _publish_new(tmp, path)
    except FileExistsError:
        if not overwrite:
            raise OutputError("appeared while this run was writing it (another run?); it was left as it is and "
                              "this run's output was discarded; pass --overwrite to replace it", path=path) from None
        _replace(tmp, path)


def _publish_new(tmp: Path, path: Path) -> None:
    """renameat2(RENAME_NOREPLACE), or its fallback; FileExistsError when `path` exists."""
    try:
        if not _rename(tmp, path, _RENAME_NOREPLACE):
            _publish_new_portably(tmp, path)
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY) and not isinstance(e, FileExistsError):
            raise FileExistsError(e.errno, e.strerror, e.filename) from None
        raise


def _publish_new_portably(tmp: Path, path: Path) -> None:
    """Without renameat2: a file by a hard link, which fails if the name exists; a folder (or a file where the
    filesystem has no hard links) by a rename after a check."""
    if not tmp.is_dir():
        try:
            os.link(tmp, path)
            os.unlink(tmp)
            return
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
    if os.path.lexists(path):
        raise FileExistsError(errno.EEXIST, "exists", str(path))
    os.rename(tmp, path)  # a folder onto an existing folder fails (not empty) or, empty, is replaced: checked above


def _replace(tmp: Path, path: Path) -> None:
    """renameat2(RENAME_EXCHANGE) then removal of the old output (now at the temporary name), or its fallback."""
    if _rename(tmp, path, _RENAME_EXCHANGE):
        _remove(tmp)
    else:
        _replace_portably(tmp, path)


def _replace_portably(tmp: Path, path: Path) -> None:
    """Without renameat2: os.replace for a file over a file (atomic); otherwise the old output is renamed away
    first (swept if this run dies before removing it)."""
    if tmp.is_dir() or (path.is_dir() and not path.is_symlink()):
        old = temp_path(path)
        os.rename(path, old)
        os.rename(tmp, path)
        _remove(old)
    else:
        os.replace(tmp, path)


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100


@functools.cache
def _renameat2():
    import ctypes  # only when publishing: header-only commands never load it

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError, TypeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


def _rename(src: Path, dst: Path, flags: int) -> bool:
    """renameat2 with RENAME_NOREPLACE or RENAME_EXCHANGE; False where the C library, kernel or filesystem lacks
    it (the caller falls back), an OSError when it fails."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    import ctypes

    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def _sync_tree(path: Path) -> None:
    """fsync a file, or every file and folder of a tree (children first), so the data is on disk before the
    rename that publishes it."""
    if path.is_dir() and not path.is_symlink():
        for root, _, files in os.walk(path, topdown=False):
            for name in files:
                if not os.path.islink(os.path.join(root, name)):
                    _fsync(os.path.join(root, name))
            _sync_folder(Path(root))
    elif not path.is_symlink():
        _fsync(path)


def _fsync(path: _PathLike, flags: int = 0) -> None:
    fd = os.open(path, os.O_RDONLY | flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_folder(folder: Path) -> None:
    try:
        _fsync(folder, os.O_DIRECTORY)
    except OSError as e:
        if e.errno != errno.EINVAL:  # some filesystems cannot fsync a folder; their entries are durable anyway
            raise


def _remove(path: _PathLike) -> None:
    """Remove a file, a symlink or a whole folder; nothing if it does not exist."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _shown(path: _PathLike) -> Path:
    """A path as the user knows it: temporary names (of this output or of a folder output around it) replaced
    by the names they will be published as."""
    return Path(*[m["name"] if (m := _TEMP.fullmatch(part)) else part for part in Path(os.fsdecode(path)).parts])


# --- stale temporaries ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StaleTemp:
    """A temporary output left by a run that no longer exists."""

    path: Path
    pid: int
    nbytes: int


def stale_temps(folder: _PathLike) -> list[StaleTemp]:
    """The temporaries in `folder` whose run is gone: its pid is not alive, and no writer holds the folder (a
    run in another container shares the folder but not our pids; its lock on the folder tells it is alive)."""
    folder = Path(folder)
    with _folder_lock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB) as free:
        return _stale(folder) if free else []


def sweep_stale(folder: _PathLike) -> tuple[int, int]:
    """Remove the stale temporaries in `folder`; returns (how many, bytes freed)."""
    folder = Path(folder)
    with _folder_lock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB) as free:
        found = _stale(folder) if free else []
        removed = []
        for stale in found:
            with contextlib.suppress(OSError):  # a read-only folder: the write that follows says so
                _remove(stale.path)
                removed.append(stale)
    return len(removed), sum(s.nbytes for s in removed)


def _stale(folder: Path) -> list[StaleTemp]:
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    found = []
    for entry in entries:
        match = _TEMP.fullmatch(entry.name) or _OLD_TEMP.fullmatch(entry.name)
        if match and not _alive(int(match["pid"])):
            found.append(StaleTemp(Path(entry.path), int(match["pid"]), _size(Path(entry.path))))
    return found


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process, or not a pid we can ask about: leave it
    return True


def _size(path: Path) -> int:
    if path.is_dir() and not path.is_symlink():
        return sum(os.lstat(os.path.join(root, f)).st_size for root, _, files in os.walk(path) for f in files)
    return path.lstat().st_size


@contextlib.contextmanager
def _writing_in(folder: Path) -> Iterator[None]:
    """Sweep the folder's stale temporaries, then hold a shared lock on it while writing there, so that a sweep
    by a run that cannot see our pid (another container) leaves our temporary alone."""
    count, freed = sweep_stale(folder)
    if count:
        log.info("removed %d partial output%s of interrupted runs from %s (%s freed)", count,
                 "" if count == 1 else "s", folder, human_size(freed))
    with _folder_lock(folder, fcntl.LOCK_SH):
        yield


@contextlib.contextmanager
def _folder_lock(folder: Path, how: int) -> Iterator[bool]:
    """flock on the folder itself; yields whether it was taken (False: another run holds it; a filesystem
    without locks counts as free, so the pid rule alone decides there)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        yield True
        return
    try:
        try:
            fcntl.flock(fd, how)
        except BlockingIOError:
            yield False
            return
        except OSError:
            yield True
            return
        yield True
    finally:
        os.close(fd)


@contextlib.contextmanager
def locked(path: _PathLike) -> Iterator[None]:
    """An exclusive flock on the lock file `path` (created if missing) for a read-modify-write of shared
    bookkeeping, such as a fetch manifest two fetches update at once."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def human_size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


# --- errors --------------------------------------------------------------------------------------------------------

_ADVICE = {
    errno.ENOSPC: "no space left on the device; free some space or write to another disk",
    errno.EDQUOT: "disk quota exceeded; free some space or write to another disk",
    errno.EFBIG: "file too large for the file size limit (ulimit -f) or the filesystem; raise the limit or "
                 "write to another filesystem",
    errno.EROFS: "on a read-only filesystem; write to another path",
    errno.EACCES: "permission denied; check its permissions or use another path",
    errno.EPERM: "operation not permitted; check its permissions or use another path",
    errno.EIO: "input/output error: the disk or network filesystem failed; check the device and try again",
    errno.ENAMETOOLONG: "name too long for the filesystem; choose a shorter name",
    errno.ENOENT: "no such file or folder",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "is a folder, expected a file",
    errno.ELOOP: "too many levels of symbolic links",
    errno.EMFILE: "too many open files; raise the limit (ulimit -n)",
    errno.ENFILE: "too many open files on the system; try again later",
    errno.ENOTEMPTY: "a folder is in the way and is not empty; move it or use another path",
    errno.EEXIST: "already exists; move it or use another path",
}


def os_error(e: OSError, path: _PathLike | None = None) -> UserError:
    """An OSError as one line a user can act on: the file (`path`, else the error's own) and what to do."""
    where = path if path is not None else e.filename
    what = _ADVICE.get(e.errno) or e.strerror or str(e) or type(e).__name__
    return UserError(what, path=_shown(where)) if where is not None else UserError(what)


# --- signals -------------------------------------------------------------------------------------------------------

_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class _State:
    raised = False  # the first signal is unwinding the stack: later ones must not cut its cleanup short
    deferring = 0
    pending: Interrupted | None = None


_state = _State()


def _handler(signum: int, frame) -> None:
    if _state.raised or _state.pending is not None:
        return
    interrupt = Interrupted(signum, signal.Signals(signum).name)
    if _state.deferring:
        _state.pending = interrupt
        return
    _state.raised = True
    raise interrupt


@contextlib.contextmanager
def signals_as_errors() -> Iterator[None]:
    """Inside, SIGINT, SIGTERM and SIGHUP raise `Interrupted` in the main thread, once, so every `output` on the
    stack cleans up on the way out. A signal the process ignores (nohup's SIGHUP) stays ignored. Elsewhere than
    in the main thread this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _state.raised, _state.pending = False, None
    previous = {}
    for signum in _SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            previous[signum] = signal.signal(signum, _handler)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """A signal arriving inside is raised when the block ends, so publishing and cleaning up run whole."""
    _state.deferring += 1
    try:
        yield
    finally:
        _state.deferring -= 1
        if not _state.deferring and _state.pending is not None:
            interrupt, _state.pending = _state.pending, None
            _state.raised = True
            raise interrupt
