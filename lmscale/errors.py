"""Errors a user can fix; the CLI prints them as one line, without a traceback."""


class LmscaleError(Exception):
    """A problem with the user's input or environment, stated with its fix."""

    exit_code = 1


class ConfigError(LmscaleError):
    """An invalid configuration: reported before anything is written."""

    exit_code = 2
