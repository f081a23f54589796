"""Exact FLOPs of the statistics sums the pre-flight plan counts, against closed forms."""

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
