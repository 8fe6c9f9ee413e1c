"""CHAIR: synonym table, caption parsing (two-word phrases, toilet seat, plurals), ground truth, metrics, id lists."""

from __future__ import annotations

import hashlib
import json
import random
import sys

import pytest

from halludec.benchmarks.chair import score_chair
from halludec.benchmarks.chair_gt import load_ground_truth
from halludec.benchmarks.chair_ids import (
    OPERA_COMPAT_IDS,
    ids_sha256,
    load_image_id_list,
    resolve_image_list,
    sample_image_ids,
)
from halludec.benchmarks.chair_synonyms import SYNONYMS_TXT, build_vocabulary, parse_synonyms
from halludec.benchmarks.chair_text import NltkBackend, caption_to_objects, make_backend, tokenize
from halludec.benchmarks.errors import BenchmarkDataError, MissingFileError


def objects(caption: str, compat: bool = False) -> list[str]:
    vocab = build_vocabulary(compat)
    return list(caption_to_objects(caption, vocab, make_backend("builtin", vocab)).node_words)


def test_synonym_table_is_the_released_one():
    # sha256 of LisaAnne/Hallucination data/synonyms.txt (== the string in shikiw/OPERA:chair.py after its first \n)
    digest = hashlib.sha256(SYNONYMS_TXT.encode()).hexdigest()
    assert digest == "b685537b36fe21b791c87151b96a991ceb582edff19f3da204dcc7a7905502f2"
    lines = parse_synonyms(compat_opera_synonyms=True)
    entries = [e for line in lines for e in line]
    assert len(lines) == 80
    assert len(entries) == 416
    assert len(set(entries)) == 403
    assert [e for e in entries if e != e.strip()] == [" motor bike", " cheesecake"]
    assert "iPhone" in entries
    assert "iphone" in build_vocabulary(False).objects
    assert " motor bike" not in build_vocabulary(False).objects


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("A man walks his dog.", ["person", "dog"]),
        ("Two puppies and three kittens.", ["dog", "cat"]),
        ("Women holding umbrellas near the buses.", ["person", "umbrella", "bus"]),
        ("Two men on a bench.", ["bench"]),  # WordNet keeps "men", as the reference
        ("A hot dog and a cell phone.", ["hot dog", "cell phone"]),
        ("Hot dogs and teddy bears.", ["hot dog", "teddy bear"]),
        ("The seat of the toilet is up.", ["toilet"]),  # toilet-seat rule: no chair
        ("A toilet seat.", ["toilet"]),
        ("A chair with a seat cushion.", ["chair", "chair"]),
        ("A baby elephant and an adult giraffe.", ["elephant", "giraffe"]),
        ("A passenger jet at the gate.", ["airplane"]),
        ("The train track.", []),  # OPERA's pair swallows the train
        ("A motor cycle.", ["motorcycle"]),
        ("A stove top oven.", ["oven", "oven"]),  # three words never merge
        ("A pickup truck.", ["truck", "truck"]),  # mentions count with repetition
        ("Wine glasses on a dining table.", ["wine glass", "dining table"]),
        ("Knives, forks and a pair of skis.", ["knife", "fork", "skis"]),
        ("A bow tie.", ["tie"]),
    ],
)
def test_caption_objects_builtin(caption, expected):
    assert objects(caption) == expected


def test_leading_space_switch():
    assert objects("A man on a motor bike eating cheesecake.") == ["person", "motorcycle", "cake"]
    assert objects("A man on a motor bike eating cheesecake.", compat=True) == ["person"]  # swallowed / unmatched
    assert objects("An iPhone.") == ["cell phone"]
    assert objects("An iPhone.", compat=True) == []


def test_tokenizer_like_treebank():
    assert tokenize("there's a man's dog, isn't it?") == [
        "there",
        "'s",
        "a",
        "man",
        "'s",
        "dog",
        ",",
        "is",
        "n't",
        "it",
        "?",
    ]
    assert tokenize("a 3.5 m-long t-shirt...") == ["a", "3.5", "m-long", "t-shirt", "..."]


def test_nltk_backend_names_missing_data(monkeypatch):
    nltk = pytest.importorskip("nltk")

    def missing(resource, *args, **kwargs):
        raise LookupError(resource)

    monkeypatch.setattr(nltk.data, "find", missing)
    with pytest.raises(BenchmarkDataError, match=r"missing NLTK data: .*wordnet.*nltk.downloader.*builtin"):
        NltkBackend(build_vocabulary())


def test_nltk_backend_without_nltk(monkeypatch):
    monkeypatch.setitem(sys.modules, "nltk", None)
    with pytest.raises(BenchmarkDataError, match="pip install nltk"):
        make_backend("nltk", build_vocabulary())


def test_unknown_backend():
    with pytest.raises(KeyError, match=r"Unknown CHAIR text backend 'nltkk'.*Did you mean 'nltk'"):
        make_backend("nltkk", build_vocabulary())


CAPTIONS = [
    (1, "A man and his dogs playing with a frisbee."),  # person, dog, frisbee (hallucinated)
    (2, "The toilet seat is up next to a sink."),  # toilet, sink
    (3, "A hot dog on a table next to a cup."),  # hot dog (hallucinated), dining table, cup
]


def test_chair_metrics_hand_computed(coco_dir, tmp_path):
    result = score_chair(CAPTIONS, annotations=coco_dir, cache_dir=tmp_path / "cache", n_bootstrap=200, seed=1)
    m = result.metrics
    assert m["chair_s"].value == pytest.approx(2 / 3)
    assert m["chair_i"].value == pytest.approx(2 / 8)
    assert m["recall"].value == pytest.approx(6 / 6)
    assert m["precision"].value == pytest.approx(6 / 8)
    assert m["f1"].value == pytest.approx(2 * 0.75 / 1.75)
    assert m["len"].value == pytest.approx((10 + 9 + 10) / 3)
    assert m["chair_s"].higher_is_better is False
    assert m["recall"].higher_is_better is True
    assert m["len"].higher_is_better is None
    lo, hi = m["chair_i"].ci95
    assert lo <= m["chair_i"].value <= hi
    again = score_chair(CAPTIONS, annotations=coco_dir, cache_dir=tmp_path / "cache", n_bootstrap=200, seed=1)
    assert again.metrics["chair_i"].ci95 == m["chair_i"].ci95  # seeded
    rows = [r.to_row() for r in result.results]
    assert rows[0]["mentioned"] == ["person", "dog", "frisbee"]
    assert rows[0]["hallucinated"] == ["frisbee"]
    assert rows[1]["hallucinated"] == []
    assert rows[2]["hallucinated"] == ["hot dog"]
    assert result.settings["backend"] == "builtin"
    assert result.settings["compat_opera_synonyms"] is False
    assert score_chair(CAPTIONS, annotations=coco_dir, cache_dir=tmp_path, n_bootstrap=0).metrics["f1"].ci95 is None


def test_ground_truth_and_json_cache(coco_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    gt = load_ground_truth(coco_dir, cache_dir=cache)
    assert {k: set(v) for k, v in gt.objects.items()} == {
        1: {"person", "dog"},
        2: {"toilet", "sink"},
        3: {"dining table", "cup"},
    }
    assert {f["name"] for f in gt.files} == {"instances_val2014", "captions_val2014"}
    files = list(cache.glob("chair_gt_*.json"))
    assert len(files) == 1
    assert json.loads(files[0].read_text())["objects"]["2"] == ["sink", "toilet"]  # JSON, not pickle
    import halludec.benchmarks.chair_gt as chair_gt

    def boom(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(chair_gt, "build_ground_truth", boom)
    assert load_ground_truth(coco_dir, cache_dir=cache).objects == gt.objects
    # another setting is another cache entry
    monkeypatch.undo()
    load_ground_truth(coco_dir, cache_dir=cache, compat_opera_synonyms=True)
    assert len(list(cache.glob("chair_gt_*.json"))) == 2


def test_ground_truth_without_pycocotools(coco_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    monkeypatch.setitem(sys.modules, "pycocotools.coco", None)
    gt = load_ground_truth(coco_dir, use_cache=False)
    assert set(gt.objects[2]) == {"toilet", "sink"}


def test_ground_truth_reads_annotations_subfolder(coco_dir, tmp_path):
    gt = load_ground_truth(coco_dir.parent, cache_dir=tmp_path / "c")  # .../coco has annotations/
    assert gt.image_ids == [1, 2, 3]


def test_missing_annotation_files(tmp_path, coco_dir):
    with pytest.raises(MissingFileError, match=r"does not exist.*annotations_trainval2014.zip"):
        load_ground_truth(tmp_path / "nope")
    (coco_dir / "captions_val2014.json").unlink()
    with pytest.raises(MissingFileError, match=r"has no captions_val2014.json.*instances_val2014.json"):
        load_ground_truth(coco_dir)
    with pytest.raises(BenchmarkDataError, match="CHAIR needs COCO ground truth"):
        score_chair(CAPTIONS)


def test_malformed_annotation_file(coco_dir):
    (coco_dir / "instances_val2014.json").write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(BenchmarkDataError, match=r"instances_val2014.json: .*needs the fields.*categories"):
        load_ground_truth(coco_dir, use_cache=False)


def test_unknown_image_ids(coco_dir, tmp_path):
    caps = [*CAPTIONS, (999, "A dog.")]
    with pytest.raises(BenchmarkDataError, match=r"1 image id\(s\) are not in the COCO annotations, e.g. \[999\]"):
        score_chair(caps, annotations=coco_dir, cache_dir=tmp_path)
    result = score_chair(caps, annotations=coco_dir, cache_dir=tmp_path, skip_unknown=True, n_bootstrap=0)
    assert len(result.results) == 3
    assert result.settings["skipped_unknown_ids"] == [999]
    assert any("999" in n for n in result.notes)


def test_file_names_as_image_ids(coco_dir, tmp_path):
    caps = [("COCO_val2014_000000000001.jpg", "A dog."), ("2", "A sink.")]
    result = score_chair(caps, annotations=coco_dir, cache_dir=tmp_path, n_bootstrap=0)
    assert [r.image_id for r in result.results] == [1, 2]
    assert result.metrics["chair_i"].value == 0.0


def test_image_lists(tmp_path, coco_dir):
    assert len(OPERA_COMPAT_IDS) == 500
    assert len(set(OPERA_COMPAT_IDS)) == 500
    assert OPERA_COMPAT_IDS[:3] == (226988, 337443, 112022)
    assert ids_sha256(OPERA_COMPAT_IDS) == "8e6d37b0baa8afa603e8b238cc35f705ca251b8abef2954d5f2a7526bee44558"
    pool = list(range(1000, 3000))
    shuffled = pool[:]
    random.Random(5).shuffle(shuffled)
    assert sample_image_ids(pool, 10) == sample_image_ids(shuffled, 10)  # sorted first: order-independent
    assert sample_image_ids(pool, 10) == random.Random(0).sample(pool, 10)
    listing = tmp_path / "ids.txt"
    listing.write_text("# my list\n3\nCOCO_val2014_000000000001.jpg\n")
    assert load_image_id_list(listing) == [3, 1]
    result = score_chair(CAPTIONS, annotations=coco_dir, cache_dir=tmp_path, image_list=listing, n_bootstrap=0)
    assert [r.image_id for r in result.results] == [1, 3]
    assert result.settings["image_list"]["n"] == 2
    with pytest.raises(BenchmarkDataError, match=r"Unknown image list 'opera'.*opera_compat"):
        resolve_image_list("opera")
    with pytest.raises(BenchmarkDataError, match="pool"):
        resolve_image_list("halludec_default")


def test_chair_samples_for_a_runner(tmp_path):
    from PIL import Image

    from halludec.benchmarks.chair import load_chair_samples

    ids = tmp_path / "ids.txt"
    ids.write_text("5\n7\n")
    folder = tmp_path / "val2014"
    folder.mkdir()
    Image.new("RGB", (4, 4)).save(folder / "COCO_val2014_000000000005.jpg")
    with pytest.raises(MissingFileError, match=r"lacks 1 of the 2 listed images.*COCO_val2014_000000000007.jpg"):
        load_chair_samples(ids, folder)
    samples = load_chair_samples(ids, folder, limit=1)
    assert samples[0].image_id == 5
    assert samples[0].load_image().size == (4, 4)


ORDINARY = [
    "A man riding a wave on top of a surfboard.",
    "Two dogs play with a frisbee in the park next to a bench.",
    "A kitchen with a refrigerator, an oven and a sink.",
    "A woman holding an umbrella while walking down the street with her child.",
    "A plate with a sandwich, a cup of coffee and a knife on a wooden table.",
    "Several cars and a bus stopped at a traffic light.",
    "A cat sleeping on a laptop keyboard next to a cell phone.",
]


def test_builtin_matches_nltk_on_ordinary_captions():
    pytest.importorskip("nltk")
    vocab = build_vocabulary()
    try:
        reference = NltkBackend(vocab)
    except BenchmarkDataError as err:
        pytest.skip(f"nltk data not installed: {err}")
    builtin = make_backend("builtin", vocab)
    for caption in ORDINARY:
        expected = caption_to_objects(caption, vocab, reference)
        assert caption_to_objects(caption, vocab, builtin).node_words == expected.node_words, caption
