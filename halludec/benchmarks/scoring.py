"""Score any tool's outputs without a model: ``score_predictions(benchmark, predictions_path, ...)``.

Prediction files (JSONL, one object per line; a JSON list is accepted too):

- ``pope``: ``answer`` (the model's text), ``label`` (yes/no), optional ``split``; or, with ``annotations`` = POPE
  question files, ``id`` (``"<split>/<question_id>"``) or ``question_id`` (+ ``split``) to take labels from them.
- ``chair``: ``image_id`` (int or COCO file name), ``caption``; ``annotations`` = the COCO annotations folder.
- ``amber``: ``id`` and ``answer`` (or AMBER's own ``response``); ``annotations`` = AMBER's annotations.json/folder.
- ``mme``: a folder / ``<subtask>.txt`` of 4-column results files, or JSONL with ``answer`` plus ``id``
  (``"<subtask>/<line>"``) joined with ``annotations`` = the MME question folder, or inline ``split`` (subtask),
  ``image`` and ``label``.

The model's text is read from ``answer`` (else ``response``, ``prediction``, ``output``; or ``answer_field``).
``benchmark.prompt_template`` stays null in scored records: the prompt another tool used is unknown (a runner records
its own).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from halludec.benchmarks.amber import load_amber, score_amber
from halludec.benchmarks.chair import score_chair
from halludec.benchmarks.errors import BenchmarkDataError
from halludec.benchmarks.fingerprint import sha256_file
from halludec.benchmarks.mme import MME_HALLUCINATION_SUBTASKS, MmeQuestion, load_mme, score_mme
from halludec.benchmarks.pope_data import check_split, load_pope
from halludec.benchmarks.pope_metrics import yesno_report
from halludec.benchmarks.pope_parsers import get_parser, normalize_label
from halludec.benchmarks.results import BenchmarkInfo, DataInfo, ResultRecord
from halludec.benchmarks.samples import answer_of, read_predictions
from halludec.registry import Registry

UNPARSEABLE_RULE = (
    "after lowercasing and stripping punctuation, no token in {yes, yeah, yep, correct, true} and none in "
    "{no, not, none, nope, false} nor ending in n't; counted beside the parser, which still classifies them"
)


@dataclass
class Scored:
    """A scoring result: the results record and the per-sample rows (with ``pred`` or CHAIR's mentions)."""

    record: ResultRecord
    rows: list[dict[str, Any]]


SCORERS: Registry[Callable[..., Scored]] = Registry(
    "benchmark", hint="Scorable benchmarks: pope, chair, amber, mme (see halludec.benchmarks.scoring)."
)


def _file_info(path: str | Path) -> dict[str, Any]:
    p = Path(path).expanduser()
    return {"path": str(p), "sha256": sha256_file(p) if p.is_file() else None}


def _record(
    name: str, splits: list[str], parser: str | None, prompt: str | None, data: DataInfo, **kw: Any
) -> ResultRecord:
    split: str | list[str] | None = splits[0] if len(splits) == 1 else splits or None
    info = BenchmarkInfo(
        name=name, split=split, parser=parser, prompt_template=prompt, data=data, settings=kw.pop("settings", {})
    )
    return ResultRecord(benchmark=info, **kw)


@SCORERS.register("pope")
def score_pope_file(
    path: str | Path,
    *,
    parser: str | None = None,
    annotations: str | Path | None = None,
    answer_field: str | None = None,
    cache_dir: str | Path | None = None,
    **_: Any,
) -> Scored:
    """Score POPE answers (see the module docstring for the file format)."""
    rule = get_parser(parser or "pope")
    truth, data = None, DataInfo(**_file_info(path), variant="unknown (labels from the predictions file)")
    if annotations is not None:
        pope = load_pope(annotations, cache_dir=cache_dir)
        truth, data = {s.id: s for s in pope.samples}, pope.data_info()
    triples, out = [], []
    for number, row in read_predictions(path):
        where = f"{path}, line {number}"
        answer = answer_of(row, where, answer_field)
        split = check_split(row["split"], where) if row.get("split") is not None else None
        if "label" in row:
            label = normalize_label(row["label"], where)
        elif truth is not None:
            sample = _lookup_pope(truth, row, split, where)
            label, split = sample.label, split or sample.split
        else:
            raise BenchmarkDataError(
                f"{where}: missing field 'label' (fields present: {sorted(row)}). Add label (yes/no) to each line, "
                "or pass annotations=<POPE question files> (CLI: --annotations) to take labels from them by id."
            )
        triples.append((split or "all", answer, label))
        out.append({**row, "split": split or "all", "answer": answer, "label": label})
    metrics, per_split, notes, preds = yesno_report(triples, rule)
    for row, pred in zip(out, preds, strict=True):
        row["pred"] = pred
    settings = {
        "predictions": _file_info(path),
        "unparseable_rule": UNPARSEABLE_RULE,
        "averaging": "metrics: mean of per-split values; *_pooled: over all rows",
        "parser_source": rule.source,
    }
    record = _record(
        "pope",
        list(per_split),
        rule.name,
        None,
        data,
        metrics=metrics,
        per_split=per_split,
        n_samples=len(out),
        notes=notes,
        settings=settings,
    )
    return Scored(record, out)


def _lookup_pope(truth: dict[str, Any], row: dict[str, Any], split: str | None, where: str) -> Any:
    keys = []
    if row.get("id") is not None:
        keys.append(str(row["id"]))
    if row.get("question_id") is not None:
        splits = [split] if split else sorted({s.split for s in truth.values()})
        keys += [f"{s}/{row['question_id']}" for s in splits] if len(splits) == 1 or split else []
    for key in keys:
        if key in truth:
            return truth[key]
    raise BenchmarkDataError(
        f"{where}: cannot match this row to a POPE question (tried ids {keys or 'none'}). Give 'id' as "
        "'<split>/<question_id>', or 'question_id' with 'split', or put 'label' on each line."
    )


@SCORERS.register("chair")
def score_chair_file(
    path: str | Path,
    *,
    annotations: str | Path | None = None,
    backend: str = "builtin",
    compat_opera_synonyms: bool = False,
    image_list: str | None = None,
    skip_unknown: bool = False,
    n_bootstrap: int = 1000,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    caption_field: str | None = None,
    **_: Any,
) -> Scored:
    """Score captions with CHAIR (see :func:`halludec.benchmarks.chair.score_chair`)."""
    pairs = []
    for number, row in read_predictions(path):
        where = f"{path}, line {number}"
        if "image_id" not in row:
            raise BenchmarkDataError(
                f"{where}: missing field 'image_id' (fields present: {sorted(row)}). CHAIR lines need image_id "
                "(COCO id or file name) and caption."
            )
        pairs.append((row["image_id"], answer_of(row, where, caption_field or "caption")))
    result = score_chair(
        pairs,
        annotations=annotations,
        backend=backend,
        compat_opera_synonyms=compat_opera_synonyms,
        image_list=image_list,
        skip_unknown=skip_unknown,
        n_bootstrap=n_bootstrap,
        seed=seed,
        cache_dir=cache_dir,
    )
    files = result.settings.get("ground_truth_files", [])
    data = DataInfo(
        path=str(annotations) if annotations else None,
        sha256=next((f["sha256"] for f in files if f["name"] == "instances_val2014"), None),
        variant="coco2014",
        files=files,
    )
    settings = {**result.settings, "predictions": _file_info(path)}
    record = _record(
        "chair",
        [],
        None,
        None,
        data,
        metrics=result.metrics,
        n_samples=len(result.results),
        notes=result.notes,
        settings=settings,
    )
    return Scored(record, [r.to_row() for r in result.results])


@SCORERS.register("lab-chair")
def score_lab_chair_file(
    path: str | Path, *, n_bootstrap: int = 1000, seed: int = 0, caption_field: str | None = None, **_: Any
) -> Scored:
    """Score lab-model captions with CHAIR over the lab vocabulary; ``image_id`` is the scene seed (ground truth is
    regenerated from it, so no annotation file is needed)."""
    from halludec.benchmarks.chair_metrics import chair_metrics
    from halludec.lab.bench import lab_caption_result, lab_data_info

    results = []
    for number, row in read_predictions(path):
        where = f"{path}, line {number}"
        if not isinstance(row.get("image_id"), int):
            raise BenchmarkDataError(
                f"{where}: 'image_id' must be the integer scene seed of a lab scene (got {row.get('image_id')!r})."
            )
        results.append(lab_caption_result(row["image_id"], answer_of(row, where, caption_field or "caption")))
    metrics, notes = chair_metrics(results, n_bootstrap=n_bootstrap, seed=seed)
    settings = {"predictions": _file_info(path), "vocabulary": "the lab's object kinds (exact words)"}
    record = _record(
        "lab-chair",
        [],
        None,
        None,
        lab_data_info("lab-chair"),
        metrics=metrics,
        n_samples=len(results),
        notes=notes,
        settings=settings,
    )
    return Scored(record, [r.to_row() for r in results])


@SCORERS.register("amber")
def score_amber_file(
    path: str | Path,
    *,
    parser: str | None = None,
    annotations: str | Path | None = None,
    answer_field: str | None = None,
    **_: Any,
) -> Scored:
    """Score AMBER discriminative answers (see :mod:`halludec.benchmarks.amber`)."""
    if annotations is None:
        raise BenchmarkDataError(
            "AMBER needs its annotations: pass annotations=<annotations.json or AMBER data folder>."
        )
    items = load_amber(annotations)
    answers, out = [], []
    for number, row in read_predictions(path):
        where = f"{path}, line {number}"
        if "id" not in row:
            raise BenchmarkDataError(
                f"{where}: missing field 'id' (fields present: {sorted(row)}); AMBER rows need id."
            )
        try:
            qid = int(row["id"])
        except (TypeError, ValueError):
            raise BenchmarkDataError(f"{where}: id {row['id']!r} is not an AMBER id (an integer).") from None
        answers.append((qid, answer_of(row, where, answer_field)))
        out.append({**row, "id": qid, "answer": answers[-1][1]})
    metrics, per_group, notes, preds = score_amber(answers, items, parser or "amber")
    for row, pred, (qid, _) in zip(out, preds, answers, strict=True):
        row.update(pred=pred, label=items[qid].label, split=items[qid].type)
    p = Path(annotations).expanduser()
    data = DataInfo(path=str(p), sha256=sha256_file(p) if p.is_file() else None, variant="amber")
    record = _record(
        "amber",
        [],
        parser or "amber",
        None,
        data,
        metrics=metrics,
        per_split=per_group,
        n_samples=len(out),
        notes=notes,
        settings={"predictions": _file_info(path), "positive_class": "no"},
    )
    return Scored(record, out)


@SCORERS.register("mme")
def score_mme_file(
    path: str | Path,
    *,
    parser: str | None = None,
    annotations: str | Path | None = None,
    answer_field: str | None = None,
    **_: Any,
) -> Scored:
    """Score MME hallucination-subset answers (see :mod:`halludec.benchmarks.mme`)."""
    p = Path(path).expanduser()
    if p.is_dir() or p.suffix == ".txt":
        questions = load_mme(p)
        missing = [q.id for q in questions if q.answer is None]
        if missing:
            raise BenchmarkDataError(
                f"{p}: {len(missing)} line(s) have no 4th column (the model's answer), e.g. {missing[0]}. Results "
                "files need image<TAB>question<TAB>answer<TAB>model answer."
            )
        items = [(q, q.answer or "") for q in questions]
    else:
        by_id = {q.id: q for q in load_mme(annotations)} if annotations is not None else {}
        items = []
        for number, row in read_predictions(p):
            where = f"{p}, line {number}"
            answer = answer_of(row, where, answer_field)
            if str(row.get("id")) in by_id:
                items.append((by_id[str(row["id"])], answer))
            elif all(k in row for k in ("split", "image", "label")):
                task = str(row["split"])
                if task not in MME_HALLUCINATION_SUBTASKS:
                    raise BenchmarkDataError(f"{where}: split {task!r} is not one of {MME_HALLUCINATION_SUBTASKS}.")
                q = MmeQuestion(
                    str(row.get("id", number)),
                    task,
                    str(row["image"]),
                    str(row.get("question", "")),
                    normalize_label(row["label"], where),
                )
                items.append((q, answer))
            else:
                raise BenchmarkDataError(
                    f"{where}: cannot match this row to an MME question: give 'id' ('<subtask>/<line>') with "
                    "annotations=<MME folder>, or 'split' (subtask), 'image' and 'label' on the line."
                )
    metrics, per_task, notes, preds = score_mme(items, parser or "mme")
    out = [
        {
            "id": q.id,
            "split": q.subtask,
            "image": q.image,
            "question": q.question,
            "answer": a,
            "label": q.label,
            "pred": pred,
        }
        for (q, a), pred in zip(items, preds, strict=True)
    ]
    data = DataInfo(path=str(annotations or p), variant="mme-hallucination")
    record = _record(
        "mme",
        list(per_task),
        parser or "mme",
        None,
        data,
        metrics=metrics,
        per_split=per_task,
        n_samples=len(out),
        notes=notes,
        settings={"predictions": _file_info(p)},
    )
    return Scored(record, out)


def score_file(benchmark: str, predictions_path: str | Path, **options: Any) -> Scored:
    """Score a predictions file; returns the typed record and per-sample rows.

    Args:
        benchmark: ``pope``, ``chair``, ``amber`` or ``mme``.
        predictions_path: The model outputs.
        **options: ``parser``, ``annotations``, ``answer_field`` and the benchmark's options (CHAIR: ``backend``,
            ``compat_opera_synonyms``, ``image_list``, ``skip_unknown``, ``n_bootstrap``, ``seed``, ``cache_dir``).

    Returns:
        The :class:`Scored` result.
    """
    return SCORERS.get(str(benchmark).lower())(predictions_path, **options)


def score_predictions(
    benchmark: str,
    predictions_path: str | Path,
    parser: str | None = None,
    annotations: str | Path | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Score any tool's outputs without a model.

    Args:
        benchmark: ``pope``, ``chair``, ``amber`` or ``mme``.
        predictions_path: JSONL (or JSON list) of model outputs; see the module docstring for the fields.
        parser: Answer rule for yes/no benchmarks (POPE: ``pope`` default, ``opera``, ``vlmevalkit``, ``strict``).
        annotations: Ground truth: COCO annotations folder (CHAIR), POPE question files, AMBER annotations, MME folder.
        **options: Benchmark options (see :func:`score_file`).

    Returns:
        The results record as a dict (design.md §8 schema): ``metrics`` ``{name: {value, higher_is_better}}``,
        ``per_split``, ``benchmark`` (parser, data fingerprint, settings), ``notes``, ...
    """
    if parser is not None:
        options["parser"] = parser
    return score_file(benchmark, predictions_path, annotations=annotations, **options).record.to_dict()
