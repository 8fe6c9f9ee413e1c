"""``halludec score`` / ``halludec compare`` end to end through argparse, score_predictions, and torch-free imports."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from halludec.benchmarks.cli import add_compare_subcommand, add_score_subcommand
from halludec.benchmarks.compare import compare_results
from halludec.benchmarks.results import Metric, save_results
from halludec.benchmarks.scoring import score_predictions


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="halludec")
    sub = parser.add_subparsers(dest="command")
    add_score_subcommand(sub)
    add_compare_subcommand(sub)
    args = parser.parse_args(argv)
    return args.func(args)


POPE_PREDS = [
    {"id": "random/1", "split": "random", "answer": "Yes.", "label": "yes"},
    {"id": "random/2", "split": "random", "answer": "No, there is not.", "label": "no"},
    {"id": "random/3", "split": "random", "answer": "I don't see one", "label": "yes"},
    {"id": "random/4", "split": "random", "answer": "There is a dog.", "label": "no"},
    {"id": "adversarial/1", "split": "adversarial", "answer": "yes", "label": "yes"},
    {"id": "adversarial/2", "split": "adversarial", "answer": "Nope", "label": "no"},
]


def test_score_pope_cli_json(tmp_path, write_jsonl, capsys):
    preds = write_jsonl(tmp_path / "preds.jsonl", POPE_PREDS)
    out = tmp_path / "results" / "pope.json"
    samples = tmp_path / "results" / "samples.jsonl"
    code = run_cli(
        [
            "score",
            "--benchmark",
            "pope",
            "--predictions",
            str(preds),
            "--json",
            "--output",
            str(out),
            "--samples-out",
            str(samples),
        ]
    )
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    # pope parser: random -> yes, no, yes, yes (TP 2, FP 1, TN 1); adversarial -> yes, yes (TP 1, FP 1)
    random_split = printed["per_split"]["random"]
    assert random_split["accuracy"]["value"] == pytest.approx(3 / 4)
    assert random_split["yes_ratio"]["value"] == pytest.approx(3 / 4)
    assert random_split["unparseable"]["value"] == 1
    assert printed["per_split"]["adversarial"]["accuracy"]["value"] == pytest.approx(1 / 2)
    assert printed["metrics"]["accuracy"]["value"] == pytest.approx((3 / 4 + 1 / 2) / 2)
    assert printed["metrics"]["accuracy_pooled"]["value"] == pytest.approx(4 / 6)
    assert printed["benchmark"]["parser"] == "pope"
    assert printed["benchmark"]["settings"]["predictions"]["sha256"]
    assert json.loads(out.read_text())["metrics"] == printed["metrics"]
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert [r["pred"] for r in rows] == ["yes", "no", "yes", "yes", "yes", "yes"]


def test_score_pope_cli_parser_and_text(tmp_path, write_jsonl, capsys):
    preds = write_jsonl(tmp_path / "preds.jsonl", POPE_PREDS)
    assert run_cli(["score", "--benchmark", "pope", "--predictions", str(preds), "--parser", "opera"]) == 0
    text = capsys.readouterr().out
    assert "parser opera" in text
    assert "random" in text
    assert "f1↑=" in text


def test_score_pope_labels_from_question_files(tmp_path, write_jsonl, pope_dir):
    rows = [{"question_id": 1, "split": "random", "text": "Yes"}, {"id": "popular/2", "text": "No"}]
    preds = write_jsonl(tmp_path / "llava_answers.jsonl", rows)
    result = score_predictions("pope", preds, annotations=pope_dir, answer_field="text")
    assert result["metrics"]["accuracy"]["value"] == 1.0
    assert result["benchmark"]["data"]["path"] == str(pope_dir)
    assert len(result["benchmark"]["data"]["files"]) == 3


def test_score_errors_name_file_field_and_fix(tmp_path, write_jsonl, capsys):
    preds = write_jsonl(tmp_path / "preds.jsonl", [{"answer": "yes", "label": "yes"}, {"answer": "no"}])
    assert run_cli(["score", "--benchmark", "pope", "--predictions", str(preds)]) == 2
    err = capsys.readouterr().err
    assert "preds.jsonl, line 2: missing field 'label'" in err
    assert "--annotations" in err
    preds = write_jsonl(tmp_path / "p2.jsonl", [{"text": "yes", "label": "yes"}])
    assert run_cli(["score", "--benchmark", "pope", "--predictions", str(preds)]) == 2
    assert "missing field 'answer'" in capsys.readouterr().err
    preds = write_jsonl(tmp_path / "p3.jsonl", [{"answer": "yes", "label": "yes", "split": "adverserial"}])
    assert run_cli(["score", "--benchmark", "pope", "--predictions", str(preds)]) == 2
    assert "unknown POPE split 'adverserial'. Did you mean 'adversarial'?" in capsys.readouterr().err
    assert run_cli(["score", "--benchmark", "popee", "--predictions", str(preds)]) == 2
    assert "Did you mean 'pope'?" in capsys.readouterr().err
    assert run_cli(["score", "--benchmark", "pope", "--predictions", str(tmp_path / "none.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_score_chair_cli(tmp_path, write_jsonl, coco_dir, capsys):
    caps = write_jsonl(
        tmp_path / "caps.jsonl",
        [
            {"image_id": 1, "caption": "A man and his dogs playing with a frisbee."},
            {"image_id": 2, "caption": "The toilet seat is up next to a sink."},
            {"image_id": 3, "caption": "A hot dog on a table next to a cup."},
        ],
    )
    argv = [
        "score",
        "--benchmark",
        "chair",
        "--predictions",
        str(caps),
        "--annotations",
        str(coco_dir),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--bootstrap",
        "100",
        "--json",
    ]
    assert run_cli(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["metrics"]["chair_s"]["value"] == pytest.approx(2 / 3)
    assert result["metrics"]["chair_i"]["value"] == pytest.approx(0.25)
    assert result["metrics"]["chair_i"]["higher_is_better"] is False
    assert len(result["metrics"]["chair_i"]["ci95"]) == 2
    settings = result["benchmark"]["settings"]
    assert settings["backend"] == "builtin"
    assert settings["compat_opera_synonyms"] is False
    assert result["benchmark"]["prompt_template"] is None  # unknown for another tool's outputs
    assert run_cli(["score", "--benchmark", "chair", "--predictions", str(caps),
                    "--annotations", str(tmp_path / "missing")]) == 2  # fmt: skip
    assert "annotations_trainval2014.zip" in capsys.readouterr().err


def test_compare_table_plot_and_cli(tmp_path, make_record, capsys):
    paths = []
    for name, f1 in (("none", 0.80), ("vcd", 0.85), ("vhr", 0.78)):
        record = make_record(name, f1)
        record.metrics["chair_i"] = Metric({"none": 0.10, "vcd": 0.12, "vhr": 0.08}[name], False)
        paths.append(save_results(record, tmp_path / f"{name}.json"))
    table = compare_results(paths)
    assert "| strategy | f1 ↑ | yes_ratio | chair_i ↓ |" in table
    assert "| vcd | **0.8500** (+0.0500) |" in table
    assert "| none | 0.8000 |" in table
    assert "**0.0800** (-0.0200)" in table
    plot = tmp_path / "plots" / "compare.png"
    pytest.importorskip("matplotlib")
    assert run_cli(["compare", *map(str, paths), "--plot", str(plot), "--out", str(tmp_path / "t.md")]) == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| vhr |" in capsys.readouterr().out
    assert (tmp_path / "t.md").read_text() == table
    assert run_cli(["compare", str(tmp_path / "missing.json")]) == 2


def test_compare_without_baseline_says_so(tmp_path, make_record):
    table = compare_results([make_record("vcd"), make_record("vhr", 0.7)])
    assert "no `none` run in this group" in table


def test_scoring_modules_import_no_torch(no_torch_stub):
    code = no_torch_stub + (
        "import halludec.benchmarks, halludec.benchmarks.cli, halludec.benchmarks.compare\n"
        "import halludec.benchmarks.scoring, halludec.benchmarks.chair_gt\n"
        "bad = [m for m in ('torch', 'transformers', 'datasets', 'matplotlib') if m in sys.modules]\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_import_halludec_benchmarks_does_not_import_torch():
    """`halludec score` works without loading torch: the package and the CLI parser import it lazily."""
    code = (
        "import sys, halludec, halludec.benchmarks, halludec.cli\n"
        "halludec.cli.build_parser()\n"
        "sys.exit(1 if 'torch' in sys.modules or 'transformers' in sys.modules else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
