"""OPERA: Over-trust Penalty and Retrospection-Allocation.

Huang et al., "OPERA: Alleviating Hallucination in Multi-Modal Large Language Models via Over-Trust Penalty and
Retrospection-Allocation", CVPR 2024, https://arxiv.org/abs/2311.17911; official code shikiw/OPERA (commit 61426ef,
``transformers-4.29.2/src/transformers/generation/utils.py::opera_beam_search``).

A beam search that owns the decoding loop (``owns_search``): ``halludec.generate`` runs it through ``generate``'s own
input preparation (``custom_generate``) inside the ``apply`` context. At every step, each beam's top
``num_attn_candidates`` tokens are the only continuations. Each candidate is fed once more to read its row of the
last decoder layer's self-attention (max over heads, renormalised): with the rows of the tokens generated so far it
forms the local window ``A`` over the response. Its over-trust score is the largest column product
``phi = max_j 1e-7 * prod_{i >= j} (scale_factor * A[i, j])`` (for the first ``early_tokens`` positions: minus its
attention to the image, a bonus). Candidate scores are ``log_softmax`` over the candidates of
``log p - penalty_weights * phi``. Retrospection: the column of each candidate's maximum is its location; the mode
over candidates is the beam's location, kept per beam; when the mode over beams appears more than ``threshold``
times in every beam's history, decoding goes back to the token after it and chooses that token again over the
whole vocabulary, excluding every earlier choice there (at most ``num_attn_candidates`` times per position, then the
position before). See ``docs/methods/opera.md`` for the equations, the open questions and their resolutions.

Each batch row keeps its own search and cache after one batched prefill (a rollback moves a row to its own length);
the forwards of rows at the same length run together, and a step's candidates of all beams are one forward.
Unsupported, with a clear error: sampling, the static cache, and composition when the batch has more than one row.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
from transformers.generation.utils import GenerateBeamDecoderOnlyOutput

from halludec.decoding.base import Strategy, StrategyConfig, check_range, register_strategy

if TYPE_CHECKING:
    from halludec.decoding.context import CallContext, LayerContext

ROWS_KEY = "opera_rows"
"""``call.state`` key: the last steered forward's attention rows (max over heads) and their image mass."""
SEARCHING_KEY = "opera_searching"
IMAGE_KEY = "opera_image"
"""``call.state`` key: the image mask ``[1, L]`` of the batch row being searched (rows are searched one at a time)."""
FP16_MAX = 65504.0
SCORE_FLOOR = 1e-7
"""The released code multiplies every column product by ``1e-7``."""


@dataclass
class OPERAConfig(StrategyConfig):
    """OPERA hyperparameters (README of shikiw/OPERA; defaults = the paper's setting).

    Attributes:
        num_beams: Beams when the ``generate`` call passes no ``num_beams`` (5; an explicit ``num_beams`` wins).
        scale_factor: ``sigma``, scaling the attention weights before the column products (50).
        threshold: Rollback when a location repeats more than this many times in every beam's history (15); None
            turns retrospection off.
        num_attn_candidates: Candidates per beam (5), also the most rollbacks to one position. None: every token
            is a candidate and no attention is read (only with ``penalty_weights=0`` and ``threshold=None``: plain
            beam search, the neutral config).
        penalty_weights: ``alpha``, weight of the over-trust penalty (1).
        window: Rollbacks go back at most this many tokens (512).
        early_tokens: The first response positions, where the penalty is minus the candidate's attention to the
            image and that no rollback targets (10, as the released code).
        fp16_scores: Round the column scores to float16 as the released code does (its buffer is float16): under
            6e-8 they vanish, a product over 65504 excludes the candidate. False: float32 scores.
    """

    num_beams: int = 5
    scale_factor: float = 50.0
    threshold: int | None = 15
    num_attn_candidates: int | None = 5
    penalty_weights: float = 1.0
    window: int = 512
    early_tokens: int = 10
    fp16_scores: bool = True

    def validate(self) -> None:
        _check_int("num_beams", self.num_beams, 1)
        check_range("scale_factor", self.scale_factor, 0.0, None)
        if self.scale_factor <= 0:
            raise ValueError(f"scale_factor={self.scale_factor!r} is invalid; allowed: a number > 0 (OPERA uses 50).")
        if self.threshold is not None:
            _check_int("threshold", self.threshold, 1)
        if self.num_attn_candidates is not None:
            _check_int("num_attn_candidates", self.num_attn_candidates, 1)
        check_range("penalty_weights", self.penalty_weights, 0.0, None)
        _check_int("window", self.window, 1)
        _check_int("early_tokens", self.early_tokens, 0)
        if not isinstance(self.fp16_scores, bool):
            raise ValueError(f"fp16_scores={self.fp16_scores!r} is invalid; allowed: True or False.")
        if self.num_attn_candidates is None and (self.penalty_weights != 0 or self.threshold is not None):
            raise ValueError(
                f"num_attn_candidates=None (every token a candidate, no attention read) needs penalty_weights=0 and "
                f"threshold=None; got penalty_weights={self.penalty_weights!r}, threshold={self.threshold!r}. "
                "Give num_attn_candidates an integer (OPERA uses 5) or turn the penalty and rollback off."
            )

    @property
    def reads_attention(self) -> bool:
        """Whether the search needs the candidates' attention rows (penalty or retrospection on)."""
        return self.num_attn_candidates is not None and (self.penalty_weights > 0 or self.threshold is not None)


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} is invalid; allowed: an integer >= {low}.")


@register_strategy("opera")
class OPERA(Strategy):
    """Beam search with the over-trust penalty on candidates and rollback on repeated aggregation columns."""

    config_class = OPERAConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "fast": {"threshold": 25, "num_attn_candidates": 1},  # the README's efficient setting
    }
    attention_rows = "last"
    owns_search = True
    paper = "https://arxiv.org/abs/2311.17911"

    def attention_layer(self, call: CallContext) -> int:
        """The layer whose attention OPERA reads: the last one (the last full-attention one on mixed models)."""
        sliding = call.sliding_layers
        layers = [i for i in range(call.adapter.dims.num_layers) if i not in sliding]
        if not layers:
            raise ValueError(
                f"OPERA reads the last layer's attention over the whole response, but every layer of "
                f"{type(call.model).__name__} is a sliding-window layer; use another strategy."
            )
        return layers[-1]

    def attention_layers(self, call: CallContext) -> set[int]:
        return {self.attention_layer(call)} if self.config.reads_attention else set()

    def edit_probs(self, probs: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        """Record the rows (max over heads) and their image mass for the search; the probabilities are unchanged."""
        if not ctx.call.state.get(SEARCHING_KEY):
            raise RuntimeError(
                "OPERA replaces generate's search loop: call halludec.generate(model, inputs, 'opera', ...); inside "
                "halludec.apply, model.generate would run plain beam search."
            )
        top = probs.amax(dim=1)  # [B, q, K]
        image = ctx.keys(ctx.call.state[IMAGE_KEY]).to(top.dtype)  # [B, K]: the searched row's image keys
        ctx.call.state[ROWS_KEY] = (top, (top * image[:, None, :]).sum(-1))  # [B, q, K], [B, q]
        return probs

    def search(self, call: CallContext, generate_kwargs: dict[str, Any]) -> Any:
        """Run OPERA's beam search through ``model.generate(custom_generate=...)``; returns what generate returns."""
        from halludec.decoding.opera_batch import make_decoder

        kwargs = dict(generate_kwargs)
        if kwargs.get("do_sample"):
            raise ValueError(
                "OPERA is a beam search: do_sample=True is not supported (the released code has no sampling "
                "variant). Drop do_sample, or use another strategy for sampling."
            )
        if "custom_generate" in kwargs:
            raise ValueError("OPERA runs its own search loop; drop custom_generate from the generate kwargs.")
        if call.batch_size > 1 and len(call.strategies) > 1:
            raise ValueError(
                f"OPERA composed with {[s.name for s in call.strategies if s is not self]} needs batch size 1 "
                f"(got {call.batch_size} rows): OPERA decodes rows one at a time (a rollback moves a row to its own "
                "length) while the other strategies' per-row state spans the batch. Run one row at a time."
            )
        config = kwargs.get("generation_config")
        if kwargs.get("num_beams") is None and (config is None or getattr(config, "num_beams", 1) == 1):
            kwargs["num_beams"] = self.config.num_beams
        call.state[SEARCHING_KEY] = True
        try:
            return call.model.generate(**call.inputs, **kwargs, custom_generate=make_decoder(self, call))
        finally:
            call.state[SEARCHING_KEY] = False
            call.state.pop(ROWS_KEY, None)


# --------------------------------------------------------------------------------------------------- the math
def normalised_rows(top: torch.Tensor) -> torch.Tensor:
    """Rows of max-over-heads attention renormalised to sum 1, as the released code does (``A / A.sum(-1)``).

    Args:
        top: ``[..., K]`` max over heads of the attention probabilities.

    Returns:
        ``[..., K]`` float32.
    """
    top = top.float()
    return top / top.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def log_columns(rows: torch.Tensor, scale: float) -> torch.Tensor:
    """``log(scale * a)`` of normalised attention weights (``-inf`` where ``a = 0``); column products add these."""
    return torch.log(scale * rows.float())


def column_scores(colsum: torch.Tensor, cand: torch.Tensor, scale: float, fp16: bool) -> tuple[torch.Tensor, ...]:
    """Over-trust score and location of each candidate's local window.

    The window of a candidate is the response block of the last layer's attention: the rows of the ``t`` tokens
    generated so far and the candidate's own row (``t + 1`` columns). Column ``j`` scores
    ``s_j = 1e-7 * prod_{i = j..t} scale * A[i, j]``; the score is ``max_j s_j``, the location its first argmax.

    Args:
        colsum: ``[R, t]`` per response column ``j``, ``sum_{i = j..t-1} log(scale * A[i, j])`` over the rows of the
            generated tokens (``log_columns`` summed).
        cand: ``[R, C, t + 1]`` each candidate's normalised attention to the response tokens, its own column last.
        scale: ``scale_factor``.
        fp16: Round the scores to float16 as the released code does (``inf`` above 65504, 0 under 6e-8).

    Returns:
        ``(score [R, C] float32 (inf: excluded), location [R, C] long)``.
    """
    log_prod = F.pad(colsum, (0, 1))[:, None, :] + log_columns(cand, scale)  # [R, C, t + 1]
    if fp16:  # the released code: float16 product (inf beyond 65504), times 1e-7 in float16
        prod = torch.exp(log_prod).to(torch.float16)  # [R, C, t + 1]
        scores = (prod.float() * SCORE_FLOOR).to(torch.float16).float()
    else:
        scores = torch.exp(log_prod + math.log(SCORE_FLOOR))  # [R, C, t + 1]
    best, location = scores.max(dim=-1)  # first maximum on ties
    return best, location


def smallest_mode(values: torch.Tensor, size: int) -> torch.Tensor:
    """The most frequent value along the last dim (the smallest one on ties).

    Args:
        values: ``[..., n]`` integers in ``[0, size)``.
        size: Number of possible values.

    Returns:
        ``[...]`` long.
    """
    counts = F.one_hot(values, size).sum(dim=-2)  # [..., size]
    return counts.argmax(dim=-1)


def candidate_scores(top: torch.Tensor, cand: torch.Tensor, vocab: int) -> torch.Tensor:
    """``log_softmax`` over each beam's candidates, ``-inf`` elsewhere (a beam with no finite candidate: all -inf).

    Args:
        top: ``[K, C]`` candidate scores (log-probabilities minus the weighted penalty).
        cand: ``[K, C]`` their token ids.
        vocab: Vocabulary size ``V``.

    Returns:
        ``[K, V]`` float32.
    """
    lse = torch.logsumexp(top, dim=-1, keepdim=True)  # [K, 1]
    norm = torch.where(torch.isfinite(lse), top - lse, torch.full_like(top, float("-inf")))  # [K, C]
    return torch.full((top.shape[0], vocab), float("-inf"), device=top.device).scatter(1, cand, norm)  # [K, V]


# ------------------------------------------------------------------------------------------- generate's side
def check_generation(gen: Any, model_kwargs: dict[str, Any]) -> None:
    if gen.do_sample:
        raise ValueError("OPERA is a beam search: do_sample=True is not supported; drop do_sample.")
    if gen.cache_implementation == "static":
        raise ValueError(
            "OPERA does not support the static cache (cache_implementation='static'): its candidate forwards and "
            "rollbacks rewind the cache. Drop cache_implementation (the default dynamic cache)."
        )
    if not model_kwargs.get("use_cache", True):
        raise ValueError("OPERA needs the KV cache; call generate with use_cache=True (the default).")
    if gen.output_attentions or gen.output_hidden_states:
        raise ValueError("OPERA does not return attentions or hidden states; drop output_attentions/_hidden_states.")
    if gen.num_return_sequences > gen.num_beams:
        raise ValueError(
            f"num_return_sequences={gen.num_return_sequences} is more than num_beams={gen.num_beams}; "
            "allowed: at most num_beams."
        )


def check_cache(cache: Any) -> None:
    layers = getattr(cache, "layers", None)
    if layers is None or any(type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer) for layer in layers):
        kinds = sorted({type(layer).__name__ for layer in layers or []}) or [type(cache).__name__]
        raise ValueError(
            f"OPERA needs the default dynamic cache (its candidate forwards and rollbacks rewind it); got {kinds}. "
            "The static, quantized and offloaded caches are unsupported: drop cache_implementation."
        )


# ------------------------------------------------------------------------------------------------ cache rows
def take_rows(kwargs: dict[str, Any], index: torch.Tensor, rows: int) -> dict[str, Any]:
    """Model kwargs for the cache rows ``index`` of kwargs built for ``rows`` rows (the cache object is shared).

    Args:
        kwargs: generate's model kwargs; per-row tensors have ``rows`` rows (``position_ids`` may be
            ``[3 | 4, rows, L]``). Pixel inputs (read only at the prefill: a decoding step has no image tokens) and
            other tensors (flattened image inputs) are dropped.
        index: ``[n]`` long, the rows to take (repeats allowed).
        rows: Rows of the per-row tensors in ``kwargs``.

    Returns:
        The kwargs for ``n`` rows.
    """
    out: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key in ("past_key_values", "cache_position") or not isinstance(value, torch.Tensor):
            out[key] = value
        elif key.startswith("pixel_values"):
            continue
        elif key == "position_ids" and value.dim() == 3:
            out[key] = value.index_select(1, index.to(value.device))  # [4 | 3, n, L]
        elif value.dim() >= 1 and value.shape[0] == rows:
            out[key] = value.index_select(0, index.to(value.device))  # [n, ...]
    return out


def row_cache(cache: Any, part: slice) -> Any:
    """A cache holding only the rows ``part`` of ``cache`` (new layer objects; ``cache`` unchanged)."""
    row = copy.copy(cache)
    row.layers = [copy.copy(layer) for layer in cache.layers]
    for layer in row.layers:
        if layer.is_initialized:
            layer.batch_select_indices(torch.arange(part.start, part.stop, device=layer.keys.device))
    return row


def mark_cache(cache: Any) -> list[dict[str, Any]]:
    """The cache layers' state for ``restore_cache`` (tensor references: updates replace tensors, never write)."""
    return [dict(vars(layer)) for layer in cache.layers]


def restore_cache(cache: Any, marks: list[dict[str, Any]]) -> None:
    """Put back the layers' state ``marks`` recorded by ``mark_cache``."""
    for layer, state in zip(cache.layers, marks, strict=True):
        vars(layer).clear()
        vars(layer).update(state)


def fill_value(gen: Any) -> Any:
    pad, eos = gen._pad_token_tensor, gen._eos_token_tensor
    return pad or eos[0] if eos is not None else -1  # as transformers' beam search fills unused positions


@dataclass
class RowResult:
    """One row's output: ``sequences [R, L + g]``, ``seq_scores [R]``, ``beam_indices [R, g]``, per-step lists."""

    sequences: torch.Tensor
    seq_scores: torch.Tensor
    beam_indices: torch.Tensor
    scores: list[torch.Tensor]
    logits: list[torch.Tensor]


def assemble(results: list[RowResult], gen: Any, beams: int, fill: Any, cache: Any) -> Any:
    """Rows' outputs padded and stacked as transformers' beam search returns them."""
    width = max(r.sequences.shape[1] for r in results)
    sequences = torch.cat([F.pad(r.sequences, (0, width - r.sequences.shape[1]), value=int(fill)) for r in results])
    if not gen.return_dict_in_generate:
        return sequences
    generated = max(r.beam_indices.shape[1] for r in results)
    beam_indices = torch.cat(
        [F.pad(r.beam_indices, (0, generated - r.beam_indices.shape[1]), value=-1) for r in results]
    )

    def steps(name: str) -> tuple[torch.Tensor, ...]:
        per_row = [getattr(r, name) for r in results]
        n = max(len(p) for p in per_row)
        pad = torch.full_like(per_row[0][0], float("-inf"))  # a row that finished earlier: -inf
        return tuple(torch.cat([p[i] if i < len(p) else pad for p in per_row]) for i in range(n))

    return GenerateBeamDecoderOnlyOutput(
        sequences=sequences,
        sequences_scores=torch.cat([r.seq_scores for r in results]) if gen.output_scores else None,
        scores=steps("scores") if gen.output_scores else None,
        logits=steps("logits") if gen.output_logits else None,
        beam_indices=beam_indices,
        past_key_values=cache,
    )
