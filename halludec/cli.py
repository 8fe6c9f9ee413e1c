"""The ``halludec`` command (argparse subcommands)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

EPILOG = """examples:
  halludec ls                       list strategies (with presets) and supported model types
  halludec ls --json                the same, machine-readable
  halludec demo                     end-to-end run on a tiny model built from config (CPU, seconds)
  halludec demo --family qwen2_vl --strategy vhr --new-tokens 16
  halludec run --model llava-hf/llava-1.5-7b-hf --strategy none --strategy vhr --benchmark pope \\
      --data pope/coco --image-dir coco/val2014 --split adversarial --batch-size 8 --output results/
  halludec heads --model llava-hf/llava-1.5-7b-hf --criterion vhd --data images/ --limit 32 \\
      --out profile.json --plot heads.png
  halludec score --benchmark pope --predictions preds.jsonl --parser pope --json
  halludec score --benchmark chair --predictions caps.jsonl --annotations coco/annotations
  halludec compare results/*.json --plot comparison.png
"""


def _cmd_ls(args: argparse.Namespace) -> int:
    from halludec.decoding import STRATEGIES
    from halludec.vlm_adapters import ADAPTERS

    strategies = {
        name: {
            "presets": sorted(cls.presets),
            "summary": (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else "",
            "paper": cls.paper,
        }
        for name, cls in STRATEGIES.items()
    }
    adapters = {name: cls.__name__ for name, cls in ADAPTERS.items()}
    if args.json:
        print(json.dumps({"strategies": strategies, "model_types": adapters}, indent=2))
        return 0
    print("strategies:")
    for name, info in strategies.items():
        presets = f"  presets: {', '.join(f'{name}:{p}' for p in info['presets'])}" if info["presets"] else ""
        print(f"  {name:<12} {info['summary']}{presets}")
    print("model types:")
    for name, cls_name in adapters.items():
        print(f"  {name:<16} {cls_name}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import torch

    import halludec
    from halludec.tiny import build_tiny, tiny_batch

    strategy = halludec.get_strategy(args.strategy)  # fail fast on a bad name, before building anything
    model, processor = build_tiny(args.family, seed=args.seed)
    questions = ["Is there a dog in the image?", "What colour is the large object on the left?"]
    batch = tiny_batch(processor, args.family, questions, seed=args.seed)
    gen = {"max_new_tokens": args.new_tokens, "do_sample": False}
    print(
        f"model: tiny random-weight {type(model).__name__} built from config ({args.family}); batch of 2, left-padded"
    )
    with torch.inference_mode():
        t0 = time.perf_counter()
        plain = model.generate(**batch, **gen)
        t1 = time.perf_counter()
        steered = halludec.generate(model, batch, strategy=strategy, processor=processor, **gen)
        t2 = time.perf_counter()
    tok = processor.tokenizer
    prompt_len = batch["input_ids"].shape[1]
    for row, question in enumerate(questions):
        print(f"\nQ{row}: {question}")
        print(f"  plain generate        : {tok.decode(plain[row, prompt_len:], skip_special_tokens=True)!r}")
        print(f"  halludec {args.strategy:<13}: {tok.decode(steered[row, prompt_len:], skip_special_tokens=True)!r}")
    same = plain.shape == steered.shape and bool((plain == steered).all())
    print(f"\ntokens identical to plain generate: {same}")
    print(f"time: plain {t1 - t0:.3f}s, halludec {t2 - t1:.3f}s (first call includes warm-up)")
    print("(random weights: the text is noise; the trained lab model replaces this demo when it lands)")
    return 0


def parse_sets(sets: Sequence[str], strategies: Sequence[str]) -> dict[str, dict[str, object]]:
    """``--set field=value`` (one strategy) or ``--set name.field=value`` -> overrides per strategy name.

    Values are parsed as JSON when they parse (numbers, booleans, lists, null), else kept as strings.

    Raises:
        ValueError: a malformed item, or an unqualified field with several strategies.
    """
    names = [s.partition(":")[0] for s in strategies]
    out: dict[str, dict[str, object]] = {n: {} for n in names}
    for item in sets:
        key, eq, raw = item.partition("=")
        if not eq or not key:
            raise ValueError(f"--set {item!r} is malformed; use field=value (or strategy.field=value).")
        name, dot, fieldname = key.rpartition(".")
        if not dot:
            if len(names) != 1:
                raise ValueError(f"--set {item!r} is ambiguous with strategies {names}; write strategy.{key}=...")
            name, fieldname = names[0], key
        if name not in out:
            raise ValueError(f"--set {item!r} names strategy {name!r}, which is not among {names}.")
        try:
            value: object = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out[name][fieldname] = tuple(value) if isinstance(value, list) else value
    return out


def load_model(name: str, dtype: str = "auto", device: str = "auto"):
    """Load a model and processor with ``from_pretrained`` (bf16 on CUDA, fp32 on CPU by default)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    cuda = torch.cuda.is_available() and device != "cpu"
    torch_dtype = {
        "auto": torch.bfloat16 if cuda else torch.float32,
        "bf16": torch.bfloat16,
        "fp32": torch.float32,
        "fp16": torch.float16,
    }[dtype]
    kwargs = {"dtype": torch_dtype}
    if cuda:
        kwargs["device_map"] = "auto" if device == "auto" else device
    model = AutoModelForImageTextToText.from_pretrained(name, **kwargs).eval()
    processor = AutoProcessor.from_pretrained(name)
    getattr(processor, "tokenizer", processor).padding_side = "left"
    return model, processor


def _cmd_run(args: argparse.Namespace) -> int:
    import halludec
    from halludec.benchmarks.runner import RunConfig, run_benchmark

    names = args.strategy or ["none"]
    overrides = parse_sets(args.set, names)
    strategies = [halludec.get_strategy(s, **overrides[s.partition(":")[0]]) for s in names]
    model, processor = load_model(args.model, args.dtype, args.device)
    for strategy in strategies:  # one results file per strategy
        config = RunConfig(
            benchmark=args.benchmark,
            data=args.data,
            image_dir=args.image_dir,
            split=args.split,
            limit=args.limit,
            batch_size=args.batch_size,
            output=args.output,
            parser=args.parser,
            max_new_tokens=args.max_new_tokens,
            image_list=args.image_list,
            seed=args.seed,
        )
        record = run_benchmark(model, processor, strategy, config, progress=not args.quiet)
        shown = ", ".join(f"{k}={m.value:.4g}" for k, m in record.metrics.items() if isinstance(m.value, float))
        print(f"{strategy.name}{':' + strategy.preset if strategy.preset else ''}: n={record.n_samples} {shown}")
        print(f"  results: {record.samples_file.replace('.samples.jsonl', '.json')}")
    return 0


def _cmd_speed(args: argparse.Namespace) -> int:
    import torch

    from halludec import speed

    source = args.model or args.shape or ("llava-1.5-7b" if torch.cuda.is_available() else "cpu-medium")
    names = [n.strip() for n in args.strategies.split(",") if n.strip()]
    import halludec

    for name in names:
        halludec.get_strategy(name)  # fail fast on a bad name
    model, processor = speed.load(source)
    timings = speed.measure(model, processor, names, args.new_tokens, args.repeats, args.batch_size)
    if not args.no_memory:
        for key in ["baseline", *names]:
            mem = speed.peak_memory_mb(source, None if key == "baseline" else key, args.new_tokens, args.batch_size)
            timings[key].peak_mem_mb = mem
    doc = speed.report(timings)
    doc["setup"] = {
        "source": source,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "batch_size": args.batch_size,
        "device": str(model.device),
        "dtype": str(model.dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
    }
    print(
        f"{source} on {model.device}, {args.new_tokens} new tokens, batch {args.batch_size}, "
        f"median of {args.repeats} interleaved runs"
    )
    print(speed.format_table(doc))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(doc, fh, indent=2)
        print(f"wrote {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``halludec`` command."""
    parser = argparse.ArgumentParser(
        prog="halludec",
        description="Training-free hallucination mitigation for vision-language models.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")

    p_ls = sub.add_parser("ls", help="list strategies, presets and supported model types")
    p_ls.add_argument("--json", action="store_true", help="print JSON")
    p_ls.set_defaults(func=_cmd_ls)

    p_demo = sub.add_parser("demo", help="run halludec end to end on a tiny model built from config")
    p_demo.add_argument("--family", default="llava", help="model type of the tiny model (default: llava)")
    p_demo.add_argument("--strategy", default="none", help="strategy name or name:preset (default: none)")
    p_demo.add_argument("--new-tokens", type=int, default=12, help="tokens to generate (default: 12)")
    p_demo.add_argument("--seed", type=int, default=0)
    p_demo.set_defaults(func=_cmd_demo)

    p_run = sub.add_parser("run", help="run a model x strategies on a benchmark (resumable)")
    p_run.add_argument("--model", required=True, help="HF id or local folder (from_pretrained)")
    p_run.add_argument(
        "--strategy", action="append", default=None, help="repeatable; one results file each (default: none)"
    )
    p_run.add_argument("--set", action="append", default=[], help="field=value or strategy.field=value")
    p_run.add_argument("--benchmark", required=True, choices=["pope", "chair"])
    p_run.add_argument("--data", required=True, help="POPE files / parquet folder / HF id; CHAIR: COCO annotations")
    p_run.add_argument("--image-dir", default=None, help="COCO val2014 folder (POPE question files, CHAIR)")
    p_run.add_argument("--split", default=None, help="POPE split (default: all three)")
    p_run.add_argument("--limit", type=int, default=None)
    p_run.add_argument("--batch-size", type=int, default=1)
    p_run.add_argument("--output", default="results")
    p_run.add_argument("--parser", default="pope", help="POPE answer rule")
    p_run.add_argument("--image-list", default="opera_compat", help="CHAIR image list")
    p_run.add_argument("--max-new-tokens", type=int, default=None)
    p_run.add_argument("--seed", type=int, default=0)
    p_run.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p_run.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda:0, ...")
    p_run.add_argument("--quiet", action="store_true", help="no progress bar")
    p_run.set_defaults(func=_cmd_run)

    p_speed = sub.add_parser("speed", help="time every strategy against plain generate on the same inputs")
    p_speed.add_argument("--model", default=None, help="checkpoint (HF id or folder) instead of a random shape")
    p_speed.add_argument("--shape", default=None, choices=["cpu-medium", "llava-1.5-7b", "tiny"])
    p_speed.add_argument("--strategies", default="none,pai,paint,vhr,gift,var,vcd,inter")
    p_speed.add_argument("--new-tokens", type=int, default=64)
    p_speed.add_argument("--repeats", type=int, default=5)
    p_speed.add_argument("--batch-size", type=int, default=1)
    p_speed.add_argument("--json", default=None, help="write the report as JSON")
    p_speed.add_argument("--no-memory", action="store_true", help="skip the per-configuration peak-memory probes")
    p_speed.set_defaults(func=_cmd_speed)

    from halludec.benchmarks.cli import add_compare_subcommand, add_score_subcommand
    from halludec.heads.cli import add_heads_subcommand

    add_score_subcommand(sub)
    add_compare_subcommand(sub)
    add_heads_subcommand(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``halludec`` console script.

    Args:
        argv: Arguments (default: ``sys.argv[1:]``).

    Returns:
        The process exit code.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from halludec import __version__

        print(__version__)
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (KeyError, ValueError) as err:
        print(f"halludec: error: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2
