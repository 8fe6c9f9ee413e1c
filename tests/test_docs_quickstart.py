"""The quickstart's lab block runs as written and prints what the page says it prints."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


@pytest.mark.slow
def test_quickstart_lab_block_runs(tmp_path):
    text = (DOCS / "quickstart.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "load_lab" in b)
    script = tmp_path / "quickstart.py"
    script.write_text(block)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("truth: ") == 2
    assert re.search(r"^\| vcd \| ", proc.stdout, flags=re.M)
    assert (tmp_path / "quickstart-results" / "comparison.png").is_file()


@pytest.mark.slow
def test_readme_quickstart_runs(tmp_path):
    text = (ROOT / "README.md").read_text()
    block = re.findall(r"```python\n(.*?)```", text, flags=re.S)[0]
    assert len(block.strip().splitlines()) <= 12, "the README's quickstart stays about 10 lines"
    script = tmp_path / "readme.py"
    script.write_text(block)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^\| vcd \| ", proc.stdout, flags=re.M)


def _links(path: Path) -> list[str]:
    return re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text())


def test_docs_and_readme_links_resolve():
    """Every relative link in the README and docs/ points at a file or folder of the repository."""
    pages = [ROOT / "README.md", *DOCS.rglob("*.md"), *(ROOT / "examples").glob("*.md")]
    broken = []
    for page in pages:
        for link in _links(page):
            if link.startswith(("http://", "https://", "mailto:")):
                continue
            if not (page.parent / link).resolve().exists():
                broken.append(f"{page.relative_to(ROOT)} -> {link}")
    assert not broken, f"broken links: {broken}"
