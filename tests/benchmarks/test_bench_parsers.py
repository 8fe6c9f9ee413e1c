"""POPE answer parsers on tricky answers, the unparseable rule, and the yes/no metrics on hand-computed fixtures."""

from __future__ import annotations

import pytest

from halludec.benchmarks.pope_metrics import yesno_report
from halludec.benchmarks.pope_parsers import (
    get_parser,
    is_unparseable,
    list_parsers,
    normalize_label,
    vlmevalkit_punctuation,
)

# answer -> (pope, opera, vlmevalkit, strict, unparseable)
TRICKY = {
    "Yes.": ("yes", "yes", "yes", "other", False),
    "No, there is not.": ("no", "no", "no", "other", False),
    "I don't see one": ("yes", "no", "other", "other", False),
    "There is a dog.": ("yes", "yes", "other", "other", True),
    "yes, but no": ("no", "no", "other", "other", False),
    "": ("yes", "yes", "other", "other", True),
    "Nope": ("yes", "yes", "other", "other", False),
    "yes": ("yes", "yes", "yes", "yes", False),
    " No ": ("no", "no", "no", "no", False),
    "NO": ("yes", "no", "no", "no", False),
    "Yes, the cup is not fully visible": ("no", "no", "yes", "other", False),
    "Yes. No other objects.": ("yes", "no", "other", "other", False),
    "Yes, there is a dog. However, it is not clear.": ("yes", "no", "yes", "other", False),
    "Not really": ("yes", "yes", "other", "other", False),
    "I cannot tell": ("yes", "yes", "other", "other", True),
}


@pytest.mark.parametrize("answer", list(TRICKY))
@pytest.mark.parametrize(("index", "parser"), list(enumerate(["pope", "opera", "vlmevalkit", "strict"])))
def test_parser_on_tricky_answers(answer, index, parser):
    assert get_parser(parser)(answer) == TRICKY[answer][index]


@pytest.mark.parametrize("answer", list(TRICKY))
def test_unparseable_rule(answer):
    assert is_unparseable(answer) is TRICKY[answer][4]


def test_parser_names_aliases_and_unknown():
    assert list_parsers() == ["opera", "pope", "strict", "vlmevalkit"]
    assert get_parser("pope_canonical").name == "pope"
    assert get_parser("YORN").name == "vlmevalkit"
    assert get_parser("lmms_exact").name == "strict"
    with pytest.raises(KeyError, match=r"Unknown POPE parser 'opra'.*Did you mean 'opera'.*Available"):
        get_parser("opra")


def test_vlmevalkit_punctuation_quirks():
    # a mark touching a space anywhere is deleted everywhere; otherwise replaced by a space
    assert vlmevalkit_punctuation("yes,no") == "yes no"
    assert vlmevalkit_punctuation("yes, no,yes") == "yes noyes"
    # digit,digit anywhere: every mark is deleted
    assert vlmevalkit_punctuation("1,000 yes,no") == "1000 yesno"
    # periods between digits stay; at most 32 periods are removed (re.UNICODE passed as the count upstream)
    assert vlmevalkit_punctuation("3.5 yes.") == "3.5 yes"
    assert vlmevalkit_punctuation("a." * 40) == "a" * 32 + "a." * 8


def test_labels_are_validated():
    assert normalize_label(" Yes ", "x") == "yes"
    with pytest.raises(ValueError, match=r"preds.jsonl, line 3: label 'maybe' is not 'yes' or 'no'"):
        normalize_label("maybe", "preds.jsonl, line 3")


def test_metrics_hand_computed_single_split():
    rows = [
        ("random", "Yes", "yes"),
        ("random", "No", "yes"),
        ("random", "Yes", "no"),
        ("random", "No", "no"),
        ("random", "Yes.", "yes"),
        ("random", "There is a cat", "no"),
    ]
    metrics, per_split, notes, preds = yesno_report(rows, get_parser("pope"))
    # pope: preds yes, no, yes, no, yes, yes -> TP 2, FN 1, FP 2, TN 1
    assert preds == ["yes", "no", "yes", "no", "yes", "yes"]
    assert metrics["accuracy"].value == pytest.approx(3 / 6)
    assert metrics["precision"].value == pytest.approx(2 / 4)
    assert metrics["recall"].value == pytest.approx(2 / 3)
    assert metrics["f1"].value == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert metrics["yes_ratio"].value == pytest.approx(4 / 6)
    assert metrics["unparseable"].value == 1
    assert metrics["f1"].higher_is_better is True
    assert metrics["yes_ratio"].higher_is_better is None
    assert metrics["unparseable"].higher_is_better is False
    assert list(per_split) == ["random"]
    assert notes == []


def test_strict_and_vlmevalkit_scoring_rules():
    rows = [
        ("random", "Yes.", "yes"),
        ("random", "no", "yes"),
        ("random", "yes", "yes"),
        ("random", "yes", "no"),
        ("random", "maybe", "no"),
    ]
    strict, _, _, _ = yesno_report(rows, get_parser("strict"))
    # strict: preds other, no, yes, yes, other. TP 1, FP 1; FN counts only "no": 1. Accuracy: 1 correct of 5
    assert strict["accuracy"].value == pytest.approx(1 / 5)
    assert strict["precision"].value == pytest.approx(1 / 2)
    assert strict["recall"].value == pytest.approx(1 / 2)
    assert strict["other"].value == 2
    vlm, _, _, _ = yesno_report(rows, get_parser("vlmevalkit"))
    # vlmevalkit: preds yes, no, yes, yes, other. TP 2, FP 1, FN 1 (other on a no-label is not an FN); acc 2/5
    assert vlm["accuracy"].value == pytest.approx(2 / 5)
    assert vlm["precision"].value == pytest.approx(2 / 3)
    assert vlm["recall"].value == pytest.approx(2 / 3)


def test_mean_and_pooled_over_splits_and_undefined_precision():
    rows = [
        ("random", "yes", "yes"),
        ("random", "no", "no"),
        ("adversarial", "no", "yes"),
        ("adversarial", "no", "no"),
        ("adversarial", "no", "no"),
        ("adversarial", "no", "no"),
    ]
    metrics, per_split, notes, _ = yesno_report(rows, get_parser("pope"))
    assert list(per_split) == ["random", "adversarial"]
    assert per_split["random"]["accuracy"].value == 1.0
    assert per_split["adversarial"]["accuracy"].value == pytest.approx(3 / 4)
    assert per_split["adversarial"]["precision"].value == 0.0  # undefined -> 0, with a note
    assert any("precision undefined (adversarial)" in n for n in notes)
    assert metrics["accuracy"].value == pytest.approx((1.0 + 0.75) / 2)  # mean of splits
    assert metrics["accuracy_pooled"].value == pytest.approx(5 / 6)  # over all rows
    assert metrics["yes_ratio"].value == pytest.approx((0.5 + 0.0) / 2)
    assert metrics["n"].value == 6
