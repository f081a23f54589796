"""`corp evaluate` and corp_cli.evaluate: top-k against a direct computation, exact self-fidelity, provenance."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from timm.data import ImageNetInfo, create_transform, resolve_data_config
from typer.testing import CliRunner

from corp_cli.cli import app
from corp_cli.evaluate import Accumulator
from corp_cli.family import Outputs
from corp_cli.loading import load_any

runner = CliRunner()
SYNSETS = ImageNetInfo("imagenet-1k").label_names()


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "deit_tiny_random.safetensors"
    save_file(_model().state_dict(), str(path))
    return path


def _direct_logits(model: torch.nn.Module, files: list[Path]) -> torch.Tensor:
    """Independent of corp: timm's own eval transform of each decoded file, one forward pass."""
    tf = create_transform(**resolve_data_config({}, model=model), is_training=False)
    x = torch.stack([tf(Image.open(f).convert("RGB")) for f in files])
    with torch.no_grad():
        return model(x)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory, ckpt: Path) -> tuple[Path, list[Path], torch.Tensor, torch.Tensor]:
    """Six random PNGs in synset folders; half filed under the class the model predicts, half not.

    So top-1 is 0.5 by construction, and a wrong synset->index mapping could not reproduce it.
    """
    root = tmp_path_factory.mktemp("labelled")
    rng = np.random.default_rng(0)
    scratch = root.parent / "scratch"
    scratch.mkdir(exist_ok=True)
    raw = []
    for i in range(6):
        p = scratch / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(p)
        raw.append(p)
    model = _model()
    model.load_state_dict(load_file(str(ckpt)))
    logits = _direct_logits(model, raw)
    pred = logits.argmax(1)
    files, labels = [], []
    for i, p in enumerate(raw):
        label = int(pred[i]) if i % 2 == 0 else (int(pred[i]) + 500) % 1000
        d = root / SYNSETS[label]
        d.mkdir(exist_ok=True)
        dest = d / p.name
        p.rename(dest)
        files.append(dest)
        labels.append(label)
    return root, files, torch.tensor(labels), logits


def _run(*args: str) -> tuple[int, str, str]:
    res = runner.invoke(app, [str(a) for a in args])
    return res.exit_code, res.stdout, res.stderr


def test_folder_top1_top5_match_direct_computation(tmp_path: Path, ckpt: Path, labelled: tuple[Path, list[Path], torch.Tensor, torch.Tensor]) -> None:
    root, _, labels, logits = labelled  # logits: timm's transform + a plain forward, no corp code
    top1 = float((logits.argmax(1) == labels).float().mean())
    top5 = float((logits.topk(5, 1).indices == labels[:, None]).any(1).float().mean())
    assert top1 == 0.5  # the fixture's construction, checked independently of corp

    out = tmp_path / "ev.json"
    code, stdout, stderr = _run("evaluate", "deit_tiny_patch16_224", "--checkpoint", ckpt, "--data", root,
                                "--batch-size", 4, "--workers", 0, "--json", out)
    assert code == 0, stderr
    rep = json.loads(out.read_text())
    assert rep["results"]["accuracy"]["top1"] == pytest.approx(top1)
    assert rep["results"]["accuracy"]["top5"] == pytest.approx(top5)
    assert rep["results"]["accuracy"]["labelled"] == 6
    assert "fidelity" not in rep["results"]  # no reference, no fidelity
    assert rep["model"]["kind"] == "dense" and rep["data"]["labels"] is True
    assert rep["samples_per_second"] > 0 and rep["environment"]["torch_version"] == torch.__version__
    assert "top-1" in stdout and "50.00%" in stdout  # the table still goes to stdout


def test_hf_classlabel_synsets_are_mapped_to_imagenet_indices(tmp_path: Path, ckpt: Path, labelled: tuple[Path, list[Path], torch.Tensor, torch.Tensor]) -> None:
    """A Hugging Face ClassLabel numbers the dataset's own classes 0..K-1; they must be scored as ImageNet ids."""
    root, _, _, _ = labelled
    out = tmp_path / "hf.json"
    code, _, stderr = _run("evaluate", "deit_tiny_patch16_224", "--checkpoint", ckpt, "--data", f"hf:{root}",
                           "--batch-size", 4, "--workers", 0, "--json", out)
    assert code == 0, stderr
    rep = json.loads(out.read_text())
    assert rep["data"]["kind"] == "hf"
    assert rep["results"]["accuracy"]["top1"] == pytest.approx(0.5)


def test_model_against_itself_is_exact(tmp_path: Path, ckpt: Path) -> None:
    code, stdout, stderr = _run("evaluate", "deit_tiny_patch16_224", "--checkpoint", ckpt, "--data", "synthetic",
                                "--samples", 5, "--batch-size", 2, "--workers", 0,
                                "--reference", "deit_tiny_patch16_224", "--reference-checkpoint", ckpt, "--json", "-")
    assert code == 0, stderr
    rep = json.loads(stdout)  # `--json -`: stdout is the JSON and nothing else
    fid = rep["results"]["fidelity"]
    assert fid["compared"] == 5
    assert fid["top1_agreement"] == 1.0
    assert fid["kl_mean"] == 0.0 and fid["kl_max"] == 0.0
    assert fid["feature_cosine_mean"] == pytest.approx(1.0, abs=1e-12)
    assert "accuracy" not in rep["results"] and rep["synthetic"] is True
    assert rep["reference"]["identity"] == rep["model"]["identity"]


def test_fidelity_metrics_match_their_definitions() -> None:
    g = torch.Generator().manual_seed(1)
    ref = Outputs(torch.randn(7, 10, generator=g), torch.randn(7, 4, generator=g))
    out = Outputs(ref.logits + 0.7 * torch.randn(7, 10, generator=g), ref.features + torch.randn(7, 4, generator=g))
    acc = Accumulator(num_classes=10)
    acc.update(Outputs(out.logits[:3], out.features[:3]), None, Outputs(ref.logits[:3], ref.features[:3]))
    acc.update(Outputs(out.logits[3:], out.features[3:]), None, Outputs(ref.logits[3:], ref.features[3:]))
    fid = acc.result()["fidelity"]
    kl = F.kl_div(F.log_softmax(out.logits.double(), 1), F.log_softmax(ref.logits.double(), 1), log_target=True, reduction="none").sum(1)
    assert fid["kl_mean"] == pytest.approx(float(kl.mean()), rel=1e-12) and fid["kl_mean"] > 0
    assert fid["kl_max"] == pytest.approx(float(kl.max()), rel=1e-12)
    agree = float((out.logits.argmax(1) == ref.logits.argmax(1)).double().mean())
    assert fid["top1_agreement"] == pytest.approx(agree) and agree < 1.0
    cos = F.cosine_similarity(out.features.double(), ref.features.double(), dim=1)
    assert fid["feature_cosine_mean"] == pytest.approx(float(cos.mean()), rel=1e-12)


def test_topk_skips_unlabelled_items_and_rejects_foreign_labels() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0], [0.0, 0.0, 5.0]])
    acc = Accumulator(num_classes=3, topk=(1, 2))
    acc.update(Outputs(logits, torch.zeros(3, 2)), torch.tensor([1, 2, -1]))
    res = acc.result()["accuracy"]
    assert res == {"labelled": 2, "top1": 0.5, "top2": 1.0}
    with pytest.raises(Exception, match="outside the model's 3 classes"):
        acc.update(Outputs(logits, torch.zeros(3, 2)), torch.tensor([0, 7, 1]))


def make_pruned_dir(out: Path, ckpt: Path) -> Path:
    """A `corp prune`-format output dir without the (slow) solve: narrowed blocks, fresh weights.

    The metadata is written by the same functions `corp prune` uses, so loaders see the real format.
    """
    from corp_cli.artifacts import sha256_file
    from corp_cli.preprocess import resolve_preprocessing

    from .conftest import narrowed, save_model

    prep = resolve_preprocessing(_model())
    torch.manual_seed(1)
    model = narrowed("deit_tiny_patch16_224", [{"mlp_hidden": 384, "qk_dim": 32}] * 12)
    dense = load_file(str(ckpt))
    model.load_state_dict({k: v for k, v in dense.items() if not k.startswith("blocks.")}, strict=False)
    return save_model(out, model, base={"name": "deit_tiny_patch16_224", "checkpoint": f"sha256:{sha256_file(ckpt)}",
                                        "num_classes": 1000},
                      options={"mlp_sparsity": 0.5, "attn_sparsity": 0.5, "target": "both"},
                      preprocessing=prep.to_dict(), classes=None)


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory: pytest.TempPathFactory, ckpt: Path) -> Path:
    return make_pruned_dir(tmp_path_factory.mktemp("pruned") / "pr", ckpt)


def test_pruned_dir_against_its_dense_reference(tmp_path: Path, ckpt: Path, pruned_dir: Path) -> None:
    out = tmp_path / "ev.json"
    code, stdout, stderr = _run("evaluate", pruned_dir, "--data", "synthetic", "--samples", 4, "--workers", 0,
                                "--reference-checkpoint", ckpt, "--json", out)
    assert code == 0, stderr
    rep = json.loads(out.read_text())
    assert rep["model"]["kind"] == "pruned" and rep["model"]["options"]["mlp_sparsity"] == 0.5
    assert rep["reference"]["name"] == "deit_tiny_patch16_224" and rep["reference"]["matches_base"] is True
    fid = rep["results"]["fidelity"]
    assert fid["kl_mean"] > 0 and fid["feature_cosine_mean"] < 1.0  # pruning changed the model
    assert rep["preprocessing"] == rep["model"]["preprocessing"]
    assert "agreement" in stdout


def test_pruned_dir_reference_needs_local_weights(pruned_dir: Path) -> None:
    code, _, stderr = _run("evaluate", pruned_dir, "--data", "synthetic", "--samples", 2, "--reference", "deit_tiny_patch16_224")
    assert code == 2
    assert "--reference-checkpoint" in stderr


def test_load_any_reads_pruned_metadata(pruned_dir: Path) -> None:
    from corp_cli.family import ModelOptions
    from corp_cli.loading import describe

    loaded = load_any(pruned_dir)
    desc = describe(loaded, pruned_dir, pruned=True)
    assert desc["kind"] == "pruned" and desc["base"]["name"] == "deit_tiny_patch16_224"
    assert loaded.model.blocks[0].mlp.fc1.out_features == 384
    prep = loaded.preprocessing
    assert prep.input_size == (3, 224, 224) and prep.to_dict() == desc["preprocessing"]
    with pytest.raises(Exception, match="--checkpoint applies only"):
        load_any(pruned_dir, ModelOptions(checkpoint=pruned_dir / "model.safetensors"))


def test_no_labels_and_no_reference_is_a_usage_error(ckpt: Path) -> None:
    code, stdout, stderr = _run("evaluate", "deit_tiny_patch16_224", "--checkpoint", ckpt, "--data", "synthetic", "--samples", 2)
    assert code == 2 and "nothing to score" in stderr and stdout == ""
