"""Compare several strategies on one benchmark: a markdown table (delta against ``none``) and a PNG plot.

``halludec.compare`` runs the benchmark once per strategy (each resumable, each with its own results file) and
builds the table and plot from the results files, as ``halludec compare results/*.json --plot out.png`` does.

    python examples/04_compare_strategies.py                                   # lab-POPE, 30 questions per split
    python examples/04_compare_strategies.py --benchmark lab-chair --strategies none vhr vcd pai:repro
    python examples/04_compare_strategies.py --model llava-hf/llava-1.5-7b-hf --benchmark pope \
        --data pope/output/coco --image-dir coco/val2014 --limit 500 --batch-size 8
"""

from __future__ import annotations

import argparse

import halludec
from halludec.cli import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="lab", help="HF id, local folder, or lab (default)")
    parser.add_argument("--benchmark", default="lab-pope", help="lab-pope, lab-chair, pope or chair")
    parser.add_argument("--strategies", nargs="+", default=["none", "vhr", "vcd", "pai"])
    parser.add_argument("--data", help="POPE files / COCO annotations folder (real benchmarks)")
    parser.add_argument("--image-dir", help="COCO val2014 images (real benchmarks)")
    parser.add_argument("--limit", type=int, default=30, help="questions per POPE split / captions")
    parser.add_argument("--batch-size", type=int, default=30)
    parser.add_argument("--metrics", nargs="+", help="metrics to show (default: the main ones of the benchmark)")
    parser.add_argument("--output", default="results/example-compare")
    args = parser.parse_args()

    pope = args.benchmark.endswith("pope")
    metrics = args.metrics or (
        ["accuracy", "f1", "yes_ratio", "unparseable"] if pope else ["chair_s", "chair_i", "recall"]
    )
    model, processor = load_model(args.model)
    # get_strategy(..., model=model): each strategy with this model's published (or documented generic) settings
    strategies = [halludec.get_strategy(name, model=model) for name in args.strategies]
    result = halludec.compare(
        model,
        processor,
        args.benchmark,
        strategies,
        output=args.output,
        plot="comparison.png",
        metrics=metrics,
        progress=False,
        data=args.data,
        image_dir=args.image_dir,
        limit=args.limit,
        batch_size=args.batch_size,
    )
    print(result.table)
    print(f"plot: {result.plot}")
    print(f"results files: {', '.join(str(p) for p in result.results_files)}")


if __name__ == "__main__":
    main()
