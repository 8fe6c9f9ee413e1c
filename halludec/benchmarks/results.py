"""The self-describing results record (design.md §8) as typed dataclasses with JSON I/O.

One JSON file per run: what was run (model, strategy, generation settings, seed, versions), on what data (benchmark,
split, parser, prompt, data fingerprint and recognised variant) and what came out (metrics with their direction,
per-split metrics, counts, timing). ``halludec score`` writes the same record with ``model``/``strategy`` unset.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import sys
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from halludec.benchmarks.errors import BenchmarkDataError, MissingFileError

SCHEMA = "halludec.results/1"


@dataclass
class Metric:
    """One metric value and its direction.

    Args:
        value: The value (``None`` when undefined, e.g. precision with no predicted *yes*).
        higher_is_better: ``True``/``False``, or ``None`` for descriptive figures with no better direction
            (yes-ratio, caption length, counts of samples).
        ci95: Optional 95 % confidence interval ``(low, high)`` (bootstrap for CHAIR).
    """

    value: float | None
    higher_is_better: bool | None
    ci95: tuple[float, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON form: ``{"value", "higher_is_better"}`` plus ``"ci95"`` when set."""
        out: dict[str, Any] = {"value": self.value, "higher_is_better": self.higher_is_better}
        if self.ci95 is not None:
            out["ci95"] = [self.ci95[0], self.ci95[1]]
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str = "metric") -> Metric:
        """Parse the JSON form (a bare number is accepted as a metric with no direction).

        Args:
            data: The JSON value.
            where: Where it was read from, for errors.

        Returns:
            The metric.
        """
        if isinstance(data, int | float) or data is None:
            return cls(value=data, higher_is_better=None)
        if not isinstance(data, dict) or "value" not in data:
            raise BenchmarkDataError(
                f"{where}: expected {{'value': number, 'higher_is_better': true|false|null}}, got {data!r}."
            )
        ci = data.get("ci95")
        return cls(
            value=data["value"],
            higher_is_better=data.get("higher_is_better"),
            ci95=(float(ci[0]), float(ci[1])) if ci else None,
        )


@dataclass
class ModelInfo:
    """The model that produced the outputs (``name_or_path`` "unknown" when scoring another tool's outputs)."""

    name_or_path: str = "unknown"
    model_type: str | None = None
    config_fingerprint: str | None = None
    dtype: str | None = None
    device: str | None = None


@dataclass
class StrategyInfo:
    """One decoding strategy: registry name, preset (or ``None``) and its full config."""

    name: str = "none"
    preset: str | None = None
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataInfo:
    """Where the data came from: path (or hub id), sha256 fingerprint, recognised variant, and per-file entries."""

    path: str | None = None
    sha256: str | None = None
    variant: str | None = None
    files: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class BenchmarkInfo:
    """What was scored and how: benchmark, split(s), parser, prompt, limit, data and benchmark-specific settings."""

    name: str
    split: str | list[str] | None = None
    parser: str | None = None
    prompt_template: str | None = None
    limit: int | None = None
    data: DataInfo = field(default_factory=DataInfo)
    settings: dict[str, Any] = field(default_factory=dict)


def default_versions() -> dict[str, str | None]:
    """Versions of python, torch, transformers and halludec, read from package metadata (imports nothing)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "halludec"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    pkg = sys.modules.get("halludec")
    if getattr(pkg, "__version__", None):
        out["halludec"] = pkg.__version__  # the imported code, even when run from a checkout
    return out


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class ResultRecord:
    """One run's results file (design.md §8). Build it, then :func:`save_results`.

    ``metrics`` holds the headline figures (for several splits: the mean over splits, plus ``*_pooled`` over all
    rows); ``per_split`` the same per split. ``notes`` lists warnings that affect the numbers (undefined precision,
    skipped images, ...).
    """

    benchmark: BenchmarkInfo
    metrics: dict[str, Metric]
    per_split: dict[str, dict[str, Metric]] = field(default_factory=dict)
    n_samples: int = 0
    model: ModelInfo | None = None
    strategy: StrategyInfo | list[StrategyInfo] | None = None
    generation: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    versions: dict[str, str | None] = field(default_factory=default_versions)
    halludec_version: str | None = None
    created: str = field(default_factory=_now)
    wall_time_s: float | None = None
    tokens_per_s: float | None = None
    samples_file: str | None = None
    notes: list[str] = field(default_factory=list)
    schema: str = SCHEMA

    def __post_init__(self) -> None:
        if self.halludec_version is None:
            self.halludec_version = self.versions.get("halludec")

    @property
    def results_path(self) -> Path | None:
        """The results JSON the runner writes beside ``samples_file`` (``<stem>.json``); None without a samples file."""
        if self.samples_file is None:
            return None
        return Path(self.samples_file.removesuffix(".samples.jsonl") + ".json")

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (plain dicts and lists)."""
        out = {
            "schema": self.schema,
            "halludec_version": self.halludec_version,
            "created": self.created,
            "model": asdict(self.model) if self.model else None,
            "strategy": _strategy_to_json(self.strategy),
            "generation": dict(self.generation),
            "benchmark": asdict(self.benchmark),
            "seed": self.seed,
            "versions": dict(self.versions),
            "metrics": {k: m.to_dict() for k, m in self.metrics.items()},
            "per_split": {s: {k: m.to_dict() for k, m in ms.items()} for s, ms in self.per_split.items()},
            "n_samples": self.n_samples,
            "wall_time_s": self.wall_time_s,
            "tokens_per_s": self.tokens_per_s,
            "samples_file": self.samples_file,
            "notes": list(self.notes),
        }
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "results") -> ResultRecord:
        """Parse the JSON form.

        Args:
            data: The parsed JSON object.
            where: Where it came from (a file name), for errors.

        Returns:
            The record.

        Raises:
            BenchmarkDataError: naming the missing or malformed field.
        """
        if not isinstance(data, dict):
            raise BenchmarkDataError(f"{where}: a results file must hold one JSON object, got {type(data).__name__}.")
        for key in ("benchmark", "metrics"):
            if key not in data:
                raise BenchmarkDataError(
                    f"{where}: missing field {key!r} (fields: {sorted(data)}). Is this a halludec results file "
                    "(written by `halludec run` or `halludec score --output`)?"
                )
        bench = dict(data["benchmark"]) if isinstance(data["benchmark"], dict) else {"name": str(data["benchmark"])}
        bench["data"] = DataInfo(**_known(DataInfo, bench.get("data") or {}))
        model = data.get("model")
        return cls(
            benchmark=BenchmarkInfo(**_known(BenchmarkInfo, bench)),
            metrics={k: Metric.from_dict(v, f"{where}: metrics.{k}") for k, v in data["metrics"].items()},
            per_split={
                s: {k: Metric.from_dict(v, f"{where}: per_split.{s}.{k}") for k, v in ms.items()}
                for s, ms in (data.get("per_split") or {}).items()
            },
            n_samples=int(data.get("n_samples") or 0),
            model=ModelInfo(**_known(ModelInfo, model)) if isinstance(model, dict) else None,
            strategy=_strategy_from_json(data.get("strategy")),
            generation=dict(data.get("generation") or {}),
            seed=data.get("seed"),
            versions=dict(data.get("versions") or {}),
            halludec_version=data.get("halludec_version"),
            created=data.get("created") or "",
            wall_time_s=data.get("wall_time_s"),
            tokens_per_s=data.get("tokens_per_s"),
            samples_file=data.get("samples_file"),
            notes=list(data.get("notes") or []),
            schema=data.get("schema") or SCHEMA,
        )

    def metric_values(self) -> dict[str, float | None]:
        """``{name: value}`` of the headline metrics."""
        return {k: m.value for k, m in self.metrics.items()}


def strategy_label(record: ResultRecord) -> str:
    """A short label for a record's strategy: ``name`` or ``name:preset``, composed ones joined by ``+``.

    Args:
        record: The results record.

    Returns:
        The label (``"(none given)"`` when the record has no strategy, e.g. scored outputs of another tool).
    """
    strategies = record.strategy if isinstance(record.strategy, list) else [record.strategy]
    parts = [f"{s.name}:{s.preset}" if s.preset else s.name for s in strategies if s is not None]
    return "+".join(parts) if parts else "(none given)"


def save_results(record: ResultRecord, path: str | Path) -> Path:
    """Write a results record as indented JSON (creating the folder).

    Args:
        record: The record.
        path: The output file.

    Returns:
        The path written.
    """
    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(record.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return p


def load_results(path: str | Path) -> ResultRecord:
    """Read a results file.

    Args:
        path: A JSON file written by :func:`save_results`.

    Returns:
        The record.

    Raises:
        MissingFileError: if the file does not exist.
        BenchmarkDataError: if it is not JSON or lacks required fields.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise MissingFileError(f"Results file {str(p)!r} does not exist; check the path or glob.")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise BenchmarkDataError(f"{p}: not valid JSON ({err.msg}, line {err.lineno}); is it a results file?") from None
    return ResultRecord.from_dict(data, where=str(p))


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    names = set(cls.__dataclass_fields__)
    return {k: v for k, v in data.items() if k in names}


def _strategy_to_json(strategy: StrategyInfo | list[StrategyInfo] | None) -> Any:
    if strategy is None:
        return None
    if isinstance(strategy, list):
        return [asdict(s) for s in strategy]
    return asdict(strategy)


def _strategy_from_json(data: Any) -> StrategyInfo | list[StrategyInfo] | None:
    if data is None:
        return None
    if isinstance(data, list):
        return [StrategyInfo(**_known(StrategyInfo, d)) for d in data if isinstance(d, dict)]
    if isinstance(data, str):
        return StrategyInfo(name=data)
    return StrategyInfo(**_known(StrategyInfo, data))
