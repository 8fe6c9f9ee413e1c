"""The quickstarts' code runs as written; every relative link in the README and docs/ resolves."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


def _run(block: str, tmp_path: Path) -> str:
    """Run ``block`` as a script in ``tmp_path``; return its stdout (fails with its stderr)."""
    script = tmp_path / "block.py"
    script.write_text(block)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.slow
def test_quickstart_lab_block_runs(tmp_path):
    block = next(b for b in _python_blocks(DOCS / "quickstart.md") if "load_lab" in b)
    out = _run(block, tmp_path)
    assert out.count("truth: ") == 2
    assert re.search(r"^\| vcd \| ", out, flags=re.M)
    assert (tmp_path / "quickstart-results" / "comparison.png").is_file()


@pytest.mark.slow
def test_readme_quickstart_runs(tmp_path):
    block = _python_blocks(ROOT / "README.md")[0]
    assert len(block.strip().splitlines()) <= 12, "the README's quickstart stays about 10 lines"
    assert re.search(r"^\| vcd \| ", _run(block, tmp_path), flags=re.M)


def test_docs_and_readme_links_resolve():
    """Every relative link in the README, docs/ and examples/ points at a file or folder of the repository."""
    pages = [ROOT / "README.md", *DOCS.rglob("*.md"), *(ROOT / "examples").glob("*.md")]
    broken = []
    for page in pages:
        for link in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if link.startswith(("http://", "https://", "mailto:")):
                continue
            if not (page.parent / link).resolve().exists():
                broken.append(f"{page.relative_to(ROOT)} -> {link}")
    assert not broken, f"broken links: {broken}"
