"""The model runner end to end on a tiny saved model: POPE and CHAIR, several strategies, resume without loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from halludec.benchmarks.runner import RunConfig, run_benchmark
from halludec.benchmarks.samples import read_jsonl
from halludec.cli import main, parse_sets
from halludec.tiny import build_tiny
from tests.benchmarks.conftest import POPE_IMAGES, write_coco, write_pope


@pytest.fixture(scope="module")
def saved_llava(tmp_path_factory):
    model, processor = build_tiny("llava")
    folder = tmp_path_factory.mktemp("tiny_llava")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


@pytest.fixture
def coco_images(tmp_path):
    from PIL import Image

    folder = tmp_path / "val2014"
    folder.mkdir()
    for k, name in enumerate([*POPE_IMAGES, "COCO_val2014_000000000003.jpg"]):
        Image.new("RGB", (32, 32), (60 * k, 90, 200)).save(folder / name)
    return folder


def test_run_pope_two_strategies_and_resume(saved_llava, coco_images, tmp_path, capsys):
    pope = write_pope(tmp_path / "pope")
    out = tmp_path / "results"
    argv = [
        "run",
        "--model",
        saved_llava,
        "--strategy",
        "none",
        "--strategy",
        "pai",
        "--benchmark",
        "pope",
        "--data",
        str(pope),
        "--image-dir",
        str(coco_images),
        "--split",
        "random",
        "--batch-size",
        "2",
        "--max-new-tokens",
        "3",
        "--output",
        str(out),
        "--quiet",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "none: n=4" in printed
    assert "pai: n=4" in printed
    record = json.loads((out / "pope_random_none.json").read_text())
    assert record["model"]["model_type"] == "llava"
    assert record["strategy"]["name"] == "none"
    assert record["benchmark"]["prompt_template"].startswith("{question}")
    assert record["benchmark"]["data"]["variant"]
    assert record["generation"]["max_new_tokens"] == 3
    assert set(record["metrics"]) >= {"accuracy", "f1", "yes_ratio", "unparseable"}
    rows = read_jsonl(out / "pope_random_none.samples.jsonl")
    assert len(rows) == 4
    assert len({r["id"] for r in rows}) == 4

    # An interrupted run: drop the last two rows (and leave a half-written line), run again: same rows, no dupes.
    path = out / "pope_random_pai.samples.jsonl"
    full = read_jsonl(path)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:2]) + lines[2][: len(lines[2]) // 2])
    assert main(argv) == 0
    resumed = read_jsonl(path)
    assert resumed == full
    again = json.loads((out / "pope_random_pai.json").read_text())
    assert again["n_samples"] == 4
    assert again["strategy"]["name"] == "pai"


def test_run_chair_python_api(saved_llava, coco_images, tmp_path):
    from halludec.cli import load_model

    coco = write_coco(tmp_path / "annotations")
    ids = tmp_path / "ids.txt"
    ids.write_text("1\n2\n3\n")
    model, processor = load_model(saved_llava)
    config = RunConfig(
        benchmark="chair",
        data=str(coco),
        image_dir=str(coco_images),
        image_list=str(ids),
        batch_size=2,
        max_new_tokens=6,
        output=str(tmp_path / "out"),
    )
    record = run_benchmark(model, processor, "vhr", config, progress=False)
    assert record.n_samples == 3
    assert {"chair_s", "chair_i"} <= set(record.metrics)
    assert record.strategy.name == "vhr"
    rows = read_jsonl(tmp_path / "out" / "chair_vhr.samples.jsonl")
    assert [r["image_id"] for r in rows] == [1, 2, 3]


def test_parse_sets():
    assert parse_sets(["alpha=2", "layers=[1,2]"], ["vhr"]) == {"vhr": {"alpha": 2, "layers": (1, 2)}}
    assert parse_sets(["vcd.alpha=0.5"], ["vhr", "vcd"]) == {"vhr": {}, "vcd": {"alpha": 0.5}}
    with pytest.raises(ValueError, match="ambiguous"):
        parse_sets(["alpha=1"], ["vhr", "vcd"])
    with pytest.raises(ValueError, match="malformed"):
        parse_sets(["alpha"], ["vhr"])


def test_bad_run_config():
    with pytest.raises(ValueError, match="benchmark='amber' cannot be run"):
        RunConfig(benchmark="amber", data="x").validate()


def test_interrupted_run_resumes_to_the_uninterrupted_result(saved_llava, coco_images, tmp_path, monkeypatch):
    """A run stopped by an exception after its first batch, started again, equals a run that never stopped."""
    import halludec
    from halludec.cli import load_model

    pope = write_pope(tmp_path / "pope", splits=("popular",))
    model, processor = load_model(saved_llava)

    def config(out):
        return RunConfig(
            benchmark="pope",
            data=str(pope),
            image_dir=str(coco_images),
            split="popular",
            batch_size=1,
            max_new_tokens=3,
            output=str(tmp_path / out),
        )

    whole = run_benchmark(model, processor, "vcd", config("whole"), progress=False)
    real_generate, calls = halludec.generate, []

    def dies_on_third_call(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(halludec, "generate", dies_on_third_call)
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(model, processor, "vcd", config("cut"), progress=False)
    assert len(read_jsonl(tmp_path / "cut" / "pope_popular_vcd.samples.jsonl")) == 2
    monkeypatch.setattr(halludec, "generate", real_generate)
    resumed = run_benchmark(model, processor, "vcd", config("cut"), progress=False)
    assert read_jsonl(tmp_path / "cut" / "pope_popular_vcd.samples.jsonl") == read_jsonl(
        tmp_path / "whole" / "pope_popular_vcd.samples.jsonl"
    )
    assert {k: m.value for k, m in resumed.metrics.items()} == {k: m.value for k, m in whole.metrics.items()}


def test_run_prints_the_mean_and_each_split(tmp_path):
    """`halludec run`'s summary: the mean over splits without pooled figures or the repeated count, then one line per
    split (accuracy, F1, yes-ratio with its n), then the results path."""
    from halludec.benchmarks.results import BenchmarkInfo, Metric, ResultRecord
    from halludec.cli import summary_lines

    def metrics(acc, n):
        return {"accuracy": Metric(acc, True), "yes_ratio": Metric(0.5, None), "n": Metric(n, None)}

    record = ResultRecord(
        benchmark=BenchmarkInfo("pope"),
        metrics={**metrics(0.75, 40.0), "accuracy_pooled": Metric(0.7, True)},
        per_split={"random": metrics(1.0, 20.0), "adversarial": metrics(0.5, 20.0)},
        n_samples=40,
        samples_file=str(tmp_path / "pope_vcd.samples.jsonl"),
    )
    assert summary_lines("vcd:repro", record) == [
        "vcd:repro: n=40 accuracy=0.75 yes_ratio=0.5 (mean over splits)",
        "  random (n=20): accuracy=1 yes_ratio=0.5",
        "  adversarial (n=20): accuracy=0.5 yes_ratio=0.5",
        f"  results: {tmp_path / 'pope_vcd.json'}",
    ]
    one = ResultRecord(
        BenchmarkInfo("chair"), {"chair_i": Metric(0.5, False)}, n_samples=4, samples_file="r/chair_none.samples.jsonl"
    )
    assert summary_lines("none", one) == ["none: n=4 chair_i=0.5", f"  results: {Path('r/chair_none.json')}"]
