"""Exact FLOPs of the statistics sums the pre-flight plan counts, against closed forms."""

from corp_cli.family import BlockShape
from corp_cli.plan import stats_flops


def test_stats_flops_closed_form() -> None:
    s = BlockShape(dim=8, mlp_hidden=16, num_heads=4, head_dim=2, qk_dim=2, kv_heads=2, v_dim=2)
    got = stats_flops([s, s, s], [0, 2], ("mlp", "attn"), tokens=10)
    assert got == {"mlp sums": 2 * (2 * 10 * 16 * 16), "attn sums": 2 * (2 * 10 * (4 + 2) * 2 * 2)}
    assert stats_flops([s], [0], ("mlp",), tokens=3) == {"mlp sums": 2 * 3 * 256, "attn sums": 0}
