"""AMBER, discriminative part (benchmarks.md §3), scored from its released files.

Files (sangminwoo/AvisC:experiments/AMBER/data, the AMBER release): ``annotations.json`` (a list of
``{"id", "type", "truth"}``; ids 1-1004 are generative, 1005-15220 discriminative with ``truth`` "yes"/"no") and
``query/query_discriminative.json`` (``{"id", "image", "query"}``, the questions). Model outputs: AMBER's own format
(a JSON list of ``{"id", "response"}``) or halludec's per-sample JSONL (``id``, ``answer``).

Scoring follows sangminwoo/AvisC:experiments/AMBER/inference.py: a response counts only if it is exactly "Yes" or
"No" (parser ``amber``; any POPE parser can be chosen instead), and **"No" is the positive class**: precision =
(answered No and truth no) / answered No, recall = (answered No and truth no) / truth no. Reported overall and per
dimension: existence (type discriminative-hallucination), attribute (state + number + action), state, number,
action, relation (discriminative-relation and relation). Differences from the script: F1 is 2PR/(P+R) on unrounded
values (the script adds 0.0001 to the denominator after rounding P and R to 0.1 %), and an undefined ratio is 0 with
a note instead of a ZeroDivisionError. Generative items (CHAIR/Cover/Hal/Cog, which need spaCy) are not scored.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from halludec.benchmarks.errors import BenchmarkDataError, MissingFileError
from halludec.benchmarks.pope_parsers import NO, OTHER, YES, get_parser, normalize_label
from halludec.benchmarks.results import Metric

AMBER_PROMPT_SUFFIX = "\nPlease answer yes or no."  # VLMEvalKit's AMBER prompt suffix
_DIMENSIONS = {
    "discriminative-hallucination": ("existence",),
    "discriminative-attribute-state": ("attribute", "state"),
    "discriminative-attribute-number": ("attribute", "number"),
    "discriminative-attribute-action": ("attribute", "action"),
    "discriminative-relation": ("relation",),
    "relation": ("relation",),
}
GROUPS = ("existence", "attribute", "state", "number", "action", "relation")
DIRECTIONS = {"accuracy": True, "precision": True, "recall": True, "f1": True, "other": False, "n": None}


@dataclass(frozen=True)
class AmberItem:
    """One discriminative AMBER question (``image``/``query`` empty when only annotations were read)."""

    id: int
    type: str
    label: str
    image: str = ""
    query: str = ""

    @property
    def groups(self) -> tuple[str, ...]:
        """The dimensions this item is reported under."""
        return _DIMENSIONS.get(self.type, ("relation",))


def parse_amber(answer: str) -> str:
    """AMBER's rule: exactly "Yes" -> yes, exactly "No" -> no, anything else -> other."""
    return YES if answer == "Yes" else NO if answer == "No" else OTHER


def _find(path: str | Path, name: str) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        for candidate in (p / name, p / "data" / name, p / "query" / name, p / "data" / "query" / name):
            if candidate.is_file():
                return candidate
        raise MissingFileError(f"AMBER folder {str(p)!r} has no {name} (looked in ., data/, query/, data/query/).")
    if not p.is_file():
        raise MissingFileError(f"AMBER file {str(p)!r} does not exist; pass AMBER's {name} or the folder holding it.")
    return p


def load_amber(annotations: str | Path, queries: str | Path | None = None) -> dict[int, AmberItem]:
    """Read AMBER's discriminative items.

    Args:
        annotations: ``annotations.json`` or the AMBER data folder.
        queries: ``query_discriminative.json`` (default: looked up next to the annotations when a folder is given).

    Returns:
        id -> item, for discriminative items only.
    """
    ann_path = _find(annotations, "annotations.json")
    data = _read_json(ann_path)
    if not isinstance(data, list):
        raise BenchmarkDataError(f"{ann_path}: expected a JSON list of {{id, type, truth}}, got {type(data).__name__}.")
    questions: dict[int, dict[str, Any]] = {}
    if queries is not None or Path(annotations).is_dir():
        try:
            q_path = _find(queries if queries is not None else annotations, "query_discriminative.json")
            questions = {int(q["id"]): q for q in _read_json(q_path)}
        except MissingFileError:
            if queries is not None:
                raise
    items: dict[int, AmberItem] = {}
    for i, entry in enumerate(data):
        where = f"{ann_path}[{i}]"
        if not isinstance(entry, dict) or any(k not in entry for k in ("id", "type", "truth")):
            raise BenchmarkDataError(f"{where}: each entry needs 'id', 'type' and 'truth' (got {str(entry)[:80]}).")
        if entry["type"] == "generative":
            continue
        q = questions.get(int(entry["id"]), {})
        items[int(entry["id"])] = AmberItem(
            int(entry["id"]),
            str(entry["type"]),
            normalize_label(entry["truth"], where),
            q.get("image", ""),
            q.get("query", ""),
        )
    return items


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise BenchmarkDataError(f"{path}: not valid JSON ({err.msg}, line {err.lineno}).") from None


def _rates(pairs: Sequence[tuple[str, str]]) -> tuple[dict[str, Metric], list[str]]:
    """AMBER's metrics from (pred, label) pairs, "no" being the positive class."""
    n = len(pairs)
    if n == 0:
        return {k: Metric(None, d) for k, d in DIRECTIONS.items()}, []
    answered_no = sum(p == NO for p, _ in pairs)
    truth_no = sum(label == NO for _, label in pairs)
    hit = sum(p == NO and label == NO for p, label in pairs)
    notes = []
    if not answered_no:
        notes.append("precision undefined: no answer was No; reported as 0")
    if not truth_no:
        notes.append("recall undefined: no item has truth no; reported as 0")
    precision = hit / answered_no if answered_no else 0.0
    recall = hit / truth_no if truth_no else 0.0
    values = {
        "accuracy": sum(p == label for p, label in pairs) / n,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "other": float(sum(p == OTHER for p, _ in pairs)),
        "n": float(n),
    }
    return {k: Metric(v, DIRECTIONS[k]) for k, v in values.items()}, notes


def score_amber(
    answers: Sequence[tuple[int, str]], items: dict[int, AmberItem], parser: str = "amber"
) -> tuple[dict[str, Metric], dict[str, dict[str, Metric]], list[str], list[str]]:
    """Score ``(id, answer)`` pairs.

    Args:
        answers: Model answers by AMBER id.
        items: From :func:`load_amber`.
        parser: ``amber`` (exact Yes/No, default) or any POPE parser name.

    Returns:
        ``(metrics, per_group, notes, preds)``.
    """
    parse: Callable[[str], str] = parse_amber if parser == "amber" else get_parser(parser).parse
    unknown = [i for i, _ in answers if i not in items]
    if unknown:
        raise BenchmarkDataError(
            f"AMBER ids {unknown[:5]} ({len(unknown)} in all) are not discriminative items of the annotations; "
            "check the id field (AMBER ids 1005-15220) or the annotations file."
        )
    preds = [parse(a) for _, a in answers]
    pairs = [(p, items[i].label) for (i, _), p in zip(answers, preds, strict=True)]
    metrics, notes = _rates(pairs)
    per_group = {}
    for group in GROUPS:
        chosen = [pair for (i, _), pair in zip(answers, pairs, strict=True) if group in items[i].groups]
        if chosen:
            per_group[group], group_notes = _rates(chosen)
            notes += [f"{note} ({group})" for note in group_notes]
    return metrics, per_group, notes, preds
