"""Yes/no metrics for POPE (and AMBER/MME's accuracy): per split, mean over splits and pooled (benchmarks.md §1.5).

"yes" is the positive class. For every parser: accuracy = correct / N (an *other* prediction is wrong); precision =
TP / (TP + FP) over predictions *yes*; recall = TP / (TP + FN) with FN = label *yes* and prediction not *yes* (only
prediction *no* for the ``strict`` parser); F1 = 2PR / (P + R); yes-ratio = predicted *yes* / N, from the predictions
(never the labels). An undefined precision or recall (no predicted *yes* / no *yes* label) is reported as 0 with a
note, where the original scripts divide by zero. ``unparseable`` counts answers by design.md's rule, whatever the
parser made of them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from halludec.benchmarks.pope_parsers import NO, OTHER, YES, PopeParser, is_unparseable
from halludec.benchmarks.results import Metric

POPE_SPLITS = ("random", "popular", "adversarial")
RATE_METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")
DIRECTIONS: dict[str, bool | None] = {
    "accuracy": True,
    "precision": True,
    "recall": True,
    "f1": True,
    "yes_ratio": None,  # descriptive: POPE's labels are balanced, so ~0.5 is unbiased; no better direction
    "unparseable": False,
    "other": False,
    "n": None,
}


@dataclass
class YesNoCounts:
    """Confusion counts of one group of rows (yes = positive)."""

    n: int = 0
    tp: int = 0
    fp: int = 0
    tn: int = 0
    fn: int = 0
    pred_yes: int = 0
    other: int = 0
    correct: int = 0
    unparseable: int = 0

    def add(self, pred: str, label: str, answer: str, fn_counts_other: bool = True) -> None:
        """Count one row.

        Args:
            pred: The parser's verdict (yes/no/other).
            label: The gold label (yes/no).
            answer: The raw answer (for the unparseable rule).
            fn_counts_other: Whether a yes-labelled *other* prediction is a false negative.
        """
        self.n += 1
        self.correct += pred == label
        self.pred_yes += pred == YES
        self.other += pred == OTHER
        self.unparseable += is_unparseable(answer)
        if label == YES:
            if pred == YES:
                self.tp += 1
            elif pred == NO or fn_counts_other:
                self.fn += 1
        elif pred == YES:
            self.fp += 1
        elif pred == NO:
            self.tn += 1

    def merge(self, other: YesNoCounts) -> YesNoCounts:
        """The sum of two count sets."""
        return YesNoCounts(**{k: getattr(self, k) + getattr(other, k) for k in self.__dataclass_fields__})


def metrics_from_counts(counts: YesNoCounts, label: str = "") -> tuple[dict[str, Metric], list[str]]:
    """Accuracy, precision, recall, F1, yes-ratio, unparseable, other and n from counts.

    Args:
        counts: The counts.
        label: Group name for notes (e.g. the split).

    Returns:
        ``(metrics, notes)``.
    """
    notes: list[str] = []
    where = f" ({label})" if label else ""
    if counts.n == 0:
        return {k: Metric(None, DIRECTIONS[k]) for k in DIRECTIONS}, [f"no rows{where}"]
    if counts.tp + counts.fp == 0:
        notes.append(f"precision undefined{where}: no answer was parsed as yes; reported as 0")
    if counts.tp + counts.fn == 0:
        notes.append(f"recall undefined{where}: no yes-labelled row counts toward recall; reported as 0")
    precision = counts.tp / (counts.tp + counts.fp) if counts.tp + counts.fp else 0.0
    recall = counts.tp / (counts.tp + counts.fn) if counts.tp + counts.fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    values = {
        "accuracy": counts.correct / counts.n,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": counts.pred_yes / counts.n,
        "unparseable": float(counts.unparseable),
        "other": float(counts.other),
        "n": float(counts.n),
    }
    return {k: Metric(v, DIRECTIONS[k]) for k, v in values.items()}, notes


def order_splits(splits: Iterable[str]) -> list[str]:
    """POPE's splits in their usual order (random, popular, adversarial), then any others sorted."""
    names = set(splits)
    return [s for s in POPE_SPLITS if s in names] + sorted(names - set(POPE_SPLITS))


def yesno_report(
    rows: Sequence[tuple[str, str, str]], parser: PopeParser
) -> tuple[dict[str, Metric], dict[str, dict[str, Metric]], list[str], list[str]]:
    """Score ``(split, answer, label)`` rows with a parser.

    Args:
        rows: One ``(split, answer text, gold label yes/no)`` per sample.
        parser: The answer rule.

    Returns:
        ``(metrics, per_split, notes, preds)``. With one split, ``metrics`` equals that split's; with several,
        the five rates are the **mean of the per-split values** (LLaVA style) and ``<name>_pooled`` are computed
        over all rows (lmms-eval / VLMEvalKit style); counts are summed. ``preds`` are the verdicts in row order.
    """
    by_split: dict[str, YesNoCounts] = {}
    preds = []
    for split, answer, label in rows:
        pred = parser.parse(answer)
        preds.append(pred)
        by_split.setdefault(split, YesNoCounts()).add(pred, label, answer, parser.fn_counts_other)
    notes: list[str] = []
    per_split: dict[str, dict[str, Metric]] = {}
    for split in order_splits(by_split):
        per_split[split], split_notes = metrics_from_counts(by_split[split], split)
        notes += split_notes
    pooled_counts = YesNoCounts()
    for c in by_split.values():
        pooled_counts = pooled_counts.merge(c)
    pooled, pooled_notes = metrics_from_counts(pooled_counts, "pooled")
    if len(per_split) <= 1:
        return (next(iter(per_split.values())) if per_split else pooled), per_split, notes, preds
    metrics = {
        name: Metric(sum(ms[name].value or 0.0 for ms in per_split.values()) / len(per_split), DIRECTIONS[name])
        for name in RATE_METRICS
    }
    for name in ("unparseable", "other", "n"):
        metrics[name] = pooled[name]
    for name in RATE_METRICS:
        metrics[f"{name}_pooled"] = pooled[name]
    return metrics, per_split, notes + [n for n in pooled_notes if n not in notes], preds
