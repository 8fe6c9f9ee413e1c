"""The ``halludec`` command (argparse subcommands)."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from typing import Any

_PLAIN_FORMAT = warnings.formatwarning

EPILOG = """examples:
  halludec ls                       list strategies (with presets) and supported model types
  halludec ls --json                the same, machine-readable
  halludec demo                     every strategy on the lab model's lab-pope and lab-chair (CPU, minutes)
  halludec demo --strategies none,vcd --pope-limit 100 --chair-limit 50
  halludec lab-path                 the lab model's folder (from_pretrained)
  halludec run --model lab --strategy none --strategy vcd --benchmark lab-pope --batch-size 32
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
    from halludec.lab.demo import run_demo

    strategies = [n.strip() for n in args.strategies.split(",") if n.strip()] if args.strategies else None
    print(
        f"halludec demo: the lab model on lab-pope (n={args.pope_limit} per split) and lab-chair (n={args.chair_limit})"
    )
    result = run_demo(
        args.output,
        strategies=strategies,
        pope_limit=args.pope_limit,
        chair_limit=args.chair_limit,
        batch_size=args.batch_size,
        plot=not args.no_plot,
        progress=False,
    )
    print()
    print(result["table"])
    print(f"\nresults: {args.output}/ (one JSON per strategy and benchmark, comparison.md", end="")
    print(f", {result['plot']})" if result["plot"] else ")")
    print(f"wall time: {result['wall_time_s']:.0f} s")
    return 0


def _cmd_lab_path(args: argparse.Namespace) -> int:
    from halludec.lab import lab_path

    print(lab_path())
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
        value = _json_value(raw)
        out[name][fieldname] = tuple(value) if isinstance(value, list) else value
    return out


def _json_value(raw: str) -> object:
    """``raw`` read as JSON (numbers, booleans, lists, null) when it parses, else the string itself."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def parse_generation(items: Sequence[str]) -> dict[str, object]:
    """``["do_sample=true", "num_beams=5"]`` -> ``{"do_sample": True, "num_beams": 5}`` (values read as JSON).

    Raises:
        ValueError: an item without ``=``.
    """
    out: dict[str, object] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--gen {item!r} is not KEY=VALUE; e.g. --gen do_sample=true --gen temperature=1.0")
        out[key.strip()] = _json_value(raw)
    return out


DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32")


def add_model_arguments(parser: argparse.ArgumentParser, model_help: str) -> None:
    """Add the options that pick and place a checkpoint (``--model``, ``--dtype``, ``--device``,
    ``--trust-remote-code``), read by :func:`load_model`; shared by ``halludec run`` and ``halludec heads``.

    Args:
        parser: The subcommand's parser.
        model_help: Help text of ``--model``.
    """
    parser.add_argument("--model", required=True, help=model_help)
    parser.add_argument(
        "--dtype", default="auto", choices=DTYPE_CHOICES, help="weights' dtype (auto: bf16 on CUDA, fp32 on CPU)"
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda:0, ...")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the checkpoint's own code")


def load_model(name: str, dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False):
    """Load a model and processor with ``from_pretrained`` (bf16 on CUDA, fp32 on CPU); ``lab``: the lab model.

    Args:
        name: HF id, local folder, or ``lab``.
        dtype: One of :data:`DTYPE_CHOICES`.
        device: ``auto`` (every visible GPU, or this process's share under ``accelerate launch``; CPU without
            CUDA), ``cpu``, or a device such as ``cuda:1``.
        trust_remote_code: Passed to ``from_pretrained`` for the model and the processor.

    Returns:
        ``(model, processor)``, the model in eval mode and the tokenizer padding on the left.
    """
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from halludec.lab import model_source

    if dtype not in DTYPE_CHOICES:
        raise ValueError(f"dtype {dtype!r} is unknown; choose one of {', '.join(DTYPE_CHOICES)}.")
    name = model_source(name)
    cuda = torch.cuda.is_available() and device != "cpu"
    torch_dtype = {
        "auto": torch.bfloat16 if cuda else torch.float32,
        "bf16": torch.bfloat16,
        "fp32": torch.float32,
        "fp16": torch.float16,
    }[dtype]
    kwargs = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    from halludec.benchmarks.distributed import current, placement

    dist = current()
    if not dist.is_main:  # under accelerate launch, progress is shown by the main process only
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if cuda:
        kwargs.update(placement(device, dist))  # one GPU group per process under accelerate launch
    model = AutoModelForImageTextToText.from_pretrained(name, **kwargs).eval()
    processor = AutoProcessor.from_pretrained(name, trust_remote_code=trust_remote_code)
    getattr(processor, "tokenizer", processor).padding_side = "left"
    return model, processor


def _cmd_run(args: argparse.Namespace) -> int:
    import halludec
    from halludec.benchmarks.distributed import current
    from halludec.benchmarks.runner import RunConfig, run_benchmark

    names = args.strategy or ["none"]
    overrides = parse_sets(args.set, names)
    strategies = [halludec.get_strategy(s, **overrides[s.partition(":")[0]]) for s in names]
    model, processor = load_model(args.model, args.dtype, args.device, args.trust_remote_code)
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
            prompt_template=args.prompt,
            generation=parse_generation(args.gen),
        )
        record = run_benchmark(model, processor, strategy, config, progress=not args.quiet)
        if not current().is_main:
            continue  # under accelerate launch, the main process reports
        label = f"{strategy.name}{':' + strategy.preset if strategy.preset else ''}"
        print("\n".join(summary_lines(label, record)))
    return 0


def summary_lines(label: str, record: Any) -> list[str]:
    """What ``halludec run`` prints for one results record: the headline metrics (the mean over splits where there
    are several; pooled figures and counts stay in the file), one line per split, and the results path.

    Args:
        label: The strategy as the user named it (``vcd``, ``pai:repro``).
        record: The :class:`~halludec.benchmarks.results.ResultRecord`.

    Returns:
        The lines, without newlines.
    """

    def shown(metrics: dict[str, Any], keep: Any) -> str:
        return " ".join(f"{k}={m.value:.4g}" for k, m in metrics.items() if keep(k) and isinstance(m.value, float))

    splits = record.per_split or {}
    mean = " (mean over splits)" if len(splits) > 1 else ""
    lines = [f"{label}: n={record.n_samples} {shown(record.metrics, lambda k: k != 'n' and '_pooled' not in k)}{mean}"]
    if len(splits) > 1:
        for split, metrics in splits.items():
            n = metrics.get("n")
            count = f" (n={n.value:.0f})" if n is not None else ""
            lines.append(f"  {split}{count}: {shown(metrics, lambda k: k in ('accuracy', 'f1', 'yes_ratio'))}")
    lines.append(f"  results: {record.results_path}")
    return lines


def _cmd_speed(args: argparse.Namespace) -> int:
    import torch

    from halludec import speed

    device = speed.resolve_device(args.device)
    source = args.model or args.shape or ("llava-1.5-7b" if device.startswith("cuda") else "cpu-medium")
    names = [n.strip() for n in args.strategies.split(",") if n.strip()] if args.strategies else None
    names = names or speed.default_strategies()
    import halludec

    for name in names:
        halludec.get_strategy(name)  # fail fast on a bad name
    model, processor = speed.load(source, device, args.dtype)
    timings = speed.measure(model, processor, names, args.new_tokens, args.repeats, args.batch_size, args.cache)
    if not args.no_memory:
        for key in ["baseline", *names]:
            name = None if key == "baseline" else key
            mem = speed.peak_memory_mb(source, name, args.new_tokens, args.batch_size, args.cache, device, args.dtype)
            timings[key].peak_mem_mb = mem
    doc = speed.report(timings)
    doc["setup"] = {
        "source": source,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "batch_size": args.batch_size,
        "cache": args.cache,
        "device": str(model.device),
        "device_name": torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else "cpu",
        "dtype": str(model.dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
    }
    print(
        f"{source} on {doc['setup']['device_name']} ({model.dtype}), {args.cache} cache, {args.new_tokens} new "
        f"tokens, batch {args.batch_size}, median of {args.repeats} interleaved runs"
    )
    print(speed.format_table(doc))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(doc, fh, indent=2)
        print(f"wrote {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``halludec`` command."""
    from halludec.benchmarks.runner import RUNNABLE

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

    from halludec.lab.demo import DEMO_BATCH_SIZE, DEMO_CHAIR_LIMIT, DEMO_POPE_LIMIT

    p_demo = sub.add_parser("demo", help="every strategy on the lab model's lab-pope and lab-chair (CPU, minutes)")
    p_demo.add_argument("--output", default="halludec-demo", help="folder for results, comparison.md and .png")
    p_demo.add_argument("--strategies", default=None, help="comma-separated (default: none + every registered one)")
    p_demo.add_argument("--pope-limit", type=int, default=DEMO_POPE_LIMIT, help="lab-pope questions per split")
    p_demo.add_argument("--chair-limit", type=int, default=DEMO_CHAIR_LIMIT, help="lab-chair captions")
    p_demo.add_argument("--batch-size", type=int, default=DEMO_BATCH_SIZE)
    p_demo.add_argument("--no-plot", action="store_true", help="skip comparison.png")
    p_demo.set_defaults(func=_cmd_demo)

    p_lab = sub.add_parser("lab-path", help="print the folder of the lab model (loadable with from_pretrained)")
    p_lab.set_defaults(func=_cmd_lab_path)

    p_run = sub.add_parser("run", help="run a model x strategies on a benchmark (resumable)")
    add_model_arguments(p_run, "HF id, local folder (from_pretrained) or lab")
    p_run.add_argument(
        "--strategy", action="append", default=None, help="repeatable; one results file each (default: none)"
    )
    p_run.add_argument("--set", action="append", default=[], help="field=value or strategy.field=value")
    p_run.add_argument("--benchmark", required=True, choices=list(RUNNABLE))
    p_run.add_argument("--data", default=None, help="POPE files / parquet folder / HF id; CHAIR: COCO annotations")
    p_run.add_argument("--image-dir", default=None, help="COCO val2014 folder (POPE question files, CHAIR)")
    p_run.add_argument("--split", default=None, help="POPE split (default: all three)")
    p_run.add_argument("--limit", type=int, default=None)
    p_run.add_argument("--batch-size", type=int, default=1)
    p_run.add_argument("--output", default="results")
    p_run.add_argument("--parser", default="pope", help="POPE answer rule")
    p_run.add_argument("--image-list", default="opera_compat", help="CHAIR image list")
    p_run.add_argument("--max-new-tokens", type=int, default=None)
    p_run.add_argument(
        "--prompt", default=None, help="prompt template with {question} (POPE) or the caption prompt (CHAIR)"
    )
    p_run.add_argument(
        "--gen",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a generate argument (JSON value), e.g. --gen do_sample=true --gen temperature=1.0 --gen num_beams=5",
    )
    p_run.add_argument("--seed", type=int, default=0)
    p_run.add_argument("--quiet", action="store_true", help="no progress bar")
    p_run.set_defaults(func=_cmd_run)

    p_speed = sub.add_parser("speed", help="time every strategy against plain generate on the same inputs")
    p_speed.add_argument("--model", default=None, help="checkpoint (HF id, folder or lab) instead of a random shape")
    p_speed.add_argument("--shape", default=None, choices=["cpu-medium", "llava-1.5-7b", "tiny"])
    p_speed.add_argument(
        "--strategies", default=None, help="comma-separated names or presets (default: none + every registered one)"
    )
    p_speed.add_argument("--new-tokens", type=int, default=64)
    p_speed.add_argument("--repeats", type=int, default=5)
    p_speed.add_argument("--batch-size", type=int, default=1)
    p_speed.add_argument("--json", default=None, help="write the report as JSON")
    p_speed.add_argument("--no-memory", action="store_true", help="skip the per-configuration peak-memory probes")
    p_speed.add_argument(
        "--cache",
        default="default",
        choices=["default", "static"],
        help="KV cache of every run, plain generate included (static: generate compiles the step on a GPU)",
    )
    p_speed.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    p_speed.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "bf16", "float16", "fp16", "float32", "fp32"],
        help="weights' dtype (auto: bfloat16 for the 7B shape or on a GPU, else float32)",
    )
    p_speed.set_defaults(func=_cmd_speed)

    from halludec.benchmarks.cli import add_compare_subcommand, add_score_subcommand
    from halludec.heads.cli import add_heads_subcommand

    add_score_subcommand(sub)
    add_compare_subcommand(sub)
    add_heads_subcommand(sub)
    from halludec.integrations.cli import add_lm_eval_subcommands

    add_lm_eval_subcommands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``halludec`` console script.

    Args:
        argv: Arguments (default: ``sys.argv[1:]``).

    Returns:
        The process exit code.
    """
    from halludec.integrations.cli import run_lm_eval_passthrough

    passthrough = run_lm_eval_passthrough(sys.argv[1:] if argv is None else argv)
    if passthrough is not None:  # lm-eval's own options must not reach argparse
        return passthrough
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from halludec import __version__

        print(__version__)
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    plain = warnings.formatwarning
    warnings.formatwarning = _format_warning  # a command's warnings read as messages, not as source lines
    try:
        return int(args.func(args) or 0)
    except (KeyError, ValueError) as err:
        print(f"halludec: error: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = plain


def _format_warning(message: Any, category: type, filename: str, lineno: int, line: str | None = None) -> str:
    """``halludec: warning: <text>`` for UserWarnings (what a strategy says about its settings); others as usual."""
    if category is UserWarning:
        return f"halludec: warning: {message}\n"
    return _PLAIN_FORMAT(message, category, filename, lineno, line)
