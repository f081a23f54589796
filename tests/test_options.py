"""Every option of every command is honoured or refused, for every family: never silently ignored.

Each option is classified below. Options that hold for every model are exercised by the
other tests; the ones whose meaning depends on the model (its family's load options, image
decoding, one pruned part) are walked here against every family: where they do not apply,
the command must exit 2 with one line naming the option, before any expensive work.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import typer
from safetensors.torch import save_file
from typer.testing import CliRunner

from corp_cli.cli import app
from corp_cli.registry import families

from .conftest import IMAGENET_SAMPLE, SHARED_DATA  # noqa: F401

transformers = pytest.importorskip("transformers")
runner = CliRunner()

# The family's load options, by ModelFamily.options name: the flag and a valid value.
MODEL_OPTIONS = {
    "checkpoint": ("--checkpoint", "{ckpt}"),
    "num_classes": ("--num-classes", "3"),
    "pretrained_cfg": ("--pretrained-cfg", "{cfg}"),
    "preprocessing": ("--mean", "0.5,0.5,0.5"),
    "model_args": ("--model-arg", "img_size=32"),
    "seq_len": ("--seq-len", "16"),
}
PREPROCESSING = {"--mean": "0.5,0.5,0.5", "--std": "0.5,0.5,0.5", "--input-size": "224", "--interpolation": "bicubic",
                 "--crop-pct": "0.9", "--crop-mode": "center"}
MLP_ONLY = {"--mlp-sparsity": "0.3", "--ranker": "obs", "--min-keep": "2", "--round-to": "8"}
ATTN_ONLY = {"--attn-sparsity": "0.3", "--qk-ranker": "joint", "--min-qk-dim": "2", "--qk-fold": "q"}
# benchmark options of causal language models (families honouring seq_len): token windows and generation
LM_BENCH = {"--seq-lens": "8", "--new-tokens": "4"}
VO_ONLY = {"--vo-sparsity": "0.3", "--vo-ranker": "obs"}
HEADS_ONLY = {"--head-sparsity": "0.3", "--head-ranker": "greedy", "--q-head-sparsity": "0.5"}
# options of decoders (families that keep a key/value cache)
DECODER = {"--kv-budget": "0.5"}

# Every option of every command, by what decides whether it applies.
CLASSES = {
    "model": {"--checkpoint", "--num-classes", "--pretrained-cfg", "--model-arg", "--seq-len", *PREPROCESSING},
    "lm": {*LM_BENCH},
    "decoder": {*DECODER},
    "images": {"--workers"},
    "part": {*MLP_ONLY, *ATTN_ONLY, *VO_ONLY, *HEADS_ONLY},
    "classifier": {"--labels"},
    # meaningful for every model and every family (checked by the tests of each command)
    "any": {"--out", "--data", "--calib-data", "--samples", "--seed", "--shard", "--parts", "--precision", "--device",
            "--batch-size", "--overwrite", "--json", "--stats", "--sparsity", "--target", "--lambda",
            "--no-compensation", "--config", "--masks", "--reference", "--reference-checkpoint", "--sparsities",
            "--cache-mb", "--batch-sizes", "--dtype", "--compile", "--warmup", "--runs", "--format", "--dynamic-batch",
            "--verify", "--debug", "--verbose", "--version", "--blocks", "--dry-run", "--max-memory", "--allow-gaps",
            "--flops-budget", "--flops-budgets", "--sequential", "--sequential-target", "--sequential-ranking", "--plot",
            "--calib-samples"},
}


def _commands() -> dict[str, Any]:
    root = typer.main.get_command(app)
    out: dict[str, Any] = {"corp": root}
    for name, cmd in root.commands.items():  # type: ignore[attr-defined]
        if hasattr(cmd, "commands"):  # a group (typer may bring its own click, so no isinstance)
            out.update({f"{name} {sub}": c for sub, c in cmd.commands.items()})
        else:
            out[name] = cmd
    assert {"calibrate run", "calibrate merge", "prune", "evaluate", "benchmark", "sweep", "export"} <= set(out)
    return out


def _flags(cmd: Any) -> set[str]:
    return {o for p in cmd.params for o in p.opts if o.startswith("--")}


def test_every_option_of_every_command_is_classified() -> None:
    known = set().union(*CLASSES.values())
    unclassified = {name: sorted(_flags(cmd) - known) for name, cmd in _commands().items() if _flags(cmd) - known}
    assert unclassified == {}, "classify new options here: does each apply to every model?"


# ------------------------------------------------------------------ one dense model per family, on disk


@pytest.fixture(scope="module")
def specs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    """family name -> {"model": spec, "ckpt": a checkpoint for it (timm), "cfg": a pretrained_cfg JSON}."""
    root = tmp_path_factory.mktemp("families")
    cfg = root / "cfg.json"
    cfg.write_text(json.dumps({"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}))
    out: dict[str, dict[str, str]] = {}
    for fam, name in (("timm-vit", "deit_tiny_patch16_224"), ("timm-eva", "eva02_tiny_patch14_224")):
        torch.manual_seed(0)
        ckpt = root / f"{name}.safetensors"
        save_file(timm.create_model(name, pretrained=False).state_dict(), str(ckpt))
        out[fam] = {"model": name, "ckpt": str(ckpt), "cfg": str(cfg), "load": f"--checkpoint {ckpt}"}
    torch.manual_seed(0)
    bert = root / "bert"
    transformers.BertModel(transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
    )).save_pretrained(bert)
    vit = root / "vit"
    transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8,
        num_labels=4,
    )).save_pretrained(vit)
    from .conftest import tiny_decoder

    llama = tiny_decoder(root / "llama", "llama")
    for fam, folder, data in (("hf-bert", bert, "text:pydoc"), ("hf-vit", vit, "synthetic"),
                              ("hf-llama", llama, "text:pydoc")):
        out[fam] = {"model": str(folder), "ckpt": str(root / "deit_tiny_patch16_224.safetensors"), "cfg": str(cfg),
                    "load": "", "data": data}
    assert set(out) >= {f.name for f in families()}, "add a dense model of the new family here"
    return out


def _base(command: str, spec: dict[str, str], tmp: Path) -> list[str]:
    """A valid invocation of `command` on the model (it would run as it is)."""
    data = spec.get("data", "synthetic")
    load = spec["load"].split()
    return {
        "calibrate": ["calibrate", spec["model"], *load, "--data", data, "--samples", "2", "--out", str(tmp / "s.st")],
        "prune": ["prune", spec["model"], *load, "--calib-data", data, "--samples", "2", "--out", str(tmp / "p")],
        "evaluate": ["evaluate", spec["model"], *load, "--data", data, "--samples", "2", "--reference", spec["model"],
                     *(["--reference-checkpoint", spec["ckpt"]] if load else [])],
        "benchmark": ["benchmark", spec["model"], *load, "--batch-sizes", "1", "--runs", "1", "--warmup", "0"],
    }[command]


def _refused(args: list[str], flag: str) -> None:
    res = runner.invoke(app, args)
    assert res.exit_code == 2, (args, res.exit_code, res.output)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error: ") and flag in lines[-1], (args, res.stderr)
    assert "Traceback" not in res.output


@pytest.mark.parametrize("command", ["calibrate", "prune", "evaluate", "benchmark"])
def test_model_options_a_family_does_not_take_are_refused(command: str, specs: dict, tmp_path: Path) -> None:
    cmd_flags = _flags(_commands()["calibrate run" if command == "calibrate" else command])
    checked = 0
    for fam in families():
        spec = specs[fam.name]
        for option, (flag, value) in MODEL_OPTIONS.items():
            if option in fam.options:
                continue
            flags = PREPROCESSING if option == "preprocessing" else {flag: value}
            for f, v in flags.items():
                if f not in cmd_flags:
                    continue
                _refused([*_base(command, spec, tmp_path), f, v.format(**spec)], f)
                checked += 1
    assert checked > 0


@pytest.mark.parametrize("command", ["calibrate", "prune", "evaluate"])
def test_workers_are_refused_on_text_models(command: str, specs: dict, tmp_path: Path) -> None:
    text = [f for f in families() if f.modality == "text"]
    assert text
    for fam in text:
        _refused([*_base(command, specs[fam.name], tmp_path), "--workers", "2"], "--workers")


def test_labels_are_refused_on_models_without_a_classifier(specs: dict, tmp_path: Path) -> None:
    _refused([*_base("evaluate", specs["hf-bert"], tmp_path), "--labels"], "--labels")


def test_part_options_are_refused_where_the_target_does_not_prune_that_part(specs: dict, tmp_path: Path) -> None:
    for fam in families():
        spec = specs[fam.name]
        base = _base("prune", spec, tmp_path)
        for flag, value in ATTN_ONLY.items():
            _refused([*base, "--target", "mlp", flag, value], flag)
        for flag, value in MLP_ONLY.items():
            if fam.name != "hf-llama":  # it cannot prune attention: --target attn is refused first
                _refused([*base, "--target", "attn", flag, value], flag)


def test_value_and_head_options_are_refused_where_the_target_does_not_prune_them(specs: dict, tmp_path: Path) -> None:
    for fam in families():
        base = _base("prune", specs[fam.name], tmp_path)
        for flag, value in VO_ONLY.items():
            _refused([*base, "--target", "mlp,heads", flag, value], flag)
        for flag, value in HEADS_ONLY.items():
            _refused([*base, "--target", "mlp,vo", flag, value], flag)
        # a FLOPs budget chooses the sparsities itself
        _refused([*base, "--flops-budget", "0.7", "--mlp-sparsity", "0.3"], "--mlp-sparsity")
        if not fam.caches_keys_values:  # a KV-cache budget means something for decoders only
            for flag, value in DECODER.items():
                _refused([*base, "--target", "mlp,vo" if fam.name != "timm-eva" else "mlp", flag, value], flag)


def test_value_and_head_pruning_is_refused_in_one_line_where_the_family_cannot(specs: dict, tmp_path: Path) -> None:
    """Eva with a norm over its attention output (scale_attn_inner): no narrow form, refused before calibration."""
    name = "eva02_tiny_patch14_224"
    torch.manual_seed(0)
    ckpt = tmp_path / "normed.safetensors"
    save_file(timm.create_model(name, pretrained=False, scale_attn_inner=True).state_dict(), str(ckpt))
    base = ["prune", name, "--checkpoint", str(ckpt), "--model-arg", "scale_attn_inner=true", "--calib-data", "synthetic",
            "--samples", "2", "--out", str(tmp_path / "p")]
    for target in ("vo", "heads", "mlp,vo", "all", "both"):
        _refused([*base, "--target", target], "--target mlp")


def test_eva_refuses_q_k_pruning_without_rotary_embeddings(tmp_path: Path) -> None:
    name = "eva02_tiny_patch14_224"
    torch.manual_seed(0)
    ckpt = tmp_path / "plain.safetensors"
    save_file(timm.create_model(name, pretrained=False, use_rot_pos_emb=False).state_dict(), str(ckpt))
    res = runner.invoke(app, ["prune", name, "--checkpoint", str(ckpt), "--model-arg", "use_rot_pos_emb=false",
                              "--calib-data", "synthetic", "--samples", "2", "--out", str(tmp_path / "p"), "--target", "both"])
    assert res.exit_code == 2 and "without rotary embeddings" in res.stderr and "--target mlp" in res.stderr


def test_model_options_a_family_takes_reach_the_artifact(specs: dict, tmp_path: Path) -> None:
    """The preprocessing flags of a timm model are what the statistics record (the load options are used)."""
    spec = specs["timm-vit"]
    out = tmp_path / "s.safetensors"
    args = ["calibrate", spec["model"], *spec["load"].split(), "--data", "synthetic", "--samples", "2", "--out", str(out),
            "--pretrained-cfg", spec["cfg"], *[x for f, v in PREPROCESSING.items() if f != "--mean" for x in (f, v)]]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    from corp_cli.stats import Statistics

    prep = Statistics.load(out).meta["preprocessing"]
    assert prep["mean"] == [0.5, 0.5, 0.5] and prep["std"] == [0.5, 0.5, 0.5]  # from --pretrained-cfg, then --std
    assert prep["interpolation"] == "bicubic" and prep["crop_pct"] == 0.9 and prep["crop_mode"] == "center"


def test_language_model_benchmark_options_are_refused_on_other_models(specs: dict, tmp_path: Path) -> None:
    checked = 0
    for fam in families():
        if "seq_len" in fam.options:
            continue
        for flag, value in LM_BENCH.items():
            _refused([*_base("benchmark", specs[fam.name], tmp_path), flag, value], flag)
            checked += 1
    assert checked > 0


def test_seq_len_is_refused_where_the_statistics_fix_it_and_past_the_context(specs: dict, tmp_path: Path) -> None:
    spec = specs["hf-llama"]
    stats = tmp_path / "s.safetensors"
    res = runner.invoke(app, [*_base("calibrate", spec, tmp_path)[:-2], "--seq-len", "16", "--out", str(stats)])
    assert res.exit_code == 0, res.output
    from corp_cli.stats import Statistics

    assert Statistics.load(stats).meta["preprocessing"]["max_length"] == 16  # the windows calibration used
    _refused(["prune", spec["model"], "--stats", str(stats), "--seq-len", "16", "--out", str(tmp_path / "p")], "--seq-len")
    _refused([*_base("calibrate", spec, tmp_path), "--seq-len", "65"], "--seq-len")  # the model's context is 64
    _refused([*_base("benchmark", spec, tmp_path), "--new-tokens", "1"], "--new-tokens")
