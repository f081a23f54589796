"""Fault injection: a run killed in the middle of writing leaves --out exactly as it was.

Each scenario runs `python -m corp_cli.cli` as a real process with the test hook
CORP_TEST_PAUSE_BEFORE_RENAME, which makes the atomic writer announce itself on stderr and
sleep just before renaming a finished temp file or directory into place. The test then
sends SIGKILL, SIGINT or SIGTERM. All scenarios start at once (they are mostly import
time) and each test checks one of them.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from corp_cli import report_plot
from corp_cli.artifacts import TEST_PAUSE_ENV, atomic_dir

REPO = Path(__file__).resolve().parents[1]
MODEL = "deit_tiny_patch16_224"
HOOK_LINE = "corp test hook: pausing"


def _tree(root: Path) -> dict[str, str]:
    """Relative path -> sha256 (or 'dir') for everything under root, hidden entries included."""
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@dataclass
class Run:
    name: str
    args: list[str]
    pause_at: str  # final file/dir name whose rename the hook holds
    sig: signal.Signals | None  # None: a control run, neither paused nor signalled
    workdir: Path
    out: Path
    before_out: dict[str, str] | bytes = b""
    before_dir: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    lines: list[str] = field(default_factory=list)
    paused: threading.Event = field(default_factory=threading.Event)
    reader: threading.Thread | None = None
    rc: int | None = None
    error: str = ""

    def start(self) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        env.pop(TEST_PAUSE_ENV, None)
        if self.sig is not None:
            env[TEST_PAUSE_ENV] = f"300:{self.pause_at}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "corp_cli.cli", *self.args], cwd=REPO, env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            # a suite started in the background (`cmd &`) inherits SIGINT ignored, and Python then
            # installs no KeyboardInterrupt handler: give the child the terminal's default
            preexec_fn=_default_sigint,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if HOOK_LINE in line:
                self.paused.set()

    @property
    def stderr(self) -> str:
        return "".join(self.lines)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _snapshot_out(out: Path) -> dict[str, str] | bytes:
    return _tree(out) if out.is_dir() else out.read_bytes()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_ckpt: Path) -> dict[str, Run]:
    base = tmp_path_factory.mktemp("interrupts")
    calib = ["--checkpoint", str(tiny_ckpt), "--samples", "2", "--batch-size", "2", "--workers", "0", "--overwrite"]
    specs: list[tuple[str, str, str, signal.Signals | None]] = [
        ("calibrate-sigkill", "calibrate", "stats.safetensors", signal.SIGKILL),
        ("calibrate-sigint", "calibrate", "stats.safetensors", signal.SIGINT),
        ("calibrate-sigterm", "calibrate", "stats.safetensors", signal.SIGTERM),
        # inside the temp dir, after stats.safetensors and masks.safetensors were written there
        ("prune-sigkill-mid-files", "prune", "model.safetensors", signal.SIGKILL),
        # the finished temp dir, just before it is swapped with --out
        ("prune-sigint-at-swap", "prune", "pruned", signal.SIGINT),
        ("prune-control", "prune", "pruned", None),
    ]
    runs: dict[str, Run] = {}
    for name, cmd, pause_at, sig in specs:
        wd = base / name
        wd.mkdir()
        if cmd == "calibrate":
            out = wd / "stats.safetensors"
            out.write_bytes(b"previous statistics, which must survive\n" * 100)
            args = ["calibrate", MODEL, "--data", "synthetic", *calib, "--out", str(out)]
        else:
            out = wd / "pruned"
            (out / "sub").mkdir(parents=True)
            (out / "report.json").write_text('{"previous": true}\n')
            (out / "model.safetensors").write_bytes(b"previous model bytes" * 50)
            (out / "sub" / "notes.txt").write_text("kept\n")
            args = ["prune", MODEL, "--calib-data", "synthetic", *calib, "--target", "attn", "--sparsity", "0.25",
                    "--out", str(out)]
        run = Run(name, args, pause_at, sig, wd, out)
        run.before_out = _snapshot_out(out)
        run.before_dir = sorted(p.name for p in wd.iterdir())
        runs[name] = run
    for run in runs.values():
        run.start()
    for run in runs.values():
        assert run.proc is not None
        if run.sig is None:
            continue
        if run.paused.wait(timeout=240):
            run.proc.send_signal(run.sig)
        else:
            run.error = "the run never reached the paused rename"
            run.proc.kill()
    for run in runs.values():
        assert run.proc is not None and run.reader is not None
        try:
            run.rc = run.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            run.proc.kill()
            run.rc = run.proc.wait()
            run.error = "the run did not stop after the signal"
        run.reader.join(timeout=10)
    return runs


SCENARIOS = ["calibrate-sigkill", "calibrate-sigint", "calibrate-sigterm", "prune-sigkill-mid-files", "prune-sigint-at-swap"]


@pytest.mark.slow
@pytest.mark.parametrize("name", SCENARIOS)
def test_killed_run_leaves_out_as_it_was(runs: dict[str, Run], name: str) -> None:
    run = runs[name]
    assert not run.error, (run.error, run.stderr)
    assert _snapshot_out(run.out) == run.before_out, "--out changed although the run was killed before finishing"
    leftovers = sorted(set(p.name for p in run.workdir.iterdir()) - set(run.before_dir))
    if run.sig == signal.SIGKILL:
        assert run.rc == -signal.SIGKILL
        # Nothing can clean up after SIGKILL; what remains must be a hidden temp, never a visible artifact.
        assert all(n.startswith(".") and n.endswith(".tmp") for n in leftovers), leftovers
    else:
        assert run.rc == 130, (run.rc, run.stderr)
        assert leftovers == [], "an interrupted run left temp files behind"
        last = run.stderr.strip().splitlines()[-1]
        word = "terminated (SIGTERM)" if run.sig == signal.SIGTERM else "interrupted"
        assert last.startswith(f"error: {word}"), run.stderr
        assert "Traceback" not in run.stderr

@pytest.mark.slow

def test_control_run_replaces_out(runs: dict[str, Run]) -> None:
    """The same prune, neither paused nor signalled, does replace --out: the scenarios above test something."""
    run = runs["prune-control"]
    assert run.rc == 0, run.stderr
    picture = ["report.png"] if report_plot.available() else []  # drawn where matplotlib is installed
    assert sorted(p.name for p in run.out.iterdir()) == ["masks.safetensors", "model.safetensors", "report.json",
                                                         *picture, "stats.safetensors"]
    assert sorted(p.name for p in run.workdir.iterdir()) == ["pruned"]  # no temp siblings
    # prune calibrated itself here: the report carries the undecodable-image count (none for synthetic data)
    report = json.loads((run.out / "report.json").read_text())
    assert report["stats"]["skipped_samples"] == 0 and report["stats"]["samples"] == 2


def test_atomic_dir_failure_keeps_previous_and_success_swaps(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("failed half way")
    assert _tree(out) == {"old.txt": hashlib.sha256(b"old").hexdigest()}
    with atomic_dir(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .tmp / .old siblings


def test_a_failed_write_takes_back_the_folders_it_made(tmp_path: Path) -> None:
    from corp_cli.artifacts import atomic_path

    (tmp_path / "a").mkdir()
    for writer in (atomic_dir, atomic_path):
        with pytest.raises(RuntimeError):
            with writer(tmp_path / "a" / "b" / "c" / "out"):
                raise RuntimeError("failed half way")
        assert [p.name for p in tmp_path.rglob("*")] == ["a"]  # b/c gone, a was there before
    with atomic_path(tmp_path / "a" / "b" / "f") as tmp:
        tmp.write_text("kept")
    assert (tmp_path / "a" / "b" / "f").read_text() == "kept"


def test_sigterm_handler_is_restored_after_a_command(tiny_ckpt: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from corp_cli.cli import app

    before = signal.getsignal(signal.SIGTERM)
    res = CliRunner().invoke(app, ["calibrate", "no_such_model_xyz", "--data", "synthetic", "--out", str(tmp_path / "s")])
    assert res.exit_code == 2
    assert signal.getsignal(signal.SIGTERM) is before


def test_pause_hook_is_inert_without_the_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from corp_cli.artifacts import write_bytes_atomic

    monkeypatch.delenv(TEST_PAUSE_ENV, raising=False)
    t0 = time.monotonic()
    write_bytes_atomic(tmp_path / "f", b"x")
    monkeypatch.setenv(TEST_PAUSE_ENV, "30:some_other_name")  # named for another file: no pause either
    write_bytes_atomic(tmp_path / "g", b"y")
    assert time.monotonic() - t0 < 5
