"""Hallucination benchmarks: loaders, answer parsers, metrics, results files, scoring and comparison.

Everything imported here is torch-free, so outputs of any tool can be scored without a model::

    from halludec.benchmarks import score_predictions
    score_predictions("pope", "preds.jsonl", parser="pope")["metrics"]["f1"]
    score_predictions("chair", "caps.jsonl", annotations="coco/annotations")["metrics"]["chair_i"]

Modules: ``pope_data`` / ``pope_hf`` (POPE loaders), ``pope_variants`` (released variants), ``pope_parsers``,
``pope_metrics``, ``chair*`` (CHAIR), ``amber``, ``mme``, ``results`` (results record), ``samples`` (per-sample
JSONL, resuming), ``scoring``, ``compare`` / ``plot`` (tables and PNG), ``cli`` (``score`` and ``compare``
subcommands). A model runner belongs in its own module that imports torch lazily; keep this file torch-free.
"""

from __future__ import annotations

from halludec.benchmarks.amber import load_amber, score_amber
from halludec.benchmarks.chair import ChairSample, ChairScore, load_chair_samples, score_chair
from halludec.benchmarks.chair_gt import ChairGroundTruth, load_ground_truth
from halludec.benchmarks.chair_ids import OPERA_COMPAT_IDS, load_image_id_list, resolve_image_list, sample_image_ids
from halludec.benchmarks.chair_metrics import CHAIR_DEFAULT_MAX_NEW_TOKENS, CHAIR_DEFAULT_PROMPT, CaptionResult
from halludec.benchmarks.chair_synonyms import build_vocabulary
from halludec.benchmarks.chair_text import TEXT_BACKENDS, caption_to_objects, make_backend
from halludec.benchmarks.compare import compare_results
from halludec.benchmarks.errors import BenchmarkDataError, MissingFileError
from halludec.benchmarks.mme import MME_HALLUCINATION_SUBTASKS, load_mme, score_mme
from halludec.benchmarks.pope_data import (
    POPE_DEFAULT_MAX_NEW_TOKENS,
    POPE_DEFAULT_PROMPT,
    POPE_HF_ID,
    PopeData,
    PopeSample,
    load_pope,
)
from halludec.benchmarks.pope_metrics import POPE_SPLITS, yesno_report
from halludec.benchmarks.pope_parsers import PARSERS, PopeParser, get_parser, is_unparseable, list_parsers
from halludec.benchmarks.pope_variants import identify_split, summarize_variant
from halludec.benchmarks.results import (
    BenchmarkInfo,
    DataInfo,
    Metric,
    ModelInfo,
    ResultRecord,
    StrategyInfo,
    load_results,
    save_results,
)
from halludec.benchmarks.samples import SampleWriter, load_done_ids, read_jsonl
from halludec.benchmarks.scoring import SCORERS, Scored, score_file, score_predictions

__all__ = [
    "CHAIR_DEFAULT_MAX_NEW_TOKENS",
    "CHAIR_DEFAULT_PROMPT",
    "MME_HALLUCINATION_SUBTASKS",
    "OPERA_COMPAT_IDS",
    "PARSERS",
    "POPE_DEFAULT_MAX_NEW_TOKENS",
    "POPE_DEFAULT_PROMPT",
    "POPE_HF_ID",
    "POPE_SPLITS",
    "SCORERS",
    "TEXT_BACKENDS",
    "BenchmarkDataError",
    "BenchmarkInfo",
    "CaptionResult",
    "ChairGroundTruth",
    "ChairSample",
    "ChairScore",
    "DataInfo",
    "Metric",
    "MissingFileError",
    "ModelInfo",
    "PopeData",
    "PopeParser",
    "PopeSample",
    "ResultRecord",
    "SampleWriter",
    "Scored",
    "StrategyInfo",
    "build_vocabulary",
    "caption_to_objects",
    "compare_results",
    "get_parser",
    "identify_split",
    "is_unparseable",
    "list_parsers",
    "load_amber",
    "load_chair_samples",
    "load_done_ids",
    "load_ground_truth",
    "load_image_id_list",
    "load_mme",
    "load_pope",
    "load_results",
    "make_backend",
    "read_jsonl",
    "resolve_image_list",
    "sample_image_ids",
    "save_results",
    "score_amber",
    "score_chair",
    "score_file",
    "score_mme",
    "score_predictions",
    "summarize_variant",
    "yesno_report",
]
