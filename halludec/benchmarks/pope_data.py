"""POPE loaders: the released question files with a COCO val2014 image folder, and ``lmms-lab/POPE`` parquet files
(on disk or from the hub) through ``datasets``. Every source is fingerprinted and its variant recognised.

Question files (RUCAIBox/POPE:output/coco/*.json, also OPERA's and VCD's copies) are JSONL although named ``.json``:
``{"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the image?",
"label": "yes"}``; a JSON array of such objects is accepted too. The split comes from the file name
(``coco_pope_random.json``) or the ``split`` argument. ``lmms-lab/POPE`` rows have ``question_id, question, answer,
image_source, image, category`` (category = split).
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from halludec.benchmarks.errors import BenchmarkDataError, MissingFileError, did_you_mean
from halludec.benchmarks.fingerprint import sha256_file, sha256_rows
from halludec.benchmarks.pope_metrics import POPE_SPLITS, order_splits
from halludec.benchmarks.pope_parsers import normalize_label
from halludec.benchmarks.pope_variants import SplitVariant, identify_split, summarize_variant
from halludec.benchmarks.results import DataInfo

POPE_DEFAULT_PROMPT = "{question}\nAnswer the question using a single word or phrase."
POPE_DEFAULT_MAX_NEW_TOKENS = 128
POPE_HF_ID = "lmms-lab/POPE"
QUESTION_FIELDS = ("question_id", "image", "text", "label")
HF_FIELDS = ("question_id", "question", "answer")
_EXAMPLE = (
    '{"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the image?", '
    '"label": "yes"}'
)


@dataclass
class PopeSample:
    """One POPE question.

    Attributes:
        id: Unique across splits: ``"<split>/<question_id>"`` (the per-sample JSONL ``id``).
        split: random, popular or adversarial.
        question_id: The id in the source file (restarts in every split).
        question: The question text.
        label: ``"yes"`` or ``"no"``.
        image: The image file name (or ``image_source`` for HF rows).
        image_path: The image file, when an image folder was given.
    """

    id: str
    split: str
    question_id: int | str
    question: str
    label: str
    image: str
    image_path: str | None = None
    image_getter: Callable[[], Any] | None = field(default=None, repr=False, compare=False)

    def load_image(self) -> Any:
        """The image as an RGB ``PIL.Image``.

        Raises:
            BenchmarkDataError: when the sample has no image source (no image folder was given).
        """
        from PIL import Image

        if self.image_getter is not None:
            return self.image_getter().convert("RGB")
        if self.image_path is None:
            raise BenchmarkDataError(
                f"POPE sample {self.id} ({self.image}) has no image: pass image_dir= (the COCO val2014 folder) "
                "when loading question files."
            )
        with Image.open(self.image_path) as img:
            return img.convert("RGB")

    def to_row(self) -> dict[str, Any]:
        """The per-sample fields a runner writes before adding ``answer`` and ``pred``."""
        return {"id": self.id, "split": self.split, "question": self.question, "label": self.label, "image": self.image}


@dataclass
class PopeData:
    """Loaded POPE questions with provenance.

    Attributes:
        samples: The questions, split by split in the usual order.
        source: What was loaded (path or hub id).
        files: One entry per file or hub split: path, split, sha256, content_sha256, n_rows, variant.
        split_variants: Variant recognition per split.
        variant: The variant name for the whole set (see :func:`summarize_variant`).
    """

    samples: list[PopeSample]
    source: str
    files: list[dict[str, Any]]
    split_variants: list[SplitVariant]
    variant: str

    @property
    def splits(self) -> list[str]:
        """Splits present, in the usual order."""
        return order_splits({s.split for s in self.samples})

    def data_info(self) -> DataInfo:
        """The ``benchmark.data`` entry of a results record (one file's sha256, or a combined one)."""
        shas = [f["sha256"] for f in self.files]
        sha = shas[0] if len(shas) == 1 else sha256_rows([[f["split"], f["sha256"]] for f in self.files])
        return DataInfo(path=self.source, sha256=sha, variant=self.variant, files=[dict(f) for f in self.files])


def split_from_name(name: str) -> str | None:
    """The POPE split named in a file name (``coco_pope_adversarial.json`` -> adversarial), else ``None``."""
    found = [s for s in POPE_SPLITS if re.search(rf"(^|[^a-z]){s}([^a-z]|$)", name.lower())]
    return found[0] if len(found) == 1 else None


def check_split(value: object, where: str) -> str:
    """Validate a split name.

    Args:
        value: The split.
        where: Where it was read, for the error.

    Returns:
        The split.

    Raises:
        BenchmarkDataError: naming the value, the allowed splits and a close match.
    """
    if value in POPE_SPLITS:
        return str(value)
    raise BenchmarkDataError(
        f"{where}: unknown POPE split {value!r}.{did_you_mean(value, POPE_SPLITS)} Allowed: {', '.join(POPE_SPLITS)}."
    )


def read_question_file(path: str | Path, split: str | None = None) -> tuple[str, list[dict[str, Any]]]:
    """Read and validate one POPE question file.

    Args:
        path: A JSONL (or JSON array) question file.
        split: The split; inferred from the file name when ``None``.

    Returns:
        ``(split, rows)`` with labels normalised to yes/no.

    Raises:
        MissingFileError / BenchmarkDataError: naming the file, the line and the field.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise MissingFileError(f"POPE question file {str(p)!r} does not exist; check the path.")
    split = split or split_from_name(p.name)
    if split is None:
        raise BenchmarkDataError(
            f"{p}: cannot tell the POPE split from the file name; pass split='random'|'popular'|'adversarial' "
            "or name the file like coco_pope_random.json."
        )
    check_split(split, str(p))
    text = p.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            items = list(enumerate(json.loads(text), start=1))
        except json.JSONDecodeError as err:
            raise BenchmarkDataError(f"{p}: not valid JSON ({err.msg}, line {err.lineno}).") from None
        unit = "item"
    else:
        items = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    items.append((number, json.loads(line)))
                except json.JSONDecodeError as err:
                    raise BenchmarkDataError(
                        f"{p}, line {number}: not valid JSON ({err.msg}). POPE lines look like {_EXAMPLE}"
                    ) from None
        unit = "line"
    rows = []
    for number, row in items:
        where = f"{p}, {unit} {number}"
        if not isinstance(row, dict):
            raise BenchmarkDataError(f"{where}: expected a JSON object like {_EXAMPLE}")
        missing = [k for k in QUESTION_FIELDS if k not in row]
        if missing:
            raise BenchmarkDataError(
                f"{where}: missing field {missing[0]!r} (fields present: {sorted(row)}). Every POPE line needs "
                f"{', '.join(QUESTION_FIELDS)}, e.g. {_EXAMPLE}. Use the released files (RUCAIBox/POPE output/coco)."
            )
        rows.append({**row, "label": normalize_label(row["label"], where)})
    if not rows:
        raise BenchmarkDataError(f"{p}: the file has no questions.")
    return split, rows


def load_pope(
    source: str | Path = POPE_HF_ID,
    *,
    splits: Sequence[str] | None = None,
    image_dir: str | Path | None = None,
    limit: int | None = None,
    split: str | None = None,
    hf_config: str | None = None,
    cache_dir: str | Path | None = None,
) -> PopeData:
    """Load POPE questions from question files, parquet files or the hub.

    Args:
        source: A question file, a folder of question files (``*_pope_{split}.json``), a parquet file or a folder of
            parquet files (``lmms-lab/POPE`` on disk), or a hub dataset id (default ``lmms-lab/POPE``, needs
            internet and ``datasets``).
        splits: Splits to keep (default: all found), from random, popular, adversarial.
        image_dir: The COCO val2014 folder for question files (images are checked to exist).
        limit: Keep the first ``limit`` questions of each split (variants are recognised on the full split).
        split: The split of a single question file whose name does not say it.
        hf_config: Hub config name (``lmms-lab/POPE``: ``default`` or ``Full``).
        cache_dir: ``datasets`` cache folder for parquet and hub loading.

    Returns:
        The questions with fingerprints and variant names.
    """
    wanted = [check_split(s, "splits") for s in splits] if splits else None
    if limit is not None and limit < 1:
        raise BenchmarkDataError(f"limit={limit} must be a positive number of questions per split (or None for all).")
    path = Path(str(source)).expanduser()
    if path.exists():
        parquet = [path] if path.suffix == ".parquet" else sorted(path.rglob("*.parquet")) if path.is_dir() else []
        if parquet:
            from halludec.benchmarks.pope_hf import load_parquet_files

            groups = load_parquet_files(parquet, cache_dir=cache_dir)
        else:
            groups = _question_groups(path, split, wanted)
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)):
        from halludec.benchmarks.pope_hf import load_hub

        groups = load_hub(str(source), config=hf_config, cache_dir=cache_dir)
    else:
        raise MissingFileError(
            f"POPE source {str(source)!r} is not an existing file or folder, nor a hub id like 'lmms-lab/POPE'. "
            "Pass the folder of POPE question files (e.g. RUCAIBox/POPE output/coco), one file, or parquet files."
        )
    return _assemble(str(source), groups, wanted, image_dir, limit)


def _question_groups(path: Path, split: str | None, wanted: list[str] | None) -> list[dict[str, Any]]:
    if path.is_file():
        real_split, rows = read_question_file(path, split)
        return [{"split": real_split, "rows": rows, "path": str(path), "sha256": sha256_file(path)}]
    files = [p for p in sorted(path.iterdir()) if p.suffix in (".json", ".jsonl")]
    by_split: dict[str, list[Path]] = {}
    for f in files:
        s = split_from_name(f.name)
        if s is not None:
            by_split.setdefault(s, []).append(f)
    if not by_split:
        raise MissingFileError(
            f"{path}: no POPE question files found (looked for *random*.json, *popular*.json, *adversarial*.json "
            f"and *.jsonl; found: {[f.name for f in files][:10] or 'nothing'}). Point at RUCAIBox/POPE output/coco."
        )
    for s in wanted or []:
        if s not in by_split:
            raise MissingFileError(
                f"{path}: no question file for split {s!r} (found splits: {order_splits(by_split)}). "
                f"Add the file (e.g. coco_pope_{s}.json) or drop the split."
            )
    for s, fs in by_split.items():
        if len(fs) > 1 and (wanted is None or s in wanted):
            raise BenchmarkDataError(
                f"{path}: several files for split {s!r}: {[f.name for f in fs]}. Point at one dataset's folder "
                "(e.g. coco/ rather than its parent) or at a single file."
            )
    groups = []
    for s, fs in by_split.items():
        if wanted and s not in wanted:
            continue
        real_split, rows = read_question_file(fs[0], s)
        groups.append({"split": real_split, "rows": rows, "path": str(fs[0]), "sha256": sha256_file(fs[0])})
    return groups


def _assemble(
    source: str, groups: list[dict[str, Any]], wanted: list[str] | None, image_dir: str | Path | None, limit: int | None
) -> PopeData:
    """Turn groups ``{split, rows (question-file fields), path, sha256, getters?}`` into :class:`PopeData`."""
    groups = [g for g in groups if not wanted or g["split"] in wanted]
    if wanted:
        missing = [s for s in wanted if s not in {g["split"] for g in groups}]
        if missing:
            raise BenchmarkDataError(
                f"{source}: no questions for split(s) {missing}; found {[g['split'] for g in groups]}."
            )
    root = Path(image_dir).expanduser() if image_dir is not None else None
    if root is not None and not root.is_dir():
        raise MissingFileError(
            f"POPE image folder {str(root)!r} does not exist. Pass the COCO val2014 folder (COCO_val2014_*.jpg files)."
        )
    samples, files, variants = [], [], []
    for g in sorted(groups, key=lambda g: order_splits([x["split"] for x in groups]).index(g["split"])):
        rows = g["rows"]
        variant = identify_split(g["split"], [(r["image"], r["text"], r["label"]) for r in rows])
        variants.append(variant)
        files.append(
            {
                "path": g["path"],
                "split": g["split"],
                "sha256": g["sha256"],
                "content_sha256": variant.content_sha256,
                "n_rows": len(rows),
                "variant": ",".join(variant.variants) or "unknown",
                "exact": variant.exact,
                "description": variant.description,
            }
        )
        getters = g.get("getters")
        for i, r in enumerate(rows[:limit] if limit else rows):
            image_path = str(root / r["image"]) if root is not None else None
            samples.append(
                PopeSample(
                    id=f"{g['split']}/{r['question_id']}",
                    split=g["split"],
                    question_id=r["question_id"],
                    question=r["text"],
                    label=r["label"],
                    image=str(r["image"]),
                    image_path=image_path,
                    image_getter=getters[i] if getters else None,
                )
            )
    if root is not None:
        absent = sorted({s.image for s in samples if not (root / s.image).is_file()})
        if absent:
            raise MissingFileError(
                f"POPE image folder {str(root)!r} lacks {len(absent)} image(s) the questions use, e.g. {absent[:3]}. "
                "Pass the COCO val2014 folder (it holds COCO_val2014_*.jpg)."
            )
    if not samples:
        raise BenchmarkDataError(f"{source}: no POPE questions were loaded; check the source and the splits.")
    return PopeData(samples, source, files, variants, summarize_variant(variants))


def image_from_cell(cell: Any) -> Any:
    """A ``PIL.Image`` from a ``datasets`` image cell (``{"bytes", "path"}``), raw bytes or a decoded image."""
    from PIL import Image

    if isinstance(cell, dict):
        if cell.get("bytes"):
            return Image.open(io.BytesIO(cell["bytes"]))
        if cell.get("path"):
            return Image.open(cell["path"])
    if isinstance(cell, bytes | bytearray):
        return Image.open(io.BytesIO(cell))
    if hasattr(cell, "convert"):
        return cell
    raise BenchmarkDataError(f"Cannot read an image from a value of type {type(cell).__name__}.")
