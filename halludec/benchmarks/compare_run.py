"""``halludec.compare``: run several strategies on one benchmark with one model, then table and plot them.

The runner (:func:`halludec.benchmarks.runner.run_benchmark`) runs once per strategy, each with its own resumable
samples file and results file in ``output``; the comparison table (markdown, delta against ``none``) and the PNG
are built from those files, exactly as ``halludec compare results/*.json --plot ...`` builds them from the shell.
Torch is imported lazily (through the runner), so this module keeps ``halludec.benchmarks`` torch-free.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from halludec.benchmarks.compare import compare_table
from halludec.benchmarks.results import ResultRecord


@dataclass
class Comparison:
    """What :func:`compare` returns.

    Attributes:
        records: One results record per strategy, in the order given.
        results_files: The results JSON written for each strategy.
        table: The markdown comparison table (strategies x metrics, delta against ``none``).
        plot: The PNG written, or None (``plot=None``, or matplotlib missing).
    """

    records: list[ResultRecord]
    results_files: list[Path]
    table: str
    plot: Path | None


def compare(
    model: Any,
    processor: Any,
    benchmark: str | Any,
    strategies: Sequence[Any] = ("none", "vcd"),
    *,
    output: str | Path = "results",
    plot: str | Path | None = "comparison.png",
    metrics: Sequence[str] | None = None,
    progress: bool = True,
    **config_fields: Any,
) -> Comparison:
    """Run each strategy on one benchmark with ``model`` and compare the results.

    Args:
        model: A loaded vision-language model.
        processor: Its processor.
        benchmark: A benchmark name (``pope``, ``chair``, ``lab-pope``, ``lab-chair``) or a ready
            :class:`~halludec.benchmarks.runner.RunConfig` (its ``output`` is replaced by ``output``).
        strategies: Strategy names, presets (``"pai:repro"``), instances, or lists of them (a composition counts as
            one entry). Include ``"none"`` to get deltas against plain decoding.
        output: Folder for the per-strategy samples and results files (an interrupted comparison resumes).
        plot: PNG file name inside ``output`` (or an absolute path); None = no plot.
        metrics: Metric names for the table and plot (default: every metric the records share / every rate).
        progress: Show progress bars.
        **config_fields: ``RunConfig`` fields when ``benchmark`` is a name (``data``, ``image_dir``, ``split``,
            ``limit``, ``batch_size``, ``parser``, ...).

    Returns:
        A :class:`Comparison` with the records, the results files, the markdown table and the plot path.

    Raises:
        ValueError: no strategies, or a bad ``RunConfig`` field.
    """
    from halludec.benchmarks.runner import RunConfig, run_benchmark

    if not strategies:
        raise ValueError("strategies=[] is empty; pass at least one strategy, e.g. ['none', 'vcd'].")
    out = Path(output)
    if isinstance(benchmark, RunConfig):
        if config_fields:
            raise ValueError(
                f"Got a RunConfig and also fields {sorted(config_fields)}; set them on the RunConfig instead."
            )
        config = dataclasses.replace(benchmark, output=str(out))
    else:
        config = RunConfig(benchmark=benchmark, output=str(out), **config_fields)
    records = [run_benchmark(model, processor, strategy, config, progress=progress) for strategy in strategies]
    files = [r.results_path for r in records]
    png = None
    if plot is not None:
        from halludec.benchmarks.errors import BenchmarkDataError
        from halludec.benchmarks.plot import plot_results

        try:
            png = plot_results(records, out / plot, metrics=metrics)
        except BenchmarkDataError as err:  # matplotlib missing: the table and results still stand
            import warnings

            warnings.warn(f"No comparison plot: {err}", stacklevel=2)
    return Comparison(records=records, results_files=files, table=compare_table(records, metrics), plot=png)
