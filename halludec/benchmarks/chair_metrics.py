"""CHAIR metrics (Rohrbach et al., 2018) as computed by shikiw/OPERA:chair.py, plus PAI's object precision/F1 and
bootstrap 95 % intervals over captions.

Per caption: the mentioned objects (with repetition) and the image's ground truth. Then

- ``chair_s`` = captions with >= 1 hallucinated mention / captions (lower is better);
- ``chair_i`` = hallucinated mentions / all mentions, summed over captions (lower is better);
- ``recall`` = sum |distinct mentioned objects in GT| / sum |GT| (OPERA's addition; higher is better);
- ``precision`` = sum |distinct mentioned objects in GT| / sum |distinct mentioned objects| and ``f1`` from the two
  (LALBJ/PAI:chair.py; higher is better);
- ``len`` = mean tokens per caption after pair merging, punctuation included (OPERA stores 0.01 x this; halludec
  reports plain tokens).

Values are fractions in [0, 1] (papers print them x 100). Intervals: percentile bootstrap over captions (one caption
per image in the standard protocol), seeded, 1000 resamples by default.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from halludec.benchmarks.chair_synonyms import ChairVocabulary
from halludec.benchmarks.chair_text import TextBackend, caption_to_objects
from halludec.benchmarks.results import Metric

CHAIR_DEFAULT_PROMPT = "Please describe this image in detail."
CHAIR_DEFAULT_MAX_NEW_TOKENS = 512
DIRECTIONS = {
    "chair_s": False,
    "chair_i": False,
    "recall": True,
    "precision": True,
    "f1": True,
    "len": None,
    "n_captions": None,
}


@dataclass(frozen=True)
class CaptionResult:
    """CHAIR's verdict on one caption (the per-sample JSONL row, see :meth:`to_row`).

    Attributes:
        image_id: The COCO image id.
        caption: The generated caption.
        words: Matched synonym entries, in order, with repetition.
        mentioned: Their node words (COCO categories), aligned with ``words``.
        hallucinated: The node words of mentions not in the ground truth, with repetition.
        gt: The image's ground-truth objects.
        n_tokens: Tokens after pair merging (for ``len``).
    """

    image_id: int
    caption: str
    words: tuple[str, ...]
    mentioned: tuple[str, ...]
    hallucinated: tuple[str, ...]
    gt: frozenset[str]
    n_tokens: int

    @property
    def recalled(self) -> set[str]:
        """Distinct mentioned objects that are in the ground truth."""
        return {w for w in self.mentioned if w in self.gt}

    def to_row(self) -> dict[str, object]:
        """The per-sample JSONL row (``image_id``, ``caption``, ``mentioned``, ``hallucinated``, ...)."""
        return {
            "image_id": self.image_id,
            "caption": self.caption,
            "mentioned": list(self.mentioned),
            "hallucinated": list(self.hallucinated),
            "words": list(self.words),
            "gt_objects": sorted(self.gt),
            "n_tokens": self.n_tokens,
        }


def evaluate_caption(
    image_id: int, caption: str, gt: frozenset[str] | set[str], vocabulary: ChairVocabulary, backend: TextBackend
) -> CaptionResult:
    """Score one caption against its image's ground truth.

    Args:
        image_id: The image id.
        caption: The generated caption.
        gt: Ground-truth node words of the image.
        vocabulary: The CHAIR vocabulary.
        backend: The text backend.

    Returns:
        The caption's result.
    """
    found = caption_to_objects(caption, vocabulary, backend)
    gt = frozenset(gt)
    return CaptionResult(
        image_id=image_id,
        caption=caption,
        words=found.words,
        mentioned=found.node_words,
        hallucinated=tuple(w for w in found.node_words if w not in gt),
        gt=gt,
        n_tokens=len(found.tokens),
    )


def _counts(results: Sequence[CaptionResult]) -> dict[str, np.ndarray]:
    return {
        "hallucinated_caption": np.array([bool(r.hallucinated) for r in results], dtype=float),
        "hallucinated": np.array([len(r.hallucinated) for r in results], dtype=float),
        "mentions": np.array([len(r.mentioned) for r in results], dtype=float),
        "recalled": np.array([len(r.recalled) for r in results], dtype=float),
        "gt": np.array([len(r.gt) for r in results], dtype=float),
        "distinct": np.array([len(set(r.mentioned)) for r in results], dtype=float),
        "tokens": np.array([r.n_tokens for r in results], dtype=float),
    }


def _ratios(sums: dict[str, np.ndarray], n: np.ndarray | float) -> dict[str, np.ndarray]:
    """Metric values from (possibly batched) sums; NaN where a denominator is 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        chair_s = sums["hallucinated_caption"] / n
        chair_i = np.where(sums["mentions"] > 0, sums["hallucinated"] / sums["mentions"], np.nan)
        recall = np.where(sums["gt"] > 0, sums["recalled"] / sums["gt"], np.nan)
        precision = np.where(sums["distinct"] > 0, sums["recalled"] / sums["distinct"], np.nan)
        denom = precision + recall
        f1 = np.where(denom > 0, 2 * precision * recall / denom, 0.0)
        f1 = np.where(np.isnan(denom), np.nan, f1)
        length = sums["tokens"] / n
    return {"chair_s": chair_s, "chair_i": chair_i, "recall": recall, "precision": precision, "f1": f1, "len": length}


def chair_metrics(
    results: Sequence[CaptionResult], *, n_bootstrap: int = 1000, seed: int = 0
) -> tuple[dict[str, Metric], list[str]]:
    """CHAIR_s, CHAIR_i, recall, precision, F1 and length over captions, with bootstrap 95 % intervals.

    Args:
        results: Per-caption results.
        n_bootstrap: Bootstrap resamples over captions (0 turns the intervals off).
        seed: Seed of the bootstrap.

    Returns:
        ``(metrics, notes)``; a metric whose denominator is 0 has value ``None`` and a note says why.
    """
    notes: list[str] = []
    n = len(results)
    if n == 0:
        return {name: Metric(None, d) for name, d in DIRECTIONS.items()}, ["no captions to score"]
    counts = _counts(results)
    point = _ratios({k: v.sum() for k, v in counts.items()}, float(n))
    intervals: dict[str, tuple[float, float] | None] = dict.fromkeys(point)
    if n_bootstrap > 0:
        rng = np.random.default_rng(seed)
        chunk = max(1, 2_000_000 // n)  # bound memory: at most ~2M indices per step
        sums: dict[str, list[np.ndarray]] = {k: [] for k in counts}
        for start in range(0, n_bootstrap, chunk):
            idx = rng.integers(0, n, size=(min(chunk, n_bootstrap - start), n))  # [resamples, captions]
            for k, v in counts.items():
                sums[k].append(v[idx].sum(axis=1))
        boot = _ratios({k: np.concatenate(v) for k, v in sums.items()}, float(n))
        for name, values in boot.items():
            finite = values[~np.isnan(values)]
            if finite.size:
                intervals[name] = (float(np.percentile(finite, 2.5)), float(np.percentile(finite, 97.5)))
    metrics: dict[str, Metric] = {}
    for name, value in point.items():
        v = float(value)
        if np.isnan(v):
            notes.append(f"{name} is undefined (its denominator is 0: no object mentions or no ground truth)")
            metrics[name] = Metric(None, DIRECTIONS[name])
        else:
            metrics[name] = Metric(v, DIRECTIONS[name], intervals[name])
    metrics["n_captions"] = Metric(float(n), None)
    return metrics, notes
