"""Comparison tables from results files: strategies x metrics, arrows for direction, delta vs the ``none`` run.

Records are grouped by benchmark, split(s), parser and model, since numbers are comparable only within a group
(benchmarks.md §6); each group becomes one Markdown table. Within a table the best value of every metric that has a
direction is bold, and every other row shows its difference from the ``none`` (plain decoding) row.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from halludec.benchmarks.results import Metric, ResultRecord, load_results, strategy_label

ARROWS = {True: "↑", False: "↓", None: ""}
BASELINE = "none"


def load_records(items: Sequence[str | Path | ResultRecord]) -> list[ResultRecord]:
    """Results records from paths (or records, passed through).

    Args:
        items: Results-file paths or records.

    Returns:
        The records, in order.
    """
    return [item if isinstance(item, ResultRecord) else load_results(item) for item in items]


def group_key(record: ResultRecord) -> tuple[str, str, str, str]:
    """``(benchmark, split(s), parser, model)`` — records are compared only within one key."""
    split = record.benchmark.split
    split_text = ",".join(split) if isinstance(split, list) else str(split or "-")
    model = record.model.name_or_path if record.model else "-"
    return record.benchmark.name, split_text, str(record.benchmark.parser or "-"), model


def group_records(records: Sequence[ResultRecord]) -> dict[tuple[str, str, str, str], list[ResultRecord]]:
    """Records grouped by :func:`group_key`, in first-seen order."""
    groups: dict[tuple[str, str, str, str], list[ResultRecord]] = {}
    for record in records:
        groups.setdefault(group_key(record), []).append(record)
    return groups


def metric_names(records: Sequence[ResultRecord], metrics: Sequence[str] | None = None) -> list[str]:
    """The metrics to show: ``metrics`` if given, else the union of the records' metrics in first-seen order."""
    if metrics:
        return list(metrics)
    names: list[str] = []
    for record in records:
        names += [m for m in record.metrics if m not in names]
    return names


COUNT_METRICS = frozenset({"n", "n_captions", "other", "unparseable"})


def format_value(value: float | None, name: str = "") -> str:
    """A metric value for a table cell: counts as integers, rates with 4 decimals, large numbers with 2.

    Args:
        value: The value (``None`` prints as a dash).
        name: The metric name (counts are recognised by name).

    Returns:
        The text.
    """
    if value is None:
        return "–"
    if name in COUNT_METRICS and float(value).is_integer():
        return str(int(value))
    return f"{value:.2f}" if abs(value) >= 10 else f"{value:.4f}"


def _direction(records: Sequence[ResultRecord], name: str) -> bool | None:
    for record in records:
        if name in record.metrics:
            return record.metrics[name].higher_is_better
    return None


def _best(records: Sequence[ResultRecord], name: str, direction: bool | None) -> float | None:
    values = [r.metrics[name].value for r in records if name in r.metrics and r.metrics[name].value is not None]
    if direction is None or len(values) < 2:
        return None
    return max(values) if direction else min(values)


def _cell(name: str, metric: Metric | None, base: Metric | None, best: float | None, is_base: bool) -> str:
    if metric is None or metric.value is None:
        return "–"
    text = format_value(metric.value, name)
    if best is not None and metric.value == best:
        text = f"**{text}**"
    if base is not None and base.value is not None and not is_base:
        text += f" ({metric.value - base.value:+.4f})"
    return text


def compare_table(records: Sequence[ResultRecord], metrics: Sequence[str] | None = None) -> str:
    """One Markdown table for records of one group.

    Args:
        records: Records to compare (normally one :func:`group_key`).
        metrics: Metric names to show (default: all).

    Returns:
        The table, with a note line when there is no ``none`` row.
    """
    names = metric_names(records, metrics)
    directions = {n: _direction(records, n) for n in names}
    base = next((r for r in records if strategy_label(r) == BASELINE), None)
    header = ["strategy", *[f"{n} {ARROWS[directions[n]]}".rstrip() for n in names]]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * len(names)) + "|"]
    for record in records:
        cells = [strategy_label(record)]
        for n in names:
            best = _best(records, n, directions[n])
            cells.append(_cell(n, record.metrics.get(n), base.metrics.get(n) if base else None, best, record is base))
        lines.append("| " + " | ".join(cells) + " |")
    if base is None and len(records) > 1:
        lines.append("")
        lines.append(f"(no `{BASELINE}` run in this group, so no deltas; run the same settings with strategy none)")
    return "\n".join(lines)


def compare_results(paths: Sequence[str | Path | ResultRecord], metrics: Sequence[str] | None = None) -> str:
    """A Markdown comparison of results files: one table per benchmark/split/parser/model group.

    Args:
        paths: Results files (``halludec run`` or ``halludec score --output``) or records.
        metrics: Metric names to show (default: every metric present).

    Returns:
        Markdown: a heading and a table per group; ↑/↓ mark the better direction, bold the best value, and
        ``(+x)`` the difference from the ``none`` row.
    """
    records = load_records(paths)
    if not records:
        return "(no results files given)"
    parts = []
    for (bench, split, parser, model), group in group_records(records).items():
        parts.append(f"### {bench} — split {split}, parser {parser}, model {model}\n")
        parts.append(compare_table(group, metrics))
        parts.append("")
    return "\n".join(parts).rstrip() + "\n"
