"""The model runner: one model x one strategy x one benchmark, resumable, writing per-sample JSONL and a results file.

Torch and the decoding core are imported lazily (inside the functions), so ``halludec.benchmarks`` stays
torch-free. Every answer is appended to ``<output>/<stem>.samples.jsonl`` as soon as its batch finishes; an
interrupted run started again with the same arguments skips the ids already there, so nothing is lost or
duplicated, and the results file is then scored from the samples file (identical whatever the interruptions).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from halludec.benchmarks.chair import load_chair_samples
from halludec.benchmarks.chair_gt import load_ground_truth
from halludec.benchmarks.chair_metrics import CHAIR_DEFAULT_MAX_NEW_TOKENS, CHAIR_DEFAULT_PROMPT
from halludec.benchmarks.distributed import consolidate, current, merge_ordered, part_path, shard_bounds
from halludec.benchmarks.pope_data import POPE_DEFAULT_MAX_NEW_TOKENS, POPE_DEFAULT_PROMPT, load_pope
from halludec.benchmarks.pope_metrics import POPE_SPLITS
from halludec.benchmarks.results import ModelInfo, ResultRecord, StrategyInfo, load_results, save_results
from halludec.benchmarks.samples import SampleWriter, load_done_ids
from halludec.benchmarks.scoring import score_file

RUNNABLE = ("pope", "chair", "lab-pope", "lab-chair")
LAB_POPE_PROMPT = "{question}"  # the lab model knows only its own small vocabulary


@dataclass
class RunConfig:
    """What to run (every field is recorded in the results file).

    Attributes:
        benchmark: ``pope``, ``chair``, or the lab model's ``lab-pope`` / ``lab-chair`` (generated scenes).
        data: POPE question files / parquet folder or HF id (POPE); the COCO annotations folder (CHAIR); unused
            by the lab benchmarks.
        image_dir: The COCO val2014 image folder (POPE question files, CHAIR).
        split: POPE split (``random``, ``popular``, ``adversarial``); None = all three.
        limit: Keep the first ``limit`` samples (per split for POPE).
        batch_size: Prompts per ``generate`` call (left-padded).
        output: Folder for ``<stem>.samples.jsonl`` and ``<stem>.json``.
        parser: POPE answer rule.
        prompt_template: ``{question}`` template (POPE) or the caption prompt (CHAIR); None = the pinned default.
        max_new_tokens: None = the benchmark default (POPE 128, CHAIR 512).
        image_list: CHAIR image list (``opera_compat``, ``halludec_default`` or a file).
        seed: Recorded and used to seed torch before each batch (sampling strategies).
        generation: Extra ``generate`` kwargs (greedy by default).
    """

    benchmark: str
    data: str | None = None
    image_dir: str | None = None
    split: str | None = None
    limit: int | None = None
    batch_size: int = 1
    output: str = "results"
    parser: str = "pope"
    prompt_template: str | None = None
    max_new_tokens: int | None = None
    image_list: str = "opera_compat"
    seed: int = 0
    generation: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Raise ``ValueError`` naming a bad field."""
        if self.benchmark not in RUNNABLE:
            raise ValueError(f"benchmark={self.benchmark!r} cannot be run; runnable: {', '.join(RUNNABLE)}.")
        if self.data is None and not self.benchmark.startswith("lab-"):
            raise ValueError(
                f"benchmark={self.benchmark!r} needs data= (POPE question files or parquet folder; CHAIR: the COCO "
                "annotations folder)."
            )
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} is invalid; use an integer >= 1.")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit={self.limit} is invalid; use an integer >= 1 or leave it unset.")


def run_benchmark(model: Any, processor: Any, strategy: Any, config: RunConfig, progress: bool = True) -> ResultRecord:
    """Run ``strategy`` on ``config.benchmark`` with ``model``; resume from an existing samples file.

    Under ``accelerate launch`` / ``torchrun`` with N processes, each process runs its contiguous block of whole
    batches and writes ``<stem>.samples.part-<rank>-of-<N>.jsonl``; the main process merges them into the one
    samples file (original order, no duplicates) and scores it as a single process does (see
    ``halludec.benchmarks.distributed``). Every process returns the same record.

    Args:
        model: A loaded vision-language model.
        processor: Its processor (chat template; left padding is forced).
        strategy: A strategy name / preset / instance, or a list of them (composition).
        config: What to run.
        progress: Show a progress bar (tqdm when installed; main process only).

    Returns:
        The results record (also written to ``<output>/<stem>.json``).
    """
    import halludec
    from halludec.decoding import resolve_strategies
    from halludec.decoding.devices import input_device
    from halludec.vlm_adapters.inputs import chat_inputs

    config.validate()
    strategies = resolve_strategies(strategy if isinstance(strategy, (list, tuple)) else [strategy])
    items, prompt, max_new = _samples(config)
    out_dir = Path(config.output).expanduser()
    stem = _stem(config, strategies)
    samples_path = out_dir / f"{stem}.samples.jsonl"
    key = "id" if _yesno(config) else "image_id"
    dist = current()
    # rows of an interrupted run (any number of processes) join the merged file before anyone reads it
    leftovers = consolidate(samples_path, key) if dist.is_main else 0
    dist.barrier()
    done = {str(i) for i in load_done_ids(samples_path, key=key)} if samples_path.exists() else set()
    first, last = shard_bounds(len(items), config.batch_size, dist.rank, dist.world)
    todo = [s for s in items[first:last] if str(_sample_id(s)) not in done]
    write_to = samples_path if dist.world == 1 else part_path(samples_path, dist.rank, dist.world)
    generation = {"max_new_tokens": max_new, "do_sample": False, **config.generation}
    tok = getattr(processor, "tokenizer", processor)
    tok.padding_side = "left"
    start, new_tokens = time.perf_counter(), 0
    device = input_device(model)  # the embeddings' device (not meta when a device_map offloads the first module)
    desc = stem if dist.world == 1 else f"{stem} (rank 0 of {dist.world} processes)"
    show = progress and dist.is_main
    with SampleWriter(write_to) as writer:
        for batch in _progress(_chunks(todo, config.batch_size), len(todo), config.batch_size, show, desc):
            questions = [_question(s, config, prompt) for s in batch]
            inputs = chat_inputs(processor, [_image(s) for s in batch], questions, device)
            _seed(config.seed)
            out = halludec.generate(model, inputs, strategies, processor=processor, questions=questions, **generation)
            new = out[:, inputs["input_ids"].shape[1] :]
            new_tokens += int((new != (tok.pad_token_id if tok.pad_token_id is not None else -1)).sum())
            for sample, text in zip(batch, tok.batch_decode(new, skip_special_tokens=True), strict=True):
                writer.write(_row(sample, text.strip(), config))
    dist.barrier()
    wall = time.perf_counter() - start
    ran, new_tokens = int(dist.sum(len(todo))), int(dist.sum(new_tokens))
    if not dist.is_main:
        dist.barrier()  # the main process merges, scores and writes the results file
        return load_results(out_dir / f"{stem}.json")
    if dist.world > 1 or leftovers:
        merge_ordered(samples_path, key, [_sample_id(s) for s in items])
    if _yesno(config):
        options: dict[str, Any] = {"parser": config.parser}
    elif config.benchmark == "chair":
        options = {"annotations": config.data, "image_list": config.image_list}
    else:
        options = {}
    record = score_file("pope" if _yesno(config) else config.benchmark, samples_path, **options).record
    record.benchmark.name = config.benchmark
    record.model = _model_info(model)
    record.strategy = [_strategy_info(s) for s in strategies] if len(strategies) > 1 else _strategy_info(strategies[0])
    record.generation = {k: v for k, v in generation.items() if _jsonable(v)}
    record.seed = config.seed
    record.halludec_version = halludec.__version__
    record.benchmark.prompt_template = prompt
    record.benchmark.limit = config.limit
    record.benchmark.split = config.split if _yesno(config) else None
    if config.benchmark == "pope":
        record.benchmark.data = load_pope(config.data, splits=_splits(config), limit=config.limit).data_info()
    elif config.benchmark.startswith("lab-"):
        from halludec.lab.bench import lab_data_info

        record.benchmark.data = lab_data_info(config.benchmark)
    record.wall_time_s = wall if ran else None
    record.tokens_per_s = new_tokens / wall if ran and wall > 0 else None
    record.samples_file = str(samples_path)
    save_results(record, record.results_path)  # <stem>.json beside the samples file
    dist.barrier()
    return record


def _yesno(config: RunConfig) -> bool:
    return config.benchmark in ("pope", "lab-pope")


def _samples(config: RunConfig) -> tuple[list[Any], str, int]:
    if config.benchmark.startswith("lab-"):
        from halludec.lab.bench import LAB_SCENES, build_lab_pope, held_out_scenes, lab_chair_samples
        from halludec.lab.model import CAPTION_PROMPT

        if config.benchmark == "lab-chair":
            return (
                lab_chair_samples(config.limit),
                config.prompt_template or CAPTION_PROMPT,
                config.max_new_tokens or 32,
            )
        per_split = build_lab_pope(held_out_scenes(LAB_SCENES), splits=tuple(_splits(config) or POPE_SPLITS))
        rows = [s for split in per_split.values() for s in split[: config.limit]]
        return rows, config.prompt_template or LAB_POPE_PROMPT, config.max_new_tokens or 8
    if config.benchmark == "pope":
        data = load_pope(config.data, splits=_splits(config), image_dir=config.image_dir, limit=config.limit)
        prompt = config.prompt_template or POPE_DEFAULT_PROMPT
        return data.samples, prompt, config.max_new_tokens or POPE_DEFAULT_MAX_NEW_TOKENS
    if config.image_dir is None:
        raise ValueError("CHAIR needs image_dir= (the COCO val2014 folder) to caption the images.")
    pool = None
    if config.image_list == "halludec_default":
        pool = load_ground_truth(config.data).image_ids
    samples = load_chair_samples(config.image_list, config.image_dir, pool=pool, limit=config.limit)
    return (
        samples,
        config.prompt_template or CHAIR_DEFAULT_PROMPT,
        config.max_new_tokens or CHAIR_DEFAULT_MAX_NEW_TOKENS,
    )


def _splits(config: RunConfig) -> list[str] | None:
    return [config.split] if config.split else None


def _stem(config: RunConfig, strategies: Sequence[Any]) -> str:
    names = "+".join(s.name + (f"-{s.preset}" if s.preset else "") for s in strategies)
    split = f"_{config.split}" if _yesno(config) and config.split else ""
    return f"{config.benchmark}{split}_{names}"


def _sample_id(sample: Any) -> Any:
    return sample.id if hasattr(sample, "id") else sample.image_id


def _question(sample: Any, config: RunConfig, prompt: str) -> str:
    return prompt.format(question=sample.question) if _yesno(config) else prompt


def _image(sample: Any) -> Any:
    return sample.load_image()


def _row(sample: Any, text: str, config: RunConfig) -> dict[str, Any]:
    if _yesno(config):
        return {**sample.to_row(), "answer": text}
    return {"image_id": sample.image_id, "caption": text}


def _seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _progress(batches: list[list[Any]], total: int, size: int, show: bool, desc: str) -> Any:
    if not show:
        return batches
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return batches

    def gen() -> Any:
        with tqdm(total=total, desc=desc, unit="sample") as bar:
            for batch in batches:
                yield batch
                bar.update(len(batch))

    return gen()


def _model_info(model: Any) -> ModelInfo:
    from halludec.vlm_adapters import get_adapter

    cfg = model.config
    return ModelInfo(
        name_or_path=getattr(cfg, "_name_or_path", None) or "unknown",
        model_type=cfg.model_type,
        config_fingerprint=get_adapter(model).config_fingerprint(),
        dtype=str(getattr(model, "dtype", None)).replace("torch.", ""),
        device=str(getattr(model, "device", None)),
    )


def _strategy_info(strategy: Any) -> StrategyInfo:
    info = strategy.describe()
    return StrategyInfo(name=info["name"], preset=info["preset"], config=info["config"])


def _jsonable(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool, type(None), list, tuple, dict))
