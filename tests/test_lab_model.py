"""The shipped lab model: it loads through from_pretrained, reads its scenes, and the demo runs end to end."""

from __future__ import annotations

import json

import pytest

from halludec.lab import lab_path, load_lab
from halludec.lab.bench import EVAL_SEED_BASE
from halludec.lab.model import QUESTION
from halludec.lab.scenes import OBJECTS, THEME_OF, sample_scene


@pytest.fixture(scope="module")
def lab():
    return load_lab()


def _plain_scenes(n: int) -> list:
    """Held-out scenes whose objects are all plainly visible (normal size, no occluder, not faint)."""
    out, seed = [], EVAL_SEED_BASE
    while len(out) < n:
        scene = sample_scene(seed)
        if all(o.visibility == "normal" for o in scene.objects):
            out.append(scene)
        seed += 1
    return out


def test_shipped_folder_loads_with_from_pretrained():
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = lab_path()
    model = AutoModelForImageTextToText.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert type(processor).__name__ == "LlavaProcessor"
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    assert size <= 10 * 2**20  # the whole folder ships in the package


def test_lab_model_answers_known_questions_on_fixed_scenes(lab):
    from halludec.vlm_adapters.inputs import chat_inputs

    model, processor = lab
    scenes = _plain_scenes(12)
    images, questions, labels = [], [], []
    for scene in scenes:
        far = next(o for o in OBJECTS if THEME_OF[o] != scene.theme and o not in scene.names)
        for obj, label in ((scene.names[0], "yes"), (far, "no")):
            images.append(scene.render())
            questions.append(QUESTION.format(obj=obj))
            labels.append(label)
    from PIL import Image

    batch = chat_inputs(processor, [Image.fromarray(i) for i in images], questions)
    out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    answers = processor.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    answers = [a.strip() for a in answers]
    assert set(answers) <= {"yes", "no"}  # the answer, then </s>
    correct = sum(a == label for a, label in zip(answers, labels, strict=True))
    assert correct >= 22, list(zip(questions, answers, labels, strict=True))


def test_lab_model_captions_name_scene_objects(lab):
    from PIL import Image

    from halludec.lab.model import CAPTION_PROMPT
    from halludec.vlm_adapters.inputs import chat_inputs

    model, processor = lab
    scenes = _plain_scenes(6)
    batch = chat_inputs(processor, [Image.fromarray(s.render()) for s in scenes], [CAPTION_PROMPT] * len(scenes))
    out = model.generate(**batch, max_new_tokens=24, do_sample=False)
    captions = processor.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    named = [{w for w in c.split() if w in OBJECTS} for c in captions]
    recall = sum(len(n & set(s.names)) for n, s in zip(named, scenes, strict=True)) / sum(len(s.names) for s in scenes)
    assert recall >= 0.4, captions  # the lab model's captions are weak (recall 38 % on lab-CHAIR), but not blind
    themes = [{THEME_OF[w] for w in n} for n in named]
    assert sum(t == {s.theme} for t, s in zip(themes, scenes, strict=True)) >= 5, captions  # on-theme objects
    assert all(c.strip().startswith("a ") and c.strip().endswith(".") for c in captions), captions


def test_demo_with_a_small_limit_writes_its_files(tmp_path, capsys):
    from halludec.cli import main

    code = main(
        ["demo", "--output", str(tmp_path), "--strategies", "none,vcd", "--pope-limit", "6", "--chair-limit", "3"]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "| none |" in printed
    assert "| vcd |" in printed
    assert "n=18 questions" in printed
    summary = json.loads((tmp_path / "demo.json").read_text())
    assert [r["strategy"] for r in summary["strategies"]] == ["none", "vcd"]
    assert all(r["n_pope"] == 18 and r["n_chair"] == 3 for r in summary["strategies"])
    for name in ("lab-pope_none.json", "lab-pope_vcd.json", "lab-chair_none.json", "lab-chair_vcd.json"):
        record = json.loads((tmp_path / name).read_text())
        assert record["model"]["model_type"] == "llava"
        assert record["metrics"]
    assert (tmp_path / "comparison.md").read_text().startswith("lab-pope: n=18")
    pytest.importorskip("matplotlib")
    assert (tmp_path / "comparison.png").stat().st_size > 1000


def test_lab_path_command_and_model_lab(tmp_path, capsys):
    from halludec.cli import main

    assert main(["lab-path"]) == 0
    assert capsys.readouterr().out.strip() == str(lab_path())
    code = main(
        [
            "run",
            "--model",
            "lab",
            "--benchmark",
            "lab-pope",
            "--split",
            "adversarial",
            "--limit",
            "4",
            "--output",
            str(tmp_path),
            "--quiet",
        ]
    )
    assert code == 0
    record = json.loads((tmp_path / "lab-pope_adversarial_none.json").read_text())
    assert record["n_samples"] == 4
    assert record["benchmark"]["split"] == "adversarial"


@pytest.mark.slow
def test_shipped_model_hallucinates_as_the_readme_says(lab, tmp_path):
    """The lab issue's thresholds, on the full held-out benchmarks under plain greedy decoding."""
    from halludec.benchmarks.runner import RunConfig, run_benchmark

    model, processor = lab
    pope = run_benchmark(model, processor, "none", RunConfig("lab-pope", batch_size=64, output=str(tmp_path)), False)
    chair = run_benchmark(model, processor, "none", RunConfig("lab-chair", batch_size=64, output=str(tmp_path)), False)
    acc = {split: m["accuracy"].value for split, m in pope.per_split.items()}
    assert acc["random"] >= 0.85
    assert acc["random"] - acc["adversarial"] >= 0.08
    assert chair.metrics["chair_i"].value >= 0.10
