"""The README's Python API example runs as written (in a fresh process, in a scratch folder)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _block(marker: str) -> str:
    text = README.read_text()
    m = re.search(re.escape(marker) + r".*?\n```python\n(.*?)```", text, re.S)
    assert m, f"no python block after {marker!r} in README.md"
    return m.group(1)


@pytest.mark.slow
def test_the_python_api_example_runs(tmp_path: Path) -> None:
    code = _block("<!-- api-example")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert 0.3 < float(res.stdout.strip().splitlines()[-1]) < 0.5  # MLP + Q/K at 50% cut about 38% of the FLOPs
    assert (tmp_path / "pruned-api" / "model.safetensors").is_file()
    assert {p.name for p in (tmp_path / "pruned-api").iterdir()} == {"masks.safetensors", "model.safetensors", "report.json"}
