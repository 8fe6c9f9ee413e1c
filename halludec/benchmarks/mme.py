"""MME, hallucination subset (existence, count, position, color; benchmarks.md §4), scored from local files.

Files: one text file per subtask, ``<subtask>.txt``, one question per line ``image<TAB>question<TAB>answer`` (the
layout of MME's evaluation tool, e.g. sangminwoo/AvisC:experiments/eval/eval_mme/LaVIN/existence.txt); results
files add the model's answer as a fourth column. Each image has two questions (30 images x 2 per subtask).

Scoring follows sangminwoo/AvisC:experiments/eval/calculation.py: answers are lowercased; an exact "yes"/"no" wins,
else "yes" then "no" is looked for in the first 4 characters, else "other" (parser ``mme``). Per subtask: acc =
correct / questions (other is wrong), acc+ = images whose questions are all correct / images, score = 100 acc +
100 acc+ (max 200); the subset total is the sum (max 800).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from halludec.benchmarks.errors import BenchmarkDataError, MissingFileError, did_you_mean
from halludec.benchmarks.pope_parsers import NO, OTHER, YES, get_parser, normalize_label
from halludec.benchmarks.results import Metric

MME_HALLUCINATION_SUBTASKS = ("existence", "count", "position", "color")
MME_PROMPT_SUFFIX = " Please answer yes or no."  # already part of MME's question text
DIRECTIONS = {"score": True, "acc": True, "acc_plus": True, "other": False, "n": None}


@dataclass(frozen=True)
class MmeQuestion:
    """One MME question; ``answer`` is the model's text when read from a 4-column results file."""

    id: str
    subtask: str
    image: str
    question: str
    label: str
    answer: str | None = None


def parse_mme(answer: str) -> str:
    """MME's rule (see the module docstring)."""
    text = answer.lower()
    if text in (YES, NO):
        return text
    prefix = text[:4]
    return YES if "yes" in prefix else NO if "no" in prefix else OTHER


def read_mme_file(path: str | Path, subtask: str) -> list[MmeQuestion]:
    """Read one subtask file (3 columns, or 4 with the model's answers).

    Args:
        path: The ``<subtask>.txt`` file.
        subtask: Its subtask.

    Returns:
        The questions, ids ``"<subtask>/<line number>"``.
    """
    p = Path(path).expanduser()
    out = []
    for number, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) not in (3, 4):
            raise BenchmarkDataError(
                f"{p}, line {number}: expected image<TAB>question<TAB>answer (optionally <TAB>model answer), "
                f"found {len(cols)} tab-separated column(s): {line[:80]!r}."
            )
        where = f"{p}, line {number}"
        out.append(
            MmeQuestion(
                f"{subtask}/{number}",
                subtask,
                cols[0],
                cols[1],
                normalize_label(cols[2], where),
                cols[3] if len(cols) == 4 else None,
            )
        )
    return out


def load_mme(folder: str | Path, subtasks: Sequence[str] | None = None) -> list[MmeQuestion]:
    """Read the hallucination subtasks from a folder of ``<subtask>.txt`` files.

    Args:
        folder: The folder (a single ``.txt`` file is read as the subtask its name says).
        subtasks: Which subtasks must be present (default: those of existence, count, position, color that have a
            file; at least one).

    Returns:
        All questions in subtask order.
    """
    p = Path(folder).expanduser()
    for s in subtasks or ():
        if s not in MME_HALLUCINATION_SUBTASKS:
            raise BenchmarkDataError(
                f"Unknown MME hallucination subtask {s!r}.{did_you_mean(s, MME_HALLUCINATION_SUBTASKS)} "
                f"Allowed: {', '.join(MME_HALLUCINATION_SUBTASKS)}."
            )
    if p.is_file():
        if p.stem not in MME_HALLUCINATION_SUBTASKS:
            raise BenchmarkDataError(
                f"{p}: the file name must be a subtask ({', '.join(MME_HALLUCINATION_SUBTASKS)}).txt."
            )
        return read_mme_file(p, p.stem)
    if not p.is_dir():
        raise MissingFileError(f"MME folder {str(p)!r} does not exist; pass the folder holding existence.txt etc.")
    if subtasks is None:
        subtasks = [s for s in MME_HALLUCINATION_SUBTASKS if (p / f"{s}.txt").is_file()] or ["existence"]
    missing = [s for s in subtasks if not (p / f"{s}.txt").is_file()]
    if missing:
        raise MissingFileError(
            f"MME folder {str(p)!r} has no {missing[0]}.txt (found: {sorted(x.name for x in p.glob('*.txt'))[:8]}). "
            "Each subtask needs a file of image<TAB>question<TAB>answer lines; pass subtasks=[...] to score fewer."
        )
    return [q for s in subtasks for q in read_mme_file(p / f"{s}.txt", s)]


def score_mme(
    items: Sequence[tuple[MmeQuestion, str]], parser: str = "mme"
) -> tuple[dict[str, Metric], dict[str, dict[str, Metric]], list[str], list[str]]:
    """Score ``(question, answer)`` pairs.

    Args:
        items: Questions with the model's answers.
        parser: ``mme`` (default) or any POPE parser name.

    Returns:
        ``(metrics, per_subtask, notes, preds)``; ``metrics`` has ``score`` (sum over subtasks), and the mean
        ``acc``/``acc_plus``.
    """
    parse = parse_mme if parser == "mme" else get_parser(parser).parse
    preds = [parse(answer) for _, answer in items]
    by_task: dict[str, list[tuple[MmeQuestion, str]]] = {}
    for (q, _), pred in zip(items, preds, strict=True):
        by_task.setdefault(q.subtask, []).append((q, pred))
    notes: list[str] = []
    per_task: dict[str, dict[str, Metric]] = {}
    for task in [t for t in MME_HALLUCINATION_SUBTASKS if t in by_task]:
        rows = by_task[task]
        images: dict[str, list[bool]] = {}
        for q, pred in rows:
            images.setdefault(q.image, []).append(pred == q.label)
        odd = [img for img, marks in images.items() if len(marks) != 2]
        if odd:
            notes.append(f"{task}: {len(odd)} image(s) do not have exactly 2 questions (e.g. {odd[0]}); acc+ uses all")
        acc = sum(pred == q.label for q, pred in rows) / len(rows)
        acc_plus = sum(all(marks) for marks in images.values()) / len(images)
        values = {
            "score": 100 * acc + 100 * acc_plus,
            "acc": acc,
            "acc_plus": acc_plus,
            "other": float(sum(p == OTHER for _, p in rows)),
            "n": float(len(rows)),
        }
        per_task[task] = {k: Metric(v, DIRECTIONS[k]) for k, v in values.items()}
    if not per_task:
        return {k: Metric(None, d) for k, d in DIRECTIONS.items()}, {}, ["no rows to score"], preds
    k = len(per_task)
    metrics = {
        "score": Metric(sum(m["score"].value or 0.0 for m in per_task.values()), True),
        "acc": Metric(sum(m["acc"].value or 0.0 for m in per_task.values()) / k, True),
        "acc_plus": Metric(sum(m["acc_plus"].value or 0.0 for m in per_task.values()) / k, True),
        "other": Metric(sum(m["other"].value or 0.0 for m in per_task.values()), False),
        "n": Metric(float(len(items)), None),
    }
    return metrics, per_task, notes, preds
