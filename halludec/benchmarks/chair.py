"""CHAIR end to end: captions + COCO annotations -> metrics, per-caption rows and the settings used.

See :mod:`~halludec.benchmarks.chair_synonyms` (table, rules, the leading-space switch),
:mod:`~halludec.benchmarks.chair_text` (text backends), :mod:`~halludec.benchmarks.chair_gt` (ground truth and its
JSON cache), :mod:`~halludec.benchmarks.chair_ids` (image lists) and :mod:`~halludec.benchmarks.chair_metrics`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from halludec.benchmarks.chair_gt import ChairGroundTruth, load_ground_truth
from halludec.benchmarks.chair_ids import ids_sha256, parse_image_id, resolve_image_list
from halludec.benchmarks.chair_metrics import CaptionResult, chair_metrics, evaluate_caption
from halludec.benchmarks.chair_synonyms import build_vocabulary
from halludec.benchmarks.chair_text import make_backend
from halludec.benchmarks.errors import BenchmarkDataError, MissingFileError
from halludec.benchmarks.results import Metric


@dataclass(frozen=True)
class ChairSample:
    """One CHAIR image for a runner: the id (the per-sample JSONL ``image_id``) and its file."""

    image_id: int
    image_path: str

    def load_image(self) -> Any:
        """The image as an RGB ``PIL.Image``."""
        from PIL import Image

        with Image.open(self.image_path) as img:
            return img.convert("RGB")


def load_chair_samples(
    image_list: str | Path, image_dir: str | Path, *, pool: Sequence[int] | None = None, limit: int | None = None
) -> list[ChairSample]:
    """The images a CHAIR run captions, in list order, with their files checked.

    Args:
        image_list: ``opera_compat``, ``halludec_default`` (needs ``pool``: the val2014 ids, e.g.
            ``load_ground_truth(...).image_ids``) or a file of ids.
        image_dir: The COCO val2014 folder (``COCO_val2014_<12-digit id>.jpg``).
        pool: Candidate ids for ``halludec_default``.
        limit: Keep the first ``limit`` images.

    Returns:
        The samples.

    Raises:
        MissingFileError: naming the folder and the first missing images.
    """
    ids = resolve_image_list(image_list, pool=pool)[:limit]
    root = Path(image_dir).expanduser()
    if not root.is_dir():
        raise MissingFileError(f"COCO image folder {str(root)!r} does not exist; pass the val2014 folder.")
    samples = [ChairSample(i, str(root / f"COCO_val2014_{i:012d}.jpg")) for i in ids]
    absent = [Path(s.image_path).name for s in samples if not Path(s.image_path).is_file()]
    if absent:
        raise MissingFileError(
            f"COCO image folder {str(root)!r} lacks {len(absent)} of the {len(samples)} listed images, e.g. "
            f"{absent[:3]}. Pass the val2014 folder (COCO_val2014_*.jpg)."
        )
    return samples


@dataclass
class ChairScore:
    """CHAIR's output.

    Attributes:
        metrics: chair_s, chair_i, recall, precision, f1, len (with 95 % intervals) and n_captions.
        results: One :class:`CaptionResult` per scored caption, in input order.
        notes: Warnings that affect the numbers (skipped ids, undefined metrics, ...).
        settings: Everything needed to reproduce: backend, synonym setting, bootstrap, image list, files.
    """

    metrics: dict[str, Metric]
    results: list[CaptionResult]
    notes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)


def score_chair(
    captions: Sequence[tuple[int | str, str]],
    *,
    annotations: str | Path | None = None,
    ground_truth: ChairGroundTruth | None = None,
    backend: str = "builtin",
    compat_opera_synonyms: bool = False,
    image_list: str | Path | None = None,
    skip_unknown: bool = False,
    n_bootstrap: int = 1000,
    seed: int = 0,
    cache_dir: str | Path | None = None,
) -> ChairScore:
    """Score generated captions with CHAIR.

    Args:
        captions: ``(image_id, caption)`` pairs; ids may be ints or COCO file names.
        annotations: COCO annotations folder (``instances_val2014.json`` + ``captions_val2014.json``).
        ground_truth: A prebuilt ground truth instead of ``annotations`` (must use the same backend and setting).
        backend: ``"builtin"`` (default, no data needed) or ``"nltk"`` (exact reference behaviour).
        compat_opera_synonyms: Reproduce the released synonym quirks (see chair_synonyms).
        image_list: Restrict to a list: ``opera_compat``, ``halludec_default`` or a file of ids. Captions of other
            images are dropped (noted); listed images without a caption are noted.
        skip_unknown: Drop captions whose image is not in the annotations (noted) instead of raising.
        n_bootstrap: Bootstrap resamples for the 95 % intervals (0 = none).
        seed: Bootstrap seed.
        cache_dir: Ground-truth cache folder.

    Returns:
        Metrics, per-caption results, notes and settings.

    Raises:
        BenchmarkDataError: for unknown image ids (unless ``skip_unknown``), a missing annotations folder, or a
            ground truth built with other settings.
    """
    if ground_truth is None:
        if annotations is None:
            raise BenchmarkDataError(
                "CHAIR needs COCO ground truth: pass annotations=<folder with instances_val2014.json and "
                "captions_val2014.json> (CLI: --annotations DIR)."
            )
        ground_truth = load_ground_truth(
            annotations, backend=backend, compat_opera_synonyms=compat_opera_synonyms, cache_dir=cache_dir
        )
    wanted = {"backend": backend, "compat_opera_synonyms": compat_opera_synonyms}
    if ground_truth.settings and any(ground_truth.settings.get(k) != v for k, v in wanted.items()):
        raise BenchmarkDataError(
            f"The ground truth was built with {ground_truth.settings}, but scoring uses {wanted}; rebuild it with "
            "the same backend and synonym setting (load_ground_truth(..., backend=..., compat_opera_synonyms=...))."
        )
    vocabulary = build_vocabulary(compat_opera_synonyms)
    text = make_backend(backend, vocabulary)
    pairs = [(parse_image_id(i, f"caption {n}"), str(c)) for n, (i, c) in enumerate(captions)]
    notes: list[str] = []
    settings: dict[str, Any] = {
        **wanted,
        "n_bootstrap": n_bootstrap,
        "bootstrap_seed": seed,
        "ground_truth_files": ground_truth.files,
    }
    if image_list is not None:
        listed = resolve_image_list(image_list, pool=ground_truth.image_ids)
        listed_set = set(listed)
        outside = [i for i, _ in pairs if i not in listed_set]
        pairs = [(i, c) for i, c in pairs if i in listed_set]
        without = len(listed_set - {i for i, _ in pairs})
        if outside:
            notes.append(f"{len(outside)} caption(s) of images outside the image list were dropped (e.g. {outside[0]})")
        if without:
            notes.append(f"{without} image(s) of the list have no caption")
        settings["image_list"] = {"name": str(image_list), "n": len(listed), "sha256": ids_sha256(listed)}
    unknown = sorted({i for i, _ in pairs if i not in ground_truth.objects})
    if unknown and not skip_unknown:
        raise BenchmarkDataError(
            f"{len(unknown)} image id(s) are not in the COCO annotations, e.g. {unknown[:5]}. CHAIR scores COCO "
            "val2014 images; check the image_id field (an integer id or a COCO file name), or pass "
            "skip_unknown=True (CLI: --skip-unknown) to drop them; the reference code silently scores them against "
            "an empty ground truth."
        )
    if unknown:
        pairs = [(i, c) for i, c in pairs if i in ground_truth.objects]
        notes.append(f"{len(unknown)} image id(s) not in the annotations were skipped: {unknown[:10]}")
        settings["skipped_unknown_ids"] = unknown
    repeated = [i for i, k in Counter(i for i, _ in pairs).items() if k > 1]
    if repeated:
        notes.append(f"{len(repeated)} image id(s) have several captions (each is scored), e.g. {repeated[0]}")
    results = [evaluate_caption(i, c, ground_truth.objects[i], vocabulary, text) for i, c in pairs]
    metrics, metric_notes = chair_metrics(results, n_bootstrap=n_bootstrap, seed=seed)
    return ChairScore(metrics, results, notes + metric_notes, settings)
