"""Released POPE question files in circulation, recognised by content and named (benchmarks.md §1.3, §11).

The same "POPE" name covers different files. Facts below were read from the repositories at these commits:
RUCAIBox/POPE 3df3ba1 (history: 28f884a 2023-05-31, 7ef3026 2023-08-04, e3e3926 2023-08-10, edebdda 2023-10-09,
109985c 2023-11-16), shikiw/OPERA 61426ef (``pope_coco/``), DAMO-NLP-SG/VCD d6568ff
(``experiments/data/POPE/{coco,aokvqa,gqa}/``). LLaVA's ``llava_pope_test.jsonl`` was built from POPE e3e3926
(haotian-liu/LLaVA#626).

Named variants (``n`` rows / ``imange`` rows per split random, popular, adversarial; 1500 yes-labels each):

- ``pope_3000``: the current RUCAIBox/POPE ``output/coco`` files (109985c): 3000/0, 3000/0, 3000/0.
- ``opera_2910``: POPE e3e3926 (same files as 28f884a), shipped by OPERA ``pope_coco/`` and behind LLaVA's
  8910-question file: 2910/144 (1500 yes, 1410 no), 3000/44, 3000/58. The "imange" rows carry the template typo
  ("...in the imange?") from replacing "a" with "an" throughout the template.
- ``vcd_imange``: POPE edebdda, shipped by VCD ``coco/``: random and popular have the same items as ``pope_3000``;
  adversarial has 57 "imange" rows (3000/0, 3000/0, 3000/57).
- ``pope_7ef3026``: a short-lived POPE version (2023-08-04) with other images, ``image_id`` fields and ids from 0.
- ``vcd_aokvqa``, ``vcd_gqa``: VCD's A-OKVQA and GQA splits (3000 rows, 500 images each).

Recognition uses a content hash (sha256 of ``json.dumps([image, text, label])`` lines in file order), so line endings
(POPE's current popular/adversarial files use CRLF, VCD's LF) and key order do not matter. Files that match no known
content are classified by their row and typo counts, and reported as such.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# content sha256 -> (variants having exactly this split file, split, dataset)
KNOWN_CONTENT: dict[str, tuple[tuple[str, ...], str, str]] = {
    "00aab0ed4ef3dd5b3c27953eaa9b3aac4d576f23c0693430ba3639f64eb6ef21": (("pope_3000", "vcd_imange"), "random", "coco"),
    "856fe1e32f554216b7b5dd571617644de705d7ff0a0730170dbc5c632d793f50": (
        ("pope_3000", "vcd_imange"), "popular", "coco"
    ),
    "ae9f862f748b7fcc56a858b626305a3eefa992b6e3ef5e4a11f9d44c371a5d6a": (("pope_3000",), "adversarial", "coco"),
    "e121f619a0981eb5dedb37619fd1cea5829bfba66c4bd1c2364c7530f87acc04": (("vcd_imange",), "adversarial", "coco"),
    "9246306dd3c01cb5edbc94dfa581d095af5a8a9e8002b19e5ee8b03d146b2793": (("opera_2910",), "random", "coco"),
    "aa9902206dcb1d1f37eb186025a2b116d36988b39b987903c893bd394c6a77cb": (("opera_2910",), "popular", "coco"),
    "674fa57537d3463841f7f9000ad3cbeae8809ee4bd171c890bc8ff70acbb7c4f": (("opera_2910",), "adversarial", "coco"),
    "73103b6e114f6d354665ae034f62992ae86ec563093d018d338c155910d29f05": (("pope_7ef3026",), "random", "coco"),
    "b2de9d39d7aa0b29ffc261dfc35adc516e1e89f892b112bd9b893ee8b58ad5d2": (("pope_7ef3026",), "popular", "coco"),
    "c4eceb8ba2d9750a005db2513217160881c36e082ff76d4eaf3f525983e725ed": (("pope_7ef3026",), "adversarial", "coco"),
    "e9040872c9cf436b2bcd8262fb9538ddc214555482a92edfbaf6e388b5a9af4c": (("vcd_aokvqa",), "random", "aokvqa"),
    "bf3c8afe53235b68d0d6e03b283308241dadc35eecbaff6f1e8e24d0cfeadde4": (("vcd_aokvqa",), "popular", "aokvqa"),
    "e477ff7ba484b041931ccdd8af752aa92ce4ff64ff624214f7d99813b2df3269": (("vcd_aokvqa",), "adversarial", "aokvqa"),
    "4778d2a942c1520d303e7710e1a2cd15f2fe6f149e52fa8fcff1e039d0f8fe42": (("vcd_gqa",), "random", "gqa"),
    "47c4917c4c2702a60aeb23d29bd8443054815b88fccfbfec4455a088d25b5162": (("vcd_gqa",), "popular", "gqa"),
    "752f4452461bc0060a7c5a9a81b666332e515bb68693086545b1369a77633d64": (("vcd_gqa",), "adversarial", "gqa"),
}  # fmt: skip

# (split, rows, rows with "imange") -> variant, for data whose exact content is unknown (e.g. HF copies)
SIGNATURES: dict[tuple[str, int, int], str] = {
    ("random", 2910, 144): "opera_2910",
    ("popular", 3000, 44): "opera_2910",
    ("adversarial", 3000, 58): "opera_2910",
    ("adversarial", 3000, 57): "vcd_imange",
}
PREFERENCE = ("pope_3000", "vcd_imange", "opera_2910", "pope_7ef3026", "vcd_aokvqa", "vcd_gqa")
TYPO = "imange"


@dataclass(frozen=True)
class SplitVariant:
    """What one split's questions were recognised as.

    Attributes:
        split: The split.
        variants: Variant names whose file for this split has exactly this content (empty if unknown).
        exact: Whether the content hash matched a released file.
        n_rows: Rows in the split.
        n_typo: Rows whose question contains "imange".
        content_sha256: The content hash.
        description: A sentence for reports.
    """

    split: str
    variants: tuple[str, ...]
    exact: bool
    n_rows: int
    n_typo: int
    content_sha256: str
    description: str


def content_sha256(rows: Iterable[tuple[str, str, str]]) -> str:
    """The content hash of ``(image, question, label)`` rows in order (see the module docstring)."""
    lines = (json.dumps([str(img), str(text), str(label)], ensure_ascii=False) for img, text, label in rows)
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def identify_split(split: str, rows: Sequence[tuple[str, str, str]]) -> SplitVariant:
    """Recognise one split's questions.

    Args:
        split: The split name.
        rows: ``(image file name, question text, label)`` in file order.

    Returns:
        The recognition result.
    """
    digest = content_sha256(rows)
    n_typo = sum(TYPO in text for _, text, _ in rows)
    known = KNOWN_CONTENT.get(digest)
    if known:
        names, known_split, dataset = known
        desc = f"{split}: exactly the released {dataset} {known_split} file of {' = '.join(names)}"
        return SplitVariant(split, names, True, len(rows), n_typo, digest, desc)
    guess = SIGNATURES.get((split, len(rows), n_typo))
    if guess:
        desc = f"{split}: not a released file, but {len(rows)} rows with {n_typo} 'imange' rows as in {guess}"
        return SplitVariant(split, (guess,), False, len(rows), n_typo, digest, desc)
    if n_typo == 0 and len(rows) == 3000:
        names = ("pope_3000",) if split == "adversarial" else ("pope_3000", "vcd_imange")
        desc = f"{split}: 3000 rows without the 'imange' typo as in pope_3000, but not a released file byte for byte"
        return SplitVariant(split, names, False, len(rows), n_typo, digest, desc)
    desc = f"{split}: {len(rows)} rows, {n_typo} 'imange' rows; matches no released POPE file (custom or regenerated)"
    return SplitVariant(split, (), False, len(rows), n_typo, digest, desc)


def summarize_variant(splits: Sequence[SplitVariant]) -> str:
    """One variant name for a set of splits.

    Args:
        splits: Per-split results.

    Returns:
        The preferred variant common to all splits (suffixed ``-like`` if any split matched only by counts), or
        ``"unknown"`` / ``"mixed"``.
    """
    if not splits:
        return "unknown"
    common = set(splits[0].variants)
    for s in splits[1:]:
        common &= set(s.variants)
    if not common:
        return "mixed" if any(s.variants for s in splits) else "unknown"
    name = next(v for v in PREFERENCE if v in common) if common & set(PREFERENCE) else sorted(common)[0]
    return name if all(s.exact for s in splits) else f"{name}-like"
