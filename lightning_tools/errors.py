"""The errors a user can act on. The CLI prints each as one `error: ...` line and exits with its `exit_code`.

Every message says what is wrong, with which file, and what to do. Errors about one file carry it in `path`
(and the message without it in `message`), so a caller that already names the file, like `verify`'s report,
shows the reason without slicing strings.
"""

from __future__ import annotations

import os


class UserError(Exception):
    """A problem the user can fix (bad path, wrong file, hash mismatch): exit 1."""

    exit_code = 1

    def __init__(self, message: str, *, path: str | os.PathLike | None = None):
        self.message = message
        self.path = path
        super().__init__(f"{os.fspath(path)}: {message}" if path is not None else message)


class UsageError(UserError):
    """The command line itself is wrong (unknown option, bad value): exit 2, like click's own usage errors."""

    exit_code = 2


class ChecksFailed(UserError):
    """The work finished but the result failed a check (a render gate): exit 3, so CI can tell it apart."""

    exit_code = 3


class CorruptFile(UserError):
    """A file that is not a well-formed weights file (truncated, padded, hostile header, wrong format)."""


class UnsafeFile(UserError):
    """A pickle that `torch.load(weights_only=True)` refuses: it would run code to load."""


class OutputError(UserError):
    """An output that cannot be written as asked: it exists, it appeared meanwhile, or it holds an input."""


class Interrupted(BaseException):
    """SIGINT, SIGTERM or SIGHUP arrived; raised in the main thread so every output cleans up on the way out.

    A BaseException, like KeyboardInterrupt, so `except Exception` blocks do not swallow it."""

    def __init__(self, signum: int, name: str):
        self.signum = signum
        self.name = name
        super().__init__(name)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
