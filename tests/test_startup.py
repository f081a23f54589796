"""`corp --help`, `--version` and `COMMAND --help` import neither torch nor timm nor transformers.

The boundary is asserted on what a fresh interpreter has imported after printing the help,
not on a wall-clock time (scripts/bench_startup.py measures the time).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "timm", "transformers", "safetensors", "datasets")
PROBE = (
    "import sys\n"
    "sys.argv = ['corp'] + sys.argv[1:]\n"
    "try:\n"
    "    from corp_cli.cli import main; main()\n"
    "except SystemExit as e:\n"
    "    code = e.code\n"
    f"print('IMPORTED', sorted(m for m in {HEAVY!r} if m in sys.modules), code)\n"
)


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["calibrate", "--help"], ["calibrate", "merge", "--help"],
                                  ["prune", "--help"], ["evaluate", "--help"], ["benchmark", "--help"],
                                  ["sweep", "--help"], ["export", "--help"]])
def test_help_and_version_do_not_import_the_heavy_libraries(args: list[str]) -> None:
    res = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120)
    last = res.stdout.strip().splitlines()[-1]
    assert last == "IMPORTED [] 0", (last, res.stderr[-500:])
