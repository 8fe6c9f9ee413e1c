"""``halludec heads``: score a model's attention heads on a folder of images; write a profile and a heatmap.

Wired into the ``halludec`` command by ``add_heads_subcommand(sub)`` in :func:`halludec.cli.build_parser`.
transformers and matplotlib are imported only when the command runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from halludec.cli import add_model_arguments

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
BUILTIN_CRITERIA = ("vhd", "image_attention", "image_centric", "visual_sensitivity")

EPILOG = """examples:
  halludec heads --model llava-hf/llava-1.5-7b-hf --criterion vhd --data coco/val2014 --limit 200 \\
      --out llava_vhd.json --plot llava_vhd.png
  halludec heads --model ./my-qwen2-vl --criterion image_attention --data images/ --question "What is shown?" \\
      --batch-size 8 --top-k 20 --out qwen_attn.json
  then: halludec.get_strategy("vhr", profile="llava_vhd.json")  # VHR with a dataset-level head set

criteria:
  vhd                 output change when the image is removed (VHR's divergence, step 0)
  image_attention     share of the last token's attention on image tokens
  image_centric       the same without attention-sink tokens (VAR); equals image_attention without sinks
  visual_sensitivity  output change when the image is noised (VCD noise)
"""


def add_heads_subcommand(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``heads`` subcommand to an argparse ``subparsers`` object.

    Args:
        subparsers: What ``parser.add_subparsers()`` returned.

    Returns:
        The ``heads`` parser (its ``func`` default runs the command and returns an exit code).
    """
    p = subparsers.add_parser(
        "heads",
        help="score attention heads on a folder of images; write a profile (JSON) and a heatmap",
        description="Score every attention head of a model (mean over the images) and save a head profile.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(p, "Hugging Face model id, local folder, or lab (the lab model)")
    p.add_argument("--criterion", default="vhd", help=f"one of {', '.join(BUILTIN_CRITERIA)} (default: vhd)")
    p.add_argument(
        "--data",
        required=True,
        help="folder of images (png, jpg, ...; not recursive), or a POPE benchmark: question files (with "
        "--image-dir) or lmms-lab/POPE parquet files; POPE questions are then asked about their images",
    )
    p.add_argument("--image-dir", default=None, help="COCO val2014 folder for POPE question files")
    p.add_argument("--question", default=None, help='question asked about every image (default: "Describe the image.")')
    p.add_argument("--limit", type=int, default=None, help="use the first N images (sorted by name)")
    p.add_argument("--batch-size", type=int, default=4, help="images per forward (default: 4)")
    p.add_argument("--out", default="profile.json", help="profile JSON to write (default: profile.json)")
    p.add_argument("--plot", default=None, help="heatmap image to write, e.g. heads.png (needs matplotlib)")
    p.add_argument("--top-k", type=int, default=10, help="print (and outline) the top-k heads (default: 10)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_heads)
    return p


def run_heads(args: argparse.Namespace) -> int:
    """Run ``halludec heads`` with parsed arguments.

    Args:
        args: The namespace from the ``heads`` parser.

    Returns:
        The exit code (0 on success, 2 on a usage problem reported on stderr).

    Raises:
        ValueError / KeyError: bad data folder, bad numbers, unknown criterion (``halludec.cli`` prints them).
    """
    from halludec.heads.plot import INSTALL_HINT, has_matplotlib

    for name in ("limit", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} {value} is invalid; allowed: an integer >= 1.")
    if args.top_k < 0:
        raise ValueError(f"--top-k {args.top_k} is invalid; allowed: an integer >= 0.")
    if args.plot and not has_matplotlib():
        print(f"halludec heads: error: --plot needs matplotlib; {INSTALL_HINT}.", file=sys.stderr)
        return 2
    pope = _pope_samples(args.data, args.image_dir, args.limit)
    images = list_images(args.data, args.limit) if pope is None else pope

    from halludec.cli import load_model
    from halludec.heads import CRITERIA, HeadProfile, head_set, save_profile, score_dataset
    from halludec.heads.score import DEFAULT_QUESTION

    CRITERIA.get(args.criterion)  # unknown names fail before the model loads
    question = args.question or DEFAULT_QUESTION
    model, processor = load_model(args.model, args.dtype, args.device, args.trust_remote_code)
    batches = _ImageBatches(images, question, args.batch_size) if pope is None else _PopeBatches(pope, args.batch_size)
    scores = score_dataset(model, processor, batches, args.criterion, progress=not args.no_progress)
    data = {
        "source": "folder" if pope is None else "pope",
        "path": str(Path(args.data).resolve()),
        "n_images": len(images),
        "question": question if pope is None else "POPE questions (benchmark prompt template)",
        "batch_size": args.batch_size,
        "dtype": str(model.dtype).removeprefix("torch."),
        "device": model.device.type,
    }
    profile = HeadProfile.for_model(model, scores, args.criterion, data)
    save_profile(profile, args.out)
    print(f"wrote {args.out}: {args.criterion} scores of {profile.num_layers} layers x {profile.num_heads} heads")
    if args.plot:
        from halludec.heads.plot import plot_profile

        plot_profile(profile, args.plot, top_k=args.top_k)
        print(f"wrote {args.plot}")
    if args.top_k:
        table = profile.tensor()
        print(f"top {args.top_k} heads by {args.criterion} (mean over {len(images)} images):")
        for rank, (layer, head) in enumerate(head_set(profile, args.top_k), start=1):
            print(f"  {rank:>3}. layer {layer:>3}  head {head:>3}  {float(table[layer, head]):.6g}")
    return 0


def _pope_samples(data: str, image_dir: str | None, limit: int | None) -> list[Any] | None:
    """POPE samples when ``data`` is POPE question files or parquet files (not an image folder), else None."""
    path = Path(data)
    if path.is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir()):
        return None
    if not path.exists():
        return None
    from halludec.benchmarks.pope_data import load_pope

    return load_pope(data, image_dir=image_dir, limit=limit).samples[:limit]


def list_images(folder: str, limit: int | None = None) -> list[Path]:
    """The image files directly in ``folder``, sorted by name, at most ``limit``.

    Raises:
        ValueError: the folder does not exist or holds no image.
    """
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"--data {folder!r} is not a folder; pass a folder of images (png, jpg, ...).")
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"--data {folder!r} holds no image file (looked for {', '.join(IMAGE_SUFFIXES)}).")
    return files[:limit] if limit else files


class _ImageBatches:
    """Batches of ``(PIL image, question)`` pairs, opened lazily; has a length for the progress bar."""

    def __init__(self, files: list[Path], question: str, batch_size: int) -> None:
        self.files, self.question, self.batch_size = files, question, batch_size

    def __len__(self) -> int:
        return -(-len(self.files) // self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[Any, str]]]:
        from PIL import Image

        for start in range(0, len(self.files), self.batch_size):
            pairs = []
            for path in self.files[start : start + self.batch_size]:
                with Image.open(path) as image:
                    pairs.append((image.convert("RGB"), self.question))
            yield pairs


class _PopeBatches:
    """Batches of ``(image, POPE prompt)`` pairs from POPE samples (images opened lazily)."""

    def __init__(self, samples: list[Any], batch_size: int) -> None:
        self.samples, self.batch_size = samples, batch_size

    def __len__(self) -> int:
        return -(-len(self.samples) // self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[Any, str]]]:
        from halludec.benchmarks.pope_data import POPE_DEFAULT_PROMPT

        for start in range(0, len(self.samples), self.batch_size):
            chunk = self.samples[start : start + self.batch_size]
            yield [(s.load_image(), POPE_DEFAULT_PROMPT.format(question=s.question)) for s in chunk]
