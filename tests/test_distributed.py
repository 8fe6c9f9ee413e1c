"""Data-parallel benchmark runs: sharding, per-rank files, merging, resuming, and real ``accelerate launch`` runs.

The protocol tests run the real runner in two threads (two lab-model copies) with a barrier standing in for
``torch.distributed``; the launch tests (slow) start two processes with ``accelerate launch`` on the CPU (gloo).
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from halludec.benchmarks import distributed, runner
from halludec.benchmarks.distributed import (
    Dist,
    consolidate,
    merge_ordered,
    part_files,
    part_path,
    placement,
    shard_bounds,
)
from halludec.benchmarks.runner import RunConfig, run_benchmark
from halludec.benchmarks.samples import SampleWriter, read_jsonl

ROOT = Path(__file__).resolve().parents[1]
LIMIT, BATCH = 5, 4  # 15 lab-pope questions in 4 batches: rank 0 gets 8, rank 1 gets 7


# ------------------------------------------------------------------------------------------------ pure helpers
@pytest.mark.parametrize(("n", "batch", "world"), [(15, 4, 2), (9000, 8, 8), (3, 4, 4), (10, 1, 3), (0, 2, 2)])
def test_shards_cover_every_item_once_in_whole_batches(n, batch, world):
    bounds = [shard_bounds(n, batch, r, world) for r in range(world)]
    assert bounds[0][0] == 0
    assert bounds[-1][1] == n
    for (_, end), (start, _) in itertools.pairwise(bounds):
        assert end == start  # contiguous, no gap, no overlap
    for start, _ in bounds:
        assert start % batch == 0 or start == n  # blocks of whole single-process batches
    sizes = [(e - s + batch - 1) // batch for s, e in bounds]
    assert max(sizes) - min(sizes) <= 1


def test_shard_bounds_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rank=2, world=2"):
        shard_bounds(10, 2, 2, 2)
    with pytest.raises(ValueError, match="batch_size=0"):
        shard_bounds(10, 0, 0, 1)


def test_part_files_and_merging(tmp_path):
    merged = tmp_path / "pope_x[1]_none.samples.jsonl"  # glob characters in the stem are escaped
    assert part_path(merged, 1, 2).name == "pope_x[1]_none.samples.part-1-of-2.jsonl"
    _write(merged, [{"id": "b", "answer": "no"}])
    _write(part_path(merged, 0, 2), [{"id": "a", "answer": "yes"}, {"id": "b", "answer": "no"}])
    _write(part_path(merged, 1, 3), [{"id": "z", "answer": "yes"}])
    (tmp_path / "other.samples.part-0-of-2.jsonl").write_text('{"id": "q"}\n')
    with open(part_path(merged, 1, 3), "a") as fh:
        fh.write('{"id": "half')  # a run killed mid-write
    assert len(part_files(merged)) == 2
    with pytest.warns(UserWarning, match="unfinished last line"):
        assert consolidate(merged, "id") == 2  # a and z; b was already there
    assert [r["id"] for r in read_jsonl(merged)] == ["b", "a", "z"]
    assert part_files(merged) == []
    _write(part_path(merged, 0, 2), [{"id": "c", "answer": "no"}, {"id": "a", "answer": "yes"}])
    assert merge_ordered(merged, "id", ["a", "b", "c"]) == 4
    assert [r["id"] for r in read_jsonl(merged)] == ["a", "b", "c", "z"]  # order, then rows of other runs
    assert part_files(merged) == []
    assert (tmp_path / "other.samples.part-0-of-2.jsonl").exists()


def test_merge_rejects_rows_without_id(tmp_path):
    merged = tmp_path / "s.samples.jsonl"
    _write(part_path(merged, 0, 2), [{"answer": "yes"}])
    with pytest.raises(Exception, match=r"no 'id' field .* Remove it"):
        consolidate(merged, "id")


def test_single_process_needs_no_accelerate(monkeypatch):
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.current() == Dist()
    assert Dist().sum(3.5) == 3.5
    assert placement("auto", Dist()) == {"device_map": "auto"}
    assert placement("cuda:1", Dist(rank=1, world=2)) == {"device_map": "cuda:1"}


def test_placement_gives_each_process_its_gpus(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr("accelerate.utils.get_max_memory", lambda: {0: 10, 1: 11, 2: 12, 3: 13, "cpu": 99})
    assert placement("auto", Dist(rank=1, world=2)) == {"device_map": "auto", "max_memory": {2: 12, 3: 13}}
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert placement("auto", Dist(rank=3, world=4)) == {"device_map": {"": "cuda:3"}}


# ---------------------------------------------------------------------------------- protocol in two threads
@pytest.fixture(scope="module")
def labs():
    from halludec.lab import load_lab

    return [load_lab() for _ in range(3)]  # one per simulated rank (apply() is per model), one reference


@pytest.fixture(scope="module")
def reference(labs, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    results = {}
    for bench in ("lab-pope", "lab-chair"):
        model, processor = labs[2]
        config = RunConfig(benchmark=bench, limit=LIMIT, batch_size=BATCH, output=str(out), max_new_tokens=6)
        results[bench] = run_benchmark(model, processor, "vcd", config, progress=False)
    return out


class _ThreadState:
    """accelerate's ``wait_for_everyone`` for ranks that are threads of one process."""

    def __init__(self, barrier: threading.Barrier, box: dict, rank: int) -> None:
        self.barrier, self.box, self.rank = barrier, box, rank
        self.local_process_index = rank

    def wait_for_everyone(self) -> None:
        self.barrier.wait(timeout=300)


def _thread_sum(self: Dist, value: float) -> float:
    self.state.box[self.rank] = value
    self.state.wait_for_everyone()
    total = float(sum(self.state.box.values()))
    self.state.wait_for_everyone()
    return total


def _run_ranks(monkeypatch, labs, world: int, config: RunConfig) -> list:
    """Run ``run_benchmark`` as ``world`` ranks (threads), each with its own model copy."""
    if world == 1:
        monkeypatch.setattr(runner, "current", Dist)
        return [run_benchmark(*labs[0], "vcd", config, progress=False)]
    barrier, box, local = threading.Barrier(world), {}, threading.local()
    monkeypatch.setattr(runner, "current", lambda: local.dist)
    monkeypatch.setattr(Dist, "sum", _thread_sum)
    records, errors = [None] * world, []

    def work(rank: int) -> None:
        local.dist = Dist(rank=rank, world=world, state=_ThreadState(barrier, box, rank))
        try:
            records[rank] = run_benchmark(*labs[rank], "vcd", config, progress=False)
        except BaseException as err:  # surface the thread's error in the test
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return records


def _same(a: Path, b: Path, stem: str) -> None:
    assert a.joinpath(f"{stem}.samples.jsonl").read_text() == b.joinpath(f"{stem}.samples.jsonl").read_text()
    ra, rb = (json.loads(p.joinpath(f"{stem}.json").read_text()) for p in (a, b))
    for r in (ra, rb):  # the samples file's own path differs; its sha256 must not
        r["benchmark"]["settings"]["predictions"].pop("path")
    for key in ("metrics", "per_split", "n_samples", "strategy", "generation", "benchmark", "seed", "model"):
        assert ra[key] == rb[key], key
    assert not list(a.glob("*.part-*"))


@pytest.mark.parametrize("bench", ["lab-pope", "lab-chair"])
def test_two_ranks_merge_to_the_single_process_results(labs, reference, tmp_path, monkeypatch, bench):
    config = RunConfig(benchmark=bench, limit=LIMIT, batch_size=BATCH, output=str(tmp_path), max_new_tokens=6)
    records = _run_ranks(monkeypatch, labs, 2, config)
    _same(tmp_path, reference, f"{bench}_vcd")
    assert records[0].to_dict()["metrics"] == records[1].to_dict()["metrics"]  # every rank returns the record


@pytest.mark.parametrize(("before", "after"), [(2, 2), (2, 1), (3, 2), (1, 2)])
def test_interrupted_run_resumes_without_loss_or_duplicates(labs, reference, tmp_path, monkeypatch, before, after):
    """Rows finished by ``before`` processes are kept (not redone) when ``after`` processes resume."""
    ref = read_jsonl(reference / "lab-pope_vcd.samples.jsonl")
    merged = tmp_path / "lab-pope_vcd.samples.jsonl"
    kept = []
    for rank in range(before):
        start, end = shard_bounds(len(ref), BATCH, rank, before)
        done = [{**row, "kept": True} for row in ref[start : start + (end - start) // 2]]
        path = merged if before == 1 else part_path(merged, rank, before)
        _write(path, done)
        with open(path, "a") as fh:
            fh.write('{"id": "lab-pope/')  # killed mid-write
        kept += [row["id"] for row in done]
    config = RunConfig(benchmark="lab-pope", limit=LIMIT, batch_size=BATCH, output=str(tmp_path), max_new_tokens=6)
    with pytest.warns(UserWarning, match="unfinished last line"):
        _run_ranks(monkeypatch, labs, after, config)
    rows = read_jsonl(merged)
    assert [r["id"] for r in rows] == [r["id"] for r in ref]  # nothing lost, nothing twice, original order
    assert [r["id"] for r in rows if r.pop("kept", False)] == kept  # finished rows were not redone
    assert rows == ref
    assert not list(tmp_path.glob("*.part-*"))
    record = json.loads((tmp_path / "lab-pope_vcd.json").read_text())
    assert record["metrics"] == json.loads((reference / "lab-pope_vcd.json").read_text())["metrics"]


# ------------------------------------------------------------------------------- real accelerate launch (CPU)
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",  # accelerate's torchrun launcher; without CUDA halludec joins the processes over gloo
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "halludec",
        "run",
        "--model",
        "lab",
        "--benchmark",
        "lab-pope",
        "--limit",
        str(LIMIT),
        "--batch-size",
        str(BATCH),
        "--max-new-tokens",
        "6",
        "--strategy",
        "vcd",
        "--output",
        str(out),
        *extra,
    ]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_accelerate_launch_two_processes_equals_single_process(reference, tmp_path):
    done = _launch(tmp_path)
    _same(tmp_path, reference, "lab-pope_vcd")
    assert done.stdout.count("vcd: n=15") == 1  # reported once, by the main process
    assert done.stderr.count("rank 0 of 2 processes") >= 1  # one progress bar, the main process's
    assert "rank 1" not in done.stderr


@pytest.mark.slow
def test_accelerate_launch_resumes_an_interrupted_run(reference, tmp_path):
    ref = read_jsonl(reference / "lab-pope_vcd.samples.jsonl")
    merged = tmp_path / "lab-pope_vcd.samples.jsonl"
    for rank in range(2):
        start, _ = shard_bounds(len(ref), BATCH, rank, 2)
        _write(part_path(merged, rank, 2), [{**row, "kept": True} for row in ref[start : start + BATCH]])
    _launch(tmp_path, "--quiet")
    rows = read_jsonl(merged)
    assert sum(bool(r.pop("kept", False)) for r in rows) == 2 * BATCH
    assert rows == ref
    record = json.loads((tmp_path / "lab-pope_vcd.json").read_text())
    assert record["metrics"] == json.loads((reference / "lab-pope_vcd.json").read_text())["metrics"]
    assert not list(tmp_path.glob("*.part-*"))


def _write(path: Path, rows: list[dict]) -> None:
    with SampleWriter(path) as writer:
        for row in rows:
            writer.write(row)
