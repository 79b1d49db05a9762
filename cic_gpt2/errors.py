"""User-facing errors.

A `CicError` is a problem with the user's input or environment (a bad file, a wrong key, a missing
model). The CLI prints its message on one line, without a traceback, and exits with status 2.
Messages name the file/row/key at fault and say what to do.
"""


class CicError(Exception):
    """An error the user can fix; printed as one line by the CLI."""


class ConfigError(CicError):
    """Invalid configuration: unknown key, wrong type, inconsistent values."""


class DataError(CicError):
    """Invalid or unusable input data."""
