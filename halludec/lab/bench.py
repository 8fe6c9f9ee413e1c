"""The lab benchmarks' data: held-out scenes, lab-POPE questions (the POPE algorithm) and lab-CHAIR ground truth.

Held-out scene seeds start at :data:`EVAL_SEED_BASE`, far from every training seed (``seed * 10**9 + counter``).

lab-POPE follows the POPE construction (Li et al., 2023, "Evaluating Object Hallucination in Large Vision-Language
Models", RUCAIBox/POPE): per scene up to 3 positives (the first listed objects; fewer when a scene has fewer) and as
many negatives, each positive followed by one negative. Negatives are drawn per split from the kinds absent from the
scene: *random* uniformly; *popular* the most frequent kinds of the held-out set; *adversarial* the kinds that
co-occur most with the scene's objects (here: the absent partners first). Occluded-but-labelled objects count as
present, as in annotation-based ground truth.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from halludec.lab.model import QUESTION
from halludec.lab.scenes import OBJECTS, Scene, sample_scene

EVAL_SEED_BASE = 10**15
VALID_SEED_BASE = 2 * 10**15  # validation scenes (training-time evaluation), disjoint from the benchmark's
POPE_SPLITS = ("random", "popular", "adversarial")
POSITIVES_PER_SCENE = 3


@lru_cache(maxsize=4)
def held_out_scenes(n: int, base: int = EVAL_SEED_BASE) -> tuple[Scene, ...]:
    """The first ``n`` held-out scenes (deterministic).

    Args:
        n: How many.
        base: First seed: :data:`EVAL_SEED_BASE` (the benchmarks) or :data:`VALID_SEED_BASE` (training-time checks).

    Returns:
        Scenes with seeds ``base + i``.
    """
    return tuple(sample_scene(base + i) for i in range(n))


def _image_getter(scene: Scene) -> Any:
    def get() -> Any:
        from PIL import Image

        return Image.fromarray(scene.render())

    return get


def build_lab_pope(
    scenes: tuple[Scene, ...] | list[Scene], splits: tuple[str, ...] = POPE_SPLITS
) -> dict[str, list[Any]]:
    """lab-POPE questions per split.

    Args:
        scenes: Held-out scenes.
        splits: Which splits.

    Returns:
        ``{split: [PopeSample, ...]}``: ids ``"<split>/<question_id>"`` (question ids from 1 in each split), images
        named ``scene-<seed>`` and rendered on demand.
    """
    from halludec.benchmarks.pope_data import PopeSample

    freq = Counter(name for s in scenes for name in set(s.names))
    cooc: dict[str, Counter] = {o: Counter() for o in OBJECTS}
    for s in scenes:
        present = set(s.names)
        for a in present:
            for b in present - {a}:
                cooc[a][b] += 1
    popular_order = sorted(OBJECTS, key=lambda o: (-freq[o], OBJECTS.index(o)))
    out: dict[str, list[Any]] = {}
    for split in splits:
        rows: list[Any] = []
        for s in scenes:
            present = list(dict.fromkeys(s.names))
            positives = present[:POSITIVES_PER_SCENE]
            absent = [o for o in OBJECTS if o not in present]
            if split == "random":
                rng = np.random.Generator(np.random.PCG64([s.seed, 11]))
                picks = [absent[i] for i in rng.choice(len(absent), size=len(positives), replace=False)]
            elif split == "popular":
                picks = [o for o in popular_order if o not in present][: len(positives)]
            elif split == "adversarial":
                score = {o: sum(cooc[p][o] for p in present) for o in absent}
                picks = sorted(absent, key=lambda o: (-score[o], -freq[o], OBJECTS.index(o)))[: len(positives)]
            else:
                raise ValueError(f"Unknown lab-POPE split {split!r}; allowed: {', '.join(POPE_SPLITS)}.")
            getter = _image_getter(s)
            for pos, neg in zip(positives, picks, strict=True):
                for obj, label in ((pos, "yes"), (neg, "no")):
                    qid = len(rows) + 1
                    rows.append(
                        PopeSample(
                            id=f"{split}/{qid}",
                            split=split,
                            question_id=qid,
                            question=QUESTION.format(obj=obj),
                            label=label,
                            image=f"scene-{s.seed}",
                            image_getter=getter,
                        )
                    )
        out[split] = rows
    return out


# ---------------------------------------------------------------------------------------------------------------
# lab-CHAIR
# ---------------------------------------------------------------------------------------------------------------
LAB_SCENES = 500  # held-out scenes of the lab benchmarks (lab-POPE: up to 3 + 3 questions each per split)


@dataclass(frozen=True)
class LabCaptionSample:
    """One lab-CHAIR item: a held-out scene to caption (``image_id`` is the scene seed)."""

    image_id: int

    def load_image(self) -> Any:
        """The rendered scene as a ``PIL.Image``."""
        from PIL import Image

        return Image.fromarray(sample_scene(self.image_id).render())


def lab_chair_samples(limit: int | None = None) -> list[LabCaptionSample]:
    """The lab-CHAIR items: the first ``limit`` (default all :data:`LAB_SCENES`) held-out scenes."""
    n = LAB_SCENES if limit is None else min(limit, LAB_SCENES)
    return [LabCaptionSample(EVAL_SEED_BASE + i) for i in range(n)]


def lab_caption_result(image_id: int, caption: str) -> Any:
    """CHAIR's verdict on a lab caption: every object word (in order, with repetition) against the scene's objects.

    Args:
        image_id: The scene seed.
        caption: The generated caption.

    Returns:
        A :class:`halludec.benchmarks.chair_metrics.CaptionResult`.
    """
    from halludec.benchmarks.chair_metrics import CaptionResult

    words = re.findall(r"[a-z]+|[^a-z\s]", caption.lower())  # [tokens]
    mentioned = tuple(w for w in words if w in _OBJECT_SET)
    gt = frozenset(sample_scene(int(image_id)).names)
    return CaptionResult(
        image_id=int(image_id),
        caption=caption,
        words=mentioned,
        mentioned=mentioned,
        hallucinated=tuple(w for w in mentioned if w not in gt),
        gt=gt,
        n_tokens=len(words),
    )


_OBJECT_SET = frozenset(OBJECTS)


def lab_data_info(benchmark: str, limit: int | None = None) -> Any:
    """The ``benchmark.data`` entry of a lab results record (fingerprint of the generated rows).

    Args:
        benchmark: ``lab-pope`` or ``lab-chair``.
        limit: The run's limit (per split for lab-POPE).

    Returns:
        A :class:`halludec.benchmarks.results.DataInfo`.
    """
    from halludec.benchmarks.fingerprint import sha256_rows
    from halludec.benchmarks.results import DataInfo

    scenes = held_out_scenes(LAB_SCENES)
    if benchmark == "lab-pope":
        rows = [[s.id, s.image, s.question, s.label] for split in build_lab_pope(scenes).values() for s in split]
    else:
        rows = [[s.seed, sorted(s.names)] for s in scenes]
    return DataInfo(path="halludec.lab", sha256=sha256_rows(rows), variant=f"{LAB_VERSION} ({LAB_SCENES} scenes)")


LAB_VERSION = "lab-v1"
