"""`corp inspect` and report.png: every artifact kind of a real CLI chain, the --json schema, damaged files."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from typer.testing import CliRunner

from corp_cli import __version__, load_pruned
from corp_cli.cli import app
from corp_cli.errors import ArtifactError
from corp_cli.inspection import DAMAGED_EXIT, KINDS, describe
from corp_cli.stats import Statistics

from .test_cli_chain import _folder

runner = CliRunner()
MODEL = "deit_tiny_patch16_224"
TOP_KEYS = {"schema_version", "path", "kind", "summary", "model", "family", "tool_version", "data", "options", "blocks",
            "totals", "reload", "files"}
DATA_KEYS = {"spec", "fingerprint", "samples", "tokens", "synthetic", "seed", "stats_fingerprint"}
TOTAL_KEYS = {"params_before", "params_after", "flops_before", "flops_after", "params_ratio", "flops_ratio"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _ok(*args: Any) -> str:
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, (res.exit_code, res.output, res.exception)
    return res.stdout


def _json(*args: Any) -> dict[str, Any]:
    return json.loads(_ok("inspect", *args, "--json", "-"))


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory, tiny_ckpt: Path) -> dict[str, Path]:
    """calibrate -> prune (MLP only, uniform: a stock timm model) and prune (MLP, Q/K, V/O) from one statistics file."""
    root = tmp_path_factory.mktemp("inspect")
    data = _folder(root / "imgs", n=4)
    stats = root / "stats.safetensors"
    _ok("calibrate", MODEL, "--checkpoint", tiny_ckpt, "--data", data, "--samples", 4, "--parts", "mlp,attn,vo",
        "--out", stats, "--batch-size", 4, "--workers", 0)
    mlp, full = root / "mlp", root / "full"
    _ok("prune", MODEL, "--checkpoint", tiny_ckpt, "--stats", stats, "--target", "mlp", "--sparsity", 0.5, "--out", mlp)
    _ok("prune", MODEL, "--checkpoint", tiny_ckpt, "--stats", stats, "--target", "all", "--sparsity", 0.3,
        "--round-to", 1, "--out", full)
    return {"root": root, "stats": stats, "mlp": mlp, "full": full, "ckpt": tiny_ckpt}


def _check_schema(d: dict[str, Any], kind: str) -> None:
    assert TOP_KEYS <= set(d), TOP_KEYS - set(d)
    assert d["kind"] == kind and kind in KINDS and d["schema_version"] == 1
    assert set(d["data"]) == DATA_KEYS
    assert set(d["reload"]) == {"python", "stock", "cli"}
    assert d["totals"] is None or set(d["totals"]) == TOTAL_KEYS
    assert d["model"]["name"] == MODEL and d["model"]["checkpoint"].startswith("sha256:")
    assert d["family"] == "timm-vit" and d["tool_version"] == __version__
    assert isinstance(d["summary"], str) and "\n" not in d["summary"] and d["summary"]
    for i, b in enumerate(d["blocks"]):
        assert b["block"] == i
        for part in ("mlp", "qk", "heads", "vo"):
            if part in b:
                kept, width = b[part]
                assert isinstance(kept, int) and (width is None or 1 <= kept <= width)


def test_stats(chain: dict[str, Path]) -> None:
    d = _json(chain["stats"])
    _check_schema(d, "stats")
    meta = Statistics.load(chain["stats"]).meta
    assert d["data"]["fingerprint"] == meta["data"]["fingerprint"] and d["data"]["samples"] == 4
    assert d["data"]["tokens"] == 4 * 197 and d["data"]["synthetic"] is False
    assert d["parts"] == ["mlp", "attn", "vo"]
    assert d["blocks"][0] == {"block": 0, "mlp": [768, 768], "qk": [64, 64], "heads": [3, 3], "vo": [64, 64]}
    assert len(d["blocks"]) == 12 and d["totals"] is None
    assert f"--stats {chain['stats']}" in d["reload"]["cli"]
    ns: dict[str, Any] = {}
    exec(d["reload"]["python"], ns)  # the line it prints loads what it describes
    assert ns["stats"].meta == meta


def test_mlp_checkpoint_folder_and_its_files(chain: dict[str, Path]) -> None:
    folder = chain["mlp"]
    d = _json(folder)
    _check_schema(d, "checkpoint")
    report = json.loads((folder / "report.json").read_text())
    for b, r in zip(d["blocks"], report["blocks"]):
        assert b["mlp"] == [384, 768] and b["qk"] == [64, 64] and b["heads"] == [3, 3]
        assert b["predicted_error"] == {"mlp": r["mlp"]["predicted_error_compensated"]}
    model = load_pruned(folder)
    t = d["totals"]
    assert t["params_after"] == sum(p.numel() for p in model.parameters()) == report["totals"]["params_after"]
    assert t["params_before"] == report["totals"]["params_before"] and t["flops_after"] == report["totals"]["flops_after"]
    assert t["flops_ratio"] == pytest.approx(report["totals"]["flops_after"] / report["totals"]["flops_before"])
    # provenance: the statistics it was pruned from
    assert d["data"]["stats_fingerprint"] == Statistics.load(chain["stats"]).fingerprint()
    assert d["data"]["samples"] == 4
    # both reload lines run, and give the same function as load_pruned
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        want = model(x)
    for key in ("python", "stock"):
        ns: dict[str, Any] = {}
        exec(d["reload"][key], ns)
        assert ("corp_cli" in d["reload"][key]) == (key == "python")  # the stock line needs timm alone
        with torch.inference_mode():
            torch.testing.assert_close(ns["model"].eval()(x), want)
    # the checkpoint file says the same as its folder
    same = _json(folder / "model.safetensors")
    assert {k: v for k, v in same.items() if k != "path"} == {k: v for k, v in d.items() if k != "path"}
    # the masks and the report beside it
    m = _json(folder / "masks.safetensors")
    _check_schema(m, "masks")
    assert [b["mlp"] for b in m["blocks"]] == [[384, 768]] * 12 and m["options"]["target"] == "mlp"
    assert m["data"]["stats_fingerprint"] == d["data"]["stats_fingerprint"]
    r = _json(folder / "report.json")
    _check_schema(r, "report")
    assert r["blocks"] == [{k: v for k, v in b.items() if k in ("block", "mlp", "predicted_error")} for b in d["blocks"]]
    assert r["totals"] == d["totals"] and r["reload"] == d["reload"]


def test_attention_checkpoint_and_text(chain: dict[str, Path]) -> None:
    d = _json(chain["full"])
    report = json.loads((chain["full"] / "report.json").read_text())
    for b, r in zip(d["blocks"], report["blocks"]):
        assert b["mlp"] == [538, 768] and b["qk"] == [45, 64] and b["vo"] == [45, 64]  # 768 - floor(0.3 * 768); 64 - 19
        assert b["predicted_error"]["qk"] == pytest.approx(sum(r["attn"]["predicted_logit_error_compensated"]))
        assert b["predicted_error"]["vo"] == r["vo"]["predicted_error_compensated"]
    assert d["reload"]["stock"] is None  # Q/K and V/O pruned: only corp rebuilds it
    text = _ok("inspect", chain["full"])
    lines = text.splitlines()
    assert lines[0] == f"{chain['full'] / 'model.safetensors'}: {d['summary']}"
    assert "MLP 538/768, Q/K 45/64, V/O 45/64" in d["summary"]
    assert d["reload"]["python"] in text and "538/768" in text and f"{__version__}" in text
    assert sum(1 for ln in lines if ln.strip().startswith(tuple("0123456789"))) == 12  # one row per block: errors differ
    masks_text = _ok("inspect", chain["full"] / "masks.safetensors")
    assert "0-11" in masks_text  # equal widths without errors: one compact row


def test_prune_writes_report_png_and_inspect_plots(chain: dict[str, Path], tmp_path: Path) -> None:
    for folder in (chain["mlp"], chain["full"]):
        png = folder / "report.png"
        assert png.read_bytes()[:8] == PNG_MAGIC
    out = tmp_path / "again.png"
    d = json.loads(_ok("inspect", chain["full"], "--plot", out, "--json", "-"))
    assert d["plot"] == str(out) and out.read_bytes()[:8] == PNG_MAGIC
    import matplotlib.image

    img = matplotlib.image.imread(out)  # decodes: a real PNG, not just its magic bytes
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200
    res = runner.invoke(app, ["inspect", str(chain["full"]), "--plot", str(out)])
    assert res.exit_code == 2 and "--overwrite" in res.stderr
    _ok("inspect", chain["stats"], "--plot", out, "--overwrite")  # a dense picture of the statistics
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_without_matplotlib_prune_skips_the_picture_with_a_note(chain: dict[str, Path], tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    out = tmp_path / "pruned"
    res = runner.invoke(app, ["prune", MODEL, "--checkpoint", str(chain["ckpt"]), "--stats", str(chain["stats"]),
                              "--target", "mlp", "--sparsity", "0.5", "--out", str(out), "--json", str(tmp_path / "s.json")])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["masks.safetensors", "model.safetensors", "report.json"]
    assert json.loads((tmp_path / "s.json").read_text())["plot"] is None
    notes = [ln for ln in res.stderr.splitlines() if "report.png" in ln]
    assert len(notes) == 1 and "matplotlib is not installed" in notes[0] and "report.png" not in res.stdout
    res = runner.invoke(app, ["inspect", str(out), "--plot", str(tmp_path / "x.png")])
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1 and "matplotlib" in res.stderr
    assert not (tmp_path / "x.png").exists()


def _damaged(root: Path, chain: dict[str, Path]) -> dict[str, Path]:
    root.mkdir(exist_ok=True)
    cases: dict[str, Path] = {}
    model_bytes = (chain["mlp"] / "model.safetensors").read_bytes()
    (cases.setdefault("truncated-checkpoint", root / "truncated.safetensors")).write_bytes(model_bytes[: len(model_bytes) // 2])
    trunc_dir = root / "truncated_dir"
    trunc_dir.mkdir(exist_ok=True)
    (trunc_dir / "model.safetensors").write_bytes(model_bytes[:-100])
    cases["truncated-folder"] = trunc_dir
    cases["foreign-safetensors"] = chain["ckpt"]  # a plain timm state dict: no corp record
    save_file({"x": torch.zeros(2)}, str(root / "other.safetensors"), metadata={"corp": "{not json"})
    cases["corrupt-metadata"] = root / "other.safetensors"
    (cases.setdefault("random-bytes", root / "noise.bin")).write_bytes(bytes(range(256)) * 4)
    (cases.setdefault("empty-file", root / "empty")).write_bytes(b"")
    (cases.setdefault("other-json", root / "config.json")).write_text('{"model_type": "bert"}')
    bad = json.loads((chain["mlp"] / "report.json").read_text())
    bad["blocks"][3]["mlp"] = {"kept": "many"}
    (cases.setdefault("broken-report", root / "report.json")).write_text(json.dumps(bad))
    (cases.setdefault("truncated-report", root / "r2.json")).write_text((chain["mlp"] / "report.json").read_text()[:300])
    empty_dir = root / "empty_dir"
    empty_dir.mkdir(exist_ok=True)
    cases["folder-without-model"] = empty_dir
    stats_bytes = chain["stats"].read_bytes()
    (cases.setdefault("truncated-stats", root / "s.safetensors")).write_bytes(stats_bytes[: len(stats_bytes) - 64])
    return cases


def test_damaged_or_foreign_files_are_one_line_and_exit_1(chain: dict[str, Path], tmp_path: Path) -> None:
    for name, path in _damaged(tmp_path, chain).items():
        for extra in ([], ["--json", "-"]):
            res = runner.invoke(app, ["inspect", str(path), *extra])
            lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
            assert res.exit_code == DAMAGED_EXIT == 1, (name, res.exit_code, res.output, res.exception)
            assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0], (name, res.stderr)
            assert "Traceback" not in res.output and res.stdout == "", name
        with pytest.raises(ArtifactError):
            describe(path)
    res = runner.invoke(app, ["inspect", str(tmp_path / "missing.safetensors")])
    assert res.exit_code == 2 and "no such file" in res.stderr  # a wrong path is bad usage, as everywhere else


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.data())
def test_byte_corruption_never_escapes_as_another_error(chain: dict[str, Path], tmp_path: Path, data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(["stats.safetensors", "mlp/masks.safetensors", "mlp/report.json"]))
    src = chain["root"] / name
    raw = bytearray(src.read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        # mostly the header / JSON text, where a flip changes what is claimed
        pos = data.draw(st.integers(0, min(len(raw), 4096) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    target = tmp_path / "fuzzed" / Path(name).name
    target.parent.mkdir(exist_ok=True)
    target.write_bytes(bytes(raw))
    try:
        d = describe(target)
    except ArtifactError as e:
        assert e.exit_code == DAMAGED_EXIT and "\n" not in str(e)
    else:
        assert d["kind"] in KINDS and json.dumps(d)
