"""Start-up time of the `corp` CLI for the commands that should not pay for torch: --help and --version.

    python scripts/bench_startup.py [--src PATH] [--runs 5]

Each command runs in a fresh interpreter (`python -c "from corp_cli.cli import main; main()"`),
`--runs` times; the table shows the median wall time and which heavy libraries the process
imported. `--src` points at another checkout of corp (e.g. a git worktree of an older commit)
to measure it side by side with this one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = (["--help"], ["--version"], ["prune", "--help"], ["calibrate", "--help"], ["evaluate", "--help"])
PROBE = (
    "import sys, runpy\n"
    "sys.argv = ['corp'] + sys.argv[1:]\n"
    "try:\n"
    "    from corp_cli.cli import main; main()\n"
    "except SystemExit:\n"
    "    pass\n"
    "heavy = [m for m in ('torch', 'timm', 'transformers') if m in sys.modules]\n"
    "sys.stderr.write('HEAVY:' + ','.join(heavy) + '\\n')\n"
)


def run(src: Path, args: list[str], runs: int) -> tuple[float, str]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    times, heavy = [], ""
    for _ in range(runs):
        t = time.perf_counter()
        res = subprocess.run([sys.executable, "-c", PROBE, *args], env=env, capture_output=True, text=True, cwd=src)
        times.append(time.perf_counter() - t)
        heavy = next((ln[6:] for ln in res.stderr.splitlines() if ln.startswith("HEAVY:")), "?")
    return statistics.median(times), heavy or "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, action="append", help="another corp checkout to measure too")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    here = Path(__file__).resolve().parents[1]
    trees = [here, *(args.src or [])]
    print("| command | " + " | ".join(f"{t.name} (s, heavy imports)" for t in trees) + " |")
    print("|---|" + "---|" * len(trees))
    for cmd in COMMANDS:
        cells = []
        for tree in trees:
            secs, heavy = run(tree, cmd, args.runs)
            cells.append(f"{secs:.2f} ({heavy})")
        print(f"| corp {' '.join(cmd)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
