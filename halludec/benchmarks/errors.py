"""Error types of the benchmark code: every message names the bad value, what is allowed and the fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path


class BenchmarkDataError(ValueError):
    """A benchmark file, row or option is malformed (the message names the file, the field and the fix)."""


class MissingFileError(BenchmarkDataError, FileNotFoundError):
    """A benchmark file or folder the user pointed at (or that a benchmark needs) does not exist."""


def did_you_mean(value: object, allowed: Iterable[str]) -> str:
    """`` Did you mean 'x'?`` for the closest allowed names, or an empty string.

    Args:
        value: The value the user gave.
        allowed: The allowed names.

    Returns:
        A sentence starting with a space, or ``""`` when nothing is close.
    """
    close = difflib.get_close_matches(str(value), list(allowed), n=2, cutoff=0.5)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def require_file(path: str | Path, what: str, fix: str) -> Path:
    """Return ``path`` as a ``Path`` if it is an existing file, else raise a helpful error.

    Args:
        path: The path to check.
        what: What the file is, for the message (e.g. ``"COCO instance annotations"``).
        fix: How to get the file.

    Returns:
        The path.

    Raises:
        MissingFileError: naming the path, what it should be and the fix.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        kind = "is a folder, not a file" if p.is_dir() else "does not exist"
        raise MissingFileError(f"{what}: {str(p)!r} {kind}. {fix}")
    return p
