"""Outputs that are complete or absent (interim: signal handling and OSError messages; the hardening branch
brings the rest)."""

from __future__ import annotations

import contextlib
import errno
import signal
import threading
from collections.abc import Iterator

from lightning_tools.errors import Interrupted, UserError

_HINTS = {errno.ENOSPC: "the disk is full: free space or write elsewhere",
          errno.EDQUOT: "the disk quota is exceeded: free space or write elsewhere",
          errno.EROFS: "the file system is read-only: write elsewhere",
          errno.EACCES: "permission denied: check the folder's permissions or write elsewhere",
          errno.EPERM: "operation not permitted: check the permissions or write elsewhere",
          errno.EIO: "an I/O error: the disk or network file system failed; check it and try again",
          errno.ENAMETOOLONG: "the name is too long: use a shorter path",
          errno.EFBIG: "the file is larger than this system allows: write elsewhere"}


def os_error(e: OSError) -> UserError:
    """One line for an error the operating system raised, with the path and what to do."""
    hint = _HINTS.get(e.errno or 0, e.strerror or str(e))
    return UserError(hint, path=e.filename) if e.filename else UserError(hint)


@contextlib.contextmanager
def signals_as_errors() -> Iterator[None]:
    """SIGTERM and SIGHUP (and SIGINT) raise `Interrupted` in the main thread, so outputs clean up on the way
    out like they do for Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Interrupted(signum, signal.Signals(signum).name)

    wanted = [s for s in (signal.SIGTERM, getattr(signal, "SIGHUP", None), signal.SIGINT) if s is not None]
    previous = {s: signal.signal(s, handler) for s in wanted}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
