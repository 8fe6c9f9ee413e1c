"""Small COCO-like, POPE, AMBER and MME fixtures written to a temporary folder (no downloads, no torch needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from halludec.benchmarks.results import BenchmarkInfo, DataInfo, Metric, ModelInfo, ResultRecord, StrategyInfo

# Hand-made COCO 2014 annotations, 3 images. Ground truth = instance categories + objects in the reference captions:
#   1: person, dog (instances; the captions add nothing new) -> {person, dog}
#   2: toilet (instances) + sink (from a caption)             -> {toilet, sink}
#   3: dining table, cup (instances)                          -> {dining table, cup}
CATEGORIES = [
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 18, "name": "dog", "supercategory": "animal"},
    {"id": 47, "name": "cup", "supercategory": "kitchen"},
    {"id": 62, "name": "chair", "supercategory": "furniture"},
    {"id": 67, "name": "dining table", "supercategory": "furniture"},
    {"id": 70, "name": "toilet", "supercategory": "furniture"},
    {"id": 81, "name": "sink", "supercategory": "appliance"},
]
IMAGES = [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg", "width": 8, "height": 8} for i in (1, 2, 3)]
INSTANCES = [(1, 1), (1, 18), (1, 1), (2, 70), (3, 67), (3, 47)]
CAPTIONS = [
    (1, "A man walks his dog."),
    (1, "A person with a dog on a leash."),
    (2, "A small bathroom with a toilet and a sink."),
    (2, "A white toilet in a bathroom."),
    (3, "A cup of coffee on a table."),
]
GROUND_TRUTH = {1: {"person", "dog"}, 2: {"toilet", "sink"}, 3: {"dining table", "cup"}}


def write_coco(folder: Path) -> Path:
    """Write instances_val2014.json and captions_val2014.json into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    anns = [
        {"id": k, "image_id": img, "category_id": cat, "bbox": [0, 0, 1, 1], "area": 1.0, "iscrowd": 0}
        for k, (img, cat) in enumerate(INSTANCES, start=1)
    ]
    instances = {"info": {}, "licenses": [], "images": IMAGES, "annotations": anns, "categories": CATEGORIES}
    caps = [{"id": k, "image_id": img, "caption": c} for k, (img, c) in enumerate(CAPTIONS, start=1)]
    (folder / "instances_val2014.json").write_text(json.dumps(instances))
    (folder / "captions_val2014.json").write_text(
        json.dumps({"info": {}, "licenses": [], "images": IMAGES, "annotations": caps})
    )
    return folder


@pytest.fixture
def coco_dir(tmp_path: Path) -> Path:
    return write_coco(tmp_path / "coco" / "annotations")


POPE_IMAGES = ["COCO_val2014_000000000001.jpg", "COCO_val2014_000000000002.jpg"]
POPE_ROWS = {
    "random": [("dog", "yes"), ("car", "no"), ("person", "yes"), ("bus", "no")],
    "popular": [("dog", "yes"), ("chair", "no"), ("toilet", "yes"), ("car", "no")],
    "adversarial": [("dog", "yes"), ("cat", "no"), ("toilet", "yes"), ("apple", "no")],
}


def pope_lines(split: str) -> list[dict]:
    rows = []
    for qid, (obj, label) in enumerate(POPE_ROWS[split], start=1):
        article = "an" if obj[0] in "aeiou" else "a"
        rows.append(
            {
                "question_id": qid,
                "image": POPE_IMAGES[(qid - 1) // 2],
                "text": f"Is there {article} {obj} in the image?",
                "label": label,
            }
        )
    return rows


def write_pope(folder: Path, splits=("random", "popular", "adversarial")) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split in splits:
        text = "".join(json.dumps(r) + "\n" for r in pope_lines(split))
        (folder / f"coco_pope_{split}.json").write_text(text)
    return folder


@pytest.fixture
def pope_dir(tmp_path: Path) -> Path:
    return write_pope(tmp_path / "pope" / "coco")


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    from PIL import Image

    folder = tmp_path / "val2014"
    folder.mkdir()
    for k, name in enumerate(POPE_IMAGES):
        Image.new("RGB", (6, 4), (40 * k, 90, 200)).save(folder / name)
    return folder


@pytest.fixture
def no_torch_stub() -> str:
    """Python source that imports halludec.benchmarks with the parent package stubbed (its __init__ not run)."""
    root = Path(__file__).resolve().parents[2]
    return (
        "import sys, types\n"
        f"pkg = types.ModuleType('halludec'); pkg.__path__ = [{str(root / 'halludec')!r}]\n"
        "sys.modules['halludec'] = pkg\n"
    )


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def write_jsonl():
    """``write_jsonl(path, rows) -> path``."""
    return _write_jsonl


@pytest.fixture
def pope_rows():
    """``pope_rows(split) -> list of question-file dicts`` of the small POPE fixture."""
    return pope_lines


def _make_record(strategy="none", f1=0.8) -> ResultRecord:
    return ResultRecord(
        benchmark=BenchmarkInfo(
            name="pope",
            split="adversarial",
            parser="pope",
            prompt_template="{question}",
            limit=10,
            data=DataInfo(path="coco_pope_adversarial.json", sha256="ab" * 32, variant="pope_3000"),
        ),
        metrics={"f1": Metric(f1, True), "yes_ratio": Metric(0.5, None), "chair_i": Metric(0.1, False, (0.05, 0.2))},
        model=ModelInfo(name_or_path="llava-hf/llava-1.5-7b-hf", model_type="llava", dtype="bfloat16"),
        strategy=StrategyInfo(name=strategy, config={"alpha": 1.0}),
        generation={"max_new_tokens": 128, "do_sample": False},
        seed=0,
        n_samples=10,
        wall_time_s=1.5,
        tokens_per_s=20.0,
        samples_file="samples.jsonl",
    )


@pytest.fixture
def make_record():
    """``make_record(strategy="none", f1=0.8) -> ResultRecord`` for a POPE run."""
    return _make_record
