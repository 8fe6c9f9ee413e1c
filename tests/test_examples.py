"""Every script in ``examples/`` runs (offline, lab model, small limits) and prints or writes what it promises.

A file added to ``examples/`` without an entry in ``RUNS`` fails ``test_every_example_has_a_test``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *args: str, timeout: int = 300, env: dict | None = None) -> str:
    """Run ``examples/<name>`` with ``args`` in a subprocess; return its stdout (fails with stderr)."""
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True, timeout=timeout, env=environ
    )
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def check_generate(tmp_path: Path) -> None:
    out = run_example("01_generate_with_strategy.py", "--limit", "3", "--strategy", "vhr", "--max-new-tokens", "12")
    assert out.count("plain     :") == 3
    assert out.count("in image  :") == 3
    assert re.search(r"answers changed: \d+ of 3", out)
    # a field set from the command line reaches the strategy
    out = run_example("01_generate_with_strategy.py", "--limit", "1", "--strategy", "vcd", "--set", "alpha=0.25")
    assert "alpha=0.25" in out


def check_compose(tmp_path: Path) -> None:
    out = run_example("02_compose_strategies.py", "--max-new-tokens", "8")
    assert out.count("vhr+vcd   :") == 2
    assert out.count("2 beams   :") == 2
    assert "attention after the block: sdpa; weights unchanged: True" in out


def check_benchmarks(tmp_path: Path) -> None:
    out = run_example("03_run_benchmarks.py", "--limit", "4", "--output", str(tmp_path))
    assert "== lab-pope (none, n=12)" in out
    assert "== lab-chair (none, n=4)" in out
    record = json.loads((tmp_path / "lab-pope_none.json").read_text())
    assert record["n_samples"] == 12
    assert 0.0 <= record["metrics"]["accuracy"]["value"] <= 1.0
    assert f"accuracy↑            {record['metrics']['accuracy']['value']:.4g}" in out
    assert (tmp_path / "lab-chair_none.json").is_file()


def check_compare(tmp_path: Path) -> None:
    args = ["--limit", "4", "--batch-size", "8", "--output", str(tmp_path), "--strategies", "none", "pai"]
    out = run_example("04_compare_strategies.py", "--benchmark", "lab-chair", *args)
    assert "| strategy | chair_s ↓ | chair_i ↓ | recall ↑ |" in out
    assert re.search(r"^\| pai \| .*\(", out, flags=re.M)  # deltas against none
    png = tmp_path / "comparison.png"
    assert png.is_file()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {p.name for p in tmp_path.glob("*.json")} == {"lab-chair_none.json", "lab-chair_pai.json"}


def check_heads(tmp_path: Path) -> None:
    profile = tmp_path / "profile.json"
    out = run_example("05_head_profile.py", "--limit", "4", "--criterion", "image_attention", "--out", str(profile))
    assert "scores: (4, 4) (layers x heads)" in out
    saved = json.loads(profile.read_text())
    assert saved["criterion"] == "image_attention"
    assert len(saved["scores"]) == 4
    assert out.count("\n[") == 2  # two captions generated with the profile's heads


def check_score(tmp_path: Path) -> None:
    out = run_example("06_score_outputs.py")
    # hand-checked on the shipped file: row 8 ("Yes, ... it is not clear ...") is yes for the official rule and no
    # for OPERA's; row 11 ("I cannot tell") is unparseable for every rule
    assert re.search(r"parser pope\s+accuracy 0\.667  f1 0\.722  yes-ratio 0\.750  unparseable 1", out)
    assert re.search(r"parser opera\s+accuracy 0\.667  f1 0\.667  yes-ratio 0\.583", out)
    # captions: 17 mentions, 3 hallucinated (flower, rake, comb), in 3 of the 6 captions
    assert "CHAIR_s 0.500  CHAIR_i 0.176" in out
    assert "torch imported: False" in out


def check_data_parallel(tmp_path: Path) -> None:
    out = run_example("07_data_parallel.py", "--output", str(tmp_path), "--limit", "4")
    assert "accelerate launch --multi_gpu" in out
    assert out.count("vcd: n=12 ") == 1  # reported once, by the main process
    assert "part files left: 0" in out
    assert "same metrics as one process: True; same samples file: True" in out


def check_lm_eval(tmp_path: Path) -> None:
    pytest.importorskip("lm_eval")
    out = run_example("08_lm_eval.py", "--tasks", "halludec_lab_chair", "--limit", "6", "--strategies", "none", "pai")
    lines = [line for line in out.splitlines() if "halludec_lab_chair:" in line]
    assert [line.split()[0] for line in lines] == ["none", "pai"]
    assert all("chair_i" in line and "recall" in line for line in lines)
    assert "shell: halludec lm-eval --model halludec-vlm" in out


RUNS = {
    "01_generate_with_strategy.py": check_generate,
    "02_compose_strategies.py": check_compose,
    "03_run_benchmarks.py": check_benchmarks,
    "04_compare_strategies.py": check_compare,
    "05_head_profile.py": check_heads,
    "06_score_outputs.py": check_score,
    "07_data_parallel.py": check_data_parallel,
    "08_lm_eval.py": check_lm_eval,
}
FAST = {"01_generate_with_strategy.py", "06_score_outputs.py"}


def test_every_example_has_a_test():
    scripts = sorted(p.name for p in EXAMPLES.iterdir() if p.suffix in (".py", ".sh"))
    missing = sorted(set(scripts) - set(RUNS))
    assert not missing, f"examples without a test in tests/test_examples.py::RUNS: {missing}"
    assert not sorted(set(RUNS) - set(scripts)), "RUNS names a script that is not in examples/"


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in sorted(RUNS)])
def test_example_runs(name, tmp_path):
    RUNS[name](tmp_path)
