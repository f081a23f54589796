"""Sequential calibration (issue 24): exact checks of the block-by-block prune on small random models."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import torch

from corp_cli import api
from corp_cli.calibration import collect_statistics
from corp_cli.errors import InputError
from corp_cli.pruning import PruneOptions, apply_block, keep_counts, plan_block

from .test_cli_chain import _folder as _images


def _model(depth: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32, depth=depth,
                             num_classes=7).eval().double()


def _batches() -> list[torch.Tensor]:
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return [x[:8], x[8:]]


@pytest.mark.parametrize(("target", "seq"), [("mlp", "dense"), ("both", "dense"), ("mlp,qk,vo,heads", "dense"),
                                             ("mlp,qk,vo,heads", "blend")])
def test_dense_target_predicted_error_is_the_error_measured_on_the_stream(target: str, seq: str) -> None:
    """Pre-norm, no layer scale: the MLP is fit to what the dense stream holds after the block, so the
    predicted error of its fit IS the squared distance of the two streams after the block."""
    m = _model()
    r = api.prune(m, sequential=True, sequential_target=seq, data=_batches(), target=target, sparsity=0.5,
                  precision="float64")
    for e in r.blocks:
        pred, meas = e["mlp"]["predicted_error_compensated"], e["sequential"]["measured_stream_error"]
        assert e["mlp"]["fit"] == "target"
        assert abs(pred - meas) < 1e-9 * meas, (e["block"], pred, meas)
        assert e["mlp"]["predicted_error_compensated"] < e["mlp"]["predicted_error_uncompensated"]
    assert r.report()["sequential"]["target"] == seq
    assert all(("blend_cv_errors" in e["mlp"]) == (seq == "blend") for e in r.blocks)


def test_self_target_is_one_shot_pruning_repeated_on_the_pruned_model() -> None:
    """Self: block l is the paper's prune on statistics of the model whose blocks 0..l-1 are already pruned."""
    m = _model()
    batches = _batches()
    r = api.prune(m, sequential=True, sequential_target="self", data=batches, target="both", sparsity=0.5,
                  precision="float64")
    ref = api.adopt(copy.deepcopy(m))
    opts = PruneOptions(target="both", mlp_sparsity=0.5, attn_sparsity=0.5)
    fam = ref.family
    for i in range(fam.num_blocks(ref.model)):
        # attention on the stream as it is, then the MLP on the stream with block i's attention pruned
        st = collect_statistics(ref.model, batches, parts=("mlp", "attn"), product_dtype=torch.float64,
                                blocks=range(i, i + 1))
        counts = keep_counts(opts, fam.shape(ref.model, i))
        bm = plan_block(fam, ref.model, i, st.blocks[i], opts, {"qk": counts["qk"]})
        apply_block(fam, ref.model, i, st.blocks[i], bm, opts)
        st = collect_statistics(ref.model, batches, parts=("mlp",), product_dtype=torch.float64,
                                blocks=range(i, i + 1))
        bm = plan_block(fam, ref.model, i, st.blocks[i], opts, {"mlp": counts["mlp"]})
        apply_block(fam, ref.model, i, st.blocks[i], bm, opts)
        assert torch.equal(bm.mlp, r.masks[i].mlp)
    x = batches[0]
    with torch.inference_mode():
        torch.testing.assert_close(r.model.forward_features(x), ref.model.forward_features(x), rtol=0, atol=1e-10)


def test_dense_target_pulls_the_stream_back_below_one_shot_and_self() -> None:
    m = _model()
    batches = _batches()
    x = torch.cat(batches)

    def err(model: torch.nn.Module) -> float:
        with torch.inference_mode():
            return float((model.forward_features(x) - m.forward_features(x)).square().mean())

    one = api.prune(m, api.calibrate(m, batches, precision="float64"), target="both", sparsity=0.5)
    seq = {t: api.prune(m, sequential=True, sequential_target=t, data=batches, target="both", sparsity=0.5,
                        precision="float64") for t in ("self", "dense")}
    assert err(seq["dense"].model) < 0.5 * min(err(one.model), err(seq["self"].model))


def test_progress_names_the_block_in_hand() -> None:
    import contextlib

    seen: list[tuple[str, int | None, int]] = []

    @contextlib.contextmanager
    def progress(description: str, total: int | None, _unit: str):
        done = [0]
        yield lambda n: done.__setitem__(0, done[0] + n)
        seen.append((description, total, done[0]))

    api.prune(_model(), sequential=True, data=_batches(), target="both", sparsity=0.5, progress=progress)
    assert seen == [(f"sequential: block {i}/3", 6, 6) for i in (1, 2, 3)]


def test_sequential_refuses_precomputed_statistics_and_bad_targets() -> None:
    m = _model(depth=1)
    st = api.calibrate(m, _batches(), precision="float64")
    with pytest.raises(InputError, match="cannot be sequential"):
        api.prune(m, st, sequential=True, target="mlp")
    with pytest.raises(InputError, match="--sequential-target"):
        api.prune(m, sequential=True, sequential_target="teacher", data=_batches(), target="mlp")


def test_masks_are_reapplied_with_the_same_units_and_refit_sequentially() -> None:
    m = _model()
    batches = _batches()
    one = api.prune(m, api.calibrate(m, batches, precision="float64"), target="both", sparsity=0.5)
    r = api.prune(m, sequential=True, data=batches, masks=one.masks, target="both", precision="float64")
    for a, b in zip(one.masks, r.masks):
        assert torch.equal(a.mlp, b.mlp) and torch.equal(a.attn, b.attn)
    for e in r.blocks:
        assert abs(e["mlp"]["predicted_error_compensated"] - e["sequential"]["measured_stream_error"]) < 1e-9


def test_scratch_file_streams_give_the_same_model_and_leave_no_file(tmp_path, monkeypatch) -> None:
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    m = _model(depth=2)
    a = api.prune(m, sequential=True, data=_batches(), target="both", sparsity=0.5, precision="float64")
    b = api.prune(m, sequential=True, data=_batches(), target="both", sparsity=0.5, precision="float64", scratch=True)
    assert b.sequential["scratch"] is True
    x = _batches()[0]
    with torch.inference_mode():
        torch.testing.assert_close(a.model.forward_features(x), b.model.forward_features(x), rtol=0, atol=0)
    assert list(tmp_path.iterdir()) == []


# ---- the CLI: prune --sequential -> evaluate -> reload in a fresh process


def _cli(tmp: Path, *args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "corp_cli.cli", *map(str, args)], cwd=tmp, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_cli_sequential_prune_evaluate_reload(tmp_path: Path, tiny_ckpt: Path) -> None:
    data = _images(tmp_path / "imgs")
    out = tmp_path / "pruned"
    common = ("deit_tiny_patch16_224", "--checkpoint", tiny_ckpt, "--calib-data", data, "--samples", 6,
              "--batch-size", 4, "--workers", 0)
    dry = _cli(tmp_path, "prune", *common, "--sequential", "--dry-run", "--out", out, "--json", "-")
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)
    assert plan["sequential"]["storage"] == "memory" and plan["sequential"]["extra_bytes"] > 3 * 6 * 197 * 192 * 4
    assert not out.exists()
    res = _cli(tmp_path, "prune", *common, "--sequential", "--target", "both", "--sparsity", 0.5, "--out", out)
    assert res.returncode == 0, res.stderr
    assert "stream err" in res.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["sequential"]["target"] == "blend"
    assert sorted(p.name for p in out.iterdir()) == ["masks.safetensors", "model.safetensors", "report.json"]
    for b in report["blocks"]:
        assert b["mlp"]["kept"] == 384 and b["attn"]["qk_kept"] == 32
        assert b["sequential"]["measured_stream_error"] >= 0 and b["mlp"]["fit"] == "target"
    ev = _cli(tmp_path, "evaluate", out, "--data", data, "--reference", "deit_tiny_patch16_224",
              "--reference-checkpoint", tiny_ckpt, "--json", "-")
    assert ev.returncode == 0, ev.stderr
    # the checkpoint alone rebuilds the same function in a fresh process
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    torch.save(x, tmp_path / "x.pt")
    code = ("import torch, corp_cli; m = corp_cli.load_pruned('pruned'); "
            "torch.save(m.forward_features(torch.load('x.pt')), 'y.pt')")
    fresh = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr
    import corp_cli

    with torch.inference_mode():
        mine = corp_cli.load_pruned(out).forward_features(x)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), mine, rtol=0, atol=0)


def test_cli_sequential_refuses_stats_in_one_line(tmp_path: Path) -> None:
    st = tmp_path / "stats.safetensors"
    st.write_bytes(b"")
    res = _cli(tmp_path, "prune", "deit_tiny_patch16_224", "--stats", st, "--sequential", "--out", tmp_path / "o")
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "cannot be sequential" in lines[0]
    res = _cli(tmp_path, "prune", "deit_tiny_patch16_224", "--sequential-target", "self", "--out", tmp_path / "o")
    assert res.returncode == 2 and "--sequential only" in res.stderr
    # --kv-budget is sequential-capable now; an encoder has no KV cache, said before any calibration
    res = _cli(tmp_path, "prune", "deit_tiny_patch16_224", "--sequential", "--kv-budget", "0.6", "--calib-data",
               "synthetic", "--out", tmp_path / "o")
    assert res.returncode == 2 and "keep none" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_bf16_forward_runs_under_autocast_and_stays_close_to_fp32() -> None:
    torch.manual_seed(0)
    m = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, num_classes=7).eval()
    data = [b.float() for b in _batches()]
    a = api.prune(m, sequential=True, data=data, target="both", sparsity=0.5)
    b = api.prune(m, sequential=True, data=data, target="both", sparsity=0.5, forward_dtype=torch.bfloat16)
    assert b.stats.meta["forward_dtype"] == "bfloat16"
    x = data[0]
    with torch.inference_mode():
        ya, yb, yd = a.model.forward_features(x), b.model.forward_features(x), m.forward_features(x)
    assert torch.isfinite(yb).all()
    # bf16 rounding of the streams changes the fit a little, far less than pruning changes the model
    assert float((ya - yb).square().mean()) < 0.1 * float((ya - yd).square().mean())


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM", "SIGKILL"])
def test_interrupted_mid_block_leaves_nothing_at_out_and_no_scratch_file(sig: str, tmp_path: Path,
                                                                        tiny_ckpt: Path) -> None:
    import os
    import signal

    from corp_cli.sequential import SCRATCH_ENV, TEST_PAUSE_ENV

    data = _images(tmp_path / "imgs")
    scratch_dir = tmp_path / "tmp"
    scratch_dir.mkdir()
    out = tmp_path / "pruned"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", SCRATCH_ENV: "1", TEST_PAUSE_ENV: "3:300",
           "TMPDIR": str(scratch_dir)}
    proc = subprocess.Popen([sys.executable, "-m", "corp_cli.cli", "prune", "deit_tiny_patch16_224", "--checkpoint",
                             str(tiny_ckpt), "--calib-data", str(data), "--samples", "6", "--batch-size", "4",
                             "--workers", "0", "--sequential", "--target", "both", "--out", str(out)],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stderr is not None
    for line in proc.stderr:
        if "pausing in sequential block 3" in line:
            break
    # mid-run: the scratch file exists but has no name (unlinked at creation)
    assert list(scratch_dir.iterdir()) == []
    proc.send_signal(getattr(signal, sig))
    rest = proc.stderr.read()
    rc = proc.wait(timeout=60)
    assert rc != 0
    if sig != "SIGKILL":
        lines = [ln for ln in rest.splitlines() if ln.strip()]
        assert len(lines) == 1 and "no artifact was written" in lines[0], rest
    assert not out.exists()
    assert list(scratch_dir.iterdir()) == []


def test_target_sums_round_trip_through_a_statistics_file_and_partial_groups_are_refused(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from corp_cli.errors import ArtifactError
    from corp_cli.stats import Statistics

    r = api.prune(_model(depth=2), sequential=True, sequential_target="dense", data=_batches(), target="both",
                  sparsity=0.5, precision="float64")
    path = tmp_path / "seq.safetensors"
    r.stats.save(path)
    again = Statistics.load(path)
    assert torch.equal(again.blocks[1]["mlp"]["t_cross"], r.stats.blocks[1]["mlp"]["t_cross"])
    assert torch.equal(again.blocks[0]["attn"]["q_cross"], r.stats.blocks[0]["attn"]["q_cross"])
    tensors = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors.pop("blocks.1.mlp.t_sq")
    bad = tmp_path / "partial.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(ArtifactError, match="target sums"):
        Statistics.load(bad)


@pytest.mark.parametrize(("target", "seq", "first"), [("mlp", "self", ("mlp",)), ("both", "blend", ("qk",)),
                                                      ("mlp,qk,vo,heads", "dense", ("qk", "vo", "heads"))])
def test_flops_budget_is_held_and_block_0_gets_the_one_shot_widths(target: str, seq: str,
                                                                   first: tuple[str, ...]) -> None:
    """--flops-budget sequentially: the pruned model keeps the budget (within BUDGET_TOLERANCE below it), and
    block 0, whose pruned stream is still the dense one when its first part is chosen, gets exactly the
    widths and predicted errors the one-shot allocation gives it (the MLP of block 0 under `both` is chosen
    on the stream after its pruned attention, so it may differ)."""
    from corp_cli.allocation import BUDGET_TOLERANCE

    m = _model()
    batches = _batches()
    budget = 0.7
    r = api.prune(m, sequential=True, sequential_target=seq, data=batches, target=target, flops_budget=budget,
                  round_to=1, precision="float64")
    ratio = r.after["flops"] / r.before["flops"]
    assert (1 - BUDGET_TOLERANCE) * budget <= ratio <= budget, ratio
    assert r.allocation is not None and r.allocation["flops_ratio"] == ratio and r.allocation["sequential"]
    assert r.report()["allocation"]["flops_budget"] == budget
    one = api.prune(m, api.calibrate(m, batches, precision="float64", parts=("mlp", "attn", "vo")),
                    target=target, flops_budget=budget, round_to=1)
    for part in first:
        assert r.allocation["blocks"][0][part] == one.allocation["blocks"][0][part], part
    # what the report says each block kept is what the model now has
    fam = r.loaded.family
    assert sum(b["flops"] for b in r.allocation["blocks"]) < r.after["flops"]
    for i, b in enumerate(r.allocation["blocks"]):
        if "mlp" in b:
            assert fam.shape(r.model, i).mlp_hidden == b["mlp"]["kept"]
    # the budget moved widths between blocks: not every block keeps the same MLP width
    assert len({b["mlp"]["kept"] for b in r.allocation["blocks"]}) > 1


@pytest.mark.slow
def test_cli_sequential_flops_budget(tmp_path: Path, tiny_ckpt: Path) -> None:
    from corp_cli.allocation import BUDGET_TOLERANCE

    data = _images(tmp_path / "imgs")
    out = tmp_path / "pruned"
    res = _cli(tmp_path, "prune", "deit_tiny_patch16_224", "--checkpoint", tiny_ckpt, "--calib-data", data,
               "--samples", 6, "--batch-size", 4, "--workers", 0, "--sequential", "--target", "both",
               "--flops-budget", 0.6, "--out", out)
    assert res.returncode == 0, res.stderr
    assert "widths chosen per block" in res.stdout
    report = json.loads((out / "report.json").read_text())
    ratio = report["totals"]["flops_after"] / report["totals"]["flops_before"]
    assert (1 - BUDGET_TOLERANCE) * 0.6 <= ratio <= 0.6
    assert report["allocation"]["sequential"] and report["sequential"]["target"] == "blend"


# ---- out of memory in the middle of a block: the batch is split and run again, the result unchanged


def _oom_when(monkeypatch, fail: Callable[[int, int], bool]) -> list[tuple[int, int]]:
    """Make the family's run_block raise torch.OutOfMemoryError where fail(block, batch size); returns the calls."""
    fam_cls = type(api.adopt(_model(depth=1)).family)
    orig = fam_cls.run_block
    calls: list[tuple[int, int]] = []

    def run_block(self, model, i, hidden, ctx):  # type: ignore[no-untyped-def]
        calls.append((i, int(hidden.shape[0])))
        if fail(i, int(hidden.shape[0])):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return orig(self, model, i, hidden, ctx)

    monkeypatch.setattr(fam_cls, "run_block", run_block)
    return calls


@pytest.mark.parametrize("seq", ["dense", "self", "blend"])
@pytest.mark.parametrize("scratch", [False, True])
def test_out_of_memory_mid_block_is_retried_in_halves_with_the_same_result(monkeypatch, seq: str,
                                                                           scratch: bool) -> None:
    m = _model(depth=3)
    kw = dict(sequential=True, sequential_target=seq, target="mlp,qk,vo,heads", sparsity=0.5, precision="float64",
              scratch=scratch)
    ref = api.prune(m, data=_batches(), **kw)
    seen = {"n": 0}

    def fail(i: int, n: int) -> bool:  # block 1 on batches of more than 2; once more, later, on a batch of 2
        if i == 1 and n > 2:
            return True
        if i == 2 and n == 2:
            seen["n"] += 1
            return seen["n"] == 3
        return False

    calls = _oom_when(monkeypatch, fail)
    r = api.prune(m, data=_batches(), **kw)
    assert (1, 2) in calls and (1, 8) in calls and (2, 1) in calls and (0, 8) in calls
    for a, b in zip(ref.masks, r.masks):
        for x, y in zip((a.mlp, a.attn, a.vo, a.heads), (b.mlp, b.attn, b.vo, b.heads)):
            assert (x is None) == (y is None) and (x is None or torch.equal(x, y))
    for ea, eb in zip(ref.blocks, r.blocks):
        for key in ("measured_stream_error", "measured_stream_error_relative"):
            assert abs(ea["sequential"][key] - eb["sequential"][key]) <= 1e-9 * abs(ea["sequential"][key])
    x = _batches()[0]
    monkeypatch.undo()
    with torch.inference_mode():
        torch.testing.assert_close(r.model.forward_features(x), ref.model.forward_features(x), rtol=1e-9, atol=1e-11)


def test_out_of_memory_on_a_single_sample_is_one_runtime_error(monkeypatch) -> None:
    from corp_cli.errors import EXIT_RUNTIME, CorpError

    _oom_when(monkeypatch, lambda i, n: i == 1)
    with pytest.raises(CorpError) as e:
        api.prune(_model(depth=2), sequential=True, data=_batches(), target="both", sparsity=0.5, precision="float64")
    assert e.value.exit_code == EXIT_RUNTIME
    assert "out of memory in sequential block 1 on a single sample" in str(e.value) and "\n" not in str(e.value)


# ---- two ranks (torch.distributed, gloo): each streams its share, every block's sums all-reduced


def _rank_options(budget: float | None) -> PruneOptions:
    """What the two-rank tests prune: half of each part, or the widths --flops-budget chooses block by block."""
    if budget is not None:
        return PruneOptions(target="both", flops_budget=budget, round_to=1)
    return PruneOptions(target="both", mlp_sparsity=0.5, attn_sparsity=0.5)


def _two_ranks(tmp_path: Path, target: str, fail_rank: int = -1,
               budget: float | None = None, ranking: str = "stream") -> list[subprocess.CompletedProcess]:
    import os
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**os.environ, "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "CORP_DIST_TIMEOUT_S": "120", "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.seq_dist_worker", str(tmp_path / "r"), target,
                                       str(fail_rank), "-" if budget is None else str(budget), ranking], cwd=Path(__file__).parent.parent, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    out = []
    for p in procs:
        so, se = p.communicate(timeout=300)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, so, se))
    return out


@pytest.mark.slow
@pytest.mark.parametrize(("seq", "budget", "ranking"), [("dense", None, "stream"), ("self", None, "stream"),
                                                       ("blend", None, "stream"), ("self", 0.7, "stream"),
                                                       ("self", None, "dense")])
def test_two_ranks_equal_one_process(tmp_path: Path, seq: str, budget: float | None, ranking: str) -> None:
    """Each rank streams half the samples: the widths (under a budget, allocated from the pre-pass's sums over
    both ranks), the masks (with dense ranking, chosen from the pre-pass's sums over both ranks), the blend's chosen weights on the dense fit (each rank's batches split into the
    single process's folds) and the weights are the single process's."""
    from corp_cli import sequential

    res = _two_ranks(tmp_path, seq, budget=budget, ranking=ranking)
    assert all(r.returncode == 0 for r in res), [r.stderr[-2000:] for r in res]
    loaded = api.adopt(_model())
    run = sequential.prune_sequential(loaded, _batches(), _rank_options(budget), target=seq, ranking=ranking,
                                      product_dtype=torch.float64)
    x = torch.cat(_batches())
    with torch.inference_mode():
        y = loaded.model.forward_features(x)
    for rank in range(2):
        got = torch.load(tmp_path / f"r.{rank}.pt", weights_only=False)
        assert (got["samples"], got["tokens"]) == (run.samples, run.tokens)
        assert len(got["masks"]) == len(run.masks)
        for (mlp, attn), m in zip(got["masks"], run.masks):
            assert torch.equal(mlp, m.mlp) and torch.equal(attn, m.attn)
        if budget is not None:
            a, b = got["allocation"], run.allocation
            assert a is not None and b is not None and a["flops"] == b["flops"] and a["flops_ratio"] <= budget
            # the widths moved between blocks, so the pre-pass's sums (all ranks' or one rank's) decided them
            assert len({blk["mlp"]["kept"] for blk in b["blocks"]}) > 1
        for ea, eb in zip(got["blocks"], run.blocks):
            a, b = ea["sequential"]["measured_stream_error"], eb["sequential"]["measured_stream_error"]
            assert abs(a - b) <= 1e-9 * b
            assert abs(ea["mlp"]["predicted_error_compensated"] - eb["mlp"]["predicted_error_compensated"]) <= \
                1e-9 * eb["mlp"]["predicted_error_compensated"]
            # the blend's cross-validated errors are the single process's: the same two folds of samples
            cv = [(ea[p], eb[p]) for p in eb if isinstance(eb[p], dict) and "blend_cv_errors" in eb[p]]
            assert cv or seq != "blend"
            for a, b in cv:
                assert a["dense_blend"] == b["dense_blend"]
                torch.testing.assert_close(torch.tensor(a["blend_cv_errors"]), torch.tensor(b["blend_cv_errors"]),
                                           rtol=1e-9, atol=0)
        torch.testing.assert_close(got["y"], y, rtol=1e-9, atol=1e-11)


@pytest.mark.slow
def test_a_rank_failing_mid_block_stops_every_rank_with_one_line(tmp_path: Path) -> None:
    res = _two_ranks(tmp_path, "dense", fail_rank=1)
    for rank, r in enumerate(res):
        assert r.returncode == 3, r.stderr[-2000:]
        line = next(ln for ln in r.stderr.splitlines() if ln.startswith(f"rank {rank} error:"))
        assert "rank 1 of 2 failed: RuntimeError: injected failure in block 1" in line
    assert not list(tmp_path.glob("r.*.pt"))


def _torchrun_cli(tmp: Path, *args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    import os

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "corp_cli",
           *map(str, args)]
    return subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "CORP_DIST_TIMEOUT_S": "120", "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.mark.slow
def test_cli_torchrun_sequential_two_ranks_prune_as_one_process_and_a_failing_rank_stops_all(tmp_path: Path,
                                                                                            tiny_ckpt: Path) -> None:
    from corp_cli.masks import load_masks

    data = _images(tmp_path / "imgs")
    common = ("prune", "deit_tiny_patch16_224", "--checkpoint", tiny_ckpt, "--calib-data", data, "--samples", 6,
              "--batch-size", 2, "--workers", 0, "--sequential", "--sequential-target", "self", "--target", "both",
              "--sparsity", 0.5)
    res = _torchrun_cli(tmp_path, *common, "--out", tmp_path / "ranks")
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("corp prune ->") == 1  # rank 0 alone prints and writes
    one = _cli(tmp_path, *common, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    a, b = (load_masks(tmp_path / d / "masks.safetensors")[0] for d in ("ranks", "one"))
    agree = sum(bool(torch.equal(x.mlp, y.mlp) and torch.equal(x.attn, y.attn)) for x, y in zip(a, b))
    assert agree >= 10, agree  # float32 products: a near-tie may flip in a block or two, the rest are the same
    ra, rb = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("ranks", "one"))
    assert ra["blocks"][0]["sequential"]["measured_stream_error"] == pytest.approx(
        rb["blocks"][0]["sequential"]["measured_stream_error"], rel=1e-4)
    # rank 1 fails in block 1 (the hook of corp_cli.distributed): every rank stops, rank 0 says it in one line
    bad = _torchrun_cli(tmp_path, *common, "--out", tmp_path / "bad", env={"CORP_TEST_FAIL_RANK": "1"})
    assert bad.returncode != 0
    ours = [ln for ln in (bad.stdout + bad.stderr).splitlines() if ln.startswith("error: ")]
    assert ours == ["error: rank 1 of 2 failed: RuntimeError: corp test hook: injected failure on rank 1; "
                    "no statistics were written"], ours
    assert not (tmp_path / "bad").exists()
    # rank 1 killed in block 1: torchrun ends the run, in bounded time, nothing written
    t = time.monotonic()
    dead = _torchrun_cli(tmp_path, *common, "--out", tmp_path / "dead", env={"CORP_TEST_KILL_RANK": "1"})
    assert dead.returncode != 0 and time.monotonic() - t < 300
    assert "exitcode  : -9" in dead.stderr
    assert not (tmp_path / "dead").exists()


@pytest.mark.slow
def test_cli_torchrun_blend_target_two_ranks_prune_as_one_process(tmp_path: Path) -> None:
    """`torchrun --nproc-per-node 2 corp prune --sequential --sequential-target blend` is the one-process run to
    float64 rounding: each rank's batches fall in the single process's cross-validation folds, so every part
    chooses the same blend. One image a batch (both runs, one thread each) makes every float32 product the same
    sample's in both runs, so only the float64 sums' order differs; larger batches group other samples into a
    product, whose float32 rounding may tip a near-tie of the cross-validation (the older torchrun test above)."""
    from safetensors.torch import load_file, save_file

    from corp_cli.masks import load_masks

    torch.manual_seed(0)
    ckpt = tmp_path / "dense.safetensors"
    save_file(timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32, depth=2,
                                num_classes=5).state_dict(), str(ckpt))
    data = _images(tmp_path / "imgs", n=8)
    common = ("prune", "deit_tiny_patch16_224", "--checkpoint", ckpt, "--model-arg", "img_size=32", "--model-arg",
              "depth=2", "--model-arg", "num_classes=5", "--calib-data", data, "--samples", 8, "--batch-size", 1,
              "--workers", 0, "--sequential", "--sequential-target", "blend", "--target", "both", "--sparsity", 0.5)
    res = _torchrun_cli(tmp_path, *common, "--out", tmp_path / "ranks")
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("corp prune ->") == 1  # rank 0 alone prints and writes
    one = _cli(tmp_path, *common, "--out", tmp_path / "one", env={"OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr
    a, b = (load_masks(tmp_path / d / "masks.safetensors")[0] for d in ("ranks", "one"))
    assert len(a) == len(b) == 2
    assert all(torch.equal(x.mlp, y.mlp) and torch.equal(x.attn, y.attn) for x, y in zip(a, b))
    wa, wb = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("ranks", "one"))
    assert wa.keys() == wb.keys()
    for k in wb:  # float32 weights of float64 solves: a last-bit flip at most
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-6, atol=1e-9, msg=k)
    ra, rb = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("ranks", "one"))
    assert ra["stats"]["samples"] == rb["stats"]["samples"] == 8
    chosen = 0
    for ea, eb in zip(ra["blocks"], rb["blocks"]):
        assert ea["sequential"]["target"] == "blend"
        assert ea["sequential"]["measured_stream_error"] == pytest.approx(eb["sequential"]["measured_stream_error"],
                                                                          rel=1e-9)
        for part, d in eb.items():
            if isinstance(d, dict) and "blend_cv_errors" in d:
                chosen += 1
                assert ea[part]["dense_blend"] == d["dense_blend"], (ea["block"], part)
                torch.testing.assert_close(torch.tensor(ea[part]["blend_cv_errors"]), torch.tensor(d["blend_cv_errors"]),
                                           rtol=1e-12, atol=0)
    assert chosen == 2  # the MLP of both blocks reports its blend (the Q/K blends are per head, in the weights)
