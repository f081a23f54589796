"""Calibration under real `torchrun --nproc-per-node 2` on CPU (gloo): equal to one process, and failures.

Both launch forms are used: `torchrun -m corp_cli calibrate ...` and `torchrun --no-python corp prune ...`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from corp_cli.cli import app
from corp_cli.masks import load_masks
from corp_cli.stats import Statistics

from .conftest import IMAGENET_SAMPLE, IN1K_CKPT, needs_shared_data

pytestmark = [pytest.mark.slow, needs_shared_data]

CORP_BIN = Path(sys.executable).with_name("corp")
COMMON = ["--checkpoint", str(IN1K_CKPT), "--samples", "8", "--batch-size", "2", "--workers", "0"]


def _torchrun(args: list[str], tmp: Path, env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "CORP_DIST_TIMEOUT_S": "120", **(env or {})})


def _calibrate(out: Path, *extra: str) -> list[str]:
    return ["calibrate", "deit_tiny_patch16_224", "--data", str(IMAGENET_SAMPLE), *COMMON, "--out", str(out), *extra]


def test_two_ranks_equal_one_process_and_prune_the_same(tmp_path: Path) -> None:
    res = _torchrun(["-m", "corp_cli", *_calibrate(tmp_path / "two.safetensors", "--precision", "float64")], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    one = tmp_path / "one.safetensors"
    r = CliRunner().invoke(app, _calibrate(one, "--precision", "float64"))
    assert r.exit_code == 0, r.output
    a, b = Statistics.load(one), Statistics.load(tmp_path / "two.safetensors")
    assert a.meta == b.meta  # same data fingerprint, sample and token counts, shard record
    for ba, bb in zip(a.blocks, b.blocks):
        for part in ba:
            for name, t in ba[part].items():
                # float64 reduction order only: differences at the level of the sums' own rounding
                torch.testing.assert_close(bb[part][name], t, rtol=0, atol=1e-12 * float(t.abs().max()))
    # prune from the two-rank statistics, and under torchrun directly (--no-python corp prune --calib-data)
    r = CliRunner().invoke(app, ["prune", "deit_tiny_patch16_224", "--checkpoint", str(IN1K_CKPT), "--stats",
                                 str(one), "--out", str(tmp_path / "from-one")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["prune", "deit_tiny_patch16_224", "--checkpoint", str(IN1K_CKPT), "--stats",
                                 str(tmp_path / "two.safetensors"), "--out", str(tmp_path / "from-two")])
    assert r.exit_code == 0, r.output
    assert shutil.which(str(CORP_BIN)), "the corp console script"
    res = _torchrun(["--no-python", str(CORP_BIN), "prune", "deit_tiny_patch16_224", "--calib-data", str(IMAGENET_SAMPLE),
                     *COMMON, "--out", str(tmp_path / "ranks")], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("corp prune ->") == 1  # rank 0 alone prints the table
    masks = [load_masks(tmp_path / d / "masks.safetensors")[0] for d in ("from-one", "from-two")]
    for m1, m2 in zip(*masks):
        assert torch.equal(m1.mlp, m2.mlp) and torch.equal(m1.attn, m2.attn)
    ranked = load_masks(tmp_path / "ranks" / "masks.safetensors")[0]
    single = CliRunner().invoke(app, ["prune", "deit_tiny_patch16_224", "--calib-data", str(IMAGENET_SAMPLE), *COMMON,
                                      "--out", str(tmp_path / "single")])
    assert single.exit_code == 0, single.output
    agree = sum(bool(torch.equal(x.mlp, y.mlp)) for x, y in zip(ranked, load_masks(tmp_path / "single" / "masks.safetensors")[0]))
    assert agree >= 10  # float32 products: a near-tie may flip in a block or two, the rest are the same


def test_a_failing_rank_stops_every_rank_with_one_line_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "fail.safetensors"
    t = time.monotonic()
    res = _torchrun(["-m", "corp_cli", *_calibrate(out)], tmp_path, env={"CORP_TEST_FAIL_RANK": "1"})
    assert res.returncode != 0
    assert time.monotonic() - t < 300
    ours = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.startswith("error: ")]
    assert ours == ["error: rank 1 of 2 failed: RuntimeError: corp test hook: injected failure on rank 1; "
                    "no statistics were written"], ours
    assert not out.exists() and not list(tmp_path.glob(".fail.safetensors.*"))


def test_a_killed_rank_ends_the_run_in_bounded_time_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "kill.safetensors"
    t = time.monotonic()
    res = _torchrun(["-m", "corp_cli", *_calibrate(out)], tmp_path, env={"CORP_TEST_KILL_RANK": "1"})
    assert res.returncode != 0
    assert time.monotonic() - t < 300
    assert "exitcode  : -9" in res.stderr  # torchrun's report names the rank that died
    assert not out.exists()
