"""Per-document results and corpus-level aggregations of halludec's lm-eval tasks, using halludec's own scoring.

lm-eval computes a task's metrics as ``aggregation([process_results(doc, output)[metric] for each doc])``. POPE and
CHAIR are corpus-level (precision over all answers, CHAIR_i over all mentions), so ``process_results`` returns the
same raw item for every metric and each aggregation scores the whole list with halludec's code:

- POPE: :func:`halludec.benchmarks.yesno_report` with the row's parser (default ``pope``): accuracy, precision,
  recall, F1, the yes-ratio of the **predictions**, and the unparseable count;
- CHAIR: :func:`halludec.benchmarks.score_chair` (COCO ground truth, builtin text backend);
- lab-CHAIR: :func:`halludec.lab.bench.lab_caption_result` + :func:`halludec.benchmarks.chair_metrics.chair_metrics`,
  as ``halludec score --benchmark lab-chair``.

Answers are stripped of surrounding whitespace first, as halludec's runner does. Scores are cached per item list,
so the metrics of one task are computed once.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

PopeItem = tuple[str, str, str, str]  # (split, answer, label, parser)
ChairItem = tuple[int, str, str]  # (image_id, caption, annotations folder)
LabChairItem = tuple[int, str]  # (scene seed, caption)

POPE_METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio", "unparseable")
CHAIR_METRICS = ("chair_s", "chair_i", "recall", "precision", "f1", "len")


def _answer(results: Sequence[str]) -> str:
    return str(results[0]).strip()


def pope_process_results(doc: dict[str, Any], results: Sequence[str]) -> dict[str, PopeItem]:
    """``process_results`` of the POPE tasks: the raw ``(split, answer, label, parser)`` item for every metric."""
    item = (str(doc["split"]), _answer(results), str(doc["label"]), str(doc.get("parser") or "pope"))
    return dict.fromkeys(POPE_METRICS, item)


@lru_cache(maxsize=8)
def _pope_scores(items: tuple[PopeItem, ...]) -> dict[str, float | None]:
    from halludec.benchmarks.pope_metrics import yesno_report
    from halludec.benchmarks.pope_parsers import get_parser

    parsers = {item[3] for item in items}
    if len(parsers) != 1:
        raise ValueError(f"One POPE task was scored with several parsers {sorted(parsers)}; use one parser per run.")
    metrics, _, _, _ = yesno_report([item[:3] for item in items], get_parser(parsers.pop()))
    return {name: metric.value for name, metric in metrics.items()}


def _pope(items: Sequence[PopeItem], name: str) -> float:
    value = _pope_scores(tuple(tuple(i) for i in items)).get(name)
    return float("nan") if value is None else float(value)


def pope_accuracy(items: Sequence[PopeItem]) -> float:
    """POPE accuracy (correct / N) over the task's answers."""
    return _pope(items, "accuracy")


def pope_precision(items: Sequence[PopeItem]) -> float:
    """POPE precision (yes = positive; 0 when no answer is yes, as halludec reports)."""
    return _pope(items, "precision")


def pope_recall(items: Sequence[PopeItem]) -> float:
    """POPE recall."""
    return _pope(items, "recall")


def pope_f1(items: Sequence[PopeItem]) -> float:
    """POPE F1."""
    return _pope(items, "f1")


def pope_yes_ratio(items: Sequence[PopeItem]) -> float:
    """Share of answers parsed as yes (from the predictions, never the labels)."""
    return _pope(items, "yes_ratio")


def pope_unparseable(items: Sequence[PopeItem]) -> float:
    """Number of answers with no yes/no word (halludec's unparseable rule), reported beside the parser's verdicts."""
    return _pope(items, "unparseable")


def chair_process_results(doc: dict[str, Any], results: Sequence[str]) -> dict[str, ChairItem]:
    """``process_results`` of ``halludec_chair``: ``(image_id, caption, annotations folder)`` for every metric."""
    item = (int(doc["image_id"]), _answer(results), str(doc["annotations"]))
    return dict.fromkeys(CHAIR_METRICS, item)


@lru_cache(maxsize=8)
def _chair_scores(items: tuple[ChairItem, ...]) -> dict[str, float | None]:
    from halludec.benchmarks.chair import score_chair

    folders = {item[2] for item in items}
    if len(folders) != 1:
        raise ValueError(f"One CHAIR task was scored against several annotation folders {sorted(folders)}.")
    result = score_chair([item[:2] for item in items], annotations=folders.pop(), n_bootstrap=0)
    return {name: metric.value for name, metric in result.metrics.items()}


def _chair(items: Sequence[ChairItem], name: str) -> float:
    value = _chair_scores(tuple(tuple(i) for i in items)).get(name)
    return float("nan") if value is None else float(value)


def chair_s(items: Sequence[ChairItem]) -> float:
    """CHAIR_s: captions with a hallucinated object / captions."""
    return _chair(items, "chair_s")


def chair_i(items: Sequence[ChairItem]) -> float:
    """CHAIR_i: hallucinated mentions / all mentions."""
    return _chair(items, "chair_i")


def chair_recall(items: Sequence[ChairItem]) -> float:
    """Ground-truth objects mentioned / ground-truth objects."""
    return _chair(items, "recall")


def chair_precision(items: Sequence[ChairItem]) -> float:
    """Distinct correct objects / distinct mentioned objects."""
    return _chair(items, "precision")


def chair_f1(items: Sequence[ChairItem]) -> float:
    """F1 of CHAIR's object precision and recall."""
    return _chair(items, "f1")


def chair_len(items: Sequence[ChairItem]) -> float:
    """Mean caption length in tokens."""
    return _chair(items, "len")


def lab_chair_process_results(doc: dict[str, Any], results: Sequence[str]) -> dict[str, LabChairItem]:
    """``process_results`` of ``halludec_lab_chair``: ``(scene seed, caption)`` for every metric."""
    item = (int(doc["seed"]), _answer(results))
    return dict.fromkeys(CHAIR_METRICS, item)


@lru_cache(maxsize=8)
def _lab_chair_scores(items: tuple[LabChairItem, ...]) -> dict[str, float | None]:
    from halludec.benchmarks.chair_metrics import chair_metrics
    from halludec.lab.bench import lab_caption_result

    metrics, _ = chair_metrics([lab_caption_result(seed, caption) for seed, caption in items], n_bootstrap=0)
    return {name: metric.value for name, metric in metrics.items()}


def _lab(items: Sequence[LabChairItem], name: str) -> float:
    value = _lab_chair_scores(tuple(tuple(i) for i in items)).get(name)
    return float("nan") if value is None else float(value)


def lab_chair_s(items: Sequence[LabChairItem]) -> float:
    """lab-CHAIR_s."""
    return _lab(items, "chair_s")


def lab_chair_i(items: Sequence[LabChairItem]) -> float:
    """lab-CHAIR_i."""
    return _lab(items, "chair_i")


def lab_chair_recall(items: Sequence[LabChairItem]) -> float:
    """lab-CHAIR recall."""
    return _lab(items, "recall")


def lab_chair_precision(items: Sequence[LabChairItem]) -> float:
    """lab-CHAIR object precision."""
    return _lab(items, "precision")


def lab_chair_f1(items: Sequence[LabChairItem]) -> float:
    """lab-CHAIR object F1."""
    return _lab(items, "f1")


def lab_chair_len(items: Sequence[LabChairItem]) -> float:
    """lab-CHAIR mean caption length in tokens."""
    return _lab(items, "len")
