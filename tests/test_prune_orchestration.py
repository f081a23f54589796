"""One orchestration for `corp prune` and the Python API (issue 24, item 7).

The command and api.prune (and prune_to, the command as a function) make the same checks
(corp_cli.prune_checks): the same refusals in the same words, the same default target with
the same warning, the same sequential prune. Small random-init models, a few images.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import corp_cli
from corp_cli import api
from corp_cli.cli import app
from corp_cli.errors import InputError
from corp_cli.family import ModelOptions
from corp_cli.masks import load_masks

from .conftest import random_model
from .test_cli_chain import _folder

runner = CliRunner()
MODEL = "deit_tiny_patch16_224"
KWARGS: dict[str, Any] = {"img_size": 32, "depth": 2, "num_classes": 7}
SAMPLES, BATCH = 6, 4


@dataclass
class Workspace:
    root: Path
    images: Path
    ckpt: Path
    module: torch.nn.Module
    batches: list[torch.Tensor]
    stats: Any
    stats_file: Path
    masks: Any
    masks_file: Path


def _model_flags(ckpt: Path, **extra: object) -> list[str]:
    args = {k: v for k, v in {**KWARGS, **extra}.items() if k != "num_classes"}
    return ["--checkpoint", str(ckpt), "--num-classes", str(KWARGS["num_classes"]),
            *[a for k, v in args.items() for a in ("--model-arg", f"{k}={str(v).lower()}")]]


def _calib_flags(ws: Workspace) -> list[str]:
    return ["--calib-data", str(ws.images), "--samples", str(SAMPLES), "--batch-size", str(BATCH), "--workers", "0"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    root = tmp_path_factory.mktemp("orch")
    module = random_model(MODEL, **KWARGS)
    ckpt = root / "model.safetensors"
    save_file(module.state_dict(), str(ckpt))
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    batches = [x[:4], x[4:]]
    stats = api.calibrate(module, batches)
    stats_file = root / "stats.safetensors"
    stats.save(stats_file)
    one = api.prune(module, stats, target="mlp", sparsity=0.5)
    api.save_pruned(one, root / "oneshot")
    return Workspace(root=root, images=_folder(root / "imgs"), ckpt=ckpt, module=module, batches=batches, stats=stats,
                     stats_file=stats_file, masks=one.masks, masks_file=root / "oneshot" / "masks.safetensors")


@dataclass
class Case:
    id: str
    flags: tuple[str, ...]  # `corp prune` flags besides the model's and --out
    kwargs: dict[str, Any]  # api.prune's keywords for the same prune
    calibrates: bool = True  # the command calibrates here (else it is given --stats); api.prune gets stats when not sequential


CASES = [
    Case("target-without-sequential", ("--sequential-target", "dense"), {"sequential_target": "dense"}),
    Case("ranking-without-sequential", ("--sequential-ranking", "dense"), {"sequential_ranking": "dense"}),
    Case("stats-with-sequential", ("--sequential",), {"sequential": True}, calibrates=False),
    Case("unknown-sequential-target", ("--sequential", "--sequential-target", "teacher"),
         {"sequential": True, "sequential_target": "teacher"}),
    Case("dense-ranking-with-masks", ("--sequential", "--sequential-ranking", "dense", "--masks", "{masks}"),
         {"sequential": True, "sequential_ranking": "dense", "masks": "{masks}"}),
    Case("dense-ranking-with-budget", ("--sequential", "--sequential-ranking", "dense", "--flops-budget", "0.7"),
         {"sequential": True, "sequential_ranking": "dense", "flops_budget": 0.7}),
    Case("qk-option-with-mlp-target", ("--target", "mlp", "--attn-sparsity", "0.3"),
         {"target": "mlp", "attn_sparsity": 0.3}),
    Case("qk-option-with-mlp-target-sequential", ("--sequential", "--target", "mlp", "--min-qk-dim", "2"),
         {"sequential": True, "target": "mlp", "min_qk_dim": 2}),
    Case("budget-with-sparsity", ("--flops-budget", "0.7", "--sparsity", "0.3"), {"flops_budget": 0.7, "sparsity": 0.3}),
    Case("kv-budget-on-an-encoder", ("--kv-budget", "0.5"), {"kv_budget": 0.5}),
]


def _one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0].removeprefix("error: ")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_the_command_and_the_api_refuse_in_the_same_words(case: Case, ws: Workspace) -> None:
    out = ws.root / f"out-{case.id}"
    flags = [f.format(masks=ws.masks_file) for f in case.flags]
    given = _calib_flags(ws) if case.calibrates else ["--stats", str(ws.stats_file)]
    res = runner.invoke(app, ["prune", MODEL, *_model_flags(ws.ckpt), *given, *flags, "--out", str(out)])
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    said = _one_error_line(res.stderr)
    assert not out.exists()
    kwargs = {k: (ws.masks if v == "{masks}" else v) for k, v in case.kwargs.items()}
    sequential = kwargs.get("sequential", False)
    stats = ws.stats if (not case.calibrates or not sequential) else None
    with pytest.raises(InputError) as err:
        api.prune(ws.module, stats, data=ws.batches if sequential else None, **kwargs)
    assert str(err.value) == said


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return module.state_dict()


def _assert_same_masks(a: list[Any], b: list[Any]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for part in ("mlp", "attn", "vo", "heads"):
            u, v = getattr(x, part), getattr(y, part)
            assert (u is None) == (v is None), part
            assert u is None or torch.equal(u, v), part


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k].cpu(), sb[k].cpu()), k


def test_a_sequential_prune_is_the_same_from_the_command_prune_to_and_api_prune(ws: Workspace) -> None:
    prune_flags = ("--sequential", "--target", "both", "--sparsity", "0.5", "--round-to", "1")
    cli_out = ws.root / "seq-cli"
    res = runner.invoke(app, ["prune", MODEL, *_model_flags(ws.ckpt), *_calib_flags(ws), *prune_flags,
                              "--out", str(cli_out)])
    assert res.exit_code == 0, (res.output, res.exception)
    options = ModelOptions(checkpoint=ws.ckpt, num_classes=KWARGS["num_classes"],
                           model_args={k: v for k, v in KWARGS.items() if k != "num_classes"})
    job_out = ws.root / "seq-job"
    done = corp_cli.prune_to(MODEL, job_out, model_options=options, calib_data=str(ws.images), samples=SAMPLES,
                             batch_size=BATCH, workers=0, sequential=True, target="both", sparsity=0.5, round_to=1)
    from corp_cli.loading import load_any

    loaded = load_any(MODEL, options, "cpu")
    result = api.prune(loaded, sequential=True, data=str(ws.images), samples=SAMPLES, batch_size=BATCH, workers=0,
                       target="both", sparsity=0.5, round_to=1)
    cli_masks, _ = load_masks(cli_out / api.MASKS_FILE)
    job_masks, _ = load_masks(job_out / api.MASKS_FILE)
    _assert_same_masks(cli_masks, result.masks)
    _assert_same_masks(job_masks, result.masks)
    # something was pruned, so equal masks say something
    assert all(m.mlp is not None and m.attn is not None for m in result.masks)
    _assert_same_weights(corp_cli.load_pruned(cli_out), result.model)
    _assert_same_weights(corp_cli.load_pruned(job_out), result.model)
    report = json.loads((cli_out / api.REPORT_FILE).read_text())
    assert done.report is not None
    for r in (report, done.report):
        assert r["options"] == result.options.to_dict()
        assert {k: r["sequential"][k] for k in ("target", "ranking")} == {"target": "blend", "ranking": "stream"}
    assert result.sequential is not None and result.sequential["target"] == "blend"


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def warnings_said() -> Iterator[list[str]]:
    # on the module's own logger: the CLI's logging setup stops corp_cli's records reaching pytest's handler
    handler = _Records()
    logger = logging.getLogger("corp_cli.prune_checks")
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


@pytest.mark.parametrize(("scale_norm", "target"), [(True, "mlp"), (False, "both")])
def test_the_default_target_and_its_warning_are_the_same_from_both(ws: Workspace, warnings_said: list[str],
                                                                     scale_norm: bool, target: str) -> None:
    """A norm over the attention output (scale_norm) rules out Q/K pruning: the default falls back to the MLP,
    and both say why in the same words; a plain ViT prunes the default both, with no warning."""
    extra = {"scale_attn_norm": True} if scale_norm else {}
    module = random_model(MODEL, **KWARGS, **extra)
    ckpt = ws.root / f"model-scale-norm-{scale_norm}.safetensors"
    save_file(module.state_dict(), str(ckpt))
    out = ws.root / f"default-target-{scale_norm}"
    res = runner.invoke(app, ["prune", MODEL, *_model_flags(ckpt, **extra), *_calib_flags(ws), "--sparsity", "0.5",
                              "--out", str(out)])
    assert res.exit_code == 0, (res.output, res.exception)
    report = json.loads((out / api.REPORT_FILE).read_text())
    cli_said = list(warnings_said)
    warnings_said.clear()
    loaded = corp_cli.adopt(module, model_kwargs={**KWARGS, **extra})
    result = api.prune(loaded, api.calibrate(loaded, ws.batches), sparsity=0.5)
    assert result.options.target == report["options"]["target"] == target
    assert report["options"] == result.options.to_dict()
    assert warnings_said == cli_said
    if scale_norm:
        assert len(cli_said) == 1 and cli_said[0].endswith("; pruning --target mlp"), cli_said
        assert "scale_norm" in cli_said[0]
        # and the command shows it (wrapped to the terminal's width)
        assert " ".join(cli_said[0].split()) in " ".join(res.stderr.split())
    else:
        assert cli_said == []


def test_a_dry_run_on_given_statistics_writes_nothing_without_a_meta_device_model(ws: Workspace) -> None:
    """A .pth checkpoint has no header to build the model from on the meta device: the dry run checks on the
    weights, and still prunes nothing and writes nothing."""
    pth = ws.root / "model.pth"
    torch.save(ws.module.state_dict(), pth)
    stats = ws.root / "stats-pth.safetensors"
    flags = _model_flags(pth)
    res = runner.invoke(app, ["calibrate", MODEL, *flags, "--data", str(ws.images), "--samples", str(SAMPLES),
                              "--batch-size", str(BATCH), "--workers", "0", "--out", str(stats)])
    assert res.exit_code == 0, (res.output, res.exception)
    out = ws.root / "dry-pth"
    res = runner.invoke(app, ["prune", MODEL, *flags, "--stats", str(stats), "--target", "mlp", "--dry-run",
                              "--json", "-", "--out", str(out)])
    assert res.exit_code == 0, (res.output, res.exception)
    plan = json.loads(res.stdout)
    assert plan["dry_run"] and plan["stats"]["path"] == str(stats)
    assert [w["mlp_kept"] for w in plan["widths"]] == [384, 384]
    assert not out.exists()


def test_a_rotary_model_says_why_its_default_target_is_the_mlp(warnings_said: list[str]) -> None:
    """EVA-02 refuses no block's Q/K pruning (its pairs are pruned when asked for), so the warning cannot
    quote a refusal: it says the rotary reason, not "None"."""
    model = random_model("eva02_tiny_patch14_224", img_size=28, depth=2, num_classes=5)
    loaded = corp_cli.adopt(model)
    assert loaded.family.qk_refusal(loaded.model, 0) is None
    result = api.prune(loaded, api.calibrate(loaded, [torch.randn(2, 3, 28, 28)]), sparsity=0.5)
    assert result.options.target == "mlp"
    assert warnings_said == [f"{loaded.family.name}: rotary Q/K dims are pruned (in pairs) only when --target asks "
                             "for them (qk, attn, both or all); pruning --target mlp"]


def test_masks_reapplied_without_a_target_prune_what_they_hold_from_both(ws: Workspace) -> None:
    """`--masks` without --target prunes (and records) what the masks hold; so does api.prune(masks=...)."""
    from corp_cli.loading import load_any
    from corp_cli.stats import Statistics

    stats = ws.root / "stats-ckpt.safetensors"
    flags = _model_flags(ws.ckpt)
    calib = ["--data", str(ws.images), "--samples", str(SAMPLES), "--batch-size", str(BATCH), "--workers", "0"]
    assert runner.invoke(app, ["calibrate", MODEL, *flags, *calib, "--out", str(stats)]).exit_code == 0
    first, again = ws.root / "masks-first", ws.root / "masks-again"
    res = runner.invoke(app, ["prune", MODEL, *flags, "--stats", str(stats), "--target", "mlp", "--sparsity", "0.5",
                              "--out", str(first)])
    assert res.exit_code == 0, (res.output, res.exception)
    res = runner.invoke(app, ["prune", MODEL, *flags, "--stats", str(stats), "--masks", str(first / api.MASKS_FILE),
                              "--out", str(again)])
    assert res.exit_code == 0, (res.output, res.exception)
    report = json.loads((again / api.REPORT_FILE).read_text())
    options = ModelOptions(checkpoint=ws.ckpt, num_classes=KWARGS["num_classes"],
                           model_args={k: v for k, v in KWARGS.items() if k != "num_classes"})
    masks, _ = load_masks(first / api.MASKS_FILE)
    result = api.prune(load_any(MODEL, options, "cpu"), Statistics.load(stats), masks=masks)
    assert result.options.target == report["options"]["target"] == "mlp"
    _assert_same_masks(masks, result.masks)
    _assert_same_weights(corp_cli.load_pruned(again), result.model)
