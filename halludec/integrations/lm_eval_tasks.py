"""The lm-eval task folder shipped in the package, the data loaders its YAML files call, and its writer.

Tasks (``--include_path``, see :func:`task_dir`): ``halludec_pope_{random,popular,adversarial}`` and
``halludec_chair`` read local data; ``halludec_lab_pope_{random,popular,adversarial}`` and ``halludec_lab_chair``
generate the lab benchmarks' held-out scenes on the fly (the same questions, ids and scenes as
``halludec run --model lab --benchmark lab-pope``), so they run offline with nothing to download or ship.

Where the data is (never hard-coded in a shipped YAML), first match wins:

- task metadata ``pope_dir`` / ``coco_dir`` (``--metadata '{"pope_dir": ...}'``, or the YAML files written by
  ``halludec lm-eval-tasks --pope-dir ... --coco-dir ... --out DIR``);
- the environment variables ``HALLUDEC_POPE_DIR`` / ``HALLUDEC_COCO_DIR``.

``pope_dir``: POPE question files (``coco_pope_<split>.json``, JSONL) or ``lmms-lab/POPE`` parquet files (images
inside), anything :func:`halludec.benchmarks.load_pope` reads. ``coco_dir``: the COCO 2014 folder, holding
``val2014/`` (images) and ``annotations/`` (``instances_val2014.json``, ``captions_val2014.json``); a folder that is
itself the image folder or the annotations folder works too. Other metadata: ``parser`` (POPE answer rule, default
``pope``), ``image_list`` (CHAIR images: ``opera_compat`` default, ``halludec_default`` or a file of ids).

This module imports neither torch nor lm-eval; the datasets are built with ``datasets`` (a dependency of lm-eval).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

TASK_DIR = Path(__file__).resolve().parent / "tasks"
POPE_DIR_ENV = "HALLUDEC_POPE_DIR"
COCO_DIR_ENV = "HALLUDEC_COCO_DIR"
TASK_NAMES = (
    "halludec_pope_random",
    "halludec_pope_popular",
    "halludec_pope_adversarial",
    "halludec_chair",
    "halludec_lab_pope_random",
    "halludec_lab_pope_popular",
    "halludec_lab_pope_adversarial",
    "halludec_lab_chair",
)
GROUP_NAMES = ("halludec_pope", "halludec_lab_pope")

# POPE samples of the datasets built in this process, by row key, so doc_to_image can reuse PopeSample.load_image
# (parquet and hub rows carry their image in the source dataset, not in the lm-eval row).
_POPE_SAMPLES: dict[str, Any] = {}


def task_dir() -> Path:
    """The task folder shipped in the package (pass it to lm-eval's ``--include_path``).

    Returns:
        The folder with the task YAML files.

    Raises:
        FileNotFoundError: when the package was installed without its data files.
    """
    if not any(TASK_DIR.glob("*.yaml")):
        raise FileNotFoundError(
            f"halludec's lm-eval task files are missing from {TASK_DIR}. Reinstall halludec with its package data "
            "(pip install --force-reinstall halludec)."
        )
    return TASK_DIR


def write_task_dir(out: str | Path, *, pope_dir: str | Path | None = None, coco_dir: str | Path | None = None) -> Path:
    """Copy the task folder to ``out`` with the data folders written into every task's metadata.

    Args:
        out: The folder to write (created; existing task files in it are replaced).
        pope_dir: POPE question files or parquet folder (recorded as ``pope_dir``).
        coco_dir: COCO 2014 folder with ``val2014/`` and ``annotations/`` (recorded as ``coco_dir``).

    Returns:
        The written folder (absolute), for ``--include_path``.

    Raises:
        FileNotFoundError: when a given data folder does not exist.
    """
    extra: dict[str, str] = {}
    for key, value in (("pope_dir", pope_dir), ("coco_dir", coco_dir)):
        if value is None:
            continue
        path = Path(value).expanduser().resolve()
        if not path.exists():
            flag = key.replace("_", "-")
            raise FileNotFoundError(f"--{flag} {str(value)!r} does not exist; pass an existing folder.")
        extra[key] = str(path)
    dest = Path(out).expanduser().resolve()
    dest.mkdir(parents=True, exist_ok=True)
    for src in sorted(task_dir().iterdir()):
        if src.stem in TASK_NAMES:
            lines = src.read_text(encoding="utf-8").rstrip("\n").split("\n")
            if lines[-2:] != ["metadata:", "  version: 1.0"]:  # a packaging error, not a user's
                raise RuntimeError(f"{src} must end with its metadata block to be written with data paths.")
            # Entries of the metadata block; JSON strings are valid YAML scalars.
            lines += [f"  {k}: {json.dumps(v)}" for k, v in extra.items()]
            text = "\n".join(lines) + "\n"
            (dest / src.name).write_text(text, encoding="utf-8")
        elif src.suffix == ".yaml" or src.name.endswith("_yaml"):  # groups and included templates, unchanged
            shutil.copyfile(src, dest / src.name)
    return dest


def _option(options: dict[str, Any], key: str, env: str | None = None) -> str | None:
    value = options.get(key)
    if value in (None, "") and env is not None:
        value = os.environ.get(env) or None
    return None if value in (None, "") else str(value)


def _need(options: dict[str, Any], key: str, env: str, what: str) -> Path:
    value = _option(options, key, env)
    if value is None:
        raise FileNotFoundError(
            f"This task needs {what}: set {env}=<folder> in the environment, pass --metadata "
            f'\'{{"{key}": "<folder>"}}\', or write a task folder with `halludec lm-eval-tasks '
            f"--{key.replace('_', '-')} <folder> --out DIR` and use --include_path DIR."
        )
    path = Path(value).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{key}={value!r} (from the task metadata or ${env}) does not exist; check the path.")
    return path


def coco_image_dir(coco_dir: Path) -> Path:
    """The val2014 image folder of a COCO folder: ``<coco_dir>/val2014`` when present, else ``coco_dir`` itself."""
    return coco_dir / "val2014" if (coco_dir / "val2014").is_dir() else coco_dir


def _dataset(rows: list[dict[str, Any]]) -> Any:
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def pope_dataset(halludec_split: str, **options: Any) -> Any:
    """lm-eval ``custom_dataset`` of ``halludec_pope_<split>``: one POPE split from local files.

    Args:
        halludec_split: random, popular or adversarial (set by the task YAML).
        **options: Task metadata: ``pope_dir`` (else ``$HALLUDEC_POPE_DIR``), ``coco_dir`` (else
            ``$HALLUDEC_COCO_DIR``; needed for question files, not for parquet files with images), ``parser``.

    Returns:
        ``DatasetDict({"test": ...})`` with rows ``key, id, split, question_id, question, label, image, parser``.
    """
    from halludec.benchmarks.pope_data import load_pope
    from halludec.benchmarks.pope_parsers import get_parser

    parser = get_parser(_option(options, "parser") or "pope").name
    source = _need(options, "pope_dir", POPE_DIR_ENV, "POPE question files or parquet files")
    coco = _option(options, "coco_dir", COCO_DIR_ENV)
    image_dir = coco_image_dir(Path(coco).expanduser()) if coco else None
    data = load_pope(source, splits=[halludec_split], image_dir=image_dir)
    if data.samples[0].image_getter is None and image_dir is None:
        raise FileNotFoundError(
            f"The POPE question files in {str(source)!r} name COCO images; set {COCO_DIR_ENV}=<COCO folder with "
            f"val2014/> (or --metadata '{{\"coco_dir\": ...}}', or halludec lm-eval-tasks --coco-dir)."
        )
    rows = []
    for sample in data.samples:
        key = f"{data.source}|{sample.id}"
        _POPE_SAMPLES[key] = sample
        rows.append({"key": key, **sample.to_row(), "question_id": str(sample.question_id), "parser": parser})
    return _dataset(rows)


def chair_dataset(**options: Any) -> Any:
    """lm-eval ``custom_dataset`` of ``halludec_chair``: the COCO val2014 images of a CHAIR image list.

    Args:
        **options: Task metadata: ``coco_dir`` (else ``$HALLUDEC_COCO_DIR``), ``image_list`` (default
            ``opera_compat``).

    Returns:
        ``DatasetDict({"test": ...})`` with rows ``image_id, image_path, annotations``.
    """
    from halludec.benchmarks.chair import load_chair_samples
    from halludec.benchmarks.chair_gt import find_annotation_files, load_ground_truth

    coco = _need(options, "coco_dir", COCO_DIR_ENV, "the COCO 2014 folder (val2014/ and annotations/)")
    find_annotation_files(coco)  # fail now, not after generating every caption
    image_list = _option(options, "image_list") or "opera_compat"
    pool = load_ground_truth(coco).image_ids if image_list == "halludec_default" else None
    samples = load_chair_samples(image_list, coco_image_dir(coco), pool=pool)
    return _dataset([{"image_id": s.image_id, "image_path": s.image_path, "annotations": str(coco)} for s in samples])


def lab_pope_dataset(halludec_split: str, **options: Any) -> Any:
    """lm-eval ``custom_dataset`` of ``halludec_lab_pope_<split>``: lab-POPE generated from the held-out scenes.

    Args:
        halludec_split: random, popular or adversarial (set by the task YAML).
        **options: Task metadata: ``parser`` (default ``pope``).

    Returns:
        ``DatasetDict({"test": ...})`` with the same rows (ids, questions, labels) as ``halludec run --benchmark
        lab-pope`` plus ``seed`` (the scene rendered by :func:`lab_image`).
    """
    from halludec.benchmarks.pope_parsers import get_parser
    from halludec.lab.bench import LAB_SCENES, build_lab_pope, held_out_scenes

    parser = get_parser(_option(options, "parser") or "pope").name
    samples = build_lab_pope(held_out_scenes(LAB_SCENES), splits=(halludec_split,))[halludec_split]
    rows = [
        {**s.to_row(), "question_id": str(s.question_id), "seed": int(s.image.removeprefix("scene-")), "parser": parser}
        for s in samples
    ]
    return _dataset(rows)


def lab_chair_dataset(**options: Any) -> Any:
    """lm-eval ``custom_dataset`` of ``halludec_lab_chair``: the lab-CHAIR scenes (``image_id`` = scene seed).

    Args:
        **options: Task metadata (unused).

    Returns:
        ``DatasetDict({"test": ...})`` with rows ``image_id, seed``.
    """
    from halludec.lab.bench import lab_chair_samples

    return _dataset([{"image_id": s.image_id, "seed": s.image_id} for s in lab_chair_samples()])


def pope_image(doc: dict[str, Any]) -> list[Any]:
    """``doc_to_image`` of the POPE tasks: the question's COCO image (RGB)."""
    sample = _POPE_SAMPLES.get(doc["key"])
    if sample is None:
        raise KeyError(
            f"POPE row {doc['key']!r} was not loaded in this process; build the task's dataset first "
            "(lm-eval does this when it loads the task)."
        )
    return [sample.load_image()]


def chair_image(doc: dict[str, Any]) -> list[Any]:
    """``doc_to_image`` of ``halludec_chair``: the COCO image (RGB)."""
    from halludec.benchmarks.chair import ChairSample

    return [ChairSample(doc["image_id"], doc["image_path"]).load_image()]


def lab_image(doc: dict[str, Any]) -> list[Any]:
    """``doc_to_image`` of the lab tasks: the held-out scene rendered from its seed."""
    from PIL import Image

    from halludec.lab.scenes import sample_scene

    return [Image.fromarray(sample_scene(int(doc["seed"])).render())]
