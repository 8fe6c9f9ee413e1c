"""PNG plot of results files: one panel per benchmark group, grouped bars of metrics per strategy (matplotlib, Agg)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from halludec.benchmarks.compare import ARROWS, COUNT_METRICS, group_records, load_records, metric_names
from halludec.benchmarks.errors import BenchmarkDataError
from halludec.benchmarks.results import ResultRecord, strategy_label


def plot_results(
    paths: Sequence[str | Path | ResultRecord], out_path: str | Path, metrics: Sequence[str] | None = None
) -> Path:
    """Draw grouped bars (metrics on x, one bar per strategy) for each benchmark group and save a PNG.

    Only metrics with a direction and values in [0, 1] are drawn by default (rates such as F1 or CHAIR_i), so panels
    share a scale; pass ``metrics`` to choose. Bars carry 95 % intervals when the record has them.

    Args:
        paths: Results files or records.
        out_path: The PNG file to write (folder created).
        metrics: Metric names to draw (default: see above).

    Returns:
        The written path.

    Raises:
        BenchmarkDataError: if matplotlib is missing or nothing can be drawn.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BenchmarkDataError("Plotting needs matplotlib: pip install 'halludec[bench]'.") from None
    records = load_records(paths)
    groups = list(group_records(records).items())
    if not groups:
        raise BenchmarkDataError("No results to plot; pass one or more results files.")
    fig, axes = plt.subplots(len(groups), 1, figsize=(9, 3.6 * len(groups)), squeeze=False)
    for ax, ((bench, split, parser, model), group) in zip(axes[:, 0], groups, strict=True):
        names = [n for n in metric_names(group, metrics) if metrics or _plottable(group, n)]
        width = 0.8 / max(len(group), 1)
        for k, record in enumerate(group):
            xs, ys, errs = [], [], [[], []]
            for i, n in enumerate(names):
                m = record.metrics.get(n)
                if m is None or m.value is None:
                    continue
                xs.append(i + (k - (len(group) - 1) / 2) * width)
                ys.append(m.value)
                lo, hi = m.ci95 if m.ci95 else (m.value, m.value)
                errs[0].append(max(m.value - lo, 0.0))
                errs[1].append(max(hi - m.value, 0.0))
            ax.bar(
                xs,
                ys,
                width=width,
                yerr=errs if any(errs[0] + errs[1]) else None,
                capsize=2,
                label=strategy_label(record),
            )
        direction = {n: next((r.metrics[n].higher_is_better for r in group if n in r.metrics), None) for n in names}
        ax.set_xticks(range(len(names)), [f"{n} {ARROWS[direction[n]]}".rstrip() for n in names], fontsize=8)
        details = [f"split {split}", f"parser {parser}", f"model {model}"]
        shown = [d for d in details if not d.endswith(" -")]
        ax.set_title(f"{bench} ({'; '.join(shown)})" if shown else bench, fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    out = Path(out_path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _plottable(group: Sequence[ResultRecord], name: str) -> bool:
    if name in COUNT_METRICS:
        return False
    metrics = [r.metrics[name] for r in group if name in r.metrics]
    values = [m.value for m in metrics if m.value is not None]
    has_direction = any(m.higher_is_better is not None for m in metrics)
    return has_direction and bool(values) and all(0.0 <= v <= 1.0 for v in values)
