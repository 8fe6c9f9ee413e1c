"""The ``halludec`` command."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from halludec.cli import main


def test_ls(capsys):
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    assert "none" in out
    assert "llava" in out
    assert "qwen2_vl" in out


def test_ls_json(capsys):
    assert main(["ls", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert "none" in data["strategies"]
    assert data["model_types"]["qwen2_5_vl"] == "QwenVLAdapter"


def test_unknown_strategy_is_a_clean_error(capsys, tmp_path):
    assert main(["demo", "--strategies", "none,vhrr", "--output", str(tmp_path)]) == 2
    assert "Unknown strategy 'vhrr'" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_runs_as_module(tmp_path):
    args = ["demo", "--strategies", "none,pai", "--pope-limit", "4", "--chair-limit", "2", "--output", str(tmp_path)]
    proc = subprocess.run([sys.executable, "-m", "halludec", *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "| pai |" in proc.stdout
    assert (tmp_path / "demo.json").is_file()


@pytest.mark.slow
def test_help_has_examples():
    proc = subprocess.run([sys.executable, "-m", "halludec", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert "halludec demo" in proc.stdout


def test_parse_generation():
    from halludec.cli import parse_generation

    got = parse_generation(["do_sample=true", "temperature=1.0", "num_beams=5", "cache_implementation=static"])
    assert got == {"do_sample": True, "temperature": 1.0, "num_beams": 5, "cache_implementation": "static"}
    with pytest.raises(ValueError, match="is not KEY=VALUE"):
        parse_generation(["temperature"])


def test_run_records_prompt_and_generation_flags(tmp_path, capsys):
    args = ["run", "--model", "lab", "--benchmark", "lab-pope", "--split", "random", "--limit", "2", "--quiet"]
    extra = ["--prompt", "{question}", "--gen", "num_beams=2", "--max-new-tokens", "4", "--output", str(tmp_path)]
    assert main([*args, *extra]) == 0
    record = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert record["generation"] == {"max_new_tokens": 4, "do_sample": False, "num_beams": 2}
    assert record["benchmark"]["prompt_template"] == "{question}"
    assert "none: n=2 " in capsys.readouterr().out


def test_run_and_heads_share_the_model_options(monkeypatch, tmp_path):
    """`halludec run` and `halludec heads` read --model/--dtype/--device/--trust-remote-code the same way and hand
    them to one loader; an unknown dtype is refused by name."""
    import pytest

    import halludec.cli as cli

    seen, real_load = [], cli.load_model

    def fake_load(name, dtype, device, trust_remote_code):
        seen.append((name, dtype, device, trust_remote_code))
        raise SystemExit(0)  # stop before any data or model work

    monkeypatch.setattr(cli, "load_model", fake_load)
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    common = ["--model", "m", "--dtype", "fp32", "--device", "cpu", "--trust-remote-code"]
    for argv in (["run", "--benchmark", "lab-pope", *common], ["heads", "--data", str(tmp_path), *common]):
        with pytest.raises(SystemExit):
            main(argv)
    assert seen == [("m", "fp32", "cpu", True)] * 2
    with pytest.raises(ValueError, match="dtype 'int8' is unknown; choose one of auto, bf16, fp16, fp32"):
        real_load("lab", "int8")


def test_command_warnings_read_as_messages(monkeypatch):
    """Inside a command, a UserWarning (a strategy's note on its settings) prints as `halludec: warning: <text>`;
    other categories keep Python's format, and the format is restored when the command ends."""
    import warnings

    import pytest

    import halludec.cli as cli

    seen, before = {}, warnings.formatwarning

    def fake_load(*args):
        seen["user"] = warnings.formatwarning("VAR found nothing", UserWarning, "x.py", 3)
        seen["other"] = warnings.formatwarning("old API", DeprecationWarning, "x.py", 3)
        raise SystemExit(0)

    monkeypatch.setattr(cli, "load_model", fake_load)
    with pytest.raises(SystemExit):
        main(["run", "--benchmark", "lab-pope", "--model", "m"])
    assert seen["user"] == "halludec: warning: VAR found nothing\n"
    assert "x.py:3: DeprecationWarning: old API" in seen["other"]
    assert warnings.formatwarning is before
