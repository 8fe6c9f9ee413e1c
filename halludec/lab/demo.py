"""``halludec demo``: every registered strategy on the lab model's benchmarks, one comparison table and plot.

Runs ``none`` and each registered strategy (with the lab model's per-model settings, as ``get_strategy(name,
model=model)`` fills them) on lab-pope (all three splits) and lab-chair, through the ordinary benchmark runner; prints
the comparison (n beside each benchmark), and writes the results files, ``comparison.md`` and ``comparison.png`` to
the output folder.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: Default per-split limit of lab-pope and caption count of lab-chair: every registered strategy fits in about
#: five minutes on a 2-core CPU (measured; see the README).
DEMO_POPE_LIMIT = 300
DEMO_CHAIR_LIMIT = 100
DEMO_BATCH_SIZE = 32


def run_demo(
    output: str | Path = "halludec-demo",
    strategies: Sequence[str] | None = None,
    pope_limit: int = DEMO_POPE_LIMIT,
    chair_limit: int = DEMO_CHAIR_LIMIT,
    batch_size: int = DEMO_BATCH_SIZE,
    plot: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """Run the demo and write its files.

    Args:
        output: Folder for the results files, ``comparison.md`` and ``comparison.png``.
        strategies: Strategy names or ``name:preset`` (default: ``none`` and every registered strategy).
        pope_limit: lab-pope questions per split.
        chair_limit: lab-chair captions.
        batch_size: Prompts per ``generate`` call.
        plot: Write ``comparison.png`` (needs matplotlib; skipped with a note when it is missing).
        progress: Show progress bars.

    Returns:
        ``{"results": [paths], "table": markdown, "plot": path or None, "wall_time_s": seconds}``.
    """
    import halludec
    from halludec.benchmarks.compare import compare_results
    from halludec.benchmarks.runner import RunConfig, run_benchmark
    from halludec.lab import load_lab

    start = time.perf_counter()
    model, processor = load_lab()
    registered = [n for n in halludec.list_strategies() if ":" not in n and n != "none"]
    names = list(strategies) if strategies else ["none", *registered]
    resolved = [halludec.get_strategy(n, model=model) for n in names]  # fail fast on a bad name
    out = Path(output)
    for old in [*out.glob("lab-pope_*"), *out.glob("lab-chair_*")]:  # a fresh run, not a resume of an older one
        old.unlink()
    paths: list[Path] = []
    rows: list[dict[str, Any]] = []
    for name, strategy in zip(names, resolved, strict=True):
        t0 = time.perf_counter()
        records = {}
        for benchmark, limit in (("lab-pope", pope_limit), ("lab-chair", chair_limit)):
            config = RunConfig(benchmark=benchmark, limit=limit, batch_size=batch_size, output=str(out))
            records[benchmark] = run_benchmark(model, processor, strategy, config, progress=progress)
            paths.append(records[benchmark].results_path)
        rows.append(summary_row(name, records["lab-pope"], records["lab-chair"], time.perf_counter() - t0))
        print(f"  {name:<12} {rows[-1]['time_s']:6.1f} s", flush=True)
    table = demo_table(rows)
    (out / "comparison.md").write_text(table + "\n\n" + compare_results(paths) + "\n")
    summary = {"pope_limit_per_split": pope_limit, "chair_limit": chair_limit, "strategies": rows}
    (out / "demo.json").write_text(json.dumps(summary, indent=1) + "\n")
    png = None
    if plot:
        try:
            from halludec.benchmarks.plot import plot_results

            png = plot_results(paths, out / "comparison.png")
        except Exception as err:  # matplotlib missing: the table and results still stand
            print(f"(no plot: {err})")
    return {"results": paths, "table": table, "plot": png, "wall_time_s": time.perf_counter() - start}


def summary_row(name: str, pope: Any, chair: Any, seconds: float) -> dict[str, Any]:
    """The demo's figures for one strategy (accuracies in %, CHAIR in %, n beside each benchmark).

    Args:
        name: Strategy name.
        pope: The lab-pope results record.
        chair: The lab-chair results record.
        seconds: Wall time of both runs.

    Returns:
        ``{"strategy", "accuracy": {split: %}, "yes_ratio_adversarial", "n_pope", "chair_s", "chair_i",
        "recall", "n_chair", "time_s"}``.
    """

    def pct(metric: Any) -> float | None:
        return None if metric is None or metric.value is None else round(100.0 * metric.value, 2)

    per_split = pope.per_split or {}
    return {
        "strategy": name,
        "accuracy": {split: pct(m.get("accuracy")) for split, m in per_split.items()},
        "yes_ratio_adversarial": (per_split.get("adversarial") or {}).get("yes_ratio").value
        if per_split.get("adversarial")
        else None,
        "n_pope": pope.n_samples,
        "chair_s": pct(chair.metrics.get("chair_s")),
        "chair_i": pct(chair.metrics.get("chair_i")),
        "recall": pct(chair.metrics.get("recall")),
        "n_chair": chair.n_samples,
        "time_s": round(seconds, 1),
    }


def demo_table(rows: Sequence[dict[str, Any]]) -> str:
    """The demo's Markdown table: lab-POPE accuracy per split, adversarial yes-ratio, lab-CHAIR, time.

    Args:
        rows: :func:`summary_row` results (the first row is the baseline for the deltas).

    Returns:
        The table; ``(+x)`` is the change from the first row.
    """
    if not rows:
        return "(no strategies run)"
    base = rows[0]
    splits = list(base["accuracy"])
    n_pope, n_chair = base["n_pope"], base["n_chair"]
    header = [f"acc {s} % ↑" for s in splits] + ["yes-ratio adv", "CHAIR_s % ↓", "CHAIR_i % ↓", "recall % ↑", "s"]
    lines = [
        f"lab-pope: n={n_pope} questions ({n_pope // max(len(splits), 1)} per split); lab-chair: n={n_chair} captions",
        "",
        "| strategy | " + " | ".join(header) + " |",
        "|---|" + "---:|" * len(header),
    ]

    def cell(value: float | None, ref: float | None, first: bool) -> str:
        if value is None:
            return "–"
        return f"{value:.1f}" if first or ref is None else f"{value:.1f} ({value - ref:+.1f})"

    for k, row in enumerate(rows):
        first = k == 0
        cells = [cell(row["accuracy"].get(s), base["accuracy"].get(s), first) for s in splits]
        yes = row["yes_ratio_adversarial"]
        cells.append("–" if yes is None else f"{yes:.2f}")
        cells += [cell(row[m], base[m], first) for m in ("chair_s", "chair_i", "recall")]
        cells.append(f"{row['time_s']:.0f}")
        lines.append(f"| {row['strategy']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
