"""Exact FLOPs of the statistics sums the pre-flight plan counts, against closed forms."""

from corp_cli import engine
from corp_cli.family import BlockShape
from corp_cli.plan import stats_flops


def test_stats_flops_closed_form() -> None:
    s = BlockShape(dim=8, mlp_hidden=16, num_heads=4, head_dim=2, qk_dim=2, kv_heads=2, v_dim=2)
    got = stats_flops([s, s, s], [0, 2], ("mlp", "attn"), tokens=10)
    assert got == {"mlp sums": 2 * (2 * 10 * 16 * 16), "attn sums": 2 * (2 * 10 * (4 + 2) * 2 * 2)}
    assert stats_flops([s], [0], ("mlp",), tokens=3) == {"mlp sums": 2 * 3 * 256, "attn sums": 0}


def test_plan_counts_forward_and_sums_on_meta() -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from corp_cli.flops import model_counts
    from corp_cli.plan import plan_calibration
    from corp_cli.registry import family_of

    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=50)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    fam = family_of(model)
    plan = plan_calibration(fam, model, name="tiny", device=torch.device("cpu"), batch_size=2, samples=3,
                            parts=("mlp", "attn"), tokens=5)
    t = 3 * 5
    assert plan.to_dict()["flops"] == {
        "forward": 3 * model_counts(model, 5, fam)["flops"],
        "mlp sums": 2 * (2 * t * 32 * 32), "attn sums": 2 * (2 * t * (4 + 2) * 4 * 4)}


def test_estimate_time_divides_by_the_given_rates() -> None:
    from corp_cli.plan import estimate_time

    t = estimate_time({"forward": 600, "mlp sums": 100, "attn sums": 50}, forward_rate=100.0, float64_rate=50.0)
    assert (t["forward_seconds"], t["sums_seconds"], t["seconds"]) == (6.0, 3.0, 9.0)


def test_ridge_solve_flops_by_hand() -> None:
    from corp_cli.plan import ridge_solve_flops

    # width 8 keeping 6 into 4 outputs (s=6, p=2): Cholesky 216//3=72, triangular solves 2*36*2=144, c 2*2*6=24,
    # error traces 2*4*4=32 twice, B Sigma_SP 48, B Sigma_SS 144, (.) B^T 48, fold 2*4*2*6=96, energy 2*4*64=512
    assert ridge_solve_flops(8, 6, 4) == 72 + 144 + 24 + 32 + 32 + 48 + 144 + 48 + 96 + 512 == 1152
    assert ridge_solve_flops(8, 8, 4) == 512  # nothing removed: no solve, only the output energy


def test_prune_solve_flops_by_hand() -> None:
    from corp_cli.family import BlockShape
    from corp_cli.plan import prune_solve_flops, qk_solve_flops, ridge_solve_flops

    s = BlockShape(dim=8, mlp_hidden=16, num_heads=4, head_dim=4, qk_dim=4, kv_heads=2, v_dim=4)
    # rotary, 2 query heads keeping 2 of 4 dims: 2 * (9 * 64 + (R + 1) * (9 * 8 + 4 * 4 * 2 * 6)), R re-solves
    rotary = 2 * (576 + (engine.ROTARY_REWEIGHT_ROUNDS + 1) * (72 + 192))
    assert qk_solve_flops(4, 2, 2, 8, rotary=True) == rotary
    # plain, 1 head keeping 2 of 4: 27*8 + 2*4*2 + 8*8 + 6*8 + 4*4*8 = 216 + 16 + 64 + 48 + 128
    assert qk_solve_flops(4, 2, 1, 8, rotary=False) == 472
    # block 0: MLP 16 -> 8, one kv head of 2 kept with its 2 query heads, qk 2 and vo 2 kept: o keeps 2 * 2 of 16
    w0 = {"mlp": 8, "heads": 1, "qk": 2, "vo": 2}
    # block 1: Q/K dims alone, on all 4 heads
    w1 = {"qk": 2}
    got = prune_solve_flops([s, s], [0, 1], [w0, w1], [True, False])
    assert got == (ridge_solve_flops(16, 8, 8) + rotary + ridge_solve_flops(16, 4, 8)) + 4 * 472
    assert prune_solve_flops([s, s], [1], [w0, w1], [True, False]) == 4 * 472


def test_estimate_time_counts_solves_at_the_float64_rate() -> None:
    from corp_cli.plan import estimate_time

    t = estimate_time({"forward": 600, "mlp sums": 100, "solves": 150}, forward_rate=100.0, float64_rate=50.0)
    assert (t["sums_seconds"], t["solves_seconds"], t["seconds"]) == (2.0, 3.0, 11.0)
    assert "solves" not in t["excluded"]
    assert "the solves" in estimate_time({"forward": 1}, 1.0, 1.0)["excluded"]
