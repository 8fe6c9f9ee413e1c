"""Per-sample JSONL files: reading with clear errors, an append-only writer, and resuming.

A runner writes one JSON object per line as it goes (:class:`SampleWriter` flushes every line), so a run that is
killed loses at most the line being written; :func:`load_done_ids` then tells it which samples are finished. The field
names are the ones ``halludec score`` reads (design.md §8):

- yes/no benchmarks (POPE, AMBER, MME): ``id``, ``split``, ``question``, ``answer`` (the model's text), ``label``
  (``yes``/``no``), ``pred`` (the parsed answer, informational: ``score`` re-parses ``answer``);
- CHAIR: ``image_id``, ``caption``, and after scoring ``mentioned`` / ``hallucinated`` (node words).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from halludec.benchmarks.errors import BenchmarkDataError, MissingFileError

YESNO_FIELDS = ("id", "split", "question", "answer", "label", "pred")
CHAIR_FIELDS = ("image_id", "caption", "mentioned", "hallucinated")
ANSWER_FIELDS = ("answer", "response", "prediction", "output")


def iter_jsonl(path: str | Path, *, allow_truncated_tail: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, row)`` for each non-blank line of a JSONL file.

    Args:
        path: The file.
        allow_truncated_tail: Skip (with a warning) a last line that is not valid JSON and has no newline, the
            trace of a run killed mid-write. Any other bad line is an error.

    Yields:
        1-based line numbers and the parsed objects.

    Raises:
        MissingFileError: if the file does not exist.
        BenchmarkDataError: naming the file and line of a line that is not a JSON object.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise MissingFileError(f"JSONL file {str(p)!r} does not exist (or is a folder); check the path.")
    with open(p, encoding="utf-8") as fh:
        lines = fh.readlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if allow_truncated_tail and number == len(lines) and not line.endswith("\n"):
                warnings.warn(
                    f"{p}: ignoring the unfinished last line {number} (a run stopped mid-write); it will be redone.",
                    stacklevel=2,
                )
                return
            raise BenchmarkDataError(
                f"{p}, line {number}: not valid JSON ({err.msg} at column {err.colno}): {line[:80]!r}. "
                "Each line must be one JSON object; fix or remove that line."
            ) from None
        if not isinstance(row, dict):
            raise BenchmarkDataError(
                f"{p}, line {number}: expected a JSON object, got {type(row).__name__} ({line[:60].strip()!r}). "
                'Each line must be one JSON object such as {"id": ..., "answer": ...}.'
            )
        yield number, row


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All rows of a JSONL file (see :func:`iter_jsonl` for the errors).

    Args:
        path: The file.

    Returns:
        The parsed rows in file order.
    """
    return [row for _, row in iter_jsonl(path)]


def load_done_ids(samples_path: str | Path, key: str = "id") -> set[str]:
    """The ids already written to a per-sample JSONL file, for resuming a run.

    A missing file means nothing is done. An unfinished last line (a run killed mid-write) is ignored with a warning,
    so that sample is redone; :class:`SampleWriter` trims it before appending.

    Args:
        samples_path: The per-sample JSONL file.
        key: The id field (``"id"``; CHAIR rows may use ``"image_id"``).

    Returns:
        The ids as strings.

    Raises:
        BenchmarkDataError: if a row lacks ``key`` or a line other than the last is not JSON.
    """
    p = Path(samples_path).expanduser()
    if not p.exists():
        return set()
    done: set[str] = set()
    for number, row in iter_jsonl(p, allow_truncated_tail=True):
        if key not in row:
            raise BenchmarkDataError(
                f"{p}, line {number}: no {key!r} field (fields: {sorted(row)}); cannot resume from this file. "
                f"Pass the id field with key=..., or start a new samples file."
            )
        done.add(str(row[key]))
    return done


class SampleWriter:
    """Append-only JSONL writer that flushes each line (use as a context manager).

    On open, an unfinished last line left by a killed run is cut off, so appending never glues two rows together.

    Args:
        path: The per-sample JSONL file (created with its folder when missing).
        fsync: Also ``os.fsync`` after every line (survives power loss; slower).
    """

    def __init__(self, path: str | Path, *, fsync: bool = False) -> None:
        self.path = Path(path).expanduser()
        self.fsync = fsync
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _trim_unfinished_tail(self.path)
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()/__exit__
        self.written = 0

    def write(self, row: Mapping[str, Any]) -> None:
        """Append one row and flush it to the file.

        Args:
            row: A JSON-serialisable mapping.
        """
        line = json.dumps(dict(row), ensure_ascii=False)
        self._fh.write(line + "\n")
        self._fh.flush()
        if self.fsync:
            os.fsync(self._fh.fileno())
        self.written += 1

    def close(self) -> None:
        """Close the file (idempotent)."""
        if not self._fh.closed:
            self._fh.close()

    def __enter__(self) -> SampleWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _trim_unfinished_tail(path: Path) -> None:
    """Cut a last line without a newline (a killed write) so the next append starts on a fresh line."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as fh:
        fh.seek(-1, os.SEEK_END)
        if fh.read(1) == b"\n":
            return
        fh.seek(0)
        data = fh.read()
        cut = data.rfind(b"\n") + 1
        tail = data[cut:]
        try:
            json.loads(tail)
            fh.seek(0, os.SEEK_END)
            fh.write(b"\n")  # a complete row that only lacks its newline: keep it
        except ValueError:
            fh.truncate(cut)


def read_predictions(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """``(line or item number, row)`` pairs from a JSONL file or a JSON list.

    Args:
        path: The predictions file.

    Returns:
        The rows with their 1-based positions.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise MissingFileError(f"Predictions file {str(p)!r} does not exist; check the path.")
    with open(p, encoding="utf-8") as fh:
        head = fh.read(4096).lstrip()
    if head.startswith("["):
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise BenchmarkDataError(f"{p}: not valid JSON ({err.msg}, line {err.lineno}).") from None
        bad = [i for i, row in enumerate(data, start=1) if not isinstance(row, dict)]
        if bad:
            raise BenchmarkDataError(f"{p}: item {bad[0]} is not a JSON object; expected a list of objects.")
        return list(enumerate(data, start=1))
    rows = list(iter_jsonl(p))
    if not rows:
        raise BenchmarkDataError(f"{p}: the predictions file is empty.")
    return rows


def answer_of(row: dict[str, Any], where: str, answer_field: str | None = None) -> str:
    """The model's text in a row.

    Args:
        row: The row.
        where: File and line, for errors.
        answer_field: The field to use; default: the first of answer, response, prediction, output.

    Returns:
        The text (``null`` counts as the empty answer).
    """
    names = (answer_field,) if answer_field else ANSWER_FIELDS
    for name in names:
        if name in row:
            value = row[name]
            if value is None:
                return ""
            if not isinstance(value, str):
                raise BenchmarkDataError(f"{where}: field {name!r} must be the model's text, got {value!r}.")
            return value
    raise BenchmarkDataError(
        f"{where}: missing field {names[0]!r} (fields present: {sorted(row)}). Each line needs the model's text in "
        f"{' or '.join(repr(n) for n in names)}; name another field with answer_field= (CLI: --answer-field)."
    )
