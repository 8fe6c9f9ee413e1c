"""lm-eval integration: the halludec-vlm model type, the shipped task folder and ``halludec lm-eval(-tasks)``.

Everything runs offline: the lab tasks generate their scenes, POPE and CHAIR read the small fixture files of
tests/benchmarks/conftest.py, and the model is the shipped lab model.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.benchmarks.conftest import CAPTIONS, write_coco, write_pope

pytest.importorskip("datasets")

TASK_DIR_NAMES = {
    "halludec_pope_random",
    "halludec_pope_popular",
    "halludec_pope_adversarial",
    "halludec_chair",
    "halludec_lab_pope_random",
    "halludec_lab_pope_popular",
    "halludec_lab_pope_adversarial",
    "halludec_lab_chair",
}


def _halludec(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    code = "import sys; from halludec.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300, cwd=cwd, check=False
    )


@pytest.fixture
def coco(tmp_path: Path) -> Path:
    """A COCO folder: annotations/ from the benchmark fixtures and val2014/ with images 1-3."""
    from PIL import Image

    root = tmp_path / "coco"
    write_coco(root / "annotations")
    (root / "val2014").mkdir()
    for i in (1, 2, 3):
        Image.new("RGB", (64, 64), (60 * i, 90, 200)).save(root / "val2014" / f"COCO_val2014_{i:012d}.jpg")
    return root


# ----------------------------------------------------------------------------------------------------- fast tier
def test_task_folder_ships_every_task():
    from halludec.integrations.lm_eval_tasks import GROUP_NAMES, TASK_NAMES, task_dir

    assert set(TASK_NAMES) == TASK_DIR_NAMES
    assert {p.stem for p in task_dir().glob("*.yaml")} == {*TASK_NAMES, *GROUP_NAMES}
    for path in task_dir().glob("*.yaml"):
        text = path.read_text()
        assert "/home/" not in text
        assert "/work/" not in text


def test_lm_eval_tasks_command_prints_and_writes(tmp_path, coco):
    from halludec.integrations.lm_eval_tasks import task_dir

    shown = _halludec("lm-eval-tasks")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == str(task_dir())
    pope = write_pope(tmp_path / "pope")
    out = _halludec("lm-eval-tasks", "--pope-dir", str(pope), "--coco-dir", str(coco), "--out", str(tmp_path / "t"))
    assert out.returncode == 0, out.stderr
    written = Path(out.stdout.strip())
    assert {p.stem for p in written.glob("*.yaml")} == {*TASK_DIR_NAMES, "halludec_pope", "halludec_lab_pope"}
    text = (written / "halludec_pope_random.yaml").read_text()
    assert f"pope_dir: {json.dumps(str(pope.resolve()))}" in text
    assert f"coco_dir: {json.dumps(str(coco.resolve()))}" in text
    bad = _halludec("lm-eval-tasks", "--pope-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "u"))
    assert bad.returncode == 2
    assert "does not exist" in bad.stderr
    no_out = _halludec("lm-eval-tasks", "--pope-dir", str(pope))
    assert no_out.returncode == 2
    assert "--out" in no_out.stderr


def test_pope_dataset_and_metrics_match_halludec_scoring(tmp_path, coco, monkeypatch):
    from halludec.benchmarks.scoring import score_file
    from halludec.integrations import lm_eval_metrics as m
    from halludec.integrations.lm_eval_tasks import pope_dataset, pope_image

    monkeypatch.delenv("HALLUDEC_POPE_DIR", raising=False)
    monkeypatch.delenv("HALLUDEC_COCO_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="HALLUDEC_POPE_DIR"):
        pope_dataset("random")
    pope = write_pope(tmp_path / "pope")
    monkeypatch.setenv("HALLUDEC_POPE_DIR", str(pope))
    with pytest.raises(FileNotFoundError, match="HALLUDEC_COCO_DIR"):
        pope_dataset("random")
    monkeypatch.setenv("HALLUDEC_COCO_DIR", str(coco))
    docs = pope_dataset("adversarial", parser="opera", pretrained="ignored")["test"]
    assert [d["id"] for d in docs] == ["adversarial/1", "adversarial/2", "adversarial/3", "adversarial/4"]
    assert pope_image(docs[0])[0].size == (64, 64)
    answers = ["Yes, there is.", "No.", "I don't see one", "yes"]
    items = [m.pope_process_results(d, [a])["f1"] for d, a in zip(docs, answers, strict=True)]
    lines = [{"answer": a, "label": d["label"], "split": d["split"]} for d, a in zip(docs, answers, strict=True)]
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps(r) + "\n" for r in lines))
    expected = score_file("pope", preds, parser="opera").record.metrics
    for name in ("accuracy", "precision", "recall", "f1", "yes_ratio", "unparseable"):
        assert getattr(m, f"pope_{name}")(items) == pytest.approx(expected[name].value), name


def test_chair_dataset_and_metrics_match_halludec_scoring(tmp_path, coco):
    from halludec.benchmarks.chair import score_chair
    from halludec.integrations import lm_eval_metrics as m
    from halludec.integrations.lm_eval_tasks import chair_dataset, chair_image

    ids = tmp_path / "ids.txt"
    ids.write_text("1\n2\n3\n")
    docs = chair_dataset(coco_dir=str(coco), image_list=str(ids))["test"]
    assert [d["image_id"] for d in docs] == [1, 2, 3]
    assert chair_image(docs[2])[0].mode == "RGB"
    captions = [CAPTIONS[0][1] + " A cat sits.", "A toilet.", "A cup on a dining table with a chair."]
    items = [m.chair_process_results(d, [c])["chair_i"] for d, c in zip(docs, captions, strict=True)]
    expected = score_chair(list(zip([1, 2, 3], captions, strict=True)), annotations=coco, n_bootstrap=0).metrics
    assert expected["chair_i"].value > 0
    for fn, name in ((m.chair_s, "chair_s"), (m.chair_i, "chair_i"), (m.chair_recall, "recall"), (m.chair_len, "len")):
        assert fn(items) == pytest.approx(expected[name].value), name


def test_lab_datasets_are_the_runner_questions():
    from halludec.integrations import lm_eval_metrics as m
    from halludec.integrations.lm_eval_tasks import lab_chair_dataset, lab_image, lab_pope_dataset
    from halludec.lab.bench import LAB_SCENES, build_lab_pope, held_out_scenes

    docs = lab_pope_dataset("popular")["test"]
    runner = build_lab_pope(held_out_scenes(LAB_SCENES), splits=("popular",))["popular"]
    assert [(d["id"], d["question"], d["label"]) for d in docs] == [(s.id, s.question, s.label) for s in runner]
    assert lab_image(docs[0])[0].size == (64, 64)
    chair = lab_chair_dataset()["test"]
    assert len(chair) == LAB_SCENES
    seed = chair[0]["seed"]
    items = [m.lab_chair_process_results(chair[0], [" a rake and a unicorn ."])["chair_s"]]
    assert m.lab_chair_len(items) > 0
    assert 0.0 <= m.lab_chair_i(items) <= 1.0
    assert seed == chair[0]["image_id"]


def test_model_args_split_into_strategy_fields_and_the_rest():
    pytest.importorskip("lm_eval")
    from halludec.integrations.lm_eval import split_model_args

    strategies, rest = split_model_args("vcd", {"alpha": 2.0, "batch_size": 4, "device": "cpu"})
    assert [s.name for s in strategies] == ["vcd"]
    assert strategies[0].config.alpha == 2.0
    assert rest == {"batch_size": 4, "device": "cpu"}
    composed, rest = split_model_args("vhr+vcd", {"vcd.alpha": 0.5, "dtype": "float32"})
    assert [s.name for s in composed] == ["vhr", "vcd"]
    assert composed[1].config.alpha == 0.5
    assert rest == {"dtype": "float32"}
    with pytest.raises(ValueError, match="not among"):
        split_model_args("vcd", {"vhr.alpha": 1})
    with pytest.raises(ValueError, match="alpha"):
        split_model_args("vcd", {"alpha": -5.0})
    with pytest.raises(KeyError):
        split_model_args("no_such_strategy", {})


def test_lm_eval_indexes_the_task_folder():
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from halludec.integrations.lm_eval import MODEL_NAME, HalludecVLM, register
    from halludec.integrations.lm_eval_tasks import GROUP_NAMES, TASK_NAMES, task_dir

    manager = TaskManager(include_path=str(task_dir()), include_defaults=False)
    assert set(TASK_NAMES) <= set(manager.all_subtasks)
    assert set(GROUP_NAMES) <= set(manager.all_groups)
    assert register() is HalludecVLM
    assert MODEL_NAME == "halludec-vlm"


# -------------------------------------------------------------------------------------------- end to end (slow)
def _evaluate(lm, tasks, limit, include_path, metadata=None, **kw):
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path), include_defaults=False, metadata=metadata)
    return lm_eval.simple_evaluate(
        model=lm, tasks=tasks, task_manager=manager, limit=limit, apply_chat_template=True, log_samples=True, **kw
    )


def _responses(result, task):
    return [s["filtered_resps"][0] for s in sorted(result["samples"][task], key=lambda s: s["doc_id"])]


@pytest.fixture(scope="module")
def lab():
    from halludec.lab import load_lab
    from halludec.vlm_adapters.inputs import chat_inputs

    model, processor = load_lab()
    image = __import__("PIL.Image").Image.new("RGB", (64, 64))
    model.generate(**chat_inputs(processor, [image], ["hi"]), max_new_tokens=1)  # transformers adds its hooks once
    return model, processor


@pytest.mark.slow
def test_lab_tasks_end_to_end_neutral_and_vcd(lab, tmp_path):
    pytest.importorskip("lm_eval")
    from halludec.benchmarks.runner import RunConfig, run_benchmark
    from halludec.integrations.lm_eval import HalludecVLM
    from halludec.integrations.lm_eval_tasks import task_dir
    from tests.helpers import assert_same_snapshot, snapshot

    model, processor = lab
    before = snapshot(model)
    tasks = ["halludec_lab_pope_random", "halludec_lab_chair"]
    runs = {}
    for strategy, fields in (("none", {}), ("vcd", {"alpha": 2.0})):
        lm = HalludecVLM(pretrained=model, processor=processor, strategy=strategy, batch_size=8, **fields)
        runs[strategy] = _evaluate(lm, tasks, 6, task_dir())
    assert_same_snapshot(before, snapshot(model))
    for result in runs.values():
        assert set(result["results"]["halludec_lab_pope_random"]) >= {f"{k},none" for k in ("accuracy", "f1")}
        assert "yes_ratio,none" in result["results"]["halludec_lab_pope_random"]
        assert "chair_i,none" in result["results"]["halludec_lab_chair"]
    # the same prompts as halludec's runner: plain lm-eval answers equal `halludec run` answers
    record = run_benchmark(
        model, processor, "none", RunConfig("lab-pope", split="random", limit=6, output=str(tmp_path))
    )
    runner_answers = [json.loads(line)["answer"] for line in Path(record.samples_file).read_text().splitlines()]
    assert [r.strip() for r in _responses(runs["none"], tasks[0])] == runner_answers
    # vcd (alpha 2) changes the lab captions, and the metrics follow the outputs
    captions = {k: _responses(r, tasks[1]) for k, r in runs.items()}
    assert captions["none"] != captions["vcd"]
    chair = {k: r["results"]["halludec_lab_chair"] for k, r in runs.items()}
    assert any(chair["none"][f"{k},none"] != chair["vcd"][f"{k},none"] for k in ("chair_i", "chair_s", "len"))
    pope = {k: r["results"]["halludec_lab_pope_random"] for k, r in runs.items()}
    if _responses(runs["none"], tasks[0]) == _responses(runs["vcd"], tasks[0]):
        assert pope["none"] == pope["vcd"]
    assert lm.strategy_description[0]["config"]["alpha"] == 2.0


@pytest.mark.slow
def test_pope_and_chair_tasks_on_local_files(lab, tmp_path, coco):
    pytest.importorskip("lm_eval")
    from halludec.benchmarks.chair import score_chair
    from halludec.benchmarks.pope_metrics import yesno_report
    from halludec.benchmarks.pope_parsers import get_parser
    from halludec.integrations.lm_eval import HalludecVLM
    from halludec.integrations.lm_eval_tasks import write_task_dir

    model, processor = lab
    folder = write_task_dir(tmp_path / "tasks", pope_dir=write_pope(tmp_path / "pope"), coco_dir=coco)
    ids = tmp_path / "ids.txt"
    ids.write_text("1\n2\n3\n")
    lm = HalludecVLM(pretrained=model, processor=processor, strategy="none", batch_size=4)
    tasks = ["halludec_pope_popular", "halludec_chair"]
    result = _evaluate(lm, tasks, None, folder, metadata={"image_list": str(ids)}, gen_kwargs="max_gen_toks=16")
    answers = [a.strip() for a in _responses(result, tasks[0])]
    docs = [s["doc"] for s in sorted(result["samples"][tasks[0]], key=lambda s: s["doc_id"])]
    expected, _, _, _ = yesno_report(
        [(d["split"], a, d["label"]) for d, a in zip(docs, answers, strict=True)], get_parser("pope")
    )
    assert result["results"][tasks[0]]["f1,none"] == pytest.approx(expected["f1"].value)
    assert result["results"][tasks[0]]["yes_ratio,none"] == pytest.approx(expected["yes_ratio"].value)
    captions = [c.strip() for c in _responses(result, tasks[1])]
    chair = score_chair(list(zip([1, 2, 3], captions, strict=True)), annotations=coco, n_bootstrap=0).metrics
    assert result["results"][tasks[1]]["chair_i,none"] == pytest.approx(chair["chair_i"].value, nan_ok=True)
    assert result["results"][tasks[1]]["len,none"] == pytest.approx(chair["len"].value)


@pytest.mark.slow
def test_halludec_lm_eval_command(tmp_path):
    pytest.importorskip("lm_eval")
    from halludec.lab import lab_path

    out = _halludec(
        "lm-eval",
        "--model",
        "halludec-vlm",
        "--model_args",
        f"pretrained={lab_path()},strategy=vcd,alpha=2.0,dtype=float32",
        "--tasks",
        "halludec_lab_pope_adversarial",
        "--apply_chat_template",
        "--limit",
        "4",
        "--batch_size",
        "4",
        "--device",
        "cpu",
        "--output_path",
        str(tmp_path / "out"),
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    files = list((tmp_path / "out").rglob("results_*.json"))
    assert len(files) == 1, out.stdout
    results = json.loads(files[0].read_text())
    metrics = results["results"]["halludec_lab_pope_adversarial"]
    assert {"accuracy,none", "f1,none", "yes_ratio,none"} <= set(metrics)
    assert "strategy" in json.dumps(results["config"]["model_args"])


def test_lmms_eval_entry_point_is_declared():
    import tomllib

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    target = project["entry-points"]["lmms_eval.models"]["halludec_hf"]
    assert target == "halludec.integrations.lmms_eval:manifest"
    assert (Path(__file__).resolve().parents[1] / "halludec/integrations/lmms_eval.py").is_file()


@pytest.mark.slow
def test_lmms_eval_model_generates_with_a_strategy(lab):
    pytest.importorskip("lmms_eval")
    from lmms_eval.api.instance import Instance
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    from halludec.integrations.lmms_eval import manifest
    from halludec.lab.bench import LAB_SCENES, build_lab_pope, held_out_scenes

    registry = ModelRegistryV2()
    for item in registry._coerce_payload_to_manifests(manifest):
        registry.register_manifest(item)
    lm = registry.get_model_class("halludec_hf").create_from_arg_string(
        "pretrained=lab,strategy=vcd,alpha=2.0,device=cpu", {"batch_size": 2}
    )
    docs = build_lab_pope(held_out_scenes(LAB_SCENES), splits=("random",))["random"][:3]
    lm.task_dict = {"t": {"test": dict(enumerate(docs))}}
    requests = [
        Instance(
            request_type="generate_until",
            arguments=("<image>" + d.question, {"max_new_tokens": 8}, lambda doc: [doc.load_image()], i, "t", "test"),
            idx=0,
            metadata={"task": "t", "doc_id": i, "repeats": 1},
        )
        for i, d in enumerate(docs)
    ]
    answers = lm.generate_until(requests)
    assert len(answers) == 3
    assert all(a in ("yes", "no") for a in answers)
