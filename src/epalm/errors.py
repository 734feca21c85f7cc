"""User-facing errors: bad input that the command line reports as ``epalm CMD: error: ...``, exit 2.

Every class is a ``ValueError`` so library callers that already catch ``ValueError`` keep working.
The message always names the file, field or argument at fault. ``EPALM_DEBUG=1`` makes the CLI
show the traceback as well.
"""

from __future__ import annotations

__all__ = ["UserError", "ConfigError", "CheckpointError", "RunDirError", "CodeLoadingRefused"]


class UserError(ValueError):
    """Bad input (config, file, argument): the message says what is wrong and where."""


class ConfigError(UserError):
    """A config value of the wrong type or out of range; the message names the field."""


class CheckpointError(UserError):
    """A checkpoint is missing, incomplete, damaged, or does not fit the run resumed with it."""


class RunDirError(UserError):
    """The run folder cannot be used as asked (not empty without --resume/--overwrite, a file, ...)."""


class CodeLoadingRefused(UserError):
    """A saved config asks transformers to import and run Python code (``trust_remote_code``, ...)."""
