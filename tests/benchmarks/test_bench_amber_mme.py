"""AMBER (discriminative) and MME hallucination subset, scored from small files with hand-computed answers."""

from __future__ import annotations

import json

import pytest

from halludec.benchmarks.amber import load_amber, parse_amber
from halludec.benchmarks.errors import BenchmarkDataError, MissingFileError
from halludec.benchmarks.mme import load_mme, parse_mme
from halludec.benchmarks.scoring import score_file

AMBER_ANN = [
    {"id": 1, "type": "generative", "truth": ["sky", "dog"], "hallu": ["cat"]},
    {"id": 1005, "type": "discriminative-hallucination", "truth": "no"},
    {"id": 1006, "type": "discriminative-hallucination", "truth": "yes"},
    {"id": 1007, "type": "discriminative-attribute-state", "truth": "no"},
    {"id": 1008, "type": "discriminative-attribute-number", "truth": "yes"},
    {"id": 1009, "type": "relation", "truth": "no"},
    {"id": 1010, "type": "discriminative-attribute-action", "truth": "no"},
]
AMBER_OUT = [
    {"id": 1005, "response": "No"},  # correct
    {"id": 1006, "response": "Yes"},  # correct
    {"id": 1007, "response": "Yes"},  # wrong
    {"id": 1008, "response": "No"},  # wrong
    {"id": 1009, "response": "no"},  # not exactly "No": other, wrong
    {"id": 1010, "response": "No"},  # correct
]


@pytest.fixture
def amber_dir(tmp_path):
    data = tmp_path / "AMBER" / "data"
    (data / "query").mkdir(parents=True)
    (data / "annotations.json").write_text(json.dumps(AMBER_ANN))
    queries = [{"id": a["id"], "image": "AMBER_1.jpg", "query": f"Question {a['id']}?"} for a in AMBER_ANN[1:]]
    (data / "query" / "query_discriminative.json").write_text(json.dumps(queries))
    return data


def test_amber_hand_computed(amber_dir, tmp_path):
    items = load_amber(amber_dir)
    assert sorted(items) == [1005, 1006, 1007, 1008, 1009, 1010]
    assert items[1005].query == "Question 1005?"
    preds = tmp_path / "amber_out.json"
    preds.write_text(json.dumps(AMBER_OUT))
    record = score_file("amber", preds, annotations=amber_dir).record
    m = record.metrics
    assert m["accuracy"].value == pytest.approx(3 / 6)
    assert m["precision"].value == pytest.approx(2 / 3)  # answered No: 1005, 1008, 1010; right: 1005, 1010
    assert m["recall"].value == pytest.approx(2 / 4)  # truth no: 1005, 1007, 1009, 1010
    assert m["f1"].value == pytest.approx(4 / 7)
    assert m["other"].value == 1
    ex, attr = record.per_split["existence"], record.per_split["attribute"]
    assert (ex["accuracy"].value, ex["precision"].value, ex["recall"].value) == (1.0, 1.0, 1.0)
    assert attr["accuracy"].value == pytest.approx(1 / 3)
    assert attr["precision"].value == pytest.approx(1 / 2)
    assert attr["recall"].value == pytest.approx(1 / 2)
    assert record.per_split["relation"]["n"].value == 1
    assert record.benchmark.settings["positive_class"] == "no"
    assert parse_amber("Yes") == "yes"
    assert parse_amber("Yes.") == "other"


def test_amber_errors(amber_dir, tmp_path):
    preds = tmp_path / "p.jsonl"
    preds.write_text(json.dumps({"id": 42, "answer": "Yes"}) + "\n")
    with pytest.raises(BenchmarkDataError, match=r"AMBER ids \[42\]"):
        score_file("amber", preds, annotations=amber_dir)
    with pytest.raises(MissingFileError, match=r"annotations\.json"):
        load_amber(tmp_path / "nothing.json")
    with pytest.raises(BenchmarkDataError, match="needs its annotations"):
        score_file("amber", preds)


MME = {
    "existence": [
        ("a.jpg", "Is there a dog in this image? Please answer yes or no.", "Yes", "Yes"),
        ("a.jpg", "Is there a cat in this image? Please answer yes or no.", "No", "No, there is not."),
        ("b.jpg", "Is there a car in this image? Please answer yes or no.", "Yes", "There is one."),
        ("b.jpg", "Is there a bus in this image? Please answer yes or no.", "No", "no"),
    ],
    "count": [
        ("c.jpg", "Are there two dogs in this image? Please answer yes or no.", "Yes", "yes"),
        ("c.jpg", "Are there three dogs in this image? Please answer yes or no.", "No", "yes"),
    ],
}


def _write_mme(folder, with_answers=True):
    folder.mkdir(parents=True, exist_ok=True)
    for task, rows in MME.items():
        lines = ["\t".join(r if with_answers else r[:3]) for r in rows]
        (folder / f"{task}.txt").write_text("\n".join(lines) + "\n")
    return folder


def test_mme_results_folder_hand_computed(tmp_path):
    folder = _write_mme(tmp_path / "results")
    record = score_file("mme", folder).record
    ex, count = record.per_split["existence"], record.per_split["count"]
    assert ex["acc"].value == pytest.approx(3 / 4)  # "There is one." -> other
    assert ex["acc_plus"].value == pytest.approx(1 / 2)
    assert ex["score"].value == pytest.approx(125.0)
    assert count["score"].value == pytest.approx(50.0)
    assert record.metrics["score"].value == pytest.approx(175.0)
    assert record.metrics["other"].value == 1


def test_mme_jsonl_joined_with_questions(tmp_path, write_jsonl):
    questions = _write_mme(tmp_path / "questions", with_answers=False)
    assert [q.id for q in load_mme(questions, ["existence"])][:2] == ["existence/1", "existence/2"]
    rows = [{"id": f"{task}/{k}", "answer": r[3]} for task, rs in MME.items() for k, r in enumerate(rs, start=1)]
    preds = write_jsonl(tmp_path / "mme.jsonl", rows)
    record = score_file("mme", preds, annotations=questions).record
    assert record.metrics["score"].value == pytest.approx(175.0)


def test_mme_parser_and_errors(tmp_path):
    assert parse_mme("Yes") == "yes"
    assert parse_mme("no, it is not") == "no"
    assert parse_mme("not sure") == "no"  # "no" within the first 4 characters, as MME's tool does
    assert parse_mme("I think yes") == "other"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "existence.txt").write_text("a.jpg\tonly two columns\n")
    with pytest.raises(BenchmarkDataError, match=r"existence\.txt, line 1: expected image<TAB>question<TAB>answer"):
        load_mme(bad, ["existence"])
    with pytest.raises(MissingFileError, match=r"has no count\.txt"):
        load_mme(bad, ["existence", "count"])
    with pytest.raises(MissingFileError, match=r"has no existence\.txt"):
        load_mme(tmp_path)
    with pytest.raises(BenchmarkDataError, match=r"subtask 'colour'\. Did you mean 'color'"):
        load_mme(bad, ["colour"])
