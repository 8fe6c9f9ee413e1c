"""Tests of halludec.tiny: tiny offline VLMs of every family, their processors and batches."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText

from halludec.tiny import TINY_FAMILIES, TINY_QUESTIONS, available_tiny_families, build_tiny, tiny_batch

# Image tokens per row for the default image size of each family.
EXPECTED_IMAGE_TOKENS = {
    "llava": 25,
    "llava_next": 80,
    "llava_onevision": 52,
    "qwen2_vl": 6,
    "qwen2_5_vl": 6,
    "qwen3_vl": 6,
    "gemma3": 16,
    "internvl": 4,
    "smolvlm": 4,
    "idefics3": 4,
    "paligemma": 16,
}
REQUIRED = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")
QUESTIONS = list(TINY_QUESTIONS)

_CACHE: dict[str, tuple] = {}


def _tiny(family: str) -> tuple:
    if family not in _CACHE:
        _CACHE[family] = build_tiny(family, seed=0)
    return _CACHE[family]


def _image_token_id(model) -> int:
    return model.config.image_token_id


def test_families_cover_required_and_expected():
    assert set(REQUIRED) <= set(available_tiny_families())
    assert set(TINY_FAMILIES) <= set(EXPECTED_IMAGE_TOKENS)
    assert len(QUESTIONS[0]) != len(QUESTIONS[1])


@pytest.mark.parametrize("family", available_tiny_families())
def test_model_properties(family):
    model, processor = _tiny(family)
    assert model.config.model_type == family
    assert not model.training
    assert model.config._attn_implementation == "sdpa"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    tok = processor.tokenizer
    assert tok.padding_side == "left"
    assert model.config.get_text_config().vocab_size >= len(tok)
    assert model.generation_config.pad_token_id == tok.pad_token_id


@pytest.mark.parametrize("family", available_tiny_families())
def test_tokenizer_round_trips(family):
    _, processor = _tiny(family)
    tok = processor.tokenizer
    text = "Héllo,  wörld!\n\t日本語 🙂 <b>x</b> 1 , 2 ; don't"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text


@pytest.mark.parametrize("family", available_tiny_families())
def test_batch_left_padded_with_image_tokens(family):
    model, processor = _tiny(family)
    batch = tiny_batch(processor, family, QUESTIONS)
    ids, mask = batch["input_ids"], batch["attention_mask"]  # (2, T)
    assert ids.shape == mask.shape
    assert ids.shape[0] == 2
    assert mask[1].all()  # the longer question fills its row
    n_pad = int((mask[0] == 0).sum())
    assert n_pad > 0
    assert not mask[0, :n_pad].any()
    assert mask[0, n_pad:].all()
    assert (ids[0, :n_pad] == processor.tokenizer.pad_token_id).all()
    n_image = (ids == _image_token_id(model)).sum(dim=1)  # (2,)
    assert n_image.tolist() == [EXPECTED_IMAGE_TOKENS[family]] * 2


@pytest.mark.parametrize("family", available_tiny_families())
def test_question_rendered_verbatim(family):
    _, processor = _tiny(family)
    tok = processor.tokenizer
    batch = tiny_batch(processor, family, QUESTIONS)
    for row, question in zip(batch["input_ids"].tolist(), QUESTIONS, strict=True):
        q = tok.encode(question, add_special_tokens=False)
        starts = [i for i in range(len(row) - len(q) + 1) if row[i : i + len(q)] == q]
        assert len(starts) == 1
        assert question in tok.decode(row)


@pytest.mark.parametrize("family", available_tiny_families())
def test_generate_and_padding_invariance(family):
    model, processor = _tiny(family)
    batch = tiny_batch(processor, family, QUESTIONS)
    out = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert out.shape[0] == 2
    assert batch["input_ids"].shape[1] < out.shape[1] <= batch["input_ids"].shape[1] + 5
    # Each row alone (image_seed_offset=row -> same image) gives the same next-token logits as in the batch.
    with torch.no_grad():
        batched = model(**batch).logits[:, -1]  # (2, V)
        for row, question in enumerate(QUESTIONS):
            single = tiny_batch(processor, family, [question], image_seed_offset=row)
            alone = model(**single).logits[0, -1]  # (V,)
            torch.testing.assert_close(batched[row], alone, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", available_tiny_families())
def test_save_and_reload(family, tmp_path):
    model, processor = _tiny(family)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model)
    batch = tiny_batch(processor, family, QUESTIONS)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits)


@pytest.mark.parametrize("family", REQUIRED)
def test_deterministic(family):
    state = torch.random.get_rng_state()
    a, proc_a = build_tiny(family, seed=0)
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched
    b, proc_b = build_tiny(family, seed=0)
    c, _ = build_tiny(family, seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    x, y = tiny_batch(proc_a, family, QUESTIONS, seed=3), tiny_batch(proc_b, family, QUESTIONS, seed=3)
    assert all(torch.equal(x[k], y[k]) for k in x)
    z = tiny_batch(proc_a, family, QUESTIONS, seed=4)
    assert not torch.equal(x["pixel_values"], z["pixel_values"])


@pytest.mark.parametrize(
    ("family", "sizes", "expected"),
    [
        ("llava_next", [(30, 60), (30, 30)], [80, 55]),
        ("qwen2_vl", [(56, 84), (56, 56)], [6, 4]),
        ("qwen2_5_vl", [(56, 112), (56, 56)], [8, 4]),
    ],
)
def test_image_sizes(family, sizes, expected):
    model, processor = _tiny(family)
    batch = tiny_batch(processor, family, QUESTIONS, image_sizes=sizes)
    assert (batch["input_ids"] == _image_token_id(model)).sum(dim=1).tolist() == expected
    model.generate(**batch, max_new_tokens=2, do_sample=False)


def test_bad_arguments():
    _, processor = _tiny("llava")
    with pytest.raises(ValueError, match="Unknown tiny family"):
        build_tiny("blip2")
    with pytest.raises(ValueError, match="at least one"):
        tiny_batch(processor, "llava", [])
    with pytest.raises(ValueError, match="image sizes"):
        tiny_batch(processor, "llava", QUESTIONS, image_sizes=[(30, 30)])
