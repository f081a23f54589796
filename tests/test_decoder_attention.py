"""Decoder attention (Llama / Qwen2 / Mistral) under grouped-query attention: value dims, kv heads, reloading.

Tiny random decoders with num_key_value_heads < num_attention_heads (tests/conftest.py DECODER_LAYOUTS),
in float64: the o_proj correction is checked against a brute-force least-squares fit over the
calibration tokens, the compacted modules against the masked dense model, and the saved folder
against transformers alone (uniform widths) or corp's loader (per-layer widths).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from corp_cli import api, engine
from corp_cli.compact import load_pruned, load_pruned_loaded
from corp_cli.families.decoder_attention import DecoderAttention
from corp_cli.loading import load_dense
from corp_cli.errors import InputError
from corp_cli.pruning import BlockMasks, group_size, o_kept_dims

from .conftest import masked_reference, tiny_decoder
from .test_family_contract import _outputs
from .test_hf_llama import _double, _tokens

transformers = pytest.importorskip("transformers")


def _dense(tmp_path: Path, layout: str = "llama", **overrides: object):
    dense = load_dense(tiny_decoder(tmp_path / layout, layout, tokenizer=False, **overrides))
    dense.model.double()
    return dense


def _calib() -> list[dict[str, torch.Tensor]]:
    return [_double(_tokens(6)), _double(_tokens(6, seed=1))]


def _assert_masked(dense, result) -> torch.Tensor:
    """compacted == masked, in float64: the narrow modules compute the masked, compensated dense model."""
    check = _double(_tokens(3, seed=9))
    got, _ = _outputs(result.loaded, check)
    ref, _ = _outputs(masked_reference(dense, result.masks, result.stats, result.blocks), check)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)
    return got


def _o_inputs(dense, batches) -> list[torch.Tensor]:
    """Every block's o (o_proj's input) over the real calibration tokens, (T, Hq*d), read off the dense model."""
    fam, model = dense.family, dense.model
    got: list[list[torch.Tensor]] = [[] for _ in range(fam.num_blocks(model))]
    mask: list[torch.Tensor] = []
    hooks = [fam.attn_module(model, i).o_proj.register_forward_pre_hook(
        lambda _m, args, i=i: got[i].append(args[0][mask[0]].clone())) for i in range(fam.num_blocks(model))]
    try:
        with torch.inference_mode():
            for b in batches:
                mask[:] = [b["attention_mask"].bool()]
                model(**b, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(x) for x in got]


@pytest.mark.parametrize("layout", ["llama", "qwen2"])
def test_gqa_value_dims_are_removed_per_kv_head_and_o_proj_is_the_least_squares_fit(layout: str, tmp_path: Path) -> None:
    dense = _dense(tmp_path, layout)
    shape = dense.family.shape(dense.model, 0)
    assert group_size(shape) == 2  # 4 query heads share 2 kv heads
    batches = _calib()
    stats = api.calibrate(dense, batches, precision="float64", parts=("mlp", "vo"))
    lam = 1e-9
    result = api.prune(dense, stats, target="vo", vo_sparsity=0.5, lam=lam)
    o = _o_inputs(dense, batches)
    for i, bm in enumerate(result.masks):
        assert bm.vo.shape == (2, 4) and bm.heads is None  # one row per KV head
        attn = dense.family.attn_module(result.model, i)
        assert isinstance(attn, DecoderAttention)
        assert (attn.num_heads, attn.kv_heads, attn.qk_dim, attn.v_dim) == (4, 2, 8, 4)
        assert attn.v_proj.out_features == 8 and attn.o_proj.in_features == 16 and attn.k_proj.out_features == 16
        keep = o_kept_dims(shape, None, bm.vo)
        # every query head of a group keeps its kv head's dims: the removed set of o is their union
        assert torch.equal(keep.reshape(4, 4) % 8, bm.vo.repeat_interleave(2, 0))
        w = dense.family.attn_module(dense.model, i).o_proj.weight.detach()
        x = o[i]
        n = x.shape[0]
        xs, xp = x[:, keep], x[:, engine.complement(keep, 32)]
        # brute force, jointly over all of o: the removed dims o_P predicted from the kept ones by least squares
        # with CORP's ridge, argmin_B sum_t ||o_P,t - B o_S,t||^2 + n lam ||B||^2 (no intercept: o_proj has no
        # bias), folded as W' = W_S + W_P B
        a = torch.cat([xs, (n * lam) ** 0.5 * torch.eye(len(keep), dtype=x.dtype)])
        b = torch.cat([xp, torch.zeros(len(keep), xp.shape[1], dtype=x.dtype)])
        coef = torch.linalg.lstsq(a, b).solution.T
        brute = w[:, keep] + w[:, engine.complement(keep, 32)] @ coef
        target = x @ w.T
        torch.testing.assert_close(attn.o_proj.weight.detach(), brute, rtol=1e-7, atol=1e-9)
        assert attn.o_proj.bias is None
        entry = result.blocks[i]["vo"]
        assert entry["predicted_error_compensated"] < entry["predicted_error_uncompensated"]
        # the predicted error is the measured one on the calibration tokens
        measured = float(((xs @ brute.T - target) ** 2).sum(1).mean())
        assert entry["predicted_error_compensated"] == pytest.approx(measured, rel=1e-6)


@pytest.mark.parametrize("target", ["vo", "heads", "mlp,vo,heads"])
def test_compacted_decoder_attention_is_the_masked_model(target: str, tmp_path: Path) -> None:
    dense = _dense(tmp_path)
    stats = api.calibrate(dense, _calib(), precision="float64", parts=("mlp", "vo"))
    result = api.prune(dense, stats, target=target, sparsity=0.5)
    fam = dense.family
    for i, bm in enumerate(result.masks):
        shape = fam.shape(result.model, i)
        if "heads" in target:  # one kv head of two is gone, with both of its query heads
            assert bm.heads.numel() == 2 and int(bm.heads[1] - bm.heads[0]) == 1 and int(bm.heads[0]) % 2 == 0
            assert (shape.num_heads, shape.kv_heads) == (2, 1)
        if "vo" in target:
            assert shape.v_dim == 4
    got = _assert_masked(dense, result)
    check = _double(_tokens(3, seed=9))
    plain = api.prune(dense, stats, target=target, sparsity=0.5, compensation=False)
    unc, _ = _outputs(plain.loaded, check)
    full, _ = _outputs(dense, check)
    assert float((got - full).abs().max()) > 1e-6  # not vacuous
    assert float((got - unc).abs().max()) > 1e-6  # the correction is folded in


def test_kv_heads_pruned_alike_in_every_layer_reload_with_transformers_alone(tmp_path: Path) -> None:
    folder = tiny_decoder(tmp_path / "llama", "llama")
    dense = load_dense(folder)
    stats = api.calibrate(dense, [_tokens(6), _tokens(6, seed=1)], parts=("mlp", "vo"))
    result = api.prune(dense, stats, target="mlp,heads", sparsity=0.5)
    out = tmp_path / "pruned"
    api.save_pruned(result, out)
    assert (out / "config.json").is_file()
    stock = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert (stock.config.num_attention_heads, stock.config.num_key_value_heads, stock.config.head_dim) == (2, 1, 8)
    assert not any(isinstance(m, DecoderAttention) for m in stock.modules())
    x = _tokens(2, seed=5)
    with torch.inference_mode():
        torch.testing.assert_close(stock(**x).logits, result.model(**x).logits, rtol=1e-5, atol=1e-5)
        gen = stock.generate(input_ids=x["input_ids"][:1], max_new_tokens=4, min_new_tokens=4, do_sample=False)
        ours = result.model.generate(input_ids=x["input_ids"][:1], max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert torch.equal(gen, ours)
    assert load_pruned(out, stock_timm=True).config.num_key_value_heads == 1


def test_value_dims_need_corps_loader_and_it_rebuilds_them(tmp_path: Path) -> None:
    folder = tiny_decoder(tmp_path / "llama", "llama", tokenizer=False)
    dense = load_dense(folder)
    stats = api.calibrate(dense, [_tokens(6), _tokens(6, seed=1)], parts=("mlp", "vo"))
    result = api.prune(dense, stats, target="vo", vo_sparsity=0.5)
    out = tmp_path / "pruned"
    api.save_pruned(result, out)
    assert not (out / "config.json").exists()  # no stock config has a value width apart from the head width
    loaded = load_pruned_loaded(out)
    assert [loaded.family.shape(loaded.model, i) for i in range(2)] == [dense.family.shape(result.model, i) for i in range(2)]
    x = _tokens(2, seed=5)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.model(**x).logits, result.model(**x).logits, rtol=0, atol=0)
        # decoding with the KV cache of narrow values is the same function as the full forward
        ids = x["input_ids"][:1]
        gen = loaded.model.generate(input_ids=ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        step = loaded.model(input_ids=gen[:, :-1], use_cache=False).logits[0, ids.shape[1] - 1:].argmax(-1)
    assert torch.equal(gen[0, ids.shape[1]:], step)


def test_query_heads_inside_each_group_keep_the_stock_layout(tmp_path: Path) -> None:
    folder = tiny_decoder(tmp_path / "llama", "llama", tokenizer=False)
    dense = load_dense(folder)
    dense.model.double()
    stats = api.calibrate(dense, _calib(), precision="float64", parts=("mlp", "vo"))
    result = api.prune(dense, stats, target="heads", head_sparsity=0.0, q_head_sparsity=0.5)
    for i, bm in enumerate(result.masks):
        assert bm.heads.numel() == 2 and torch.equal(bm.heads // 2, torch.tensor([0, 1]))  # one query head per group
        assert (result.blocks[i]["vo"]["kv_heads_kept"], result.blocks[i]["vo"]["heads_kept"]) == (2, 2)
    _assert_masked(dense, result)
    result.model.float()
    out = tmp_path / "pruned"
    api.save_pruned(result, out)
    stock = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert (stock.config.num_attention_heads, stock.config.num_key_value_heads) == (2, 2)
    x = _tokens(2, seed=5)
    with torch.inference_mode():
        torch.testing.assert_close(stock(**x).logits, result.model(**x).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(InputError, match="one query head per key/value head"):
        api.prune(_dense(tmp_path, "mistral"), api.calibrate(_dense(tmp_path, "mistral"), _calib(), parts=("mlp", "vo"),
                                                             precision="float64"), target="heads", head_sparsity=0.0,
                  q_head_sparsity=0.5)


def test_uneven_query_groups_run_in_corps_module_and_reload_with_corp(tmp_path: Path) -> None:
    dense = _dense(tmp_path)
    stats = api.calibrate(dense, _calib(), precision="float64", parts=("mlp", "vo"))
    masks = [BlockMasks(heads=torch.tensor([0, 1, 3])), BlockMasks(heads=torch.tensor([1, 2, 3]))]  # groups of 2 and 1
    result = api.prune(dense, stats, masks=masks, target="heads")
    attn = dense.family.attn_module(result.model, 0)
    assert not attn.regular and attn.kv_index.tolist() == [0, 0, 1]
    _assert_masked(dense, result)
    result.model.float()
    out = tmp_path / "pruned"
    api.save_pruned(result, out)
    assert not (out / "config.json").exists()
    again = load_pruned_loaded(out)
    x = _tokens(2, seed=5)
    with torch.inference_mode():
        torch.testing.assert_close(again.model(**x).logits, result.model(**x).logits, rtol=0, atol=0)


def _block0_logits(fam, model, batches) -> list[torch.Tensor]:
    """Block 0's attention logits q^T k (B, Hq, N, N) as its module computes them (rotated, narrow where pruned)."""
    attn = fam.attn_module(model, 0)
    seen: list[tuple[torch.Tensor, tuple]] = []
    hook = attn.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append((kwargs["hidden_states"], kwargs["position_embeddings"])), with_kwargs=True)
    try:
        with torch.inference_mode():
            for b in batches:
                model(**b, use_cache=False)
    finally:
        hook.remove()
    out = []
    with torch.inference_mode():
        for x, (cos, sin) in seen:
            out.append(_logits(attn, x, cos, sin))
    return out


def _logits(attn, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    if True:
        bsz, n, _ = x.shape
        if isinstance(attn, DecoderAttention):
            q = attn.q_proj(x).view(bsz, n, attn.num_heads, attn.qk_dim).transpose(1, 2)
            k = attn.k_proj(x).view(bsz, n, attn.kv_heads, attn.qk_dim).transpose(1, 2)
            q, k = attn._rotate(q, k, cos, sin)
            k = k[:, attn.kv_index]
        else:
            from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

            d = attn.head_dim
            q = attn.q_proj(x).view(bsz, n, -1, d).transpose(1, 2)
            k = attn.k_proj(x).view(bsz, n, -1, d).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k = repeat_kv(k, attn.num_key_value_groups)
        return q @ k.transpose(-1, -2)


def _per_offset(dense: list[torch.Tensor], model: list[torch.Tensor]) -> torch.Tensor:
    """Mean squared logit difference at each causal offset l = query position - key position, per query head (N, Hq)."""
    err = torch.cat([(a - b) ** 2 for a, b in zip(dense, model)])
    return torch.stack([torch.diagonal(err, offset=-lag, dim1=2, dim2=3).mean((0, 2)) for lag in range(err.shape[-1])])


def _check_rotary_every_offset(dense, stats, batches, sparsity: float) -> torch.Tensor:
    fam = dense.family
    comp = api.prune(dense, stats, target="qk", attn_sparsity=sparsity)
    none = api.prune(dense, stats, target="qk", attn_sparsity=sparsity, compensation=False)
    attn = fam.attn_module(comp.model, 0)
    assert isinstance(attn, DecoderAttention) and attn.rope_dims is not None
    # the same pairs in a kv head and in every query head of its group; k_proj keeps exactly those rows
    half = attn.head_dim // 2
    assert torch.equal(attn.rope_dims[:, attn.qk_dim // 2:], attn.rope_dims[:, : attn.qk_dim // 2] + half)
    ref = _block0_logits(fam, dense.model, batches)
    err_c = _per_offset(ref, _block0_logits(fam, comp.model, batches))
    err_u = _per_offset(ref, _block0_logits(fam, none.model, batches))
    ratio = err_c.sum(1) / err_u.sum(1)
    # measured on the calibration windows: no worse at any offset, except sampling noise at the longest ones,
    # which hold only a few (query, key) pairs per window (the last quarter: within 1%)
    n = ratio.numel()
    assert bool((ratio[: 3 * n // 4] <= 1 + 1e-9).all()), f"worse at offsets {torch.nonzero(ratio > 1).flatten().tolist()}"
    assert bool((ratio <= 1.01).all()) and float(ratio.mean()) < 1
    _assert_masked(dense, comp)
    return ratio


def _full_windows(n: int, seed: int, seq: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 512, (n, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_rotary_pairs_compensated_logits_are_no_worse_than_none_at_every_relative_position(tmp_path: Path) -> None:
    dense = _dense(tmp_path, max_position_embeddings=12)  # the fit's offsets are those of a 12-token window
    batches = [_full_windows(64, seed) for seed in range(8)]
    stats = api.calibrate(dense, batches, precision="float64", parts=("mlp", "attn"))
    assert stats.blocks[0]["attn"]["k_gram"].shape == (2, 8, 8)  # keys per kv head, queries per query head
    ratio = _check_rotary_every_offset(dense, stats, batches, 0.5)
    assert float(ratio.min()) < 1.0  # and better somewhere: the correction is not vacuous here


@pytest.mark.slow
def test_real_stories260k_rotary_pairs_every_relative_position(tmp_path: Path) -> None:
    from corp_cli.sources import open_data

    from .conftest import STORIES, STORIES260K

    if not (STORIES260K / "model.safetensors").is_file():
        pytest.skip("the real TinyStories Llama is not present")
    dense = load_dense(STORIES260K)
    dense.model.config.max_position_embeddings = 64  # the default window, whose offsets the fit covers
    dense = dense.family.with_seq_len(dense, 64)
    dense.model.double()
    calib = open_data(f"text:{STORIES}@calib", "text", samples=48, text_unit="document")
    batches = [{k: v for k, v in b.items()} for b, _ in dense.preprocessing.batches(calib, 16)]
    batches = [{k: v.double() if v.is_floating_point() else v for k, v in b.items()} for b in batches]
    full = [{k: v[b["attention_mask"].all(1)] for k, v in b.items()} for b in batches]
    full = [b for b in full if b["input_ids"].shape[0] and b["input_ids"].shape[1] == 64]  # whole 64-token windows
    stats = api.calibrate(dense, full, precision="float64", parts=("mlp", "attn"))
    _check_rotary_every_offset(dense, stats, full, 0.5)


def test_the_allocator_spans_every_part_and_holds_the_flops_and_kv_budgets(tmp_path: Path) -> None:
    dense = _dense(tmp_path)
    stats = api.calibrate(dense, _calib(), precision="float64", parts=("mlp", "attn", "vo"))
    free = api.prune(dense, stats, target="mlp,qk,vo,heads", flops_budget=0.7)
    assert free.allocation["flops_ratio"] <= 0.7 and "kv_ratio" in free.allocation
    result = api.prune(dense, stats, target="mlp,qk,vo,heads", flops_budget=0.7, kv_budget=0.4)
    alloc = result.allocation
    assert alloc["flops_ratio"] <= 0.7 and alloc["kv_ratio"] <= 0.4 < free.allocation["kv_ratio"]
    # what the allocator counted is what the pruned model holds
    report = result.report()
    assert report["totals"]["kv_ratio"] == pytest.approx(alloc["kv_ratio"])
    assert report["totals"]["flops_after"] == alloc["flops"]
    _assert_masked(dense, result)
    # the "heads" menu holds every (kv heads, query heads per group) pair: the widths decode to what plan_masks keeps
    for b, bm, rec in zip(result.masks, result.masks, alloc["blocks"]):
        heads = bm.heads if bm.heads is not None else torch.arange(4)
        assert rec["heads"]["kept_heads"] == heads.tolist()
        groups = torch.bincount(heads // 2, minlength=2)
        assert set(groups.tolist()) <= {0, rec["heads"]["query_heads_per_group"]}
    kv_only = api.prune(dense, stats, target="mlp,qk,vo,heads", kv_budget=0.5)
    assert kv_only.allocation["kv_ratio"] <= 0.5 and kv_only.allocation["flops_budget"] is None
    with pytest.raises(InputError, match="--kv-budget"):
        api.prune(dense, stats, target="mlp", kv_budget=0.5)


def test_sequential_holds_the_flops_and_kv_budgets_and_block_0_gets_the_one_shot_widths(tmp_path: Path) -> None:
    """--sequential with --flops-budget and --kv-budget: both hold for the whole model (KV at or under its
    budget, FLOPs within BUDGET_TOLERANCE below), and block 0, chosen first on the still-dense stream, gets
    the one-shot two-budget allocation's attention widths and predicted errors."""
    from corp_cli.allocation import BUDGET_TOLERANCE

    dense = _dense(tmp_path)
    target = "mlp,qk,vo,heads"
    stats = api.calibrate(dense, _calib(), precision="float64", parts=("mlp", "attn", "vo"))
    one = api.prune(dense, stats, target=target, flops_budget=0.7, kv_budget=0.4, round_to=1)
    seq = api.prune(_dense(tmp_path), sequential=True, sequential_target="self", data=_calib(), target=target,
                    flops_budget=0.7, kv_budget=0.4, round_to=1, precision="float64")
    alloc = seq.allocation
    assert alloc is not None and alloc["sequential"]
    report = seq.report()
    assert report["totals"]["kv_ratio"] == pytest.approx(alloc["kv_ratio"]) and alloc["kv_ratio"] <= 0.4
    ratio = seq.after["flops"] / seq.before["flops"]
    assert (1 - BUDGET_TOLERANCE) * 0.7 <= ratio <= 0.7, ratio
    for part in ("qk", "vo", "heads"):
        assert alloc["blocks"][0][part] == one.allocation["blocks"][0][part], part


def test_two_budget_allocation_holds_both_and_is_the_one_budget_choice_when_the_second_is_loose() -> None:
    g = torch.Generator().manual_seed(3)
    groups = []
    for _ in range(6):
        err = torch.rand(5, generator=g, dtype=torch.float64).sort(descending=True).values
        flops = torch.linspace(-4, 0, 5, dtype=torch.float64)
        kv = torch.linspace(1, 5, 5, dtype=torch.float64) * float(torch.rand(1, generator=g) + 0.5)
        groups.append([engine.Alternative(0.0, 0.0, [engine.Menu(err, flops, kv)])])
    one = engine.allocate_budget(groups, -10.0)
    assert engine.allocate_two_budgets(groups, -10.0, 1e9) == one
    kv_one = engine.picked_kv(groups, one)
    two = engine.allocate_two_budgets(groups, -10.0, 0.7 * kv_one)
    assert engine.picked_kv(groups, two) <= 0.7 * kv_one
    assert sum(float(alts[a].menus[0].flops[ks[0]]) for alts, (a, ks) in zip(groups, two)) <= -10.0
    with pytest.raises(ValueError, match="KV budget"):
        engine.allocate_two_budgets(groups, -10.0, 1.0)


def test_cli_prunes_decoder_attention_under_a_kv_budget_and_benchmarks_kv_bytes(tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from corp_cli.cli import app

    from .conftest import STORIES

    runner = CliRunner()
    folder = tiny_decoder(tmp_path / "llama", "llama")
    out = tmp_path / "pruned"
    args = ["prune", str(folder), "--calib-data", f"text:{STORIES}@calib" if STORIES.is_file() else "text:pydoc",
            "--samples", "8", "--seq-len", "16", "--target", "mlp,qk,vo,heads", "--flops-budget", "0.8",
            "--kv-budget", "0.5", "--out", str(out)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "KV cache" in res.stdout and "reload: " in res.stdout and "--kv-budget 0.5" in res.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["totals"]["kv_ratio"] <= 0.5 and report["allocation"]["flops_ratio"] <= 0.8
    assert report["reload"].startswith(("the same widths", "widths differ"))
    assert (out / "config.json").is_file() == report["reload"].startswith("the same widths")
    res = runner.invoke(app, ["benchmark", str(out), "--batch-sizes", "1", "--seq-lens", "8", "--new-tokens", "3",
                              "--runs", "1", "--warmup", "0", "--json", "-"])
    assert res.exit_code == 0, res.output
    bench = json.loads(res.stdout)
    assert bench["model"]["kv_bytes_per_token"] < bench["reference"]["kv_bytes_per_token"]
    assert bench["comparison"]["kv_ratio"] == pytest.approx(report["totals"]["kv_ratio"])  # both fp32 here
    assert bench["model"]["decode"][0]["decode_tokens_per_s"] > 0
    res = runner.invoke(app, ["prune", "deit_tiny_patch16_224", "--calib-data", "synthetic", "--samples", "2",
                              "--kv-budget", "0.5", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "--kv-budget" in res.stderr, res.output


def test_the_plan_counts_the_key_statistics_per_kv_head(tmp_path: Path) -> None:
    from corp_cli.plan import block_stats_bytes

    dense = _dense(tmp_path)
    stats = api.calibrate(dense, _calib(), precision="float64", parts=("mlp", "attn"))
    s = dense.family.shape(dense.model, 0)
    real = sum(t.numel() * t.element_size() for part in stats.blocks[0].values() for t in part.values())
    assert block_stats_bytes(s.mlp_hidden, s.num_heads, s.head_dim, ("mlp", "attn"), kv_heads=s.kv_heads) == real


@pytest.mark.parametrize("layout", ["qwen2", "mistral"])
def test_every_layout_prunes_all_its_attention_parts_to_the_masked_model(layout: str, tmp_path: Path) -> None:
    """Qwen2: q/k/v biases (the complex scales fold into q's bias too); Mistral: a sliding window (8) shorter than
    the 12-token checks, and one query head per kv head."""
    dense = _dense(tmp_path, layout)
    stats = api.calibrate(dense, _calib(), precision="float64", parts=("mlp", "attn", "vo"))
    result = api.prune(dense, stats, target="mlp,qk,vo,heads", sparsity=0.5)
    shape = dense.family.shape(result.model, 0)
    assert (shape.qk_dim, shape.v_dim, shape.num_heads) == (4, 4, 2)
    if layout == "qwen2":
        assert dense.family.attn_module(result.model, 0).q_proj.bias is not None
    _assert_masked(dense, result)
