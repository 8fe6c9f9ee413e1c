"""Head profiles: per-head scores of one model, saved as JSON, and the head sets strategies take from them.

A profile holds a ``[num_layers][num_heads]`` score table (from :func:`halludec.heads.score_heads` or the
``halludec heads`` command) with what it was computed on: the model's name, ``model_type``, config fingerprint
(:meth:`~halludec.vlm_adapters.VLMAdapter.config_fingerprint`), the criterion and a data description. Profiles are
plain JSON (never pickle). Loading one for a model of another structure raises a ``ValueError``.

A profile becomes a head set with :func:`head_set`: the top ``k`` heads over all layers (``k`` = 10 % of all heads
by default), or VHR's per-layer rule (heads scoring strictly above their layer's median). Strategies that can act
on a fixed head set (VHR's dataset-level variant, PAINT, VAR) take a profile path and use :func:`profile_head_mask`.

This module lives in ``decoding/`` because strategies need it; ``halludec.heads`` re-exports it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from halludec.vlm_adapters import VLMAdapter, get_adapter

FORMAT_VERSION = 1
DEFAULT_K = 0.1
"""Default head-set size: 10 % of all heads."""

Rule = Literal["topk", "above_median"]


@dataclass
class HeadProfile:
    """Per-head scores of one model and what they were computed on.

    Attributes:
        model: The model's ``name_or_path`` (a hint for people; matching uses the fingerprint).
        model_type: ``config.model_type``.
        config_fingerprint: sha256 of the model's structural fields (``VLMAdapter.config_fingerprint()``).
        num_layers: Decoder layers.
        num_heads: Query heads per layer.
        criterion: The scoring criterion (a name in ``halludec.heads.CRITERIA``).
        data: What the scores were computed on (e.g. ``{"path": ..., "n_images": ..., "question": ...}``).
        scores: ``[num_layers][num_heads]`` floats (7 significant digits, float32's precision); higher = more of
            what the criterion measures.
        halludec_version: The halludec version that wrote the profile.
        created: ISO-8601 UTC time of creation.
        format_version: Version of this file format.
    """

    model: str
    model_type: str
    config_fingerprint: str
    num_layers: int
    num_heads: int
    criterion: str
    data: dict[str, Any] | str
    scores: list[list[float]]
    halludec_version: str = ""
    created: str = ""
    format_version: int = FORMAT_VERSION

    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        scores: torch.Tensor,
        criterion: str,
        data: dict[str, Any] | str,
        adapter: VLMAdapter | None = None,
    ) -> HeadProfile:
        """A profile of ``model`` holding ``scores``.

        Args:
            model: The scored model.
            scores: ``[num_layers, num_heads]`` scores.
            criterion: The criterion's name.
            data: Data description (JSON-serialisable).
            adapter: Override the model's adapter.

        Returns:
            The profile, stamped with the halludec version and the current UTC time.
        """
        import halludec  # at call time: the package is fully imported by then

        adapter = adapter or get_adapter(model)
        dims = adapter.dims
        if tuple(scores.shape) != (dims.num_layers, dims.num_heads):
            raise ValueError(
                f"scores have shape {tuple(scores.shape)}, but this model has {dims.num_layers} layers x "
                f"{dims.num_heads} heads; pass the [num_layers, num_heads] tensor score_heads returns."
            )
        return cls(
            model=str(getattr(model.config, "name_or_path", "") or type(model).__name__),
            model_type=str(model.config.model_type),
            config_fingerprint=adapter.config_fingerprint(),
            num_layers=dims.num_layers,
            num_heads=dims.num_heads,
            criterion=criterion,
            data=data,
            scores=[[float(f"{v:.7g}") for v in row] for row in scores.detach().float().cpu().tolist()],
            halludec_version=halludec.__version__,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )

    def tensor(self) -> torch.Tensor:
        """The scores as a float32 tensor ``[num_layers, num_heads]``."""
        return torch.tensor(self.scores, dtype=torch.float32)

    def describe(self) -> str:
        """One line naming the model and its structure, for messages."""
        return (
            f"{self.model!r} ({self.model_type}, {self.num_layers} layers x {self.num_heads} heads, "
            f"fingerprint {self.config_fingerprint[:12]})"
        )


def save_profile(profile: HeadProfile, path: str | os.PathLike[str]) -> None:
    """Write ``profile`` as JSON (parent folders are created).

    Args:
        profile: The profile.
        path: Destination file, conventionally ``*.json``.
    """
    _check_table(profile, str(path))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = asdict(profile)
    rows = body.pop("scores")
    head = json.dumps(body, indent=2)[:-2]  # without the closing "\n}"
    table = ",\n".join("    " + json.dumps(row) for row in rows)  # one layer per line
    path.write_text(f'{head},\n  "scores": [\n{table}\n  ]\n}}\n', encoding="utf-8")


def load_profile(path: str | os.PathLike[str], model: nn.Module | VLMAdapter | None = None) -> HeadProfile:
    """Read a profile written by :func:`save_profile`; with ``model``, check it was made for that model.

    Args:
        path: The JSON file.
        model: A model (or its adapter) the profile will be used with; its config fingerprint and layers/heads
            must match the profile's.

    Returns:
        The profile.

    Raises:
        ValueError: the file is missing, not JSON, lacks fields or has a malformed score table, or the profile was
            made for a different model (the message names both models and how to fix it).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            f"Head profile {str(path)!r} does not exist; write one with `halludec heads --model ... --out {path}` "
            "or halludec.heads.save_profile."
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"Head profile {str(path)!r} is not valid JSON ({err}); it must be a file save_profile wrote."
        ) from None
    if not isinstance(raw, dict):
        raise ValueError(f"Head profile {str(path)!r} holds a JSON {type(raw).__name__}, expected an object.")
    known = {f.name for f in fields(HeadProfile)}
    required = {f.name for f in fields(HeadProfile) if f.default is MISSING and f.default_factory is MISSING}
    missing = sorted(required - set(raw))
    if missing:
        raise ValueError(
            f"Head profile {str(path)!r} lacks the field(s) {missing}; a profile needs {sorted(required)}. "
            "Re-create it with `halludec heads` or halludec.heads.save_profile."
        )
    profile = HeadProfile(**{k: v for k, v in raw.items() if k in known})
    _check_table(profile, str(path))
    if model is not None:
        check_profile_matches(profile, model, str(path))
    return profile


def check_profile_matches(profile: HeadProfile, model: nn.Module | VLMAdapter, where: str = "the profile") -> None:
    """Raise ``ValueError`` unless ``profile`` was made for a model of ``model``'s structure.

    Args:
        profile: The profile.
        model: The model (or its adapter).
        where: How to name the profile in the message (e.g. its path).
    """
    adapter = model if isinstance(model, VLMAdapter) else get_adapter(model)
    dims = adapter.dims
    fingerprint = adapter.config_fingerprint()
    same_shape = (profile.num_layers, profile.num_heads) == (dims.num_layers, dims.num_heads)
    if same_shape and profile.config_fingerprint == fingerprint:
        return
    name = str(getattr(adapter.config, "name_or_path", "") or type(adapter.model).__name__)
    what = "layers/heads" if not same_shape else "config fingerprint"
    raise ValueError(
        f"Head profile {where} was made for {profile.describe()}, but it is being used with {name!r} "
        f"({adapter.config.model_type}, {dims.num_layers} layers x {dims.num_heads} heads, fingerprint "
        f"{fingerprint[:12]}): the {what} differ. Head scores do not transfer between models; score this model's "
        f"heads with `halludec heads --model {name or '<model>'} --out profile.json` and pass that profile."
    )


def head_set(
    profile: HeadProfile | torch.Tensor, k: int | float | None = None, rule: Rule = "topk"
) -> list[tuple[int, int]]:
    """The heads a profile selects, best first.

    Args:
        profile: A profile, or a ``[num_layers, num_heads]`` score tensor.
        k: For ``rule="topk"``: a fraction of all heads in ``(0, 1]`` (float) or a number of heads ``>= 1`` (int);
            None = 10 % of all heads (at least one). Must be None for ``"above_median"``.
        rule: ``"topk"``: the ``k`` highest-scoring heads over all layers. ``"above_median"``: VHR's per-layer rule,
            heads scoring strictly above their layer's median (``torch.median``, the lower middle).

    Returns:
        ``(layer, head)`` pairs sorted by descending score (ties: lower layer, then lower head, first). Non-finite
        scores rank last.
    """
    scores = profile.tensor() if isinstance(profile, HeadProfile) else profile.detach().float().cpu()
    if scores.dim() != 2 or scores.numel() == 0:
        raise ValueError(
            f"Head scores must be a non-empty [num_layers, num_heads] table; got shape {tuple(scores.shape)}."
        )
    n_layers, n_heads = scores.shape
    clean = torch.where(torch.isfinite(scores), scores, torch.full_like(scores, -math.inf))  # [L, H]
    order = torch.sort(clean.flatten(), descending=True, stable=True).indices  # [L*H]
    if rule == "topk":
        count = _count(k, n_layers * n_heads)
        chosen = order[:count]
    elif rule == "above_median":
        if k is not None:
            raise ValueError(
                f"k={k!r} was given with rule='above_median', which picks its own number of heads; pass k=None."
            )
        median = clean.median(dim=-1, keepdim=True).values  # [L, 1]
        keep = (clean > median).flatten()  # [L*H]
        chosen = order[keep[order]]
    else:
        raise ValueError(f"rule={rule!r} is invalid; allowed: 'topk' or 'above_median'.")
    return [(int(i) // n_heads, int(i) % n_heads) for i in chosen.tolist()]


def head_mask(profile_or_set: HeadProfile | Sequence[tuple[int, int]], num_layers: int, num_heads: int) -> torch.Tensor:
    """A ``[num_layers, num_heads]`` bool mask of a head set.

    Args:
        profile_or_set: A profile (its default :func:`head_set`) or ``(layer, head)`` pairs.
        num_layers: Decoder layers.
        num_heads: Heads per layer.

    Returns:
        ``torch.BoolTensor`` ``[num_layers, num_heads]``, True on the set's heads.
    """
    pairs = head_set(profile_or_set) if isinstance(profile_or_set, HeadProfile) else list(profile_or_set)
    mask = torch.zeros(num_layers, num_heads, dtype=torch.bool)
    for layer, head in pairs:
        if not (0 <= layer < num_layers and 0 <= head < num_heads):
            raise ValueError(
                f"Head ({layer}, {head}) is outside a model of {num_layers} layers x {num_heads} heads "
                f"(valid: layers 0..{num_layers - 1}, heads 0..{num_heads - 1})."
            )
        mask[layer, head] = True
    return mask


def profile_head_mask(path: str | os.PathLike[str], adapter: VLMAdapter, fraction: float = DEFAULT_K) -> torch.Tensor:
    """Load the profile at ``path`` for ``adapter``'s model; its top-``fraction`` head mask (strategies' ``profile``).

    Args:
        path: Profile JSON.
        adapter: The adapter of the model the head set will be used on (its fingerprint must match).
        fraction: Share of all heads in ``(0, 1]`` (an int 1 means all heads here, not one head).

    Returns:
        ``[num_layers, num_heads]`` bool mask on CPU.
    """
    profile = load_profile(path, adapter)
    return head_mask(head_set(profile, float(fraction)), profile.num_layers, profile.num_heads)


def check_profile_k(value: Any) -> None:
    """Validate a strategy's ``profile_k`` (a fraction of all heads in ``(0, 1]``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1
    if not ok:
        raise ValueError(
            f"profile_k={value!r} is invalid; allowed: a fraction of all heads in (0, 1] (default 0.1 = 10 %)."
        )


def profile_path(value: Any) -> Any:
    """``os.fspath`` of a path-like ``profile`` value (strategies store the path as a str); others unchanged."""
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def check_profile_path(value: Any) -> None:
    """Validate a strategy's ``profile`` field (None or a path string)."""
    if value is not None and not isinstance(value, str):
        raise ValueError(
            f"profile={value!r} is invalid; allowed: None or the path of a head profile JSON (a str), e.g. "
            "'profile.json' written by `halludec heads`."
        )


def _count(k: int | float | None, total: int) -> int:
    """Number of heads for ``k`` out of ``total``."""
    if k is None:
        k = DEFAULT_K
    if isinstance(k, bool) or not isinstance(k, (int, float)):
        raise ValueError(f"k={k!r} is invalid; allowed: a fraction in (0, 1] (float) or a number of heads >= 1 (int).")
    if isinstance(k, int):
        if k < 1:
            raise ValueError(f"k={k} is invalid; a number of heads must be >= 1 (or pass a fraction in (0, 1]).")
        return min(k, total)
    if not 0 < k <= 1:
        raise ValueError(f"k={k!r} is invalid; a fraction of heads must be in (0, 1] (or pass an int count).")
    return max(1, round(k * total))


def _check_table(profile: HeadProfile, where: str) -> None:
    """Raise ``ValueError`` unless the score table is ``num_layers x num_heads`` numbers."""
    rows = profile.scores
    ok = isinstance(rows, list) and len(rows) == profile.num_layers
    ok = ok and all(isinstance(r, list) and len(r) == profile.num_heads for r in rows)
    ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) for r in rows for v in r)
    if not ok:
        raise ValueError(
            f"Head profile {where} has a malformed score table: expected {profile.num_layers} rows of "
            f"{profile.num_heads} numbers (num_layers x num_heads). Re-create it with `halludec heads`."
        )
