"""``lmms-lab/POPE`` through ``datasets``: parquet files on disk, or the hub for users who are online.

The dataset's features are ``id, question_id, question, answer, image_source, image, category`` (benchmarks.md
§1.3): config ``default`` has one split ``test`` of 9000 rows, config ``Full`` has splits random/popular/adversarial;
``category`` holds the POPE split. Rows are mapped to the question-file fields (``text`` = question, ``label`` =
answer, ``image`` = image_source) and images stay undecoded until a sample's ``load_image()``.

Fingerprints: each parquet file's sha256; for hub data, the sha256 of the canonical non-image rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from halludec.benchmarks.errors import BenchmarkDataError
from halludec.benchmarks.fingerprint import sha256_file, sha256_rows
from halludec.benchmarks.pope_data import HF_FIELDS, check_split, image_from_cell, split_from_name
from halludec.benchmarks.pope_metrics import POPE_SPLITS
from halludec.benchmarks.pope_parsers import normalize_label


def _datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise BenchmarkDataError(
            "Loading POPE parquet files or the hub dataset needs the 'datasets' package: "
            "pip install 'halludec[bench]' (or pip install datasets)."
        ) from None
    return datasets


def load_parquet_files(files: Sequence[Path], *, cache_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Read ``lmms-lab/POPE``-style parquet files.

    Args:
        files: Parquet files (one dataset's shards).
        cache_dir: ``datasets`` cache folder.

    Returns:
        One group per (file, split): ``{split, rows, path, sha256, getters}``.
    """
    datasets = _datasets()
    groups: list[dict[str, Any]] = []
    for f in files:
        ds = datasets.load_dataset(
            "parquet", data_files=str(f), split="train", cache_dir=str(cache_dir) if cache_dir else None
        )
        groups += _groups_from_dataset(ds, str(f), split_from_name(f.name), sha256_file(f))
    return _merge_shards(groups)


def load_hub(
    dataset_id: str, *, config: str | None = None, cache_dir: str | Path | None = None
) -> list[dict[str, Any]]:
    """Load a POPE dataset from the Hugging Face hub (needs internet on first use).

    Args:
        dataset_id: e.g. ``lmms-lab/POPE`` (moved to ``lmms-lab-encoder/POPE`` by lmms-eval).
        config: ``default`` (one ``test`` split, 9000 rows) or ``Full`` (per-split).
        cache_dir: ``datasets`` cache folder.

    Returns:
        One group per split.
    """
    datasets = _datasets()
    try:
        dd = datasets.load_dataset(dataset_id, name=config, cache_dir=str(cache_dir) if cache_dir else None)
    except Exception as err:  # network, auth or a wrong id: say which and how to work offline
        raise BenchmarkDataError(
            f"Could not load {dataset_id!r} (config {config!r}) from the hub: {type(err).__name__}: {err}. "
            "Offline, download its parquet files once and pass their folder instead."
        ) from err
    groups: list[dict[str, Any]] = []
    for split_name, ds in dd.items():
        fallback = split_name if split_name in POPE_SPLITS else None
        meta_rows = _meta_rows(ds)
        groups += _groups_from_dataset(ds, f"{dataset_id}:{split_name}", fallback, sha256_rows(meta_rows))
    return _merge_shards(groups)


def _meta_rows(ds: Any) -> list[dict[str, Any]]:
    return ds.remove_columns([c for c in ds.column_names if c == "image"]).to_list()


def _groups_from_dataset(ds: Any, where: str, fallback_split: str | None, sha: str) -> list[dict[str, Any]]:
    columns = list(ds.column_names)
    missing = [c for c in HF_FIELDS if c not in columns]
    if missing:
        raise BenchmarkDataError(
            f"{where}: missing column {missing[0]!r} (columns: {columns}). lmms-lab/POPE parquet files have "
            "question_id, question, answer, image_source, image, category."
        )
    if "category" not in columns and fallback_split is None:
        raise BenchmarkDataError(
            f"{where}: no 'category' column and no split in the file name; name the file after its split "
            "(e.g. random-00000.parquet) or add the category column."
        )
    image_ds = None
    if "image" in columns:
        image_ds = ds.select_columns(["image"])
        feature = image_ds.features["image"]
        if type(feature).__name__ == "Image":
            image_ds = image_ds.cast_column("image", type(feature)(decode=False))
    by_split: dict[str, dict[str, Any]] = {}
    for i, rec in enumerate(_meta_rows(ds)):
        row_where = f"{where}, row {i}"
        split = check_split(rec.get("category") or fallback_split, row_where)
        image = rec.get("image_source") or rec.get("image_path") or f"{split}-{rec['question_id']}"
        row = {
            "question_id": rec["question_id"],
            "image": str(image),
            "text": str(rec["question"]),
            "label": normalize_label(rec["answer"], row_where),
        }
        group = by_split.setdefault(split, {"split": split, "rows": [], "path": where, "sha256": sha, "getters": []})
        group["rows"].append(row)
        group["getters"].append(_getter(image_ds, i) if image_ds is not None else None)
    return list(by_split.values())


def _getter(image_ds: Any, index: int) -> Callable[[], Any]:
    def load() -> Any:
        return image_from_cell(image_ds[index]["image"])

    return load


def _merge_shards(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Join groups of the same split (a split spread over several shards) in file order."""
    merged: dict[str, dict[str, Any]] = {}
    for g in groups:
        if g["split"] not in merged:
            merged[g["split"]] = {**g, "rows": list(g["rows"]), "getters": list(g["getters"])}
            continue
        m = merged[g["split"]]
        m["rows"] += g["rows"]
        m["getters"] += g["getters"]
        if g["path"] not in m["path"].split(" + "):
            m["path"] += " + " + g["path"]
            m["sha256"] = sha256_rows([m["sha256"], g["sha256"]])
    for g in merged.values():
        if all(x is None for x in g["getters"]):
            g["getters"] = None
    return list(merged.values())
