"""Data-parallel benchmark run with ``accelerate launch``: N processes, one merged results file.

Each process answers a contiguous block of the samples and writes its own part file; the main process merges them
into the one samples file and scores it exactly as a single process would. This script launches the run for you
(2 CPU processes over gloo by default; on a GPU machine one process per GPU) and then checks the merged metrics
against a single-process run of the same command.

    python examples/07_data_parallel.py                                  # lab model, 2 CPU processes
    python examples/07_data_parallel.py --model llava-hf/llava-1.5-7b-hf --num-processes 8 --benchmark pope \
        --extra "--data pope/output/coco --image-dir coco/val2014 --batch-size 8" --no-check

The command it runs is what you would type yourself:

    accelerate launch --multi_gpu --num_processes 2 -m halludec run --model lab --benchmark lab-pope ...
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    """A free TCP port for the processes' rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="lab", help="HF id, local folder, or lab (default)")
    parser.add_argument("--benchmark", default="lab-pope")
    parser.add_argument("--strategy", default="vcd")
    parser.add_argument("--num-processes", type=int, default=2)
    parser.add_argument("--limit", type=int, default=6, help="samples per POPE split / captions")
    parser.add_argument("--extra", default="--batch-size 4 --max-new-tokens 6", help="more `halludec run` flags")
    parser.add_argument("--output", default="results/example-data-parallel")
    parser.add_argument("--no-check", action="store_true", help="skip the single-process comparison run")
    args = parser.parse_args()

    out = Path(args.output)
    run = ["run", "--model", args.model, "--benchmark", args.benchmark, "--strategy", args.strategy]
    run += ["--limit", str(args.limit), *shlex.split(args.extra)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1"]
    launch += ["--num_processes", str(args.num_processes), "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(free_port()), "-m", "halludec", *run, "--output", str(out / "parallel")]
    print("$", shlex.join(launch[1:]).replace("-m accelerate.commands.launch", "accelerate launch", 1), flush=True)
    subprocess.run(launch, check=True, env=env)

    stem = f"{args.benchmark}_{args.strategy}"
    merged = json.loads((out / "parallel" / f"{stem}.json").read_text())
    parts = list((out / "parallel").glob("*.part-*"))
    print(f"merged results: {out / 'parallel' / stem}.json (n={merged['n_samples']}, part files left: {len(parts)})")
    if args.no_check:
        return
    single = [sys.executable, "-m", "halludec", *run, "--output", str(out / "single"), "--quiet"]
    subprocess.run(single, check=True, env=env, stdout=subprocess.DEVNULL)
    reference = json.loads((out / "single" / f"{stem}.json").read_text())
    same = merged["metrics"] == reference["metrics"]
    rows = (out / "parallel" / f"{stem}.samples.jsonl").read_text() == (
        out / "single" / f"{stem}.samples.jsonl"
    ).read_text()
    print(f"same metrics as one process: {same}; same samples file: {rows}")


if __name__ == "__main__":
    main()
