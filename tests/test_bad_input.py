"""Bad input through the real CLI: one clear line, the right exit code, no file created or changed.

The matrix covers calibrate, calibrate merge and prune in depth, and the bad input every
subcommand shares (unknown model, hostile checkpoint, wrong artifact) for the others.

Every case runs `corp` through Typer's CliRunner inside one shared workspace, and compares a
snapshot of that workspace (every file's size, mtime and, for small files, bytes) before
and after. Most cases are refused before the model is loaded; the few that need the
weights use a random-init deit_tiny.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from corp_cli.artifacts import META_KEY, read_safetensors, safetensors_bytes
from corp_cli.cli import app
from corp_cli.errors import EXIT_RUNTIME
from corp_cli.masks import save_masks
from corp_cli.family import ModelIdentity
from corp_cli.pruning import BlockMasks

runner = CliRunner()
MODEL = "deit_tiny_patch16_224"


class _Evil:
    """Unpickling this runs a shell command: what a hostile .pth file does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def _rewrite_meta(src: Path, dst: Path, edit: Callable[[dict], None], tensors_edit: Callable[[dict], None] | None = None) -> None:
    tensors, meta = read_safetensors(src, kind=json.loads(_raw_meta(src))["kind"])
    edit(meta)
    if tensors_edit is not None:
        tensors_edit(tensors)
    dst.write_bytes(safetensors_bytes(tensors, meta))


def _raw_meta(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()[META_KEY]


def _png(path: Path, mode: str = "RGB", size: tuple[int, int] = (40, 32)) -> None:
    g = torch.Generator().manual_seed(len(str(path)))
    arr = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
    Image.fromarray(arr, "RGB").convert(mode).save(path)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    # These runs are tiny (a few images, 48x48 solves), where OpenMP threads only add
    # synchronisation cost, which explodes when the machine is busy; restored afterwards.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass
class Workspace:
    root: Path
    ckpt: Path
    stats: Path
    marker: Path

    def __getattr__(self, name: str) -> Path:  # files made by the fixture, by name
        return self.root / name


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory, tiny_ckpt: Path) -> Workspace:
    root = tmp_path_factory.mktemp("bad_input")
    ckpt = root / "model.safetensors"
    ckpt.write_bytes(tiny_ckpt.read_bytes())
    stats = root / "stats.safetensors"
    res = runner.invoke(app, ["calibrate", MODEL, "--checkpoint", str(ckpt), "--data", "synthetic", "--samples", "2",
                              "--batch-size", "2", "--workers", "0", "--out", str(stats)])
    assert res.exit_code == 0, res.output
    w = Workspace(root, ckpt, stats, root / "MARKER")

    # statistics: of another model, MLP-only, truncated, a .pth in their place
    other_id = {"name": "deit_small_patch16_224", "checkpoint": "sha256:" + "0" * 64, "num_classes": 1000}
    _rewrite_meta(stats, root / "other_model.stats.safetensors", lambda m: m.update(model=other_id))
    _rewrite_meta(
        stats, root / "mlp_only.stats.safetensors", lambda m: m.update(parts=["mlp"]),
        lambda t: [t.pop(k) for k in list(t) if ".attn." in k],
    )
    (root / "truncated.stats.safetensors").write_bytes(stats.read_bytes()[: stats.stat().st_size // 3])
    torch.save({"blocks.0.mlp.count": torch.ones(1)}, root / "stats.pth")

    # masks: valid for this model, another model, out-of-range indices
    ident = ModelIdentity.from_dict(json.loads(_raw_meta(stats))["model"])
    shapes = json.loads(_raw_meta(stats))["block_shapes"]
    keep = [BlockMasks(mlp=torch.arange(0, 768, 2)) for _ in shapes]
    save_masks(root / "other.masks.safetensors", keep, identity=ModelIdentity(**other_id), shapes=shapes, options={}, stats_fingerprint="x")
    save_masks(root / "range.masks.safetensors", [BlockMasks(mlp=torch.arange(400, 769)) for _ in shapes],
               identity=ident, shapes=shapes, options={}, stats_fingerprint="x")
    save_masks(root / "mlp.masks.safetensors", keep, identity=ident, shapes=shapes, options={}, stats_fingerprint="x")

    # checkpoints: malicious pickle, missing/unexpected keys, truncated, garbage, NaN weights
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _Evil(w.marker)}, root / "evil.pth")
    with open(root / "evil_legacy.pth", "wb") as f:
        pickle.dump({"w": _Evil(w.marker)}, f, protocol=2)
    sd = load_file(str(ckpt))
    save_file({k: v for k, v in sd.items() if not k.startswith("blocks.11.mlp.")}, str(root / "missing_keys.safetensors"))
    save_file({**sd, "extra.weight": torch.zeros(2)}, str(root / "extra_keys.safetensors"))
    (root / "truncated.safetensors").write_bytes(ckpt.read_bytes()[:100_000])
    (root / "garbage.pth").write_bytes(b"this is not a checkpoint\n" * 20)
    nan_sd = dict(sd)
    nan_sd["blocks.3.mlp.fc1.weight"] = torch.full_like(sd["blocks.3.mlp.fc1.weight"], float("nan"))
    save_file(nan_sd, str(root / "nan_weights.safetensors"))

    # image folders: empty, only undecodable files
    (root / "empty_images" / "sub").mkdir(parents=True)
    (root / "empty_images" / "notes.txt").write_text("no images here")
    bad = root / "bad_images"
    bad.mkdir()
    (bad / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    _png(bad / "whole.png")
    data = (bad / "whole.png").read_bytes()
    (bad / "truncated.png").write_bytes(data[: len(data) // 2])
    (bad / "whole.png").unlink()

    # outputs that must be refused
    (root / "existing.safetensors").write_bytes(b"previous contents")
    (root / "existing_dir").mkdir()
    (root / "existing_dir" / "keep.txt").write_text("previous contents")
    (root / "a_file").write_text("a regular file, not a directory")
    (root / "config_missing_dir").mkdir()
    (root / "both.yaml").write_text("target: both\nsparsity: 0.3\n")
    return w


def _snapshot(root: Path) -> dict[str, tuple[int, int, bytes | None]]:
    snap = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        small = p.read_bytes() if p.is_file() and st.st_size < 4096 else None
        snap[str(p.relative_to(root))] = (st.st_size if p.is_file() else -1, st.st_mtime_ns if p.is_file() else 0, small)
    return snap


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]  # "{name}" is replaced by the workspace path of that name
    code: int
    needles: tuple[str, ...]
    one_line: bool = True  # click's own usage errors print a usage block instead
    warnings_ok: bool = False  # logged warnings (e.g. each skipped image) may precede the error line


def _c(id: str, args: str, code: int, *needles: str, one_line: bool = True, warnings_ok: bool = False) -> Case:
    return Case(id, tuple(args.split()), code, needles, one_line, warnings_ok)


CAL = f"calibrate {MODEL} --checkpoint {{ckpt}} --data synthetic --samples 2 --workers 0"
CAL_OUT = CAL + " --out {root}/new.safetensors"
PRUNE = f"prune {MODEL} --checkpoint {{ckpt}} --stats {{stats}}"
PRUNE_OUT = PRUNE + " --out {root}/new_out"

CASES = [
    # ---- corp calibrate
    _c("cal-unknown-model", "calibrate deit_tiny_patc16_224 --data synthetic --out {root}/n.safetensors", 2,
       "unknown model", "did you mean deit_tiny_patch16_224"),
    _c("cal-unsupported-model", "calibrate resnet18 --data synthetic --out {root}/n.safetensors", 2, "not supported"),
    _c("cal-samples-zero", CAL.replace("--samples 2", "--samples 0") + " --out {root}/n.safetensors", 2,
       "Invalid value for '--samples'", one_line=False),
    _c("cal-empty-folder", CAL_OUT.replace("synthetic", "{root}/empty_images"), 2, "contains no images"),
    _c("cal-missing-folder", CAL_OUT.replace("synthetic", "{root}/no_such_dir"), 2, "no such directory"),
    _c("cal-only-corrupt-images", CAL_OUT.replace("synthetic", "{root}/bad_images"), 2,
       "no calibration image could be decoded", "2 skipped", warnings_ok=True),
    _c("cal-missing-checkpoint", CAL_OUT.replace("{ckpt}", "{root}/nope.safetensors"), 2, "does not exist"),
    _c("cal-malicious-pickle", CAL_OUT.replace("{ckpt}", "{root}/evil.pth"), 2,
       "refused", "would run code", "weights_only=True", "save_file", ".safetensors"),
    _c("cal-malicious-legacy-pickle", CAL_OUT.replace("{ckpt}", "{root}/evil_legacy.pth"), 2, "refused", "save_file"),
    _c("cal-missing-keys", CAL_OUT.replace("{ckpt}", "{root}/missing_keys.safetensors"), 2,
       "missing keys", "blocks.11.mlp.fc1.bias"),
    _c("cal-unexpected-keys", CAL_OUT.replace("{ckpt}", "{root}/extra_keys.safetensors"), 2,
       "unexpected keys", "extra.weight"),
    _c("cal-truncated-checkpoint", CAL_OUT.replace("{ckpt}", "{root}/truncated.safetensors"), 2,
       "not a readable safetensors file", "truncated"),
    _c("cal-garbage-pth", CAL_OUT.replace("{ckpt}", "{root}/garbage.pth"), 2, "not a PyTorch checkpoint"),
    _c("cal-existing-out", CAL + " --out {root}/existing.safetensors", 2, "already exists", "--overwrite"),
    _c("cal-out-is-dir", CAL + " --out {root}/existing_dir", 2, "is a directory"),
    _c("cal-out-under-file", CAL + " --out {root}/a_file/sub/s.safetensors", 2, "a_file is not a directory"),
    _c("cal-out-unwritable", CAL + " --out /proc/corp_test/s.safetensors", 2, "not writable"),
    _c("cal-cuda-without-cuda", CAL_OUT + " --device cuda", 2, "CUDA is not available", "--device cpu"),
    _c("cal-unknown-device", CAL_OUT + " --device tpu", 2, "device 'tpu'"),
    _c("cal-bad-shard", CAL_OUT + " --shard 3/2", 2, "--shard 3/2"),
    _c("cal-bad-parts", CAL_OUT + " --parts mlp,ffn", 2, "--parts"),
    _c("cal-bad-precision", CAL_OUT + " --precision float16", 2, "--precision"),
    _c("cal-bad-mean", CAL_OUT + " --mean a,b,c", 2, "--mean"),
    _c("cal-missing-pretrained-cfg", CAL_OUT + " --pretrained-cfg {root}/cfg.json", 2, "--pretrained-cfg"),
    _c("cal-hub-miss-offline", f"calibrate {MODEL} --data synthetic --samples 2 --out {{root}}/n.safetensors", 2,
       "HF_HUB_OFFLINE is set", "--checkpoint"),
    _c("cal-hf-dataset-offline", CAL_OUT.replace("synthetic", "hf:corp-test/does-not-exist"), 2,
       "HF_HUB_OFFLINE is set", "--data"),
    _c("cal-nan-weights", CAL_OUT.replace("{ckpt}", "{root}/nan_weights.safetensors"), EXIT_RUNTIME,
       "non-finite activations", "block 3"),
    # ---- corp calibrate merge
    _c("merge-one-file", "calibrate merge {stats} --out {root}/m.safetensors", 2, "at least two"),
    _c("merge-pth-as-stats", "calibrate merge {stats} {root}/stats.pth --out {root}/m.safetensors", 2,
       "stats.pth", "not a readable safetensors file"),
    _c("merge-truncated", "calibrate merge {stats} {root}/truncated.stats.safetensors --out {root}/m.safetensors", 2,
       "truncated.stats.safetensors", "truncated"),
    _c("merge-other-model", "calibrate merge {stats} {root}/other_model.stats.safetensors --out {root}/m.safetensors", 2,
       "cannot merge", "different model"),
    _c("merge-overlapping", "calibrate merge {stats} {stats} --out {root}/m.safetensors", 2, "overlapping"),
    _c("merge-checkpoint-as-stats", "calibrate merge {stats} {ckpt} --out {root}/m.safetensors", 2, "not a corp artifact"),
    _c("merge-masks-as-stats", "calibrate merge {stats} {root}/range.masks.safetensors --out {root}/m.safetensors", 2,
       "expected a corp stats file", "'masks'"),
    _c("merge-missing-file", "calibrate merge {stats} {root}/nope.safetensors --out {root}/m.safetensors", 2, "does not exist"),
    _c("merge-existing-out", "calibrate merge {stats} {stats} --out {root}/existing.safetensors", 2, "already exists"),
    # ---- corp prune
    _c("prune-sparsity-negative", PRUNE_OUT + " --sparsity -0.1", 2, "[0, 1)", "-0.1"),
    _c("prune-sparsity-one", PRUNE_OUT + " --sparsity 1.0", 2, "[0, 1)"),
    _c("prune-sparsity-nan", PRUNE_OUT + " --sparsity nan", 2, "nan"),
    _c("prune-attn-sparsity-inf", PRUNE_OUT + " --attn-sparsity inf", 2, "--attn-sparsity"),
    _c("prune-min-keep-too-big", PRUNE_OUT + " --min-keep 1000", 2, "--min-keep 1000 exceeds its 768"),
    _c("prune-min-qk-dim-too-big", PRUNE_OUT + " --min-qk-dim 65", 2, "--min-qk-dim 65 exceeds the head dim 64"),
    _c("prune-lambda-negative", PRUNE_OUT + " --lambda -1", 2, "--lambda"),
    _c("prune-lambda-word", PRUNE_OUT + " --lambda lots", 2, "--lambda"),
    _c("prune-bad-target", PRUNE_OUT + " --target hedas", 2, "--target"),
    _c("prune-bad-ranker", PRUNE_OUT + " --ranker random", 2, "--ranker"),
    _c("prune-bad-qk-fold", PRUNE_OUT + " --qk-fold k", 2, "--qk-fold"),
    _c("prune-unknown-model", PRUNE_OUT.replace(MODEL, "deit_tiny_patch16_225"), 2, "did you mean deit_tiny_patch16_224"),
    _c("prune-pth-as-stats", PRUNE_OUT.replace("{stats}", "{root}/stats.pth"), 2, "not a readable safetensors file"),
    _c("prune-truncated-stats", PRUNE_OUT.replace("{stats}", "{root}/truncated.stats.safetensors"), 2, "truncated"),
    _c("prune-checkpoint-as-stats", PRUNE_OUT.replace("{stats}", "{ckpt}"), 2, "not a corp artifact"),
    _c("prune-stats-other-model", PRUNE_OUT.replace("{stats}", "{root}/other_model.stats.safetensors"), 2,
       "deit_small_patch16_224", "deit_tiny_patch16_224", "recalibrate"),
    _c("prune-mlp-only-stats-attn-target", PRUNE_OUT.replace("{stats}", "{root}/mlp_only.stats.safetensors"), 2,
       "no attention sums"),
    _c("prune-stats-and-calib-data", PRUNE_OUT + " --calib-data synthetic", 2, "either --stats or --calib-data"),
    _c("prune-masks-other-model", PRUNE_OUT + " --target mlp --masks {root}/other.masks.safetensors", 2,
       "were made for", "deit_small_patch16_224"),
    _c("prune-masks-out-of-range", PRUNE_OUT + " --target mlp --masks {root}/range.masks.safetensors", 2,
       "indices outside [0, 768)"),
    _c("prune-stats-as-masks", PRUNE_OUT + " --masks {stats}", 2, "expected a corp masks file"),
    _c("prune-masks-other-target", PRUNE_OUT + " --target both --masks {root}/mlp.masks.safetensors", 2,
       "--masks hold target mlp", "--target is both"),
    _c("prune-masks-other-config-target", PRUNE_OUT + " --config {root}/both.yaml --masks {root}/mlp.masks.safetensors", 2,
       "--masks hold target mlp", "both.yaml sets target both"),
    _c("prune-masks-with-sparsity", PRUNE_OUT + " --sparsity 0.3 --masks {root}/mlp.masks.safetensors", 2,
       "--masks fixes which units", "--sparsity"),
    _c("prune-malicious-pickle", PRUNE_OUT.replace("{ckpt}", "{root}/evil.pth"), 2, "refused", "save_file"),
    _c("prune-missing-keys", PRUNE_OUT.replace("{ckpt}", "{root}/missing_keys.safetensors"), 2, "missing keys"),
    _c("prune-existing-out", PRUNE + " --out {root}/existing_dir", 2, "not empty", "--overwrite"),
    _c("prune-out-is-file", PRUNE + " --out {root}/existing.safetensors", 2, "not a directory"),
    _c("prune-out-under-file", PRUNE + " --out {root}/a_file/pruned", 2, "a_file is not a directory"),
    _c("prune-out-unwritable", PRUNE + " --out /proc/corp_test_pruned", 2, "not writable"),
    _c("prune-cuda-without-cuda", PRUNE_OUT + " --device cuda", 2, "CUDA is not available"),
    _c("prune-missing-config", PRUNE_OUT + " --config {root}/config_missing_dir/c.yaml", 2, "--config"),
    _c("prune-calib-empty-folder", PRUNE_OUT.replace("--stats {stats}", "--calib-data {root}/empty_images"), 2,
       "contains no images"),
    _c("prune-calib-hub-miss", f"prune {MODEL} --calib-data synthetic --samples 2 --out {{root}}/new_out", 2,
       "HF_HUB_OFFLINE is set"),
    # ---- evaluate / benchmark / sweep / export (written by others; only what every command shares)
    _c("eval-unknown-model", "evaluate deit_tiny_patc16_224 --data synthetic", 2, "did you mean deit_tiny_patch16_224"),
    _c("eval-malicious-pickle", f"evaluate {MODEL} --checkpoint {{root}}/evil.pth --data synthetic", 2, "refused", "save_file"),
    _c("bench-unknown-model", "benchmark deit_tiny_patc16_224", 2, "did you mean deit_tiny_patch16_224"),
    _c("sweep-unknown-model", "sweep deit_tiny_patc16_224 --stats {stats} --data synthetic --out {root}/sweep", 2,
       "did you mean deit_tiny_patch16_224"),
    _c("export-missing-dir", "export {root}/no_such_dir --out {root}/e.pt", 2, "no_such_dir"),
    _c("export-stats-as-model", "export {stats} --out {root}/e.pt", 2, "expected a corp model file"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_matrix(case: Case, ws: Workspace) -> None:
    if case.id.endswith("-cuda-without-cuda") and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    subst = {"root": str(ws.root), "ckpt": str(ws.ckpt), "stats": str(ws.stats)}
    args = [a.format(**subst) for a in case.args]
    before = _snapshot(ws.root)
    res = runner.invoke(app, args)
    assert res.exit_code == case.code, (res.exit_code, res.output, res.exception)
    err_lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    text = res.stderr
    assert "Traceback" not in res.output
    if case.one_line:
        if case.warnings_ok:
            assert all(ln.startswith(("WARNING", " ")) for ln in err_lines[:-1]), res.stderr
        else:
            assert len(err_lines) == 1, res.stderr
        assert err_lines[-1].startswith("error: "), res.stderr
        text = err_lines[-1]
    for needle in case.needles:
        assert needle in text, (needle, text)
    assert _snapshot(ws.root) == before, "a failed run created or changed files"
    assert not ws.marker.exists(), "code from a checkpoint was executed"
    assert not Path("/proc/corp_test").exists()


def test_debug_shows_the_traceback(ws: Workspace) -> None:
    res = runner.invoke(app, ["--debug", "calibrate", "deit_tiny_patc16_224", "--data", "synthetic", "--out", str(ws.root / "n.st")])
    assert res.exit_code != 0
    assert type(res.exception).__name__ == "InputError"


def test_mixed_image_modes_converted_undecodable_skipped_and_counted(tmp_path: Path, tiny_ckpt: Path) -> None:
    """Grayscale/RGBA/palette/CMYK/16-bit decode as RGB; corrupt and truncated files are skipped, counted, reported."""
    data = tmp_path / "imgs"
    data.mkdir()
    for mode in ("L", "RGBA", "P", "I;16"):
        _png(data / f"{mode.replace(';', '')}.png", mode)
    _png(data / "cmyk.jpg", "CMYK")
    (data / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    _png(tmp_path / "full.png")
    (data / "truncated.png").write_bytes((tmp_path / "full.png").read_bytes()[:200])
    stats = tmp_path / "s.safetensors"
    res = runner.invoke(app, ["calibrate", MODEL, "--checkpoint", str(tiny_ckpt), "--data", str(data), "--samples", "50",
                              "--batch-size", "4", "--workers", "0", "--parts", "attn", "--json", "-", "--out", str(stats)])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["samples"] == 5 and summary["skipped_samples"] == 2
    assert any("asked for 50 samples but only 7 exist" in w for w in summary["warnings"])
    assert "asked for 50 samples" in res.stderr  # the warning is also shown, not only recorded

    # prune reports the count it finds in the statistics (which it also writes when it calibrates itself)
    out = tmp_path / "pruned"
    res = runner.invoke(app, ["prune", MODEL, "--checkpoint", str(tiny_ckpt), "--stats", str(stats), "--target", "attn",
                              "--sparsity", "0.25", "--json", "-", "--out", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["stats"]["skipped_samples"] == 2 and report["stats"]["samples"] == 5
    assert json.loads(res.stdout)["stats"]["skipped_samples"] == 2


def test_qk_solve_with_zero_lambda_on_collinear_dims_raises_lambda(caplog: pytest.LogCaptureFixture) -> None:
    """--lambda 0 with (nearly) collinear kept Q/K dims: the solve must raise lambda, not divide noise by 1e-30."""
    from corp_cli import engine

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 300, 8, generator=g, dtype=torch.float64) * 10
    q[..., 1] = q[..., 0] * 3.0 + 1e-9 * torch.randn(2, 300, generator=g, dtype=torch.float64)
    k = torch.randn(2, 300, 8, generator=g, dtype=torch.float64)
    k[..., 4] = k[..., 5] * 0.5
    gq, gk = q.transpose(1, 2) @ q / 300, k.transpose(1, 2) @ k / 300
    keep = torch.tensor([[0, 1, 3, 4, 5, 6]] * 2)
    prune = torch.tensor([[2, 7]] * 2)
    sol = engine.qk_compensation(gq, gk, keep, prune, lam=0.0)
    assert "lambda raised" in caplog.text
    assert bool((sol.lam > 0).all()) and float(sol.m.abs().max()) < 1.0  # was ~1e19 before the fix
    assert bool((sol.err_compensated > 0).all())  # was a cancelled 0.0: a correction that looked perfect
    assert bool((sol.err_compensated <= sol.err_uncompensated).all())
