"""ICD: "Mitigating Hallucinations in Large Vision-Language Models with Instruction Contrastive Decoding".

Wang, Pan, Ding, Biemann, Findings of ACL 2024, https://arxiv.org/abs/2403.18715 (official code: p1k0pan/ICD).

A *disturbance instruction* (a role prefix such as "You are a confused object detector to provide a fuzzy overview
or impression of the image.") put in front of the instruction makes the model hallucinate more; contrasting the
standard distribution with the disturbed one subtracts the hallucinated concepts. Per step, with ``l`` the logits of
the prompt as given and ``l_d`` those of the same prompt with the prefix (same image, its own KV cache and the same
generated tokens; it rides as one extra batch row per main row of every forward):

1. ``z = (1 + lam) * l - lam * l_d`` (the released code's ``cd_alpha``).
2. Adaptive plausibility on the raw ``l``: tokens with ``l < log(beta) + max(l)`` are dropped (``cd_beta``; pushed
   ``CUTOFF_MARGIN`` below every kept token instead of ``-inf``, see ``halludec.decoding.contrast``).

The disturbed prompt is built from the inputs' token ids: in each row the question's tokens (``call.query_spans``,
found from the chat template or ``questions=``) are replaced by the tokens of ``prefix + " " + question``,
tokenized in context (the token before the question is used as an anchor and stripped, so tokenizers whose output
depends on the left context, such as SentencePiece's dummy prefix, give the tokens a full rendering would), and the
rows are re-left-padded. Image tokens, pixels and every per-token tensor (e.g. Qwen's ``mm_token_type_ids``) are
carried over, so no image is processed again. This needs the tokenizer: pass ``processor=`` to ``halludec.generate``.

Deviations, documented in docs/methods/icd.md: the released LLaVA-1.5 script puts the prefix in place of the system
prompt (InstructBLIP's and MiniGPT-4's put it in the Q-Former instruction); here it is prepended to the user's
question, as the paper describes the disturbance, so the same rule works for every chat template. The contrast runs
inside the forward, before every processor and warper, so greedy, sampling and beam search all work (the released
sampler is sampling-only).

Defaults follow the paper's prefix and the released argparse (``lam`` 1, ``beta`` 0.1); the ``repro`` preset uses
the released spelling of the prefix. The released scripts sample with ``do_sample=True, temperature=1, top_p=1`` —
``generate`` keyword arguments, not strategy fields, so pass them yourself.

Cost: one extra batched branch (the prompt plus the prefix, about as long as the main one) in every forward.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from halludec.decoding.base import Strategy, StrategyConfig, check_range, register_strategy
from halludec.decoding.context import CallContext
from halludec.decoding.contrast import plausibility_cutoff
from halludec.decoding.side import LogitsContext

PAPER_PREFIX = "You are a confused object detector to provide a fuzzy overview or impression of the image."
"""The paper's disturbance prefix (its Figure 1)."""
RELEASED_PREFIX = "You are a confused objects detector to provide a fuzzy overview or impression of the image."
"""The same prefix as spelled in the released scripts."""
MAX_ANCHOR = 8
"""Most tokens before the question used as left context when the prefixed question is re-tokenized."""


@dataclass
class ICDConfig(StrategyConfig):
    """ICD hyperparameters.

    Attributes:
        lam: Contrast strength ``lambda`` (the released ``cd_alpha``); 0 turns the contrast (and its branch) off.
        plausibility_beta: Adaptive plausibility cutoff (the released ``cd_beta``) in ``[0, 1]``; 0 = no cutoff.
        prefix: The disturbance instruction put in front of each row's question (a space is added after it).
    """

    lam: float = 1.0
    plausibility_beta: float = 0.1
    prefix: str = PAPER_PREFIX

    def validate(self) -> None:
        check_range("lam", self.lam, 0.0, None)
        check_range("plausibility_beta", self.plausibility_beta, 0.0, 1.0)
        if not isinstance(self.prefix, str) or not self.prefix.strip():
            raise ValueError(
                f"prefix={self.prefix!r} is invalid; allowed: a non-empty string (the disturbance instruction, e.g. "
                f"{PAPER_PREFIX!r}). Use lam=0 to turn ICD off."
            )


def icd_combine(logits: torch.Tensor, disturbed: torch.Tensor, lam: float, beta: float) -> torch.Tensor:
    """ICD's instruction contrast with the plausibility cutoff on the raw standard logits.

    Args:
        logits: Next-token logits of the prompt as given ``[B, V]`` (float32).
        disturbed: Next-token logits of the prompt with the disturbance prefix ``[B, V]``.
        lam: Contrast strength.
        beta: Plausibility cutoff (0 = none).

    Returns:
        ``(1 + lam) * logits - lam * disturbed`` with implausible tokens dropped, ``[B, V]``.
    """
    return plausibility_cutoff((1.0 + lam) * logits - lam * disturbed, logits, beta)


def prefixed_inputs(
    inputs: Mapping[str, Any],
    spans: Sequence[tuple[int, int]],
    tokenizer: Any,
    prefix: str,
    pad_id: int,
) -> dict[str, Any]:
    """The same inputs with ``prefix`` put in front of each row's question, re-tokenized in context, re-left-padded.

    Args:
        inputs: Model inputs with ``input_ids`` ``[B, L]`` (any padding) and optionally ``attention_mask``.
        spans: Per row, the question's half-open token span in the padded row (``call.query_spans``).
        tokenizer: The tokenizer that built ``input_ids`` (a processor's ``.tokenizer``).
        prefix: Text to put in front of the question; a space separates them unless it ends with whitespace.
        pad_id: Id written into the new left padding.

    Returns:
        New inputs of length ``L'`` (the longest new row): ``input_ids``, ``attention_mask`` and every other
        per-token ``[B, L]`` tensor (the new tokens get the value of the question's first token there); position
        ids dropped; every other entry (pixels, grids) shared with ``inputs``.

    Raises:
        ValueError: when the number of spans does not match the rows.
    """
    ids = inputs["input_ids"]
    if len(spans) != ids.shape[0]:
        raise ValueError(f"Got {len(spans)} question spans for {ids.shape[0]} rows; pass one span per row.")
    am = inputs.get("attention_mask")
    keep = (torch.ones_like(ids) if am is None else am).bool().tolist()
    per_token = {
        k: v for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape == ids.shape
    }
    rows: dict[str, list[list[Any]]] = {k: [] for k in per_token}
    for r, (q0, q1) in enumerate(spans):
        row_ids = ids[r].tolist()
        segment = _prefixed_question(tokenizer, row_ids, keep[r], q0, q1, prefix)
        before = [i for i in range(q0) if keep[r][i]]
        after = [i for i in range(q1, len(row_ids)) if keep[r][i]]
        for key, value in per_token.items():
            vals = value[r].tolist()
            # attention mask and type ids: the new tokens are real text, like the question's first token
            mid = segment if key == "input_ids" else [vals[q0]] * len(segment)
            rows[key].append([vals[i] for i in before] + mid + [vals[i] for i in after])
    new_len = max(len(row) for row in rows["input_ids"])
    out: dict[str, Any] = {}
    for key, value in inputs.items():
        if key in per_token:
            fill = pad_id if key == "input_ids" else 0
            padded = [[fill] * (new_len - len(row)) + row for row in rows[key]]
            out[key] = torch.tensor(padded, dtype=value.dtype, device=value.device)  # [B, L']
        elif key not in ("position_ids", "cache_position", "rope_deltas"):
            out[key] = value
    if am is None:
        lengths = torch.tensor([len(row) for row in rows["input_ids"]], device=ids.device)  # [B]
        out["attention_mask"] = (torch.arange(new_len, device=ids.device) >= new_len - lengths[:, None]).long()
    return out


def _prefixed_question(tokenizer: Any, ids: list[int], keep: list[bool], q0: int, q1: int, prefix: str) -> list[int]:
    """Token ids of ``prefix + " " + question`` as they follow the tokens before the question in a full rendering.

    The shortest run of tokens before the question that re-tokenizes to itself (at most :data:`MAX_ANCHOR`) is
    decoded, the new text appended, the whole re-tokenized and the anchor stripped again.
    """
    question = ids[q0:q1]
    before = [t for t, k in zip(ids[:q0], keep[:q0], strict=True) if k]
    sep = "" if prefix[-1].isspace() else " "
    for n in range(1, min(MAX_ANCHOR, len(before)) + 1):
        anchor = before[-n:]
        left = _decode(tokenizer, anchor)
        full = _decode(tokenizer, anchor + question)
        if not full.startswith(left):
            continue
        text = full[len(left) :]
        body = text.lstrip()
        lead = text[: len(text) - len(body)]  # whitespace a SentencePiece token carries in front of the question
        encoded = _encode(tokenizer, f"{left}{lead}{prefix}{sep}{body}")
        if encoded[:n] == anchor:
            return encoded[n:]
    return _encode(tokenizer, f"{prefix}{sep}{_decode(tokenizer, question).lstrip()}")


def _decode(tokenizer: Any, ids: list[int]) -> str:
    if not ids:
        return ""
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@register_strategy("icd")
class ICD(Strategy):
    """Instruction Contrastive Decoding: contrast with the prompt under a disturbance instruction (Wang et al. 2024)."""

    config_class = ICDConfig
    paper: ClassVar[str] = "https://arxiv.org/abs/2403.18715"
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # The released scripts' prefix spelling and argparse values; they also sample with temperature=1, top_p=1.
        "repro": {"lam": 1.0, "plausibility_beta": 0.1, "prefix": RELEASED_PREFIX},
    }

    def side_inputs(self, call: CallContext) -> list[dict[str, Any]]:
        """The prompt with the disturbance prefix in front of each question (none when ``lam`` is 0)."""
        if self.config.lam == 0.0:
            return []
        if call.processor is None:
            raise ValueError(
                "Strategy 'icd' writes its disturbance prefix into each prompt as text and needs the tokenizer that "
                "built the inputs: pass `processor=` (the processor or its tokenizer) to halludec.generate / "
                "halludec.apply, and optionally `questions=[...]`."
            )
        tokenizer = getattr(call.processor, "tokenizer", call.processor)
        return [
            prefixed_inputs(call.inputs, call.query_spans, tokenizer, self.config.prefix, call.adapter.pad_token_id)
        ]

    def logits_enabled(self, call: CallContext) -> bool:
        return self.config.lam != 0.0 or self.config.plausibility_beta != 0.0

    def edit_logits(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
        """``(1 + lam) * l - lam * l_disturbed``, then the plausibility cutoff on ``l``."""
        if not ctx.side:  # lam == 0: only the cutoff
            return plausibility_cutoff(logits, logits, self.config.plausibility_beta)
        (disturbed,) = ctx.side
        return icd_combine(logits, disturbed, self.config.lam, self.config.plausibility_beta)
