"""Errors a person can fix, as opposed to bugs.

Every command-line entry point catches `UserError`, prints its message on one line and exits with its
`exit_code`; anything else is our bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: the message names the file or field and the fix."""

    exit_code = 1


class ConfigError(UserError):
    """An experiment or site configuration is missing, malformed or inconsistent."""

    exit_code = 2


class DataError(UserError):
    """A site's data cannot be used as it is (missing files, broken CSV, impossible labels)."""

    exit_code = 3


class CheckpointError(UserError):
    """A weights file does not fit the model it is loaded into, or is missing."""

    exit_code = 4
