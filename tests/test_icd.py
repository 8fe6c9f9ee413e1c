"""ICD: the contrast math, the disturbed prompt (= a fresh rendering with the prefix), neutral/active configs,
side logits, batches, beams and the missing-processor error.

Every other tiny family runs through the strategy matrix (tests/test_strategy_matrix.py).
"""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import halludec
from halludec.decoding.contrast import CUTOFF_MARGIN
from halludec.decoding.icd import ICD, PAPER_PREFIX, RELEASED_PREFIX, icd_combine, prefixed_inputs
from halludec.decoding.side import LogitsContext
from halludec.tiny import tiny_batch
from tests.conftest import QUESTIONS, REQUIRED_FAMILIES, tiny
from tests.helpers import (
    assert_batch_equals_singles,
    assert_neutral_then_active,
    assert_same_snapshot,
    assert_side_logits_and_contrast,
    recording,
    snapshot,
)

GREEDY = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False}
SCORES = {"output_scores": True, "return_dict_in_generate": True}
NEUTRAL = {"lam": 0.0, "plausibility_beta": 0.0}


def test_combination_and_cutoff_match_hand_computed_values():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.5, 0.4, -1.0]])
    disturbed = torch.tensor([[1.0, 2.0, 0.0], [0.5, -0.6, 0.0]])
    keep_l, keep_d = logits.clone(), disturbed.clone()
    # lam 1: z = 2 l - l_d = [[3, 0, 0], [0.5, 1.4, -2]]; beta 0.5 keeps l >= max(l) - 0.693: row 0 token 0 only,
    # row 1 tokens 0 and 1. Dropped tokens: z - (max z - min z) - margin.
    expected = torch.tensor([[3.0, -3.0 - CUTOFF_MARGIN, -3.0 - CUTOFF_MARGIN], [0.5, 1.4, -2.0 - 3.4 - CUTOFF_MARGIN]])
    torch.testing.assert_close(icd_combine(logits, disturbed, 1.0, 0.5), expected)
    torch.testing.assert_close(icd_combine(logits, disturbed, 0.5, 0.0), 1.5 * logits - 0.5 * disturbed)
    assert torch.equal(logits, keep_l)
    assert torch.equal(disturbed, keep_d)
    # The hook: lam 0 has no side branch; with beta 0 it returns the logits unchanged.
    assert torch.equal(ICD(**NEUTRAL).edit_logits(logits, LogitsContext(None, [], 0)), logits)
    torch.testing.assert_close(
        ICD(lam=1.0, plausibility_beta=0.5).edit_logits(logits, LogitsContext(None, [disturbed], 3)), expected
    )


def test_config_validation_and_preset():
    for field, value in [("lam", -1.0), ("plausibility_beta", 1.5), ("prefix", "  "), ("prefix", 3)]:
        with pytest.raises(ValueError, match=rf"{field}={value!r} is invalid"):
            halludec.get_strategy("icd", **{field: value})
    s = halludec.get_strategy("icd")
    assert (s.config.lam, s.config.plausibility_beta, s.config.prefix) == (1.0, 0.1, PAPER_PREFIX)
    assert halludec.get_strategy("icd:repro").config.prefix == RELEASED_PREFIX
    assert ICD.paper.endswith("2403.18715")
    assert "icd:repro" in halludec.list_strategies()


@pytest.mark.parametrize("family", REQUIRED_FAMILIES)
def test_disturbed_prompt_equals_a_fresh_rendering(family):
    """The side input is exactly what the processor gives for "<prefix> <question>" (left-padded batch)."""
    model, processor = tiny(family)
    adapter = halludec.get_adapter(model)
    batch = tiny_batch(processor, family, QUESTIONS, seed=0)
    before = {k: v.clone() for k, v in batch.items()}
    with halludec.apply(model, ICD(prefix="Be vague."), batch, processor=processor) as call:
        (side,) = ICD(prefix="Be vague.").side_inputs(call)
    reference = tiny_batch(processor, family, [f"Be vague. {q}" for q in QUESTIONS], seed=0)
    assert sorted(side) == sorted(reference)
    for key, value in reference.items():
        assert torch.equal(side[key], value), key
    for key, value in before.items():  # the main inputs are untouched
        assert torch.equal(batch[key], value), key
    assert adapter.image_mask(side["input_ids"]).sum() == adapter.image_mask(batch["input_ids"]).sum()


def _metaspace_tokenizer() -> PreTrainedTokenizerFast:
    """A SentencePiece-like tokenizer (dummy prefix "▁" at the start of the text only) with a few whole words."""
    vocab = {"<pad>": 0, "<s>": 1, "<unk>": 2, "▁": 3}
    for ch in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ?.:,\n":
        vocab[ch] = len(vocab)
    merges = []
    for word in ("▁What", "▁is", "▁USER", "▁ASSISTANT", "▁Be", "What", "Be"):
        for k in range(2, len(word) + 1):
            if word[:k] not in vocab:
                merges.append((word[: k - 1], word[k - 1]))
                vocab[word[:k]] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", pad_token="<pad>", unk_token="<unk>")
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tok


@pytest.mark.parametrize(
    ("template", "head"),  # head: tokens before the question (the tail " ASSISTANT:" is 2 tokens in each)
    [("USER: <image>\n{} ASSISTANT:", 5), ("USER: <image> {} ASSISTANT:", 4), ("{} ASSISTANT:", 0)],
)
def test_prefix_is_tokenized_in_context(template, head):
    """With a context-dependent tokenizer the prefixed question gets the tokens a full rendering gives."""
    tok = _metaspace_tokenizer()
    questions, prefix = ("What is it?", "Is it?"), "Be vague."
    rows = [tok(template.format(q), add_special_tokens=False)["input_ids"] for q in questions]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])  # left-padded
    spans = [(width - len(r) + head, width - 2) for r in rows]
    out = prefixed_inputs({"input_ids": ids, "attention_mask": (ids != 0).long()}, spans, tok, prefix, 0)
    for r, q in enumerate(questions):
        assert tok.decode(ids[r, spans[r][0] : spans[r][1]]).strip() == q
        expected = tok(template.format(f"{prefix} {q}"), add_special_tokens=False)["input_ids"]
        got = out["input_ids"][r][out["attention_mask"][r].bool()].tolist()
        assert got == expected, (tok.convert_ids_to_tokens(got), tok.convert_ids_to_tokens(expected))


def test_missing_processor_is_a_clear_error():
    model, processor = tiny("llava")
    batch = tiny_batch(processor, "llava", QUESTIONS, seed=0)
    with pytest.raises(ValueError, match="pass `processor=`"):
        halludec.generate(model, batch, "icd", max_new_tokens=2)
    assert torch.equal(
        halludec.generate(model, batch, ICD(**NEUTRAL), max_new_tokens=2), model.generate(**batch, max_new_tokens=2)
    )


@pytest.mark.parametrize("family", REQUIRED_FAMILIES)
def test_neutral_active_side_logits_batch_and_restore(family):
    model, processor = tiny(family)
    batch = tiny_batch(processor, family, QUESTIONS, seed=0)
    before = snapshot(model)
    strategy = recording(ICD)(plausibility_beta=0.0)
    _, active = assert_neutral_then_active(model, processor, batch, [ICD(**NEUTRAL)], strategy, **GREEDY, **SCORES)

    # The side logits at the prefill equal a fresh forward on the disturbed prompt; the first scores are the contrast.
    side = tiny_batch(processor, family, [f"{PAPER_PREFIX} {q}" for q in QUESTIONS], seed=0)
    assert_side_logits_and_contrast(model, batch, strategy, [side], active, lambda m, s: icd_combine(m, s, 1.0, 0.0))

    # A left-padded batch of 2 equals each row alone (default config, cutoff on).
    assert_batch_equals_singles(model, processor, family, ICD(), QUESTIONS, **GREEDY)
    assert_same_snapshot(before, snapshot(model))


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_greedy_sampling_and_beam_run(family):
    model, processor = tiny(family)
    batch = tiny_batch(processor, family, QUESTIONS, seed=0)
    prompt = batch["input_ids"].shape[1]
    kw = {"processor": processor, "max_new_tokens": 4}
    greedy = halludec.generate(model, batch, "icd", do_sample=False, **kw)
    beam = halludec.generate(model, batch, "icd", num_beams=2, do_sample=False, **kw)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(halludec.generate(model, batch, "icd:repro", do_sample=True, top_p=1.0, **kw))
    assert torch.equal(runs[0], runs[1])
    for out in (greedy, beam, runs[0]):
        assert out.shape[0] == 2
        assert prompt < out.shape[1] <= prompt + 4
