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


def test_unknown_strategy_is_a_clean_error(capsys):
    assert main(["demo", "--strategy", "vhrr"]) == 2
    assert "Unknown strategy 'vhrr'" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_runs_as_module():
    proc = subprocess.run(
        [sys.executable, "-m", "halludec", "demo", "--new-tokens", "4"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "tokens identical to plain generate: True" in proc.stdout


@pytest.mark.slow
def test_help_has_examples():
    proc = subprocess.run([sys.executable, "-m", "halludec", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert "halludec demo" in proc.stdout
