"""`corp benchmark`: every JSON field present and consistent; the timing and memory helpers measure."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from corp_cli.artifacts import sha256_file
from corp_cli.benchmark import _CpuPeak, misaligned_widths, parse_batch_sizes, percentile
from corp_cli.cli import app
from corp_cli.errors import InputError
from corp_cli.preprocess import resolve_preprocessing

from .conftest import adopt, narrowed, save_model

runner = CliRunner()
RUN_KEYS = {
    "batch_size", "latency_ms_median", "latency_ms_p90", "latency_ms_min", "throughput_items_per_s",
    "peak_memory_bytes", "peak_memory_method",
}
FIGURE_KEYS = {"params", "param_bytes", "flops_per_item", "tokens", "per_block_flops", "runs", "kind", "name"}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(dense checkpoint, pruned DIR in `corp prune`'s format with uneven, unaligned widths)."""
    root = tmp_path_factory.mktemp("bench")
    dense = _model()
    ckpt = root / "dense.safetensors"
    save_file(dense.state_dict(), str(ckpt))
    prep = resolve_preprocessing(dense)
    blocks = [{"mlp_hidden": 300 + 10 * i, "qk_dim": 30 if i % 2 else 64} for i in range(12)]
    out = save_model(root / "pruned", narrowed("deit_tiny_patch16_224", blocks),
                     base={"name": "deit_tiny_patch16_224", "checkpoint": f"sha256:{sha256_file(ckpt)}", "num_classes": 1000},
                     preprocessing=prep.to_dict(), classes=None)
    return ckpt, out


def test_benchmark_json_has_every_field(tmp_path: Path, files: tuple[Path, Path]) -> None:
    ckpt, pruned = files
    out = tmp_path / "bench.json"
    res = runner.invoke(app, ["benchmark", str(pruned), "--reference-checkpoint", str(ckpt), "--batch-sizes", "1,2",
                              "--warmup", "1", "--runs", "3", "--device", "cpu", "--json", str(out)])
    assert res.exit_code == 0, res.stderr
    rep = json.loads(out.read_text())
    assert set(rep) >= {"command", "model", "reference", "comparison", "settings", "environment", "warnings", "seconds"}
    for side in ("model", "reference"):
        assert set(rep[side]) >= FIGURE_KEYS
        assert [r["batch_size"] for r in rep[side]["runs"]] == [1, 2]
        for r in rep[side]["runs"]:
            assert set(r) >= RUN_KEYS
            assert 0 < r["latency_ms_min"] <= r["latency_ms_median"] <= r["latency_ms_p90"]
            assert r["throughput_items_per_s"] == pytest.approx(1e3 * r["batch_size"] / r["latency_ms_median"])
            assert r["peak_memory_bytes"] >= 0
    m, ref = rep["model"], rep["reference"]
    assert m["kind"] == "pruned" and ref["kind"] == "dense"
    assert ref["flops_per_item"] == 2_507_366_400  # dense deit_tiny, checked by brute force in test_flops
    assert m["flops_per_item"] < ref["flops_per_item"] and m["params"] < ref["params"]
    cmp = rep["comparison"]
    assert cmp["flop_reduction"] == pytest.approx(1 - m["flops_per_item"] / ref["flops_per_item"])
    for c, mr, rr in zip(cmp["per_batch_size"], m["runs"], ref["runs"]):
        assert set(c) == {"batch_size", "speedup_median", "throughput_ratio", "flop_reduction", "flop_speedup_bound"}
        assert c["speedup_median"] == pytest.approx(rr["latency_ms_median"] / mr["latency_ms_median"])
    s = rep["settings"]
    assert s["batch_sizes"] == [1, 2] and s["dtype"] == "fp32" and s["runs"] == 3 and s["inference_mode"] is True
    assert "peak" in s["peak_memory"] and rep["environment"]["device"] == "cpu"
    assert rep["warnings"] == []  # the multiple-of-8 warning is for CUDA only
    assert "speed-up" in res.stdout and "reference" in res.stdout and "GFLOPs/image" in res.stdout


def test_benchmark_bf16_on_cpu_and_stdout_json(files: tuple[Path, Path]) -> None:
    ckpt, _ = files
    res = runner.invoke(app, ["benchmark", "deit_tiny_patch16_224", "--checkpoint", str(ckpt), "--dtype", "bf16",
                              "--batch-sizes", "1", "--warmup", "0", "--runs", "1", "--device", "cpu", "--json", "-"])
    assert res.exit_code == 0, res.stderr
    rep = json.loads(res.stdout)
    assert rep["settings"]["dtype"] == "bf16" and rep["reference"] is None and rep["comparison"] is None
    assert rep["model"]["param_bytes"] == 2 * rep["model"]["params"]


def test_bad_options_are_usage_errors(files: tuple[Path, Path]) -> None:
    ckpt, _ = files
    res = runner.invoke(app, ["benchmark", "deit_tiny_patch16_224", "--checkpoint", str(ckpt), "--dtype", "fp8"])
    assert res.exit_code == 2 and "--dtype" in res.stderr
    with pytest.raises(InputError):
        parse_batch_sizes("1,0")
    assert parse_batch_sizes("1, 32,256") == (1, 32, 256)


def test_misaligned_widths_names_the_blocks(files: tuple[Path, Path]) -> None:
    from corp_cli.compact import load_pruned_loaded

    bad = misaligned_widths(load_pruned_loaded(files[1]))
    # hidden 300+10i is a multiple of 8 only for i = 2, 6, 10; Q/K 30 in odd blocks
    assert sum("MLP" in b for b in bad) == 9 and sum("Q/K" in b for b in bad) == 6
    assert misaligned_widths(adopt(_model())) == []


def test_percentile_matches_numpy() -> None:
    vals = [5.0, 1.0, 3.0, 2.0, 4.0, 10.0, 7.5]
    for q in (0, 50, 90, 100):
        assert percentile(vals, q) == pytest.approx(float(np.percentile(vals, q)))


def test_cpu_peak_memory_sees_a_transient_allocation() -> None:
    probe = _CpuPeak()
    if probe.method != "vmhwm":
        pytest.skip("peak RSS cannot be reset here (no /proc/self/clear_refs); ru_maxrss only grows")
    probe.start()
    # 96 MiB: above glibc's largest dynamic mmap threshold (32 MiB), so the pages are fresh
    # even when earlier tests left freed memory resident in the heap
    x = torch.ones(96 * 2**20 // 4)
    x += 1
    del x
    assert probe.stop() >= 90 * 2**20
