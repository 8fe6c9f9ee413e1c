"""Data fingerprints (design.md §8): the sha256 of a file's bytes, or of canonical rows for data without a file."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """The sha256 hex digest of a file's bytes.

    Args:
        path: The file.

    Returns:
        64 hex characters.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def canonical_row(row: Any) -> str:
    """One row as canonical JSON: sorted keys, no spaces, non-ASCII kept, bytes as their sha256.

    Args:
        row: A JSON-like value (dicts, lists, strings, numbers; ``bytes`` are replaced by their sha256).

    Returns:
        The canonical JSON text.
    """
    return json.dumps(_jsonable(row), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sha256_rows(rows: Iterable[Any]) -> str:
    """The sha256 of rows in order, each as canonical JSON on its own line (the fingerprint of HF datasets).

    Args:
        rows: JSON-like rows.

    Returns:
        64 hex characters.
    """
    digest = hashlib.sha256()
    for i, row in enumerate(rows):
        if i:
            digest.update(b"\n")
        digest.update(canonical_row(row).encode("utf-8"))
    return digest.hexdigest()


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return "sha256:" + hashlib.sha256(value).hexdigest()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)
