"""User-facing errors: bad input that the command line reports as ``epalm CMD: error: ...``, exit 2.

Every class is a ``ValueError`` so library callers that already catch ``ValueError`` keep working.
The message always names the file, field or argument at fault. ``EPALM_DEBUG=1`` makes the CLI
show the traceback as well.
"""

from __future__ import annotations

import errno
from pathlib import Path

__all__ = ["UserError", "ConfigError", "CheckpointError", "RunDirError", "CodeLoadingRefused",
           "AnnotationError", "MediaError", "missing_file"]


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


# ---- data errors. Two kinds of failure are kept apart on purpose: a broken *annotation* file is a
# setup error that must stop the run (AnnotationError), while one broken *media* file among hundreds
# of thousands is data rot that a run may choose to skip (MediaError, see the datasets' ``on_error``).
# Both always name the offending file.


class AnnotationError(UserError):
    """An annotation file (JSON/CSV) is malformed; the message starts with the file's path."""


class MediaError(Exception):
    """A media file (image, video, audio) or a cached feature could not be read.

    ``path`` is the file (or media id, for feature caches) and ``reason`` says what went wrong;
    ``str(err)`` is ``"<path>: <reason>"`` so logs and warnings always name the file.
    """

    def __init__(self, path: str | Path, reason: str = "") -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}" if reason else self.path)

    def __reduce__(self):  # keep (path, reason) across DataLoader worker processes
        return (type(self), (self.path, self.reason))


def missing_file(path: str | Path, what: str) -> FileNotFoundError:
    """A ``FileNotFoundError`` whose message names both the role of the file and its path."""
    return FileNotFoundError(errno.ENOENT, f"{what} not found", str(path))
