"""Adapters: structure, image spans, query spans, image-free and noised inputs, vision attentions."""

from __future__ import annotations

import pytest
import torch

import halludec
from halludec.tiny import TINY_FAMILIES, available_tiny_families, tiny_batch
from halludec.vlm_adapters.spans import contiguous_runs
from tests.conftest import QUESTIONS, REQUIRED_FAMILIES, tiny


def test_required_families_are_covered():
    assert set(REQUIRED_FAMILIES) <= set(available_tiny_families())
    assert set(TINY_FAMILIES) <= set(halludec.list_adapters())


def test_structure(family):
    model, _ = tiny(family)
    adapter = halludec.get_adapter(model)
    dims = adapter.dims
    assert (dims.num_layers, dims.num_heads, dims.num_kv_heads, dims.head_dim) == (4, 4, 2, 16)
    assert len(adapter.attention_modules()) == 4
    for i in range(4):
        assert adapter.attention(i).layer_idx == i
        assert adapter.o_proj(i).in_features == dims.num_heads * dims.head_dim


def test_contiguous_runs():
    mask = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1], dtype=torch.bool)
    assert contiguous_runs(mask) == [(1, 3), (4, 5), (7, 8)]
    assert contiguous_runs(torch.zeros(3, dtype=torch.bool)) == []


def test_image_spans_hand_built_two_images_left_padding():
    """Two images in row 0, one in row 1 behind 4 pads; spans index the padded rows."""
    model, _ = tiny("llava")
    adapter = halludec.get_adapter(model)
    img = adapter.image_token_id
    row0 = [5, img, img, img, 6, 7, img, img, img, 8]
    row1 = [0, 0, 0, 0, 5, img, img, img, 6, 7]
    spans = adapter.image_spans(torch.tensor([row0, row1]))
    assert spans == [[(1, 4), (6, 9)], [(5, 8)]]


def test_image_spans_qwen_inside_vision_start_end():
    model, processor = tiny("qwen2_vl")
    adapter = halludec.get_adapter(model)
    batch = tiny_batch(processor, "qwen2_vl", QUESTIONS, seed=0)
    ids = batch["input_ids"]
    cfg = model.config
    for row, spans in enumerate(adapter.image_spans(ids)):
        assert len(spans) == 1
        start, end = spans[0]
        assert ids[row, start - 1] == cfg.vision_start_token_id
        assert ids[row, end] == cfg.vision_end_token_id
        n_expected = int(batch["image_grid_thw"][row].prod()) // cfg.vision_config.spatial_merge_size**2
        assert end - start == n_expected


def test_image_spans_follow_padding(family):
    model, processor = tiny(family)
    batch = tiny_batch(processor, family, QUESTIONS, seed=0)
    adapter = halludec.get_adapter(model)
    pads = (batch["attention_mask"] == 0).sum(-1).tolist()
    spans = adapter.image_spans(batch["input_ids"])
    assert pads[0] != pads[1]
    for row in range(2):
        assert spans[row], "every row has an image"
        assert spans[row][0][0] >= pads[row]
        n_img = int(adapter.image_mask(batch["input_ids"][row : row + 1]).sum())
        assert sum(e - s for s, e in spans[row]) == n_img


@pytest.mark.parametrize("use_questions", [True, False])
def test_query_spans(family, use_questions):
    model, processor = tiny(family)
    batch = tiny_batch(processor, family, QUESTIONS, seed=0)
    adapter = halludec.get_adapter(model)
    spans = adapter.query_spans(
        batch["input_ids"],
        processor.tokenizer,
        questions=QUESTIONS if use_questions else None,
        chat_template_owner=processor,
    )
    for row, (start, end) in enumerate(spans):
        text = processor.tokenizer.decode(batch["input_ids"][row, start:end])
        assert text.strip() == QUESTIONS[row]


def test_query_span_error_names_the_question():
    model, processor = tiny("llava")
    batch = tiny_batch(processor, "llava", QUESTIONS[:1], seed=0)
    with pytest.raises(ValueError, match="'Is there a zebra\\?' of row 0 was not found"):
        halludec.get_adapter(model).query_spans(batch["input_ids"], processor.tokenizer, ["Is there a zebra?"])


def test_text_only_inputs(family):
    """Image tokens (and wrappers) removed, rows re-left-padded, text kept in order; the model runs on them."""
    model, processor = tiny(family)
    batch = tiny_batch(processor, family, QUESTIONS, seed=0)
    adapter = halludec.get_adapter(model)
    side = adapter.text_only_inputs(batch)
    assert not adapter.image_mask(side["input_ids"]).any()
    for key in adapter.image_input_keys:
        assert key not in side
    for wrapper in adapter.wrapper_token_ids():
        assert not (side["input_ids"] == wrapper).any()
    drop = adapter.image_mask(batch["input_ids"])
    for wrapper in adapter.wrapper_token_ids():
        drop |= batch["input_ids"] == wrapper
    for row in range(2):
        kept = batch["input_ids"][row][batch["attention_mask"][row].bool() & ~drop[row]]
        got = side["input_ids"][row][side["attention_mask"][row].bool()]
        assert torch.equal(kept, got)
        am = side["attention_mask"][row]
        assert torch.equal(am, am.sort().values), "left padding"
    out = model.generate(**side, max_new_tokens=2, do_sample=False)
    assert out.shape[0] == 2


def test_text_only_row_equals_prompt_built_without_image():
    """The image-free side input of a row gives the logits of that text prompt run alone."""
    model, processor = tiny("llava")
    batch = tiny_batch(processor, "llava", QUESTIONS, seed=0)
    side = halludec.get_adapter(model).text_only_inputs(batch)
    full = model(**side).logits[:, -1]  # [2, V]
    for row in range(2):
        ids = side["input_ids"][row][side["attention_mask"][row].bool()][None]
        alone = model(input_ids=ids).logits[:, -1]
        torch.testing.assert_close(full[row : row + 1], alone, atol=1e-4, rtol=1e-4)


def test_noised_image_inputs_are_seeded_and_scaled():
    model, processor = tiny("llava")
    batch = tiny_batch(processor, "llava", QUESTIONS, seed=0)
    adapter = halludec.get_adapter(model)
    a = adapter.noised_image_inputs(batch, 500, torch.Generator().manual_seed(3))
    b = adapter.noised_image_inputs(batch, 500, torch.Generator().manual_seed(3))
    assert torch.equal(a["pixel_values"], b["pixel_values"])
    assert torch.equal(a["input_ids"], batch["input_ids"])
    none = adapter.noised_image_inputs(batch, 0, torch.Generator().manual_seed(3))
    assert (none["pixel_values"] - batch["pixel_values"]).abs().max() < 0.05  # step 0: almost clean
    with pytest.raises(ValueError, match="noise_step=1000 is out of range"):
        adapter.noised_image_inputs(batch, 1000)


@pytest.mark.parametrize(
    "family", [f for f in ("llava", "qwen2_vl", "gemma3", "idefics3") if f in available_tiny_families()]
)
def test_vision_attentions_are_probabilities_and_restore(family):
    from halludec.decoding.vision import vision_attentions
    from tests.helpers import assert_same_snapshot, snapshot

    model, processor = tiny(family)
    batch = tiny_batch(processor, family, QUESTIONS, seed=0)
    adapter = halludec.get_adapter(model)
    before = snapshot(model)
    maps = vision_attentions(adapter, batch, layers=[0, -1])
    n_layers = len(adapter.vision_attention_modules())
    assert set(maps) == {0, n_layers - 1}
    for per_image in maps.values():
        assert len(per_image) >= 2  # both rows' images (tiles count as images where the family tiles)
        for probs in per_image:
            assert probs.dim() == 3
            assert probs.shape[-1] == probs.shape[-2]
            torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)), atol=1e-5, rtol=0)
    assert_same_snapshot(before, snapshot(model))
    with pytest.raises(ValueError, match="out of range"):
        vision_attentions(adapter, batch, layers=[n_layers])


def test_vision_attentions_match_eager_reference():
    """CLIP's own eager attentions (output_attentions=True) equal the recorded maps."""
    from halludec.decoding.vision import vision_attentions

    model, processor = tiny("llava")
    batch = tiny_batch(processor, "llava", QUESTIONS, seed=0)
    adapter = halludec.get_adapter(model)
    maps = vision_attentions(adapter, batch)
    model.set_attn_implementation({"vision_config": "eager"})
    try:
        ref = adapter.vision_tower(batch["pixel_values"], output_attentions=True).attentions
    finally:
        model.set_attn_implementation({"vision_config": "sdpa"})
    for layer, probs in maps.items():
        torch.testing.assert_close(torch.stack(probs), ref[layer], atol=1e-6, rtol=1e-5)


def two_image_batch(family: str):
    """Row 0 holds two images, row 1 one image (processor-built, left-padded)."""
    import numpy as np
    from PIL import Image

    _, processor = tiny(family)
    rng = np.random.default_rng(0)
    size = {"llava": (30, 30), "qwen2_vl": (56, 84)}[family]
    ims = [Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for _ in range(3)]
    conversations = [
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": ims[0]},
                    {"type": "text", "text": "left"},
                    {"type": "image", "image": ims[1]},
                    {"type": "text", "text": "Which differs?"},
                ],
            }
        ],
        [
            {
                "role": "user",
                "content": [{"type": "image", "image": ims[2]}, {"type": "text", "text": "Is there a dog?"}],
            }
        ],
    ]
    return processor.apply_chat_template(
        conversations,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"padding": True, "padding_side": "left"},
    )


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_two_images_in_one_prompt(family):
    model, processor = tiny(family)
    batch = two_image_batch(family)
    adapter = halludec.get_adapter(model)
    spans = adapter.image_spans(batch["input_ids"])
    per_image = 25 if family == "llava" else 6
    assert [len(s) for s in spans] == [2, 1]
    assert all(e - s == per_image for row in spans for s, e in row)
    pads = int((batch["attention_mask"][1] == 0).sum())
    assert spans[1][0][0] > pads
    side = adapter.text_only_inputs(batch)
    assert not adapter.image_mask(side["input_ids"]).any()
    q = adapter.query_spans(batch["input_ids"], processor.tokenizer, chat_template_owner=processor)
    assert processor.tokenizer.decode(batch["input_ids"][0, q[0][0] : q[0][1]]) == "Which differs?"
    kw = {"max_new_tokens": 3, "do_sample": False}
    assert torch.equal(model.generate(**batch, **kw), halludec.generate(model, batch, "none", **kw))


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_without_question_inputs(family):
    """Dropping the question span keeps the image and the template; the model runs on the result."""
    model, processor = tiny(family)
    batch = tiny_batch(processor, family, QUESTIONS, seed=0)
    adapter = halludec.get_adapter(model)
    spans = adapter.query_spans(batch["input_ids"], processor.tokenizer, QUESTIONS)
    side = adapter.without_spans_inputs(batch, spans)
    tok = processor.tokenizer
    for row, question in enumerate(QUESTIONS):
        text = tok.decode(side["input_ids"][row][side["attention_mask"][row].bool()])
        assert question not in text
        full = tok.decode(batch["input_ids"][row][batch["attention_mask"][row].bool()])
        assert text == full.replace(question, "", 1)
    assert torch.equal(adapter.image_mask(side["input_ids"]).sum(-1), adapter.image_mask(batch["input_ids"]).sum(-1))
    out = model.generate(**side, max_new_tokens=2, do_sample=False)
    assert out.shape[0] == 2
