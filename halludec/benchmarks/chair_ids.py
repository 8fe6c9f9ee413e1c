"""CHAIR image-id lists: the shipped ``opera_compat`` list, halludec's seeded default rule, and user lists.

Published CHAIR numbers use different 500-image sets (benchmarks.md §2.5), and OPERA's own selection (shuffled
``os.listdir``) cannot be reproduced across filesystems. So halludec pins lists by name:

- ``opera_compat``: the 500 val2014 ids of OPERA's released LLaVA-1.5 CHAIR logs
  (shikiw/OPERA, commit 61426ef, ``log/chair_eval_results/llava-1.5/{greedy,beam5,ours}.jsonl``; the MiniGPT-4 and
  Shikra logs use the same ids in the same order; InstructBLIP's differ). Shipped below in the logs' order.
  sha256 of the comma-joined ids in this order: 8e6d37b0baa8afa603e8b238cc35f705ca251b8abef2954d5f2a7526bee44558.
- ``halludec_default``: ``random.Random(0).sample(sorted(ids), 500)`` over the sorted image ids of the user's
  ``instances_val2014.json`` (40,504 images in the official file), i.e. :func:`sample_image_ids` with its defaults.
  It depends only on the official file's id set, never on directory order; it is computed from the annotations
  (this package does not ship COCO's id list) and its sha256 is recorded in results so runs can be compared.
- a user list: a ``.txt`` file (one id or COCO file name per line), a ``.json`` list, or a ``.jsonl`` file with an
  ``image_id`` field.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from halludec.benchmarks.errors import BenchmarkDataError, MissingFileError, did_you_mean

# fmt: off
OPERA_COMPAT_IDS: tuple[int, ...] = (
    226988, 337443, 112022, 394444, 481635, 285258, 479057, 66238, 558458, 400596, 373266, 38332,
    84533, 449963, 128180, 204232, 477867, 308128, 222407, 469543, 421564, 177419, 86432, 544590,
    513060, 140921, 361351, 202154, 94248, 200681, 532989, 565989, 67315, 157170, 328786, 46011,
    384348, 451798, 376545, 11538, 346207, 359238, 297610, 428447, 428769, 452084, 545363, 77963,
    78093, 346334, 185633, 327165, 410632, 468471, 241317, 444982, 117563, 206579, 221172, 317969,
    82150, 284064, 372203, 359136, 499281, 192233, 11987, 406810, 99965, 17328, 393682, 540093,
    242400, 409009, 6091, 42834, 433554, 174987, 116208, 80131, 310663, 100138, 415613, 214737,
    172718, 99186, 3580, 526044, 105291, 577169, 181574, 83441, 130527, 86471, 105737, 212842,
    105220, 490701, 368961, 520892, 113354, 33652, 511153, 328957, 190015, 244925, 29406, 32570,
    260608, 291286, 375278, 290684, 29306, 173375, 198590, 25747, 346589, 121106, 392850, 554241,
    341017, 135497, 159260, 417332, 90520, 318524, 118406, 25748, 365557, 320978, 315073, 363927,
    243355, 373521, 76409, 485985, 27564, 92749, 554958, 439971, 559006, 457262, 263881, 322594,
    22423, 59000, 119547, 432763, 125635, 542549, 494759, 5617, 279774, 323442, 109454, 370677,
    521509, 236461, 534845, 180580, 484551, 456146, 283131, 23309, 547487, 34830, 125997, 19916,
    145019, 127161, 543660, 8333, 482907, 290130, 58225, 249550, 448765, 498439, 252403, 347995,
    544216, 205729, 350988, 288673, 568690, 504194, 35368, 307332, 490878, 507187, 254644, 400803,
    574928, 559247, 254625, 374966, 351967, 172877, 309237, 565877, 489924, 125472, 422706, 290700,
    365177, 398661, 175611, 477673, 1270, 224012, 552510, 272880, 580540, 242934, 178807, 135748,
    255036, 3926, 236762, 248314, 559773, 340665, 388599, 163528, 481212, 277533, 173383, 419624,
    130291, 193369, 367804, 84735, 247285, 438432, 185479, 570826, 127394, 311081, 376677, 269419,
    210708, 472246, 187475, 299457, 2894, 209733, 428231, 250619, 434693, 15596, 569415, 305004,
    510527, 581317, 532071, 467978, 184972, 525568, 165056, 362240, 179558, 120792, 294865, 159662,
    176906, 250608, 33561, 274612, 288714, 284379, 205247, 200267, 296775, 4265, 104392, 316658,
    230993, 321035, 571038, 395978, 482917, 207561, 369470, 482210, 525381, 156375, 334399, 322955,
    312024, 118715, 237318, 236865, 72096, 450762, 168974, 559950, 575776, 552352, 490683, 76417,
    231153, 190497, 126065, 375915, 95022, 177935, 380117, 132373, 284282, 276707, 194704, 430286,
    361171, 406451, 57286, 535952, 455772, 63617, 90155, 158127, 248582, 206560, 69009, 322122,
    549930, 33216, 434581, 239509, 88848, 116182, 562345, 343410, 490529, 328818, 218947, 152281,
    41110, 512985, 414212, 426578, 291962, 460927, 552186, 553852, 370337, 18491, 556000, 443351,
    63965, 405660, 419144, 371004, 116861, 579664, 5600, 199389, 568131, 35671, 76522, 504167,
    21644, 483135, 271063, 36477, 125375, 362520, 5412, 757, 396496, 81761, 130677, 318825,
    48014, 421028, 479659, 369826, 406253, 548267, 335844, 299640, 121812, 107234, 153104, 216417,
    286708, 547041, 293802, 252738, 43165, 218215, 299082, 152360, 205601, 174004, 31542, 305268,
    2867, 72428, 158494, 147629, 581899, 369345, 372246, 261563, 461802, 138175, 103488, 215901,
    514180, 396338, 579362, 289512, 306928, 453009, 112581, 504977, 228764, 151528, 248919, 580607,
    200291, 296231, 505663, 41572, 509589, 357238, 466575, 271970, 305540, 462928, 270544, 134042,
    120340, 418949, 520109, 50753, 329939, 351345, 25293, 543041, 568265, 467386, 242363, 554900,
    115006, 75375, 419223, 137578, 408808, 243773, 436492, 556648, 298924, 562030, 501315, 436162,
    323888, 211476, 473433, 165752, 573756, 187450, 43266, 150080, 453757, 354460, 221681, 349324,
    225133, 452566, 124952, 26697, 126064, 557190, 137612, 408480, 277694, 74166, 102625, 540694,
    518586, 81303, 383065, 169602, 19890, 236604, 270753, 457178, 577712, 414560, 388983, 245965,
    147590, 46882, 518719, 176312, 580746, 541223, 22589, 196815,
)
# fmt: on

DEFAULT_SEED = 0
DEFAULT_COUNT = 500
IMAGE_LISTS = ("opera_compat", "halludec_default")
_COCO_NAME = re.compile(r"(?:COCO_(?:val|train)2014_)?0*(\d+)(?:\.jpg)?$")


def sample_image_ids(pool: Iterable[int], n: int = DEFAULT_COUNT, seed: int = DEFAULT_SEED) -> list[int]:
    """halludec's seeded selection: ``random.Random(seed).sample(sorted(set(pool)), n)``.

    Args:
        pool: Candidate image ids (for the default list: every image of ``instances_val2014.json``).
        n: How many to draw.
        seed: The seed.

    Returns:
        ``n`` ids in draw order.

    Raises:
        BenchmarkDataError: if the pool has fewer than ``n`` ids.
    """
    ids = sorted({int(i) for i in pool})
    if n > len(ids):
        raise BenchmarkDataError(f"Cannot draw {n} image ids from a pool of {len(ids)}; lower n or use more images.")
    return random.Random(seed).sample(ids, n)


def ids_sha256(ids: Sequence[int]) -> str:
    """sha256 of the comma-joined ids in order (how lists are fingerprinted in results)."""
    return hashlib.sha256(",".join(str(i) for i in ids).encode()).hexdigest()


def parse_image_id(value: object, where: str = "image id") -> int:
    """An image id from an int, a digit string or a COCO file name (``COCO_val2014_000000397133.jpg``).

    Args:
        value: The value.
        where: Where it was read, for errors.

    Returns:
        The integer id.

    Raises:
        BenchmarkDataError: if the value is none of those.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = _COCO_NAME.match(Path(str(value).strip()).name) if isinstance(value, str) else None
    if not match:
        raise BenchmarkDataError(
            f"{where}: {value!r} is not a COCO image id; use an integer (397133) or a file name "
            "(COCO_val2014_000000397133.jpg)."
        )
    return int(match.group(1))


def load_image_id_list(path: str | Path) -> list[int]:
    """Read a user's image-id list.

    Args:
        path: ``.txt`` (one id or file name per line, ``#`` comments), ``.json`` (a list) or ``.jsonl``
            (objects with ``image_id``).

    Returns:
        The ids in file order.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise MissingFileError(f"Image-id list {str(p)!r} does not exist; check the path.")
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".json":
        data = json.loads(text)
        if not isinstance(data, list):
            raise BenchmarkDataError(f"{p}: expected a JSON list of image ids, got {type(data).__name__}.")
        return [parse_image_id(v, f"{p}[{i}]") for i, v in enumerate(data)]
    if p.suffix == ".jsonl":
        out = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                row = json.loads(line)
                if not isinstance(row, dict) or "image_id" not in row:
                    raise BenchmarkDataError(f"{p}, line {number}: expected an object with an 'image_id' field.")
                out.append(parse_image_id(row["image_id"], f"{p}, line {number}"))
        return out
    return [
        parse_image_id(line.split("#")[0].strip(), f"{p}, line {n}")
        for n, line in enumerate(text.splitlines(), start=1)
        if line.split("#")[0].strip()
    ]


def resolve_image_list(spec: str | Path, pool: Iterable[int] | None = None) -> list[int]:
    """Image ids for a list name (``opera_compat``, ``halludec_default``) or a file path.

    Args:
        spec: A list name or a path.
        pool: The candidate ids, needed for ``halludec_default`` (all image ids of ``instances_val2014.json``).

    Returns:
        The ids.

    Raises:
        BenchmarkDataError: for an unknown name that is not a file either, or a missing pool.
    """
    name = str(spec)
    if name == "opera_compat":
        return list(OPERA_COMPAT_IDS)
    if name == "halludec_default":
        if pool is None:
            raise BenchmarkDataError(
                "The 'halludec_default' image list is drawn from the val2014 image ids; pass the COCO annotations "
                "(pool=ground_truth.image_ids, or --annotations DIR on the command line)."
            )
        return sample_image_ids(pool)
    if Path(name).expanduser().is_file():
        return load_image_id_list(name)
    raise BenchmarkDataError(
        f"Unknown image list {name!r}: not a shipped list and not an existing file.{did_you_mean(name, IMAGE_LISTS)} "
        f"Shipped lists: {', '.join(IMAGE_LISTS)}; or pass a .txt/.json/.jsonl file of ids."
    )
