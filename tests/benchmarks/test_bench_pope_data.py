"""POPE loaders (question files + image folder, parquet through datasets), fingerprints, variants, bad files."""

from __future__ import annotations

import hashlib
import json

import pytest

from halludec.benchmarks.errors import BenchmarkDataError, MissingFileError
from halludec.benchmarks.pope_data import load_pope, read_question_file, split_from_name
from halludec.benchmarks.pope_variants import KNOWN_CONTENT, content_sha256, identify_split, summarize_variant


def test_load_question_files_with_images(pope_dir, image_dir):
    data = load_pope(pope_dir, image_dir=image_dir)
    assert data.splits == ["random", "popular", "adversarial"]
    assert len(data.samples) == 12
    first = data.samples[0]
    assert (first.id, first.split, first.question_id, first.label) == ("random/1", "random", 1, "yes")
    assert first.question == "Is there a dog in the image?"
    assert first.load_image().size == (6, 4)
    assert first.to_row()["id"] == "random/1"
    adv = [s for s in data.samples if s.split == "adversarial"]
    assert adv[3].question == "Is there an apple in the image?"
    for entry in data.files:
        raw = (pope_dir / f"coco_pope_{entry['split']}.json").read_bytes()
        assert entry["sha256"] == hashlib.sha256(raw).hexdigest()
        assert entry["n_rows"] == 4
    info = data.data_info()
    assert info.path == str(pope_dir)
    assert len(info.sha256) == 64
    assert info.variant == "unknown"


def test_splits_limit_and_single_file(pope_dir):
    data = load_pope(pope_dir, splits=["adversarial"], limit=2)
    assert [s.id for s in data.samples] == ["adversarial/1", "adversarial/2"]
    assert data.files[0]["n_rows"] == 4  # the variant is recognised on the full split
    one = load_pope(pope_dir / "coco_pope_popular.json")
    assert one.splits == ["popular"]
    with pytest.raises(BenchmarkDataError, match="has no image"):
        one.samples[0].load_image()


def test_split_names_from_file_names():
    assert split_from_name("coco_pope_adversarial.json") == "adversarial"
    assert split_from_name("aokvqa_pope_seem_random.json") == "random"
    assert split_from_name("random-00000-of-00001.parquet") == "random"
    assert split_from_name("questions.jsonl") is None


def test_json_array_files_are_accepted(tmp_path, pope_rows):
    path = tmp_path / "gqa_pope_seem_popular.json"
    path.write_text(json.dumps(pope_rows("popular"), indent=4))
    split, rows = read_question_file(path)
    assert split == "popular"
    assert len(rows) == 4


def test_missing_field_names_file_line_and_fix(tmp_path, pope_rows):
    rows = pope_rows("random")
    del rows[2]["label"]
    path = tmp_path / "coco_pope_random.json"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(BenchmarkDataError) as err:
        load_pope(path)
    msg = str(err.value)
    assert "coco_pope_random.json, line 3" in msg
    assert "missing field 'label'" in msg
    assert "question_id" in msg


def test_bad_label_and_bad_json(tmp_path, pope_rows):
    rows = pope_rows("random")
    rows[0]["label"] = "maybe"
    path = tmp_path / "coco_pope_random.json"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(BenchmarkDataError, match=r"line 1: label 'maybe'"):
        load_pope(path)
    path.write_text('{"question_id": 1, "image": \n')
    with pytest.raises(BenchmarkDataError, match=r"line 1: not valid JSON"):
        load_pope(path)


def test_unknown_split_and_missing_inputs(pope_dir, tmp_path, image_dir):
    with pytest.raises(BenchmarkDataError, match=r"unknown POPE split 'randm'.*Did you mean 'random'.*Allowed"):
        load_pope(pope_dir, splits=["randm"])
    with pytest.raises(BenchmarkDataError, match="cannot tell the POPE split"):
        load_pope(_copy(pope_dir / "coco_pope_random.json", tmp_path / "questions.jsonl"))
    with pytest.raises(MissingFileError, match="not an existing file or folder"):
        load_pope(tmp_path / "nowhere" / "pope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MissingFileError, match="no POPE question files found"):
        load_pope(empty)
    (image_dir / "COCO_val2014_000000000002.jpg").unlink()
    with pytest.raises(MissingFileError, match=r"lacks 1 image\(s\).*COCO_val2014_000000000002.jpg"):
        load_pope(pope_dir, image_dir=image_dir)
    with pytest.raises(MissingFileError, match="image folder"):
        load_pope(pope_dir, image_dir=tmp_path / "no_images")


def _copy(src, dst):
    dst.write_bytes(src.read_bytes())
    return dst


def _rows(n, n_typo, split="random"):
    out = []
    for i in range(n):
        word = "imange" if i < n_typo else "image"
        out.append((f"COCO_val2014_{i:012d}.jpg", f"Is there an apple in the {word}?", "yes" if i % 2 else "no"))
    return out


def test_variant_signatures_from_published_counts():
    assert identify_split("random", _rows(2910, 144)).variants == ("opera_2910",)
    assert identify_split("popular", _rows(3000, 44)).variants == ("opera_2910",)
    assert identify_split("adversarial", _rows(3000, 58)).variants == ("opera_2910",)
    vcd = identify_split("adversarial", _rows(3000, 57))
    assert vcd.variants == ("vcd_imange",)
    assert not vcd.exact
    assert vcd.n_typo == 57
    plain = [identify_split(s, _rows(3000, 0)) for s in ("random", "popular", "adversarial")]
    assert summarize_variant(plain) == "pope_3000-like"
    assert summarize_variant([identify_split("random", _rows(2910, 144)), plain[1]]) == "mixed"
    assert identify_split("random", _rows(10, 0)).variants == ()
    assert summarize_variant([identify_split("random", _rows(10, 0))]) == "unknown"


def test_variant_exact_content_match(monkeypatch):
    rows = _rows(20, 3)
    digest = content_sha256(rows)
    monkeypatch.setitem(KNOWN_CONTENT, digest, (("vcd_imange",), "adversarial", "coco"))
    found = identify_split("adversarial", rows)
    assert found.exact
    assert found.variants == ("vcd_imange",)
    assert summarize_variant([found]) == "vcd_imange"
    # random/popular files shared by two variants resolve to the preferred name
    shared = identify_split("random", rows)
    monkeypatch.setitem(KNOWN_CONTENT, digest, (("pope_3000", "vcd_imange"), "random", "coco"))
    shared = identify_split("random", rows)
    assert summarize_variant([shared]) == "pope_3000"


def test_known_table_is_consistent():
    per_variant: dict[str, set[str]] = {}
    for digest, (names, split, _) in KNOWN_CONTENT.items():
        assert len(digest) == 64
        for name in names:
            per_variant.setdefault(name, set()).add(split)
    assert set(per_variant) == {"pope_3000", "opera_2910", "vcd_imange", "pope_7ef3026", "vcd_aokvqa", "vcd_gqa"}
    assert all(splits == {"random", "popular", "adversarial"} for splits in per_variant.values())


def test_parquet_files_through_datasets(tmp_path, pope_rows):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    rows = {"id": [], "question_id": [], "question": [], "answer": [], "image_source": [], "image": [], "category": []}
    for split in ("random", "adversarial"):
        for r in pope_rows(split):
            rows["id"].append(f"{split}-{r['question_id']}")
            rows["question_id"].append(str(r["question_id"]))
            rows["question"].append(r["text"])
            rows["answer"].append(r["label"])
            rows["image_source"].append(r["image"].removesuffix(".jpg"))
            rows["image"].append(Image.new("RGB", (5, 3), (10, 20, 30)))
            rows["category"].append(split)
    features = datasets.Features({k: datasets.Value("string") for k in rows if k != "image"})
    features["image"] = datasets.Image()
    ds = datasets.Dataset.from_dict(rows, features=features)
    folder = tmp_path / "lmms-pope" / "data"
    folder.mkdir(parents=True)
    ds.to_parquet(str(folder / "test-00000-of-00001.parquet"))
    data = load_pope(tmp_path / "lmms-pope", cache_dir=tmp_path / "hf-cache")
    assert data.splits == ["random", "adversarial"]
    assert [s.id for s in data.samples[:2]] == ["random/1", "random/2"]
    assert data.samples[1].label == "no"
    assert data.samples[1].image == "COCO_val2014_000000000001"
    assert data.samples[5].load_image().size == (5, 3)
    raw = (folder / "test-00000-of-00001.parquet").read_bytes()
    assert data.files[0]["sha256"] == hashlib.sha256(raw).hexdigest()
    bad = datasets.Dataset.from_dict({"question": ["Is there a dog?"], "answer": ["yes"]})
    bad.to_parquet(str(tmp_path / "random.parquet"))
    with pytest.raises(BenchmarkDataError, match=r"random.parquet: missing column 'question_id'"):
        load_pope(tmp_path / "random.parquet", cache_dir=tmp_path / "hf-cache")


def test_hub_loading_path(monkeypatch, pope_rows):
    datasets = pytest.importorskip("datasets")
    rows = pope_rows("popular")
    split_ds = datasets.Dataset.from_dict(
        {
            "question_id": [str(r["question_id"]) for r in rows],
            "question": [r["text"] for r in rows],
            "answer": [r["label"] for r in rows],
            "image_source": [r["image"] for r in rows],
            "category": ["popular"] * len(rows),
        }
    )
    calls = {}

    def fake_load_dataset(path, **kwargs):
        calls.update(path=path, **kwargs)
        return datasets.DatasetDict({"test": split_ds})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = load_pope("lmms-lab/POPE", hf_config="default")
    assert calls["path"] == "lmms-lab/POPE"
    assert calls["name"] == "default"
    assert data.splits == ["popular"]
    assert len(data.files[0]["sha256"]) == 64  # canonical rows
    assert data.files[0]["path"] == "lmms-lab/POPE:test"

    def offline(path, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(BenchmarkDataError, match=r"Could not load 'lmms-lab/POPE'.*parquet files"):
        load_pope("lmms-lab/POPE")
