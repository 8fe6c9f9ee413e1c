"""Results records (JSON round trip, schema errors) and per-sample JSONL (append-only writer, resuming)."""

from __future__ import annotations

import json

import pytest

from halludec.benchmarks.errors import BenchmarkDataError, MissingFileError
from halludec.benchmarks.results import (
    Metric,
    ResultRecord,
    StrategyInfo,
    load_results,
    save_results,
    strategy_label,
)
from halludec.benchmarks.samples import SampleWriter, load_done_ids, read_jsonl


def test_record_round_trip(tmp_path, make_record):
    record = make_record()
    path = save_results(record, tmp_path / "out" / "r.json")
    data = json.loads(path.read_text())
    for key in (
        "halludec_version",
        "created",
        "model",
        "strategy",
        "generation",
        "benchmark",
        "seed",
        "versions",
        "metrics",
        "per_split",
        "n_samples",
        "wall_time_s",
        "tokens_per_s",
        "samples_file",
    ):
        assert key in data
    assert data["metrics"]["f1"] == {"value": 0.8, "higher_is_better": True}
    assert data["metrics"]["chair_i"]["ci95"] == [0.05, 0.2]
    assert data["benchmark"]["data"] == {
        "path": "coco_pope_adversarial.json",
        "sha256": "ab" * 32,
        "variant": "pope_3000",
        "files": [],
    }
    assert set(data["versions"]) >= {"python", "torch", "transformers", "halludec"}
    back = load_results(path)
    assert back.to_dict() == record.to_dict()
    assert strategy_label(back) == "none"
    composed = make_record()
    composed.strategy = [StrategyInfo("vhr"), StrategyInfo("vcd", preset="repro")]
    assert strategy_label(ResultRecord.from_dict(composed.to_dict())) == "vhr+vcd:repro"


def test_record_errors(tmp_path):
    with pytest.raises(MissingFileError, match="does not exist"):
        load_results(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"metrics": {}}))
    with pytest.raises(BenchmarkDataError, match=r"bad.json: missing field 'benchmark'"):
        load_results(bad)
    bad.write_text("{")
    with pytest.raises(BenchmarkDataError, match="not valid JSON"):
        load_results(bad)
    with pytest.raises(BenchmarkDataError, match="expected"):
        Metric.from_dict({"val": 1})
    assert Metric.from_dict(0.5).higher_is_better is None


def test_writer_flushes_each_line(tmp_path):
    path = tmp_path / "run" / "samples.jsonl"
    with SampleWriter(path) as writer:
        writer.write({"id": "random/1", "answer": "Yes"})
        assert read_jsonl(path) == [{"id": "random/1", "answer": "Yes"}]  # visible before close
        writer.write({"id": "random/2", "answer": "No"})
    assert load_done_ids(path) == {"random/1", "random/2"}
    assert load_done_ids(tmp_path / "missing.jsonl") == set()


def test_resume_after_a_kill_mid_write(tmp_path):
    path = tmp_path / "samples.jsonl"
    ids = [f"adversarial/{i}" for i in range(1, 7)]
    with SampleWriter(path) as writer:
        for i in ids[:3]:
            writer.write({"id": i, "answer": "yes"})
    with open(path, "a") as fh:
        fh.write('{"id": "adversarial/4", "ans')  # killed while writing row 4
    with pytest.warns(UserWarning, match="unfinished last line"):
        done = load_done_ids(path)
    assert done == set(ids[:3])
    with SampleWriter(path) as writer:  # trims the broken tail, then appends
        for i in ids:
            if i not in done:
                writer.write({"id": i, "answer": "no"})
    rows = read_jsonl(path)
    assert [r["id"] for r in rows] == ids  # nothing lost, nothing duplicated


def test_complete_row_without_newline_is_kept(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b"}')
    assert load_done_ids(path) == {"a", "b"}
    with SampleWriter(path) as writer:
        writer.write({"id": "c"})
    assert [r["id"] for r in read_jsonl(path)] == ["a", "b", "c"]


def test_bad_lines_name_file_and_line(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_text('{"id": "a"}\nnot json\n{"id": "c"}\n')
    with pytest.raises(BenchmarkDataError, match=r"samples.jsonl, line 2: not valid JSON"):
        load_done_ids(path)
    path.write_text('{"id": "a"}\n{"image_id": 3}\n')
    with pytest.raises(BenchmarkDataError, match=r"line 2: no 'id' field"):
        load_done_ids(path)
    with pytest.raises(BenchmarkDataError, match=r"line 1: no 'image_id' field"):
        load_done_ids(path, key="image_id")
