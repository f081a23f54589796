"""The plan's estimated calibration time beside the measured one, for a few small models on this machine.

Run: nice -n 5 python scripts/bench_plan_time.py
Each row runs `corp calibrate --dry-run --json -` (the estimate) and then the same calibration
(its own measured `seconds`, start-up and model loading excluded).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

D = Path("/work/shared/data")
RUNS = [
    ("deit_tiny (ImageNet, 64 images)", ["deit_tiny_patch16_224", "--checkpoint", str(D / "deit_tiny_patch16_224.in1k.safetensors"),
                                         "--data", str(D / "imagenet-sample"), "--samples", "64"]),
    ("stories260k (64 x 512 tokens)", [str(D / "llama-stories260k"), "--data", f"text:{D / 'llama-stories260k/stories.txt'}@calib",
                                       "--samples", "64"]),
]


def calibrate(args: list[str], out: Path, *extra: str) -> dict:
    r = subprocess.run([sys.executable, "-m", "corp_cli", "calibrate", *args, "--out", str(out), "--json", "-", *extra],
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout)


def main() -> None:
    print(f"{'model':34} {'estimate s':>10} {'measured s':>10} {'ratio':>6}  rates fwd/f64 GFLOP/s")
    with tempfile.TemporaryDirectory() as tmp:
        for label, args in RUNS:
            out = Path(tmp) / f"s{len(label)}.safetensors"
            plan = calibrate(args, out, "--dry-run")
            done = calibrate(args, out)
            t = plan["time"]
            print(f"{label:34} {t['seconds']:10.2f} {done['seconds']:10.2f} {t['seconds'] / done['seconds']:6.2f}  "
                  f"{t['forward_rate'] / 1e9:.1f}/{t['float64_rate'] / 1e9:.1f}")


if __name__ == "__main__":
    main()
