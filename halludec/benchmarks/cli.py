"""``halludec score`` and ``halludec compare``: argparse subcommands the main CLI adds with one line each.

Nothing here imports torch: both commands work on files written by any tool.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from halludec.benchmarks.compare import format_value
from halludec.benchmarks.errors import BenchmarkDataError
from halludec.benchmarks.results import ResultRecord, save_results
from halludec.benchmarks.samples import SampleWriter

SCORE_EPILOG = """examples:
  halludec score --benchmark pope --predictions preds.jsonl                  lines: answer, label, optional split
  halludec score --benchmark pope --predictions preds.jsonl --parser opera --json
  halludec score --benchmark pope --predictions answers.jsonl --annotations POPE/output/coco   labels by id
  halludec score --benchmark chair --predictions caps.jsonl --annotations coco/annotations   lines: image_id, caption
  halludec score --benchmark chair --predictions caps.jsonl --annotations coco/annotations --image-list opera_compat
  halludec score --benchmark amber --predictions amber_out.json --annotations AMBER/data
  halludec score --benchmark mme --predictions mme_results/                  <subtask>.txt with a 4th answer column

parsers (POPE, AMBER, MME): pope (default for POPE; official), opera, vlmevalkit, strict; amber and mme use their
own official rules by default. Unparseable answers are counted beside every parser.
"""

COMPARE_EPILOG = """examples:
  halludec compare results/*.json                       markdown table (strategies x metrics, delta vs none)
  halludec compare results/*.json --plot compare.png    also a PNG plot
  halludec compare results/*.json --metrics f1,accuracy,yes_ratio --out table.md
"""


def add_score_subcommand(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``score`` to the main parser's subparsers.

    Args:
        subparsers: The object returned by ``parser.add_subparsers()``.

    Returns:
        The ``score`` parser (its ``func`` default runs the command and returns the exit code).
    """
    p = subparsers.add_parser(
        "score",
        help="score model outputs from any tool (no model needed)",
        description="Score POPE, CHAIR, AMBER or MME outputs written by any tool, without loading a model.",
        epilog=SCORE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--benchmark", required=True, help="pope, chair, amber or mme")
    p.add_argument("--predictions", required=True, help="JSONL (or JSON list) of model outputs; MME: results folder")
    p.add_argument("--parser", default=None, help="yes/no answer rule (POPE default: pope)")
    p.add_argument("--annotations", default=None, help="ground truth: COCO annotations dir, POPE files, AMBER, MME")
    p.add_argument("--answer-field", default=None, help="field holding the model's text (default: answer)")
    chair = p.add_argument_group("CHAIR options")
    chair.add_argument("--backend", default="builtin", help="text backend: builtin (default, no data) or nltk")
    chair.add_argument(
        "--compat-opera-synonyms",
        action="store_true",
        help="reproduce the released synonym quirks (' motor bike', ' cheesecake', 'iPhone')",
    )
    chair.add_argument("--image-list", default=None, help="opera_compat, halludec_default or a file of image ids")
    chair.add_argument("--skip-unknown", action="store_true", help="drop image ids that are not in the annotations")
    chair.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for 95%% intervals (0: none)")
    chair.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    chair.add_argument("--cache-dir", default=None, help="ground-truth JSON cache folder (default ~/.cache/halludec)")
    p.add_argument("--output", default=None, help="also write the results JSON here")
    p.add_argument("--samples-out", default=None, help="also write per-sample rows (with pred / mentions) as JSONL")
    p.add_argument("--json", action="store_true", help="print the results record as one JSON object")
    p.set_defaults(func=run_score)
    return p


def run_score(args: argparse.Namespace) -> int:
    """Run ``halludec score`` with parsed arguments; prints results, returns the exit code (2 on bad input)."""
    from halludec.benchmarks.scoring import score_file

    options: dict[str, Any] = {
        "parser": args.parser,
        "annotations": args.annotations,
        "answer_field": args.answer_field,
    }
    if args.benchmark.lower() == "chair":
        options = {
            "annotations": args.annotations,
            "backend": args.backend,
            "image_list": args.image_list,
            "compat_opera_synonyms": args.compat_opera_synonyms,
            "skip_unknown": args.skip_unknown,
            "n_bootstrap": args.bootstrap,
            "seed": args.seed,
            "cache_dir": args.cache_dir,
            "caption_field": args.answer_field,
        }
    try:
        scored = score_file(args.benchmark, args.predictions, **options)
        if args.output:
            save_results(scored.record, args.output)
        if args.samples_out:
            Path(args.samples_out).expanduser().unlink(missing_ok=True)
            with SampleWriter(args.samples_out) as writer:
                for row in scored.rows:
                    writer.write(row)
    except (BenchmarkDataError, KeyError, ValueError, OSError) as err:
        print(f"halludec score: error: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(scored.record.to_dict(), indent=2, ensure_ascii=False))
    else:
        print(format_record(scored.record))
    return 0


def format_record(record: ResultRecord) -> str:
    """A short human-readable summary of a results record (metrics, per split, notes)."""
    bench = record.benchmark
    lines = [
        f"{bench.name}: {record.n_samples} samples; parser {bench.parser or '-'}; data {bench.data.variant or '-'}"
    ]

    def row(name: str, metrics: dict[str, Any]) -> str:
        cells = []
        for key, m in metrics.items():
            arrow = {True: "↑", False: "↓"}.get(m.higher_is_better, "")
            ci = f" [{m.ci95[0]:.4f}, {m.ci95[1]:.4f}]" if m.ci95 else ""
            value = format_value(m.value, key)
            cells.append(f"{key}{arrow}={value}{ci}")
        return f"  {name:<12} " + "  ".join(cells)

    lines.append(row("overall", record.metrics))
    for split, metrics in record.per_split.items():
        lines.append(row(split, metrics))
    lines += [f"  note: {note}" for note in record.notes]
    return "\n".join(lines)


def add_compare_subcommand(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``compare`` (table + optional plot from results files) to the main parser's subparsers.

    Args:
        subparsers: The object returned by ``parser.add_subparsers()``.

    Returns:
        The ``compare`` parser.
    """
    p = subparsers.add_parser(
        "compare",
        help="markdown table (and PNG plot) comparing results files",
        description="Compare results files: strategies x metrics, arrows for direction, delta vs the 'none' run.",
        epilog=COMPARE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("results", nargs="+", help="results JSON files (from halludec run / halludec score --output)")
    p.add_argument("--metrics", default=None, help="comma-separated metric names to show (default: all)")
    p.add_argument("--out", default=None, help="also write the markdown table to this file")
    p.add_argument("--plot", default=None, help="write a PNG plot to this file")
    p.set_defaults(func=run_compare)
    return p


def run_compare(args: argparse.Namespace) -> int:
    """Run ``halludec compare`` with parsed arguments; returns the exit code (2 on bad input)."""
    from halludec.benchmarks.compare import compare_results, load_records

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    try:
        records = load_records(args.results)
        table = compare_results(records, metrics)
        if args.out:
            out = Path(args.out).expanduser()
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(table, encoding="utf-8")
        if args.plot:
            from halludec.benchmarks.plot import plot_results

            plot_results(records, args.plot, metrics)
    except (BenchmarkDataError, KeyError, ValueError, OSError) as err:
        print(f"halludec compare: error: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2
    print(table, end="")
    if args.plot:
        print(f"plot written to {args.plot}")
    return 0
