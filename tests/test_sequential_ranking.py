"""--sequential-ranking dense: the one-shot prune's units, their corrections fit sequentially, in one run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from corp_cli import api
from corp_cli.errors import InputError

from .test_sequential import _batches, _cli, _model


@pytest.mark.parametrize("target", ["both", "mlp,qk,vo,heads"])
def test_dense_ranking_is_the_two_run_recipe_in_one(target: str) -> None:
    m = _model()
    batches = _batches()
    stats = api.calibrate(m, batches, precision="float64", parts=("mlp", "attn", "vo"))
    one = api.prune(m, stats, target=target, sparsity=0.5)
    two = api.prune(m, sequential=True, data=batches, masks=one.masks, target=target, sparsity=0.5,
                    precision="float64")
    single = api.prune(m, sequential=True, sequential_ranking="dense", data=batches, target=target, sparsity=0.5,
                       precision="float64")
    for a, b in zip(two.masks, single.masks):
        for part in ("mlp", "attn", "vo", "heads"):
            x, y = getattr(a, part), getattr(b, part)
            assert (x is None) == (y is None) and (x is None or torch.equal(x, y)), part
    sa, sb = two.model.state_dict(), single.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert single.sequential is not None and single.sequential["ranking"] == "dense"
    # the default ranks on the pruned stream: other units, so the test above tells the two apart
    stream = api.prune(m, sequential=True, data=batches, target=target, sparsity=0.5, precision="float64")
    assert any(not torch.equal(a.mlp, b.mlp) for a, b in zip(stream.masks, single.masks))


def test_dense_ranking_refusals() -> None:
    m = _model(depth=1)
    batches = _batches()
    with pytest.raises(InputError, match="--sequential only"):
        api.prune(m, api.calibrate(m, batches, precision="float64"), sequential_ranking="dense", target="mlp")
    with pytest.raises(InputError, match="must be one of stream, dense"):
        api.prune(m, sequential=True, sequential_ranking="oneshot", data=batches, target="mlp")
    one = api.prune(m, api.calibrate(m, batches, precision="float64"), target="mlp", sparsity=0.5)
    with pytest.raises(InputError, match="with --masks"):
        api.prune(m, sequential=True, sequential_ranking="dense", data=batches, masks=one.masks, target="mlp")
    with pytest.raises(InputError, match="with a budget"):
        api.prune(m, sequential=True, sequential_ranking="dense", data=batches, target="mlp", flops_budget=0.7)


@pytest.mark.parametrize(("extra", "said"), [
    ((), "--sequential only"),
    (("--sequential", "--masks", "m.safetensors"), "with --masks"),
    (("--sequential", "--flops-budget", "0.7"), "with a budget"),
    (("--sequential", "--sequential-ranking", "oneshot"), "must be one of"),
])
def test_cli_dense_ranking_refusals_are_one_line(tmp_path: Path, extra: tuple[str, ...], said: str) -> None:
    args = ["prune", "deit_tiny_patch16_224", "--calib-data", "synthetic", "--out", tmp_path / "o"]
    ranking = () if "--sequential-ranking" in extra else ("--sequential-ranking", "dense")
    res = _cli(tmp_path, *args, *ranking, *extra)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1 and said in lines[0], res.stderr
    assert not (tmp_path / "o").exists()
