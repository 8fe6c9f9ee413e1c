"""The lab: scenes, lab-POPE / lab-CHAIR construction and scoring, tokenizer and processor, training determinism."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from halludec.lab.bench import (
    EVAL_SEED_BASE,
    build_lab_pope,
    held_out_scenes,
    lab_caption_result,
    lab_chair_samples,
)
from halludec.lab.scenes import APPEARANCE, OBJECTS, P_PARTNER, PARTNER, THEME_OF, sample_scene


def test_scenes_are_deterministic_and_differ_across_seeds():
    a, b = sample_scene(123), sample_scene(123)
    assert a.names == b.names
    assert a.caption() == b.caption()
    assert np.array_equal(a.render(), b.render())
    assert a.render().shape == (64, 64, 3)
    assert a.render().dtype == np.uint8
    assert not np.array_equal(a.render(), sample_scene(124).render())


def test_scene_statistics_carry_the_co_occurrence_prior():
    scenes = [sample_scene(EVAL_SEED_BASE * 2 + i) for i in range(2000)]
    with_partner = sum(PARTNER[o.name] in s.names for s in scenes for o in s.objects if THEME_OF[o.name] == s.theme)
    anchors = sum(1 for s in scenes for o in s.objects if THEME_OF[o.name] == s.theme)
    assert with_partner / anchors > 0.85  # a kind's partner is nearly always there ...
    assert with_partner / anchors < 1.0  # ... but not always: absent partners exist to be hallucinated
    assert 0.8 < P_PARTNER < 1.0
    assert len(set(APPEARANCE.values())) == len(OBJECTS) == 24  # every kind looks different
    for obj, partner in PARTNER.items():  # partners share a hue, differ in shape
        assert APPEARANCE[obj][1] == APPEARANCE[partner][1]
        assert APPEARANCE[obj][0] != APPEARANCE[partner][0]
    counts = Counter(s.theme for s in scenes)
    assert counts["kitchen"] > counts["garden"] > 0  # skewed theme frequencies
    assert all(1 <= len(s.names) <= 5 and len(set(s.names)) == len(s.names) for s in scenes)
    xs = [[o.x for o in s.objects] for s in scenes[:50]]
    assert all(x == sorted(x) for x in xs)  # objects listed left to right (the caption's order)


def test_lab_pope_follows_the_pope_algorithm():
    scenes = held_out_scenes(60)
    pope = build_lab_pope(scenes)
    assert list(pope) == ["random", "popular", "adversarial"]
    n_pos = sum(min(3, len(s.names)) for s in scenes)
    in_theme = Counter()
    for split, rows in pope.items():
        assert len(rows) == 2 * n_pos
        assert [r.label for r in rows] == ["yes", "no"] * n_pos  # each positive followed by one negative
        assert [r.question_id for r in rows] == list(range(1, len(rows) + 1))
        assert len({r.id for r in rows}) == len(rows)
        assert all(r.id.startswith(f"{split}/") for r in rows)
        by_seed = {f"scene-{s.seed}": s for s in scenes}
        for r in rows:
            obj = r.question.removeprefix("Is there a ").removesuffix(" in the image?")
            scene = by_seed[r.image]
            assert (obj in scene.names) == (r.label == "yes")
            if r.label == "no":
                in_theme[split] += THEME_OF[obj] == scene.theme
    # adversarial negatives are the kinds that co-occur with the scene's objects: its theme's absent kinds first
    assert in_theme["adversarial"] > 3 * in_theme["random"]
    assert in_theme["adversarial"] / n_pos > 0.25
    again = build_lab_pope(held_out_scenes(60))
    assert [r.question for r in again["random"]] == [r.question for r in pope["random"]]
    image = pope["random"][0].load_image()
    assert image.size == (64, 64)
    assert image.mode == "RGB"


def test_lab_caption_scoring_matches_hand_counts():
    seed = lab_chair_samples(1)[0].image_id
    gt = sample_scene(seed).names
    absent = next(o for o in OBJECTS if o not in gt)
    result = lab_caption_result(seed, f"a {gt[0]} and a {absent} and a {gt[0]} .")
    assert result.mentioned == (gt[0], absent, gt[0])
    assert result.hallucinated == (absent,)
    assert result.gt == frozenset(gt)
    assert result.n_tokens == 9  # a X and a Y and a X .


def test_lab_chair_file_scoring(tmp_path):
    from halludec.benchmarks.scoring import score_file

    samples = lab_chair_samples(2)
    names = [sample_scene(s.image_id).names for s in samples]
    absent = next(o for o in OBJECTS if o not in names[0])
    rows = [
        {"image_id": samples[0].image_id, "caption": f"a {names[0][0]} and a {absent} ."},  # 1 of 2 hallucinated
        {"image_id": samples[1].image_id, "caption": " and ".join(f"a {n}" for n in names[1]) + " ."},  # exact
    ]
    path = tmp_path / "caps.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    scored = score_file("lab-chair", path, n_bootstrap=0)
    m = scored.record.metrics
    assert m["chair_s"].value == pytest.approx(0.5)
    assert m["chair_i"].value == pytest.approx(1 / (2 + len(names[1])))
    assert m["recall"].value == pytest.approx((1 + len(names[1])) / (len(names[0]) + len(names[1])))
    assert scored.record.benchmark.name == "lab-chair"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image_id": "x.jpg", "caption": "a cup ."}) + "\n")
    with pytest.raises(Exception, match="scene seed"):
        score_file("lab-chair", bad)


def test_processor_output_equals_the_training_tensors():
    from halludec.lab.data import make_batch, pixel_values
    from halludec.lab.model import build_processor, image_tokens
    from halludec.vlm_adapters.inputs import chat_inputs

    processor = build_processor()
    scene = sample_scene(5)
    from PIL import Image

    batch = chat_inputs(processor, [Image.fromarray(scene.render())], ["Is there a cup in the image?"])
    assert (batch["pixel_values"][0] - pixel_values([scene.render()])[0]).abs().max() < 1e-5
    ids = batch["input_ids"][0].tolist()
    tokens = processor.tokenizer.convert_ids_to_tokens(ids)
    assert tokens.count("<image>") == image_tokens(processor.patch_size)
    assert "<unk>" not in tokens
    assert tokens[-2:] == ["assistant", ":"]
    train = make_batch(processor, [5], np.random.Generator(np.random.PCG64(0)), easy=False, p_caption=1.0)
    train_ids = [t for t in train.input_ids[0].tolist() if t != processor.tokenizer.pad_token_id]
    assert train_ids[: ids.index(processor.tokenizer.convert_tokens_to_ids("is"))] == ids[: len(ids) - 10]
    answer = train.weights[0] > 0
    answered = processor.tokenizer.decode(train.input_ids[0][answer])
    assert answered.replace(" </s>", "") == scene.caption()
    assert float(train.weights[0].sum()) == pytest.approx(1.0)


def test_training_is_deterministic_for_a_seed(tmp_path):
    from safetensors.torch import load_file

    from halludec.lab.train import train

    for name in ("a", "b"):
        train(tmp_path / name, steps=2, batch_size=4, eval_every=0, log_every=0)
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(bool((a[k] == b[k]).all()) for k in a)
    record = json.loads((tmp_path / "a" / "training.json").read_text())
    assert record["steps"] == 2
    assert record["seed"] == 0


def test_question_spans_are_found_through_the_lower_casing_word_tokenizer():
    from transformers import LlavaForConditionalGeneration

    from halludec.lab.model import build_config, build_processor
    from halludec.vlm_adapters import get_adapter
    from halludec.vlm_adapters.inputs import chat_inputs

    processor = build_processor()
    model = LlavaForConditionalGeneration(build_config(text_layers=2))
    rows = build_lab_pope(held_out_scenes(2))["random"][:2]
    batch = chat_inputs(processor, [r.load_image() for r in rows], [r.question for r in rows])
    adapter = get_adapter(model)
    for questions in ([r.question for r in rows], None):  # by the question text, and by the chat template alone
        spans = adapter.query_spans(batch["input_ids"], processor, questions, processor)
        found = [processor.tokenizer.decode(batch["input_ids"][i, a:b]) for i, (a, b) in enumerate(spans)]
        assert found == [r.question.lower().replace("?", " ?") for r in rows]
