"""Errors raised by the data pipeline.

Two kinds of failure are kept apart on purpose: a broken *annotation* file is a setup error that
must stop the run (:class:`AnnotationError`, a ``ValueError``), while one broken *media* file among
hundreds of thousands is data rot that a run may choose to skip (:class:`MediaError`, see the
datasets' ``on_error`` flag). Both always name the offending file.
"""

from __future__ import annotations

import errno
from pathlib import Path

__all__ = ["AnnotationError", "MediaError", "missing_file"]


class AnnotationError(ValueError):
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
