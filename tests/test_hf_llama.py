"""Hugging Face decoder LMs (Llama, Qwen2, Mistral layouts): gated-MLP pruning, refusals, artifacts, evaluation.

Small random-init decoders of every layout (built offline; tests/conftest.py DECODER_LAYOUTS) and
the real TinyStories Llama in ../shared/data/llama-stories260k (grouped-query attention, rotary,
tied embeddings). compacted == masked for one layout runs in tests/test_family_contract.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from typer.testing import CliRunner

from corp_cli import api
from corp_cli.cli import app
from corp_cli.compact import load_pruned, load_pruned_loaded
from corp_cli.errors import ArtifactError, UnsupportedModelError
from corp_cli.evaluate import evaluate
from corp_cli.loading import load_dense
from corp_cli.pruning import MLP_RANKERS
from corp_cli.sources import open_data

from .conftest import DECODER_LAYOUTS, STORIES, STORIES260K, masked_reference, needs_stories, tiny_decoder
from .test_family_contract import _outputs

transformers = pytest.importorskip("transformers")
runner = CliRunner()
SEQ = 12


def _tokens(n: int, seed: int = 0, vocab: int = 512) -> dict[str, torch.Tensor]:
    """Right-padded token batches of different real lengths (the padding must never count)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, SEQ), generator=g)
    mask = torch.ones(n, SEQ, dtype=torch.long)
    for r in range(n):
        mask[r, SEQ - r % 4 * 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _double(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}


@pytest.mark.parametrize("layout", sorted(DECODER_LAYOUTS))
def test_every_layout_prunes_its_gated_mlp_to_the_masked_reference(layout: str, tmp_path: Path) -> None:
    dense = load_dense(tiny_decoder(tmp_path / layout, layout, tokenizer=False))
    assert dense.family.name == "hf-llama" and dense.modality == "text"
    cfg = dense.model.config
    shape = dense.family.shape(dense.model, 0)
    assert (shape.mlp_hidden, shape.num_heads, shape.kv_heads, shape.head_dim) == (48, 4, cfg.num_key_value_heads, 8)
    dense.model.double()
    stats = api.calibrate(dense, [_tokens(6), _tokens(6, seed=1)], precision="float64")
    assert stats.parts == ["mlp"]  # the default: what the model can be pruned by (no Q/K under rotary)
    result = api.prune(dense, stats, sparsity=0.5)
    assert all(m.attn is None for m in result.masks)
    model = result.model
    for layer in model.model.layers:  # gate and up rows go together; down_proj stays bias-free
        assert layer.mlp.gate_proj.out_features == layer.mlp.up_proj.out_features == layer.mlp.down_proj.in_features == 24
        assert layer.mlp.down_proj.bias is None
    assert all(b["mlp"]["intercept"] is False for b in result.blocks)
    assert all(b["mlp"]["predicted_error_compensated"] <= b["mlp"]["predicted_error_uncompensated"] for b in result.blocks)
    if layout == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None  # Qwen2's q/k/v biases load and stay
    check = _double(_tokens(3, seed=9))
    got_logits, got_feats = _outputs(result.loaded, check)
    ref_logits, ref_feats = _outputs(masked_reference(dense, result.masks, result.stats, result.blocks), check)
    torch.testing.assert_close(got_logits, ref_logits, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got_feats, ref_feats, rtol=1e-9, atol=1e-9)
    dense_logits, _ = _outputs(dense, check)
    assert float((got_logits - dense_logits).abs().max()) > 1e-8


def test_padding_never_enters_the_statistics(tmp_path: Path) -> None:
    """A right-padded batch gives the sums of its sequences run one by one, without their padding."""
    dense = load_dense(tiny_decoder(tmp_path / "llama", "llama", tokenizer=False))
    dense.model.double()
    batch = _tokens(4, seed=3)
    assert int(batch["attention_mask"].sum()) < batch["attention_mask"].numel()
    singles = []
    for r in range(4):
        n = int(batch["attention_mask"][r].sum())
        singles.append({"input_ids": batch["input_ids"][r:r + 1, :n], "attention_mask": torch.ones(1, n, dtype=torch.long)})
    padded = api.calibrate(dense, [batch], precision="float64")
    alone = api.calibrate(dense, singles, precision="float64")
    assert padded.meta["tokens"] == alone.meta["tokens"] == int(batch["attention_mask"].sum())
    for a, b in zip(padded.blocks, alone.blocks):
        for key in ("sum", "gram"):
            torch.testing.assert_close(a["mlp"][key], b["mlp"][key], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("layout", ["llama", "mistral"])
def test_rotary_q_k_pairs_are_pruned_when_asked_and_the_default_stays_the_mlp(layout: str, tmp_path: Path) -> None:
    folder = tiny_decoder(tmp_path / layout, layout)
    dense = load_dense(folder)
    assert dense.family.qk_refusal(dense.model, 0) is None
    stats = api.calibrate(dense, [_tokens(4)])
    assert stats.parts == ["mlp"]  # Q/K pairs are opt-in (--target qk), not the default
    with pytest.raises(Exception, match="attn"):
        api.prune(dense, stats, target="both", sparsity=0.5)
    stats = api.calibrate(dense, [_tokens(4)], parts=("mlp", "attn"))
    result = api.prune(dense, stats, target="both", sparsity=0.5)
    assert all(m.attn.shape == (dense.family.shape(dense.model, 0).kv_heads, 4) for m in result.masks)  # pair dims per kv head
    assert all(dense.family.shape(result.model, i).qk_dim == 4 for i in range(2))
    res = runner.invoke(app, ["prune", str(folder), "--target", "both", "--qk-ranker", "joint", "--calib-data", "text:pydoc",
                              "--samples", "2", "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output  # the other rankers score a pair by its two dims


def _prune_to(folder: Path, out: Path, **options: object) -> api.PruneResult:
    dense = load_dense(folder)
    stats = api.calibrate(dense, [_tokens(6), _tokens(6, seed=1)])
    result = api.prune(dense, stats, target="mlp", **options)
    api.save_pruned(result, out)
    return result


def _keys(path: Path) -> set[str]:
    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("layout", ["llama", "qwen2"])
def test_a_tied_head_is_stored_once_and_reloads_tied(layout: str, tmp_path: Path) -> None:
    out = tmp_path / "pruned"
    result = _prune_to(tiny_decoder(tmp_path / layout, layout, tokenizer=False), out, sparsity=0.5)
    tied = DECODER_LAYOUTS[layout][2]["tie_word_embeddings"]
    assert ("lm_head.weight" in _keys(out / "model.safetensors")) == (not tied)
    model = load_pruned(out)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    x = _tokens(2, seed=5)
    with torch.inference_mode():
        torch.testing.assert_close(model(**x).logits, result.model(**x).logits, rtol=0, atol=0)


def test_a_uniform_pruning_is_a_plain_transformers_folder(tmp_path: Path) -> None:
    out = tmp_path / "pruned"
    _prune_to(tiny_decoder(tmp_path / "llama", "llama"), out, sparsity=0.25)
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    stock = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    # 48 - floor(0.25 * 48) = 36, rounded to the default multiple of 8 (ties up): 40
    assert type(stock).__name__ == "LlamaForCausalLM" and stock.config.intermediate_size == 40
    tok = transformers.AutoTokenizer.from_pretrained(out)
    x = tok(["Once upon a time there was a dog."], return_tensors="pt")
    ours = load_pruned(out)
    with torch.inference_mode():
        torch.testing.assert_close(stock(**x).logits, ours(**x).logits, rtol=0, atol=0)
        generated = stock.generate(**x, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert generated.shape[1] == x["input_ids"].shape[1] + 5
    assert load_pruned(out, stock_timm=True).config.intermediate_size == 40  # the library's own class, no corp module


def test_per_layer_widths_are_recorded_and_rebuilt(tmp_path: Path) -> None:
    out = tmp_path / "pruned"
    result = _prune_to(tiny_decoder(tmp_path / "qwen2", "qwen2", tokenizer=False), out, sparsity=0.5,
                       block_overrides={1: {"mlp_sparsity": 0.25}})
    assert not (out / "config.json").exists()  # transformers would refuse per-layer widths: corp loads them
    loaded = load_pruned_loaded(out)
    assert [loaded.family.shape(loaded.model, i).mlp_hidden for i in range(2)] == [24, 40]  # 36 rounded to 8
    x = _tokens(2, seed=5)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.model(**x).logits, result.model(**x).logits, rtol=0, atol=0)
    with pytest.raises(ArtifactError, match="no stock"):
        load_pruned(out, stock_timm=True)


# ------------------------------------------------------------------ text: documents, windows, perplexity


@needs_stories
def test_documents_are_cut_into_windows_that_never_span_two(tmp_path: Path) -> None:
    folder = tiny_decoder(tmp_path / "llama", "llama")
    loaded = load_dense(folder, _options(seq_len=16))
    prep = loaded.preprocessing
    assert prep.max_length == 16 and prep.to_dict() == {"kind": "text", "unit": "document", "tokenizer": str(folder),
                                                          "max_length": 16}
    src = open_data(f"text:{STORIES}@calib", "text", samples=5, text_unit="document")
    tok = prep.load_tokenizer()
    docs = [tok(t)["input_ids"] for t in src.texts]
    wins = prep.windows(src.texts, tok)
    assert wins == [d[i:i + 16] for d in docs for i in range(0, len(d), 16)]
    assert prep.count(src) == len(wins) > len(docs)
    rows = 0
    for batch, labels in prep.batches(src, 4):
        assert labels is None and batch["input_ids"].shape[1] <= 16
        m = batch["attention_mask"]
        assert bool((m[:, 1:] <= m[:, :-1]).all()) and bool(m[:, 0].all())  # ones, then zeros: right padding
        rows += m.shape[0]
    assert rows == len(wins)


@needs_stories
def test_perplexity_is_the_mean_next_token_loss_over_real_tokens_whatever_the_batching(tmp_path: Path) -> None:
    dense = load_dense(tiny_decoder(tmp_path / "llama", "llama"), _options(seq_len=24))
    dense.model.double()
    src = open_data(f"text:{STORIES}@eval", "text", samples=6, text_unit="document")
    prep = dense.preprocessing
    tok = prep.load_tokenizer()
    nll, n = 0.0, 0
    with torch.inference_mode():  # by hand: every window alone, unpadded
        for w in prep.windows(src.texts, tok):
            ids = torch.tensor([w])
            logits = dense.model(input_ids=ids).logits[0, :-1]
            nll += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            n += len(w) - 1
    one = evaluate(dense, prep.batches(src, 1)).result
    many = evaluate(dense, prep.batches(src, 7), reference=dense).result
    assert one["tokens"] == many["tokens"] == n
    assert one["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-9)
    assert many["perplexity"] == pytest.approx(one["perplexity"], rel=1e-9)
    fid = many["fidelity"]
    assert fid["top1_agreement"] == 1.0 and fid["kl_mean"] == pytest.approx(0.0, abs=1e-12)
    assert many["reference_perplexity"] == pytest.approx(many["perplexity"], rel=1e-12)


def _options(**kw: object):  # noqa: ANN202 - a ModelOptions
    from corp_cli.family import ModelOptions

    return ModelOptions(**kw)


@needs_stories
def test_cli_chain_with_seq_len_evaluate_and_benchmark(tmp_path: Path) -> None:
    folder = tiny_decoder(tmp_path / "llama", "llama")
    out = tmp_path / "pruned"
    res = runner.invoke(app, ["prune", str(folder), "--calib-data", f"text:{STORIES}@calib", "--samples", "8",
                              "--seq-len", "32", "--sparsity", "0.5", "--out", str(out), "--json", "-"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["options"]["target"] == "mlp" and report["stats"]["data"]["count"] == 8
    meta = json.loads((out / "report.json").read_text())
    assert meta["stats"]["tokens"] > 8 * 10
    res = runner.invoke(app, ["evaluate", str(out), "--data", f"text:{STORIES}@eval", "--samples", "4", "--json", "-"])
    assert res.exit_code == 0, res.output
    ev = json.loads(res.stdout)
    assert ev["reference"]["spec"] == str(folder.resolve())  # the folder it was pruned from, by default
    r = ev["results"]
    assert r["tokens"] > 0 and r["perplexity"] > 1 and r["reference_perplexity"] > 1
    assert 0 <= r["fidelity"]["top1_agreement"] <= 1 and r["fidelity"]["kl_mean"] > 0
    assert ev["preprocessing"]["max_length"] == 32  # the pruned model's windows are the ones it was pruned with
    res = runner.invoke(app, ["benchmark", str(out), "--batch-sizes", "1,2", "--seq-lens", "8,16", "--new-tokens", "3",
                              "--runs", "1", "--warmup", "0", "--json", "-"])
    assert res.exit_code == 0, res.output
    bench = json.loads(res.stdout)
    runs = bench["model"]["runs"]
    assert [(r["seq_len"], r["batch_size"]) for r in runs] == [(8, 1), (8, 2), (16, 1), (16, 2)]
    assert all(r["tokens_per_s"] > 0 for r in runs) and len(bench["reference"]["runs"]) == 4
    assert [d["batch_size"] for d in bench["model"]["decode"]] == [1, 2]
    assert all(d["new_tokens"] == 3 and d["decode_tokens_per_s"] > 0 for d in bench["model"]["decode"])
    assert len(bench["comparison"]["decode"]) == 2


# ------------------------------------------------------------------ the real TinyStories Llama


@pytest.mark.slow
@needs_stories
def test_real_stories260k_perplexity_compensation_and_a_plain_transformers_folder(tmp_path: Path) -> None:
    """Dense perplexity about 3 on held-out stories; compensation beats none at 30%; the folder generates text."""
    stats = tmp_path / "stats.safetensors"
    res = runner.invoke(app, ["calibrate", str(STORIES260K), "--data", f"text:{STORIES}@calib", "--out", str(stats)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["sweep", str(STORIES260K), "--stats", str(stats), "--data", f"text:{STORIES}@eval",
                              "--sparsities", "0.3", "--out", str(tmp_path / "sweep"), "--json", "-"])
    assert res.exit_code == 0, res.output
    sweep = json.loads(res.stdout)
    dense = sweep["dense"]["perplexity"]
    by_arm = {r["arm"]: r["perplexity"] for r in sweep["points"]}
    assert 2.5 < dense < 3.6
    assert dense < by_arm["corp"] < by_arm["no-compensation"]
    out = tmp_path / "pruned"
    res = runner.invoke(app, ["prune", str(STORIES260K), "--stats", str(stats), "--target", "mlp", "--sparsity", "0.3",
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    # 172 - floor(0.3 * 172) = 121 units, rounded to the default multiple of 8 (defaults.ROUND_TO)
    assert model.config.intermediate_size == 120
    x = tok("Once upon a time", return_tensors="pt")
    with torch.inference_mode():
        text = tok.decode(model.generate(**x, max_new_tokens=30, do_sample=False)[0], skip_special_tokens=True)
        torch.testing.assert_close(model(**x).logits, load_pruned(out)(**x).logits, rtol=0, atol=0)
    assert text.startswith("Once upon a time") and len(text.split()) > 10


def test_a_language_model_is_not_compared_with_an_encoder(tmp_path: Path) -> None:
    bert = tmp_path / "bert"
    transformers.BertModel(transformers.BertConfig(vocab_size=512, hidden_size=32, num_hidden_layers=1,
                                                   num_attention_heads=4, intermediate_size=64)).save_pretrained(bert)
    folder = tiny_decoder(tmp_path / "llama", "llama")
    res = runner.invoke(app, ["evaluate", str(folder), "--data", "text:pydoc@eval", "--samples", "2", "--reference", str(bert)])
    assert res.exit_code == 2 and "causal language models" in res.stderr, res.output
    res = runner.invoke(app, ["evaluate", str(folder), "--data", "text:pydoc@eval", "--samples", "2", "--json", "-"])
    assert res.exit_code == 0, res.output  # alone, a language model is still scored: perplexity needs no reference
    assert json.loads(res.stdout)["results"]["perplexity"] > 1


@pytest.mark.parametrize("ranker", MLP_RANKERS)
def test_every_mlp_ranker_prunes_a_decoder(ranker: str, tmp_path: Path) -> None:
    dense = load_dense(tiny_decoder(tmp_path / "qwen2", "qwen2", tokenizer=False))
    stats = api.calibrate(dense, [_tokens(6), _tokens(6, seed=1)], precision="float64")
    result = api.prune(dense, stats, target="mlp", sparsity=0.5, ranker=ranker)
    assert [len(m.mlp) for m in result.masks] == [24, 24] and all(b["mlp"]["ranker"] == ranker for b in result.blocks)
    assert all(b["mlp"]["predicted_error_compensated"] <= b["mlp"]["predicted_error_uncompensated"] for b in result.blocks)


@pytest.mark.slow
def test_onnx_export_gives_the_logits_in_onnxruntime(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    from corp_cli.export import export_model

    out = tmp_path / "pruned"
    result = _prune_to(tiny_decoder(tmp_path / "llama", "llama", tokenizer=False), out, sparsity=0.5)
    exported = export_model(out, "onnx", tmp_path / "model.onnx")
    assert [i["name"] for i in exported.inputs] == ["input_ids"] and exported.dynamic_batch
    ids = torch.randint(3, 512, (2, 9), generator=torch.Generator().manual_seed(4))
    session = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input_ids": ids.numpy()})
    with torch.inference_mode():
        expected = result.model(input_ids=ids).logits
    torch.testing.assert_close(torch.from_numpy(logits), expected, rtol=1e-4, atol=1e-5)


def test_statistics_of_block_ranges_merge_to_the_full_statistics(tmp_path: Path) -> None:
    """How a 7B decoder is calibrated in pieces: each run holds only its blocks' MLP Grams (README, "Memory: what a 7B model needs")."""
    from corp_cli.calibration import calibrate
    from corp_cli.stats import merge

    dense = load_dense(tiny_decoder(tmp_path / "llama", "llama", num_hidden_layers=3), _options(seq_len=32))
    src = open_data("text:pydoc@calib", "text", samples=3, text_unit="document")
    full = calibrate(dense, src, parts=("mlp",), product_dtype=torch.float64)
    pieces = [calibrate(dense, src, parts=("mlp",), product_dtype=torch.float64, blocks=r) for r in (range(0, 1), range(1, 3))]
    merged = merge(pieces)
    assert merged.meta["tokens"] == full.meta["tokens"]
    for a, b in zip(merged.blocks, full.blocks):
        for key in ("count", "sum", "gram"):
            torch.testing.assert_close(a["mlp"][key], b["mlp"][key], rtol=1e-12, atol=0)


def test_the_pre_flight_plan_counts_the_seq_len_windows(tmp_path: Path) -> None:
    folder = tiny_decoder(tmp_path / "llama", "llama")
    plans = []
    for n in (16, 64):
        res = runner.invoke(app, ["calibrate", str(folder), "--data", "text:pydoc@calib", "--samples", "2", "--seq-len",
                                  str(n), "--dry-run", "--out", str(tmp_path / "s.safetensors"), "--json", "-"])
        assert res.exit_code == 0, res.output
        plans.append(json.loads(res.stdout))
    assert [p["tokens_per_item"] for p in plans] == [16, 64] and plans[0]["parts"] == ["mlp"]
    assert plans[0]["memory_bytes"]["activations"] * 4 == plans[1]["memory_bytes"]["activations"]
    assert not (tmp_path / "s.safetensors").exists()
