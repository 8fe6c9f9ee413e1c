"""CHAIR ground truth: the objects in each COCO image, from the user's COCO 2014 annotation files.

Ground truth of an image = its instance-annotation categories (mapped through the synonym table) united with the
objects found in its reference captions by the same caption parser as the generated captions (shikiw/OPERA:chair.py
``get_annotations``). The reference loads train2014 and val2014; for val images the val files alone give the same
ground truth, so halludec needs only ``instances_val2014.json`` and ``captions_val2014.json`` and also reads the train
files when they are present. The files are read with pycocotools (plain ``json`` when it is not installed: same data).

Building takes a while (hundreds of thousands of captions), so the result is cached as JSON (never pickle), keyed by
the files' paths, sizes and modification times, the text backend and the synonym setting.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from halludec.benchmarks.chair_synonyms import ChairVocabulary, build_vocabulary
from halludec.benchmarks.chair_text import caption_to_objects, make_backend
from halludec.benchmarks.errors import BenchmarkDataError, MissingFileError
from halludec.benchmarks.fingerprint import sha256_file

CACHE_FORMAT = "halludec.chair-ground-truth/1"
_FIX = (
    "Download annotations_trainval2014.zip (241 MB) from the COCO website (cocodataset.org, 2014 Train/Val "
    "annotations), unzip it, and pass the folder that holds instances_val2014.json and captions_val2014.json "
    "(usually coco/annotations)."
)


@dataclass
class ChairGroundTruth:
    """Ground-truth objects per image id, with where they came from.

    Attributes:
        objects: image id -> COCO category names (node words) present in the image.
        files: One entry per annotation file read: name, path, size, sha256.
        settings: The text backend and synonym setting the caption objects were extracted with.
    """

    objects: dict[int, frozenset[str]]
    files: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def image_ids(self) -> list[int]:
        """All known image ids, sorted."""
        return sorted(self.objects)


def find_annotation_files(annotations_dir: str | Path) -> dict[str, Path]:
    """Locate the COCO 2014 annotation files in a folder (or its ``annotations/`` subfolder).

    Args:
        annotations_dir: The folder.

    Returns:
        ``{"instances_val2014": path, "captions_val2014": path, ...}`` with the train files when present.

    Raises:
        MissingFileError: naming the folder, the missing file, what was found and how to get it.
    """
    root = Path(annotations_dir).expanduser()
    if not root.is_dir():
        kind = "is a file, not a folder" if root.exists() else "does not exist"
        raise MissingFileError(f"COCO annotations folder {str(root)!r} {kind}. {_FIX}")
    for base in (root, root / "annotations"):
        if (base / "instances_val2014.json").is_file() or (base / "captions_val2014.json").is_file():
            break
    else:
        base = root
    found: dict[str, Path] = {}
    for name in ("instances_val2014", "captions_val2014", "instances_train2014", "captions_train2014"):
        if (base / f"{name}.json").is_file():
            found[name] = base / f"{name}.json"
    for required in ("instances_val2014", "captions_val2014"):
        if required not in found:
            present = sorted(p.name for p in base.iterdir())[:12]
            raise MissingFileError(
                f"COCO annotations folder {str(base)!r} has no {required}.json (found: {present or 'nothing'}). "
                f"CHAIR's ground truth needs both instances_val2014.json and captions_val2014.json. {_FIX}"
            )
    return found


def default_cache_dir() -> Path:
    """``$HALLUDEC_CACHE_DIR``, else ``$XDG_CACHE_HOME/halludec``, else ``~/.cache/halludec``; plus ``/chair``."""
    env = os.environ.get("HALLUDEC_CACHE_DIR")
    if env:
        return Path(env).expanduser() / "chair"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "halludec" / "chair"


def load_ground_truth(
    annotations_dir: str | Path,
    *,
    backend: str = "builtin",
    compat_opera_synonyms: bool = False,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
) -> ChairGroundTruth:
    """Ground-truth objects for every image in the COCO 2014 annotation files, cached as JSON.

    Args:
        annotations_dir: Folder with ``instances_val2014.json`` and ``captions_val2014.json`` (train files optional).
        backend: Text backend for the reference captions (``"builtin"`` or ``"nltk"``); use the same as for the
            generated captions.
        compat_opera_synonyms: The synonym setting (see :mod:`halludec.benchmarks.chair_synonyms`).
        cache_dir: Where to keep the JSON cache (default: :func:`default_cache_dir`).
        use_cache: Read and write the cache.

    Returns:
        The ground truth.
    """
    files = find_annotation_files(annotations_dir)
    settings = {"backend": backend, "compat_opera_synonyms": compat_opera_synonyms}
    stamp = [[name, str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for name, p in sorted(files.items())]
    key = hashlib.sha256(json.dumps([CACHE_FORMAT, settings, stamp]).encode()).hexdigest()[:20]
    cache_path = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    cache_file = cache_path / f"chair_gt_{key}.json"
    if use_cache and cache_file.is_file():
        cached = _read_cache(cache_file)
        if cached is not None:
            return cached
    vocabulary = build_vocabulary(compat_opera_synonyms)
    gt = build_ground_truth(files, vocabulary, backend)
    gt.settings = settings
    if use_cache:
        _write_cache(cache_file, gt)
    return gt


def build_ground_truth(files: dict[str, Path], vocabulary: ChairVocabulary, backend: str) -> ChairGroundTruth:
    """Read the annotation files and build the per-image object sets (no cache).

    Args:
        files: From :func:`find_annotation_files`.
        vocabulary: The CHAIR vocabulary.
        backend: Text backend name for the reference captions.

    Returns:
        The ground truth.
    """
    text = make_backend(backend, vocabulary)
    objects: dict[int, set[str]] = {}
    entries = []
    for name in sorted(files, key=lambda n: (not n.startswith("instances"), n)):
        path = files[name]
        coco = _load_coco(path, captions=name.startswith("captions"))
        for image_id in coco["image_ids"]:
            objects.setdefault(image_id, set())
        if name.startswith("instances"):
            for image_id, category in coco["pairs"]:
                if category not in vocabulary.node_word:
                    raise BenchmarkDataError(
                        f"{path}: category {category!r} is not a COCO category of the CHAIR synonym table "
                        f"(known: {', '.join(vocabulary.categories[:5])}, ...). CHAIR needs the COCO 2014 files."
                    )
                objects.setdefault(image_id, set()).add(vocabulary.node_word[category])
        else:
            for image_id, caption in coco["pairs"]:
                found = caption_to_objects(caption, vocabulary, text).node_words
                objects.setdefault(image_id, set()).update(found)
        entries.append({"name": name, "path": str(path), "size": path.stat().st_size, "sha256": sha256_file(path)})
    return ChairGroundTruth(objects={k: frozenset(v) for k, v in objects.items()}, files=entries)


def _load_coco(path: Path, *, captions: bool) -> dict[str, Any]:
    """Read one COCO annotation file; returns image ids and (image_id, category name | caption) pairs."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise BenchmarkDataError(f"{path}: not valid JSON ({err.msg}, line {err.lineno}). {_FIX}") from None
    needed = ("images", "annotations") if captions else ("images", "annotations", "categories")
    if not isinstance(data, dict) or any(k not in data for k in needed):
        have = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise BenchmarkDataError(
            f"{path}: a COCO {'captions' if captions else 'instances'} file needs the fields {list(needed)} "
            f"(found: {have}). {_FIX}"
        )
    field_name = "caption" if captions else "category_id"
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or field_name not in ann:
            raise BenchmarkDataError(
                f"{path}: annotations[{i}] lacks 'image_id' or {field_name!r} ({str(ann)[:80]}). {_FIX}"
            )
    anns, cats, image_ids = _index(data)
    if captions:
        pairs = [(int(a["image_id"]), str(a["caption"])) for a in anns]
    else:
        unknown = sorted({a["category_id"] for a in anns} - set(cats), key=str)
        if unknown:
            raise BenchmarkDataError(
                f"{path}: annotations use category ids {unknown[:5]} that are not in its 'categories' list. {_FIX}"
            )
        pairs = [(int(a["image_id"]), cats[a["category_id"]]) for a in anns]
    return {"image_ids": image_ids, "pairs": pairs}


def _index(data: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[Any, str], list[int]]:
    """Annotations, category id -> name and image ids, through pycocotools when it is installed."""
    try:
        from pycocotools.coco import COCO
    except ImportError:
        cats = {c["id"]: c["name"] for c in data.get("categories", [])}
        return list(data["annotations"]), cats, [int(im["id"]) for im in data["images"]]
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(sys.stderr):  # pycocotools prints progress; keep stdout clean for --json
        coco.createIndex()
    cats = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())} if data.get("categories") else {}
    return coco.loadAnns(coco.getAnnIds()), cats, [int(i) for i in coco.getImgIds()]


def _read_cache(path: Path) -> ChairGroundTruth | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != CACHE_FORMAT:
            return None
        return ChairGroundTruth(
            objects={int(k): frozenset(v) for k, v in data["objects"].items()},
            files=list(data["files"]),
            settings=dict(data["settings"]),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # a damaged cache is rebuilt, never trusted


def _write_cache(path: Path, gt: ChairGroundTruth) -> None:
    payload = {
        "format": CACHE_FORMAT,
        "settings": gt.settings,
        "files": gt.files,
        "objects": {str(k): sorted(v) for k, v in sorted(gt.objects.items())},
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass  # an unwritable cache only costs time
