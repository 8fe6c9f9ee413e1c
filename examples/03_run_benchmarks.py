"""Run POPE and CHAIR on a model and print the metrics.

Offline default: the lab model on lab-POPE (the POPE algorithm on held-out synthetic scenes) and lab-CHAIR
(captions scored by CHAIR over the lab vocabulary). With a real checkpoint, point it at your POPE question files (or
the lmms-lab/POPE parquet folder) and your COCO folders:

    python examples/03_run_benchmarks.py                       # lab model, 20 questions per split, 20 captions
    python examples/03_run_benchmarks.py --strategy vcd --limit 50
    python examples/03_run_benchmarks.py --model llava-hf/llava-1.5-7b-hf --pope pope/output/coco \
        --coco-annotations coco/annotations --image-dir coco/val2014 --limit 500 --batch-size 8

Each run writes ``<output>/<benchmark>_..._<strategy>.json`` (self-describing results) and a per-sample JSONL;
rerunning the same command resumes where it stopped.
"""

from __future__ import annotations

import argparse

from halludec.benchmarks.runner import RunConfig, run_benchmark
from halludec.cli import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="lab", help="HF id, local folder, or lab (default)")
    parser.add_argument("--strategy", default="none", help="strategy name or preset")
    parser.add_argument("--pope", help="POPE question files or parquet folder (real models)")
    parser.add_argument("--coco-annotations", help="COCO annotations folder for CHAIR (real models)")
    parser.add_argument("--image-dir", help="COCO val2014 images (real models)")
    parser.add_argument("--limit", type=int, default=20, help="questions per POPE split / CHAIR captions")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--output", default="results/example-benchmarks")
    args = parser.parse_args()

    model, processor = load_model(args.model)
    lab = args.model == "lab"
    if not lab and not (args.pope and args.coco_annotations and args.image_dir):
        parser.error("a real model needs --pope, --coco-annotations and --image-dir (no data is downloaded)")
    common = {"limit": args.limit, "batch_size": args.batch_size, "output": args.output}
    pope = (
        RunConfig(benchmark="lab-pope", **common)
        if lab
        else RunConfig(benchmark="pope", data=args.pope, image_dir=args.image_dir, **common)
    )
    chair = (
        RunConfig(benchmark="lab-chair", **common)
        if lab
        else RunConfig(benchmark="chair", data=args.coco_annotations, image_dir=args.image_dir, **common)
    )

    for config in (pope, chair):
        record = run_benchmark(model, processor, args.strategy, config, progress=False)
        print(f"== {config.benchmark} ({args.strategy}, n={record.n_samples})")
        if record.per_split:  # POPE: one block of metrics per split, then the average
            for split, metrics in record.per_split.items():
                shown = ", ".join(
                    f"{k} {v.value:.3f}" for k, v in metrics.items() if k in ("accuracy", "f1", "yes_ratio")
                )
                print(f"  {split:<12} {shown}")
        for name, metric in record.metrics.items():
            arrow = {True: "↑", False: "↓", None: ""}[metric.higher_is_better]
            print(f"  {name + arrow:<20} {metric.value:.4g}")
        print(f"  results file: {record.results_path}")


if __name__ == "__main__":
    main()
