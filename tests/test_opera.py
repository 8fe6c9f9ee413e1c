"""OPERA: the column-product penalty on hand-computed windows, the search against transformers' beam search."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

import halludec
from halludec.decoding import opera_batch, opera_search
from halludec.decoding.opera import candidate_scores, column_scores, log_columns, normalised_rows, smallest_mode
from halludec.tiny import tiny_batch
from tests.conftest import QUESTIONS, REQUIRED_FAMILIES, tiny
from tests.helpers import assert_batch_equals_singles, assert_same_snapshot, snapshot

NEUTRAL = {"num_attn_candidates": None, "penalty_weights": 0.0, "threshold": None}
# rollbacks within a few tokens on random tiny models: sigma * a > 1, so the first column's product keeps growing
ROLLING = {"num_beams": 2, "scale_factor": 1000.0, "early_tokens": 0, "threshold": 1, "fp16_scores": False}


# ------------------------------------------------------------------------------------------------ the math
def _window() -> tuple[torch.Tensor, torch.Tensor]:
    """Two generated rows and two candidates' rows of a response window (already normalised)."""
    history = torch.tensor([[1.0, 0.0], [0.2, 0.8]])  # rows 0 and 1 over response columns 0..1
    cands = torch.tensor([[0.5, 0.3, 0.2], [0.01, 0.9, 0.09]])  # [C, t + 1]: columns 0, 1 and the candidate
    return history, cands


def test_column_scores_match_hand_computed_products():
    history, cands = _window()
    colsum = torch.stack([log_columns(history[0:, 0], 50.0).sum(), log_columns(history[1:, 1], 50.0).sum()])[None]
    before = (colsum.clone(), cands.clone())
    score, loc = column_scores(colsum, cands[None], 50.0, fp16=False)
    # s_j = 1e-7 * prod_{i >= j} 50 * A[i, j]: candidate 0 -> 1e-7 * 50^3 * 1.0 * 0.2 * 0.5 = 1.25e-3 (column 0)
    # candidate 1 -> column 0: 1e-7 * 50^3 * 0.2 * 0.01 = 2.5e-5, column 1: 1e-7 * 50^2 * 0.8 * 0.9 = 1.8e-4
    torch.testing.assert_close(score, torch.tensor([[1.25e-3, 1.8e-4]]), rtol=1e-5, atol=0)
    assert loc.tolist() == [[0, 1]]
    assert torch.equal(colsum, before[0])  # inputs untouched
    assert torch.equal(cands, before[1])


def test_fp16_scores_vanish_and_saturate_like_the_released_code():
    colsum = torch.tensor([[math.log(50.0) * 4, math.log(1e-3)]])  # column 0: 50^4 so far; column 1: tiny
    cands = torch.tensor([[[1.0, 1e-9, 0.0]], [[1e-10, 1e-9, 0.0]]])  # [2 beams, 1 candidate, 3 columns]
    score, loc = column_scores(colsum.expand(2, -1), cands, 50.0, fp16=True)
    assert math.isinf(score[0, 0])  # 50^5 = 3.1e8 > 65504: float16 overflow excludes the candidate
    assert score[1, 0] == 0.0  # everything under 6e-8 vanishes: a tie, the first column
    assert loc[1, 0] == 0
    exact, _ = column_scores(colsum.expand(2, -1), cands, 50.0, fp16=False)
    assert exact[0, 0] == pytest.approx(1e-7 * 50.0**5, rel=1e-5)


def test_candidate_scores_renormalise_over_the_candidates():
    top = torch.tensor([[math.log(0.3), math.log(0.1)], [float("-inf"), float("-inf")]])
    cand = torch.tensor([[4, 1], [0, 2]])
    out = candidate_scores(top, cand, vocab=6)
    torch.testing.assert_close(out[0, [4, 1]], torch.log(torch.tensor([0.75, 0.25])))
    assert torch.isinf(out[0, [0, 2, 3, 5]]).all()
    assert torch.isneginf(out[1]).all()  # no NaN for a dead beam


def test_rows_and_mode_helpers():
    torch.testing.assert_close(normalised_rows(torch.tensor([[2.0, 2.0, 4.0]])), torch.tensor([[0.25, 0.25, 0.5]]))
    assert smallest_mode(torch.tensor([[3, 1, 3, 1, 2], [0, 0, 4, 4, 4]]), 5).tolist() == [1, 4]


# ------------------------------------------------------------------------------------------------ the search
class _PushEos(LogitsProcessor):
    """Make EOS likely at the third step where the last token is odd, so beams finish at different lengths."""

    def __init__(self, eos: int, at: int) -> None:
        self.eos, self.at = eos, at

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] != self.at:
            return scores
        odd = input_ids[:, -1] % 2 == 1  # [rows]: by content, not by row index (OPERA searches row by row)
        boost = torch.zeros_like(scores)
        boost[:, self.eos] = scores.max(-1).values - scores[:, self.eos] + 1.0
        return scores + boost * odd[:, None]


@pytest.mark.parametrize(
    ("beams", "length_penalty", "early_stopping", "returned"),
    [(2, 1.0, False, 1), (5, 1.0, False, 2), (3, 2.0, True, 1), (3, -0.5, "never", 3)],
)
def test_neutral_search_equals_transformers_beam_search(beams, length_penalty, early_stopping, returned):
    model, processor = tiny("llava")
    batch = tiny_batch(processor, "llava", QUESTIONS, seed=0)
    eos = model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    kw = {
        "max_new_tokens": 7,
        "num_beams": beams,
        "length_penalty": length_penalty,
        "early_stopping": early_stopping,
        "num_return_sequences": returned,
        "output_scores": True,
        "return_dict_in_generate": True,
    }
    push = _PushEos(eos, batch["input_ids"].shape[1] + 2)
    plain = model.generate(**batch, **kw, logits_processor=LogitsProcessorList([push]))
    ours = halludec.generate(model, batch, halludec.get_strategy("opera", **NEUTRAL), logits_processor=[push], **kw)
    assert torch.equal(plain.sequences, ours.sequences)
    assert torch.equal(plain.beam_indices, ours.beam_indices)
    torch.testing.assert_close(plain.sequences_scores, ours.sequences_scores)
    for a, b in zip(plain.scores, ours.scores, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("family", REQUIRED_FAMILIES)
def test_neutral_and_active_on_required_families(family):
    model, processor = tiny(family)
    batch = tiny_batch(processor, family, QUESTIONS, seed=0)
    kw = {"max_new_tokens": 5, "min_new_tokens": 5, "num_beams": 3}
    before = snapshot(model)
    plain = model.generate(**batch, **kw)
    assert torch.equal(plain, halludec.generate(model, batch, halludec.get_strategy("opera", **NEUTRAL), **kw))
    active = halludec.generate(model, batch, halludec.get_strategy("opera", early_tokens=0, fp16_scores=False), **kw)
    assert active.shape == plain.shape
    assert_same_snapshot(before, snapshot(model))


def test_default_uses_five_beams_and_the_penalty_changes_scores():
    model, processor = tiny("llava")
    batch = tiny_batch(processor, "llava", QUESTIONS, seed=0)
    kw = {"max_new_tokens": 4, "min_new_tokens": 4, "output_scores": True, "return_dict_in_generate": True}
    plain = model.generate(**batch, **kw, num_beams=5)
    off = halludec.generate(model, batch, halludec.get_strategy("opera", penalty_weights=0.0), **kw)
    on = halludec.generate(model, batch, "opera", **kw)
    assert off.scores[0].shape == plain.scores[0].shape == (10, plain.scores[0].shape[1])  # 2 rows x 5 beams
    finite = torch.isfinite(on.scores[0])
    assert int(finite.sum(-1).max()) == 5  # five candidates per beam
    assert not torch.allclose(off.scores[0][finite], on.scores[0][finite])  # the image bonus of the first tokens


def test_fast_preset_is_greedy_until_a_rollback():
    model, processor = tiny("llava")
    batch = tiny_batch(processor, "llava", QUESTIONS, seed=0)
    fast = halludec.get_strategy("opera:fast")
    assert (fast.config.threshold, fast.config.num_attn_candidates, fast.config.num_beams) == (25, 1, 5)
    kw = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False}
    assert torch.equal(model.generate(**batch, **kw), halludec.generate(model, batch, fast, **kw))


def test_rollback_rechooses_excluding_every_earlier_choice(monkeypatch):
    model, processor = tiny("llava")
    batch = tiny_batch(processor, "llava", QUESTIONS[:1], seed=0)
    seen: list[tuple[int, torch.Tensor]] = []
    redo: dict[str, torch.Tensor] = {}
    rollback, advance = opera_search.RowSearch._rollback, opera_search.RowSearch._advance

    def spy_rollback(self, pos, history, rejects, prompt):
        out = rollback(self, pos, history, rejects, prompt)
        redo["rejects"] = out[-1].clone()
        seen.append((pos, out[-1].clone()))
        return out

    def spy_advance(self, b, step, scores):
        new, source, token, done = advance(self, b, step, scores)
        if "rejects" in redo:  # the step right after a rollback: none of the excluded continuations is chosen
            chosen = source * step.shape[1] + token
            assert not torch.isin(chosen, redo.pop("rejects")).any()
        return new, source, token, done

    monkeypatch.setattr(opera_search.RowSearch, "_rollback", spy_rollback)
    monkeypatch.setattr(opera_search.RowSearch, "_advance", spy_advance)
    kw = {"max_new_tokens": 6, "min_new_tokens": 6}
    rolled = halludec.generate(model, batch, halludec.get_strategy("opera", **ROLLING), **kw)
    assert seen, "no rollback happened"
    positions = [pos for pos, _ in seen]
    assert max(positions.count(p) for p in positions) <= 5  # at most num_attn_candidates per position
    for (pos, first), (again, second) in itertools.pairwise(seen):
        if again == pos:  # a second rollback to a position excludes the earlier choices too
            assert torch.isin(first, second).all()
            assert second.numel() > first.numel()
    plain = halludec.generate(model, batch, halludec.get_strategy("opera", **{**ROLLING, "threshold": None}), **kw)
    assert not torch.equal(rolled, plain)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_batch_equals_singles_with_rollbacks(family):
    model, processor = tiny(family)
    strategy = halludec.get_strategy("opera", **{**ROLLING, "num_beams": 1})  # the helper compares rows, not beams
    assert_batch_equals_singles(model, processor, family, strategy, QUESTIONS, max_new_tokens=5, min_new_tokens=5)


# ------------------------------------------------------------------------------------------------ errors
def test_unsupported_settings_are_clear_errors():
    model, processor = tiny("llava")
    batch = tiny_batch(processor, "llava", QUESTIONS, seed=0)
    before = snapshot(model)
    with pytest.raises(ValueError, match="do_sample"):
        halludec.generate(model, batch, "opera", max_new_tokens=2, do_sample=True)
    with pytest.raises(ValueError, match="static cache"):
        halludec.generate(model, batch, "opera", max_new_tokens=2, cache_implementation="static")
    with pytest.raises(ValueError, match="batch size 1"):
        halludec.generate(model, batch, ["vhr", "opera"], max_new_tokens=2)
    with pytest.raises(RuntimeError, match=r"halludec\.generate"), halludec.apply(model, "opera", batch):
        model.generate(**batch, max_new_tokens=2, num_beams=2)
    assert_same_snapshot(before, snapshot(model))
    for bad in ({"scale_factor": 0.0}, {"threshold": 0}, {"num_attn_candidates": 0}, {"num_attn_candidates": None}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            halludec.get_strategy("opera", **bad)


def test_composes_with_attention_and_logits_strategies_on_one_row():
    model, processor = tiny("llava")
    batch = tiny_batch(processor, "llava", QUESTIONS[:1], seed=0)
    before = snapshot(model)
    kw = {"max_new_tokens": 3, "min_new_tokens": 3, "num_beams": 2}
    alone = halludec.generate(model, batch, halludec.get_strategy("opera", **ROLLING), **kw)
    for other in ("pai", "vcd"):
        both = halludec.generate(model, batch, [other, halludec.get_strategy("opera", **ROLLING)], **kw)
        assert both.shape == alone.shape
    assert_same_snapshot(before, snapshot(model))


# ------------------------------------------------------------------------------------------------ batched candidates
@pytest.mark.parametrize(
    ("family", "config"),
    [
        ("llava", {"early_tokens": 2, "fp16_scores": False}),
        ("llava", ROLLING),
        ("qwen2_vl", {**ROLLING, "num_beams": 3}),
    ],
)
def test_batched_candidates_equal_one_candidate_at_a_time(monkeypatch, family, config):
    """One forward of K * C candidate rows reads the attention rows of C forwards of K rows (to rounding)."""
    model, processor = tiny(family)
    batch = tiny_batch(processor, family, QUESTIONS, seed=0)
    strategy = halludec.get_strategy("opera", **config)
    kw = {"max_new_tokens": 6, "min_new_tokens": 6, "output_scores": True, "return_dict_in_generate": True}
    batched = halludec.generate(model, batch, strategy, **kw)
    monkeypatch.setattr(opera_search.RowSearch, "_candidates", opera_search.RowSearch._candidates_serial)
    serial = halludec.generate(model, batch, strategy, **kw)
    assert torch.equal(batched.sequences, serial.sequences)
    assert torch.equal(batched.beam_indices, serial.beam_indices)
    # float32 GEMMs over K * C rows instead of K may round the attention rows differently in the last bit
    torch.testing.assert_close(batched.sequences_scores, serial.sequences_scores, rtol=1e-5, atol=1e-6)
    for a, b in zip(batched.scores, serial.scores, strict=True):
        assert torch.equal(torch.isfinite(a), torch.isfinite(b))  # the same candidates, the same exclusions
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("family", "config", "diverge"),
    [("llava", ROLLING, False), ("llava", ROLLING, True), ("qwen2_vl", {**ROLLING, "num_beams": 3}, True)],
)
def test_rows_in_lockstep_share_forwards_and_equal_rows_searched_alone(monkeypatch, family, config, diverge):
    model, processor = tiny(family)
    if diverge:  # only the second row rolls back: the rows go on at different lengths, in separate forwards
        position = opera_search.RowSearch._rollback_position
        monkeypatch.setattr(
            opera_search.RowSearch,
            "_rollback_position",
            lambda self, *args: None if self.offset == 0 else position(self, *args),
        )
    batch = tiny_batch(processor, family, QUESTIONS, seed=0)
    strategy = halludec.get_strategy("opera", **config)
    kw = {"max_new_tokens": 6, "min_new_tokens": 6, "output_scores": True, "return_dict_in_generate": True}
    shared: list[int] = []
    forward_rows = opera_batch.forward_rows

    def spy(model, call, requests, rows):
        shared.append(len(requests))
        return forward_rows(model, call, requests, rows)

    run_searches = opera_batch.run_searches
    monkeypatch.setattr(opera_batch, "forward_rows", spy)
    monkeypatch.setattr(opera_batch, "run_searches", lambda *args, max_rows: run_searches(*args))  # no row cap
    together = halludec.generate(model, batch, strategy, **kw)
    assert max(shared) == 2  # the rows in lockstep share their forwards, candidates included
    assert (min(shared) == 1) == diverge  # a row at another length runs alone

    def alone(model, call, searches, max_rows):
        return {row: run_searches(model, call, {row: s})[row] for row, s in searches.items()}

    monkeypatch.setattr(opera_batch, "run_searches", alone)
    apart = halludec.generate(model, batch, strategy, **kw)
    assert torch.equal(together.sequences, apart.sequences)
    assert torch.equal(together.beam_indices, apart.beam_indices)
    torch.testing.assert_close(together.sequences_scores, apart.sequences_scores, rtol=1e-5, atol=1e-6)
    for a, b in zip(together.scores, apart.scores, strict=True):
        assert torch.equal(torch.isfinite(a), torch.isfinite(b))
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
