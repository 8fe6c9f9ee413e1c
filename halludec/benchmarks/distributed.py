"""Data-parallel benchmark runs on top of 🤗 accelerate: shards, per-rank sample files, merging, resuming.

``accelerate launch -m halludec run ...`` (or ``torchrun``) starts N processes; each runs the same command.
The runner then:

1. **consolidates** (main process, before anything runs): rows of every leftover part file (an interrupted run with
   any number of processes) are appended to the merged samples file, duplicates dropped by id, part files removed;
   then all processes wait at a barrier, so every rank sees the same finished ids;
2. **shards** the full sample list (not only what is left, so shard membership never depends on progress) into
   contiguous blocks of whole batches: on a fresh run every batch is the batch a single process would form, and
   the answers are the same;
3. each rank appends its answers to ``<stem>.samples.part-<rank>-of-<world>.jsonl`` next to the merged file;
4. after a barrier the main process **merges** the merged file and all parts into one samples file in the original
   sample order (rows from other runs, e.g. a larger ``limit``, are kept after them, in file order) and scores it
   exactly as a single-process run does.

Nothing here imports torch or accelerate at module level (``halludec.benchmarks`` stays torch-free); a single,
unlaunched process never initialises ``torch.distributed``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from halludec.benchmarks.samples import SampleWriter, iter_jsonl

PART_GLOB = ".samples.part-*-of-*.jsonl"
_LAUNCH_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


@dataclass(frozen=True)
class Dist:
    """This process's place in a (possibly single-process) run.

    Attributes:
        rank: Global process index (0 = main).
        world: Number of processes.
        state: accelerate's ``PartialState`` when ``world > 1``, else None.
    """

    rank: int = 0
    world: int = 1
    state: Any = None

    @property
    def is_main(self) -> bool:
        """Whether this is the main process (writes the merged samples and the results file)."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait until every process gets here (no-op for one process)."""
        if self.state is not None:
            self.state.wait_for_everyone()

    def sum(self, value: float) -> float:
        """Sum ``value`` over the processes (``value`` itself for one process)."""
        if self.state is None:
            return value
        from accelerate.utils import gather_object

        return float(sum(gather_object([value])))


def launched_world_size() -> int:
    """Processes started by a launcher (``accelerate launch``, ``torchrun``, mpirun) from the environment; 1 if none."""
    for name in _LAUNCH_VARS:
        raw = os.environ.get(name)
        if raw and raw.isdigit() and int(raw) > 1:
            return int(raw)
    return 1


def current() -> Dist:
    """The run's processes, through accelerate's ``PartialState`` when launched with several processes.

    On a machine without CUDA the processes talk over gloo (``PartialState(cpu=True)``); with GPUs accelerate picks
    its default (nccl). An ``accelerate``-initialised state in the calling program is reused.

    Returns:
        ``Dist(rank, world, state)``; ``Dist()`` for a plain single process.
    """
    if launched_world_size() == 1:
        return Dist()
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    if state.num_processes == 1:
        return Dist()
    return Dist(rank=state.process_index, world=state.num_processes, state=state)


def shard_bounds(n_items: int, batch_size: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous block of whole batches for ``rank``: items ``[start, end)``.

    The ``ceil(n_items / batch_size)`` batches of a single-process run are split into ``world`` contiguous blocks
    whose sizes differ by at most one batch, so a fresh sharded run forms exactly the single-process batches.

    Args:
        n_items: All samples of the run (done or not).
        batch_size: Prompts per ``generate`` call.
        rank: This process's index.
        world: Number of processes.

    Returns:
        ``(start, end)`` item indices (``start == end`` when a rank gets nothing).
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank={rank}, world={world} is invalid; need world >= 1 and 0 <= rank < world.")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is invalid; use an integer >= 1.")
    batches = -(-n_items // batch_size)
    lo, hi = rank * batches // world, (rank + 1) * batches // world
    return min(lo * batch_size, n_items), min(hi * batch_size, n_items)


def part_path(samples_path: str | Path, rank: int, world: int) -> Path:
    """The per-rank samples file next to ``samples_path`` (``<stem>.samples.part-<rank>-of-<world>.jsonl``)."""
    p = Path(samples_path)
    stem = p.name.removesuffix(".samples.jsonl")
    return p.with_name(f"{stem}.samples.part-{rank}-of-{world}.jsonl")


def part_files(samples_path: str | Path) -> list[Path]:
    """Every part file of ``samples_path`` (any rank, any number of processes), sorted by name."""
    p = Path(samples_path)
    stem = p.name.removesuffix(".samples.jsonl")
    return sorted(p.parent.glob(f"{_glob_escape(stem)}{PART_GLOB}")) if p.parent.is_dir() else []


def consolidate(samples_path: str | Path, key: str) -> int:
    """Append the rows of leftover part files to ``samples_path`` (new ids only), then remove the parts.

    Safe to repeat after an interruption at any point: rows already in the merged file are recognised by ``key``
    and not written twice; a part file is removed only after its rows are flushed to the merged file.

    Args:
        samples_path: The merged per-sample JSONL file (created when missing and there are parts).
        key: The id field (``id`` for yes/no benchmarks, ``image_id`` for captions).

    Returns:
        Number of rows appended.
    """
    parts = part_files(samples_path)
    if not parts:
        return 0
    seen = {str(row[key]) for row in _rows(samples_path, key)}
    added = 0
    with SampleWriter(samples_path) as writer:
        for part in parts:
            for row in _rows(part, key):
                if str(row[key]) not in seen:
                    seen.add(str(row[key]))
                    writer.write(row)
                    added += 1
    for part in parts:
        part.unlink(missing_ok=True)
    return added


def merge_ordered(samples_path: str | Path, key: str, order: Sequence[Any]) -> int:
    """Rewrite ``samples_path`` with its rows and every part file's rows, in ``order`` of ids, without duplicates.

    Rows whose id is not in ``order`` (left by a run over more samples) follow, in their file order. The new file
    replaces the old one atomically; part files are removed afterwards.

    Args:
        samples_path: The merged per-sample JSONL file.
        key: The id field.
        order: Sample ids in the run's original order.

    Returns:
        Rows in the merged file.
    """
    p = Path(samples_path)
    parts = part_files(p)
    rows: dict[str, dict[str, Any]] = {}
    for source in [p, *parts]:
        for row in _rows(source, key):
            rows.setdefault(str(row[key]), row)
    ids = [str(i) for i in order]
    known = set(ids)
    ordered = [rows[i] for i in ids if i in rows] + [r for i, r in rows.items() if i not in known]
    tmp = p.with_name(p.name + ".merging")
    tmp.unlink(missing_ok=True)
    with SampleWriter(tmp) as writer:
        for row in ordered:
            writer.write(row)
    os.replace(tmp, p)
    for part in parts:
        part.unlink(missing_ok=True)
    return len(ordered)


def _rows(path: str | Path, key: str) -> Iterable[dict[str, Any]]:
    from halludec.benchmarks.errors import BenchmarkDataError

    p = Path(path)
    if not p.is_file():
        return
    for number, row in iter_jsonl(p, allow_truncated_tail=True):
        if key not in row:
            raise BenchmarkDataError(
                f"{p}, line {number}: no {key!r} field (fields: {sorted(row)}); cannot merge or resume from this "
                "file. Remove it (or that line) and run again."
            )
        yield row


def _glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def placement(device: str, dist: Dist) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments placing the model for this process (CUDA machines).

    One process: ``device_map="auto"`` (shard over every visible GPU) or the named device. N processes per machine
    with ``device="auto"``: each process takes ``G // N`` of the ``G`` visible GPUs, contiguous by local rank, and
    shards the model over them (``device_map="auto"`` limited by ``max_memory``) when that is 2 or more, else it
    takes one GPU (several processes share one when ``N > G``).

    Args:
        device: ``auto`` or an explicit device (``cuda:1``), as given to ``halludec run --device``.
        dist: The run's processes (:func:`current`).

    Returns:
        ``{"device_map": ...}`` plus ``{"max_memory": ...}`` when a process shards over a subset of the GPUs.
    """
    if device != "auto":
        return {"device_map": device}
    if dist.world == 1:
        return {"device_map": "auto"}
    import torch

    gpus = torch.cuda.device_count()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", dist.world))
    local_rank = dist.state.local_process_index if dist.state is not None else dist.rank
    per = gpus // max(local_world, 1)
    if per < 2:
        return {"device_map": {"": f"cuda:{local_rank % max(gpus, 1)}"}}
    from accelerate.utils import get_max_memory

    memory = get_max_memory()
    mine = range(local_rank * per, (local_rank + 1) * per)
    return {"device_map": "auto", "max_memory": {g: memory[g] for g in mine}}
