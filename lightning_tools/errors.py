"""The one exception type for user mistakes: the CLI prints it as a single line and exits non-zero."""


class UserError(Exception):
    """A problem the user can fix (bad path, wrong file, hash mismatch). Message: what, which file, what to do."""

    exit_code = 1
