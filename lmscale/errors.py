"""Errors a user can fix; the CLI prints them as one line, without a traceback."""

import errno


class LmscaleError(Exception):
    """A problem with the user's input or environment, stated with its fix."""

    exit_code = 1


class ConfigError(LmscaleError):
    """An invalid configuration: reported before anything is written."""

    exit_code = 2


# Why a file cannot be written, as the operating system says it: each is the user's to fix.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


def is_write_failure(exc: OSError) -> bool:
    return exc.errno in NO_SPACE + NOT_WRITABLE and exc.filename is not None


def write_failure_line(exc: OSError) -> str:
    """One line for a file lmscale could not write (or, for a permission, read): which, why, what to do."""
    where = exc.filename if exc.filename2 is None else f"{exc.filename} -> {exc.filename2}"
    if exc.errno in NO_SPACE:
        fix = (
            "free space there (checkpoint.keep_last keeps fewer checkpoints), then run the same command again"
        )
    else:
        fix = "fix its permissions, or choose a location you can write to (output_dir=..., --out ...)"
    return f"cannot use {where} ({exc.strerror}): {fix}"
