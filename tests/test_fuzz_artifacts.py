"""Property tests: corrupted statistics and masks files raise corp's own error, never anything else.

A small, valid statistics file and masks file are built by hand (two blocks, four MLP
units, two heads of three dims), then hypothesis corrupts their metadata, their tensors or
their bytes. Loading must either succeed (the corruption was harmless) or raise
CorpError; whatever loads must also survive what prune and merge do with it next.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save

from corp_cli import engine
from corp_cli.artifacts import META_KEY
from corp_cli.config import check_plan
from corp_cli.errors import CorpError
from corp_cli.masks import load_masks, save_masks
from corp_cli.family import ModelIdentity
from corp_cli.pruning import BlockMasks, PruneOptions
from corp_cli.stats import FIELDS, Statistics, check_matches, merge, new_meta

SHAPES = [{"dim": 6, "mlp_hidden": 4, "num_heads": 2, "head_dim": 3, "qk_dim": 3} for _ in range(2)]
IDENTITY = ModelIdentity("deit_tiny_patch16_224", "sha256:" + "ab" * 32, 1000)
TOKENS = 10
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _valid_stats(shard: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    g = torch.Generator().manual_seed(shard)
    tensors: dict[str, torch.Tensor] = {}
    for i, s in enumerate(SHAPES):
        h = torch.randn(TOKENS, s["mlp_hidden"], generator=g, dtype=torch.float64)
        q = torch.randn(s["num_heads"], TOKENS, s["head_dim"], generator=g, dtype=torch.float64)
        k = torch.randn(s["num_heads"], TOKENS, s["head_dim"], generator=g, dtype=torch.float64)
        tensors.update({
            f"blocks.{i}.mlp.count": torch.tensor([TOKENS]),
            f"blocks.{i}.mlp.sum": h.sum(0),
            f"blocks.{i}.mlp.gram": h.T @ h,
            f"blocks.{i}.mlp.abs_hist": torch.randint(0, 5, (s["mlp_hidden"], engine.HIST_BINS), generator=g),
            f"blocks.{i}.attn.count": torch.tensor([TOKENS]),
            f"blocks.{i}.attn.q_gram": q.transpose(1, 2) @ q,
            f"blocks.{i}.attn.k_gram": k.transpose(1, 2) @ k,
            f"blocks.{i}.attn.qk_sq": (q**2 * k**2).sum(1),
        })
    meta = new_meta(
        identity=IDENTITY, shapes=SHAPES, parts=["mlp", "attn"], preprocessing={"input_size": [3, 224, 224]},
        data={"spec": "synthetic", "base_fingerprint": "f" * 64, "fingerprint": f"{shard}" * 64, "synthetic": True},
        samples=2, tokens=TOKENS, seed=0, shard=(shard, 2), product_dtype="float32",
    )
    return tensors, meta


def _write(path: Path, tensors: dict[str, torch.Tensor], meta: Any, raw_meta: str | None = None) -> None:
    text = raw_meta if raw_meta is not None else json.dumps(meta, allow_nan=True)
    path.write_bytes(st_save({k: v.contiguous() for k, v in tensors.items()}, metadata={META_KEY: text}))


def _paths(obj: Any, prefix: tuple[Any, ...] = (), depth: int = 3) -> Iterator[tuple[Any, ...]]:
    """Every key/index path into a JSON value, to depth 3."""
    if depth == 0:
        return
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        yield (*prefix, k)
        yield from _paths(v, (*prefix, k), depth - 1)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=6) | st.sampled_from([0, 1, -1, 4, 3, 2, 10]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)
_DTYPES = [torch.int64, torch.int32, torch.float64, torch.float32, torch.float16, torch.bool, torch.uint8]


@st.composite
def tensor_values(draw: st.DrawFn) -> torch.Tensor:
    shape = draw(st.lists(st.integers(0, 5), max_size=3))
    dtype = draw(st.sampled_from(_DTYPES))
    fill = draw(st.sampled_from(["randn", "nan", "inf", "neg", "big", "zeros"]))
    x = torch.randn(shape, dtype=torch.float64) * 5
    if fill == "nan":
        x = x.fill_(float("nan"))
    elif fill == "inf":
        x = x.fill_(float("inf"))
    elif fill == "neg":
        x = -x.abs() - 1
    elif fill == "big":
        x = x * 1e12
    elif fill == "zeros":
        x = x.zero_()
    if dtype == torch.bool:
        return x > 0
    if not dtype.is_floating_point:
        x = torch.nan_to_num(x, nan=0.0, posinf=1e6, neginf=-1e6).clamp(-1e6, 1e6)
    return x.to(dtype)


@st.composite
def corruptions(draw: st.DrawFn, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> tuple[dict, Any, str | None, Any]:
    """(tensors, meta, raw metadata text or None, byte edit or None), each corrupted somehow."""
    tensors = dict(tensors)
    meta = json.loads(json.dumps(meta))
    raw: str | None = None
    byte_edit = None
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["meta_set", "meta_set", "meta_del", "meta_raw", "tensor_set", "tensor_del", "tensor_add", "bytes"]))
        if kind in ("meta_set", "meta_del"):
            path = draw(st.sampled_from(sorted(_paths(meta), key=repr) or [("kind",)]))
            parent = meta
            try:
                for key in path[:-1]:
                    parent = parent[key]
                if kind == "meta_set":
                    parent[path[-1]] = draw(json_values)
                elif isinstance(parent, dict):
                    parent.pop(path[-1], None)
                elif isinstance(parent, list) and path[-1] < len(parent):
                    parent.pop(path[-1])
            except (KeyError, IndexError, TypeError):
                pass  # an earlier edit changed the structure under this path
        elif kind == "meta_raw":
            raw = draw(st.sampled_from(["", "{", "[]", "null", "1", '"stats"', "{\"kind\": \"stats\"}"]) | st.text(max_size=20))
        elif kind == "tensor_set" and tensors:
            tensors[draw(st.sampled_from(sorted(tensors)))] = draw(tensor_values())
        elif kind == "tensor_del" and tensors:
            tensors.pop(draw(st.sampled_from(sorted(tensors))))
        elif kind == "tensor_add":
            name = draw(st.sampled_from(["blocks.2.mlp.count", "blocks.0.mlp.extra", "blocks.0.attn.keep",
                                         "blocks.x.mlp.keep", "blocks.01.mlp.keep", "blocks.\u00b2.mlp.keep", "other"]))
            tensors[name] = draw(tensor_values())
        else:
            byte_edit = draw(st.tuples(st.sampled_from(["truncate", "flip"]), st.floats(0, 1), st.binary(min_size=1, max_size=8)))
    return tensors, meta, raw, byte_edit


def _apply_bytes(path: Path, edit: Any) -> None:
    if edit is None:
        return
    op, where, junk = edit
    data = bytearray(path.read_bytes())
    pos = int(where * (len(data) - 1))
    if op == "truncate":
        del data[pos:]
    else:
        data[pos : pos + len(junk)] = junk
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


def test_the_uncorrupted_fixtures_load(workdir: Path) -> None:
    """The property tests below mean something only if the files they corrupt are valid."""
    for shard in (0, 1):
        _write(workdir / f"ok{shard}.safetensors", *_valid_stats(shard))
    a, b = (Statistics.load(workdir / f"ok{s}.safetensors") for s in (0, 1))
    assert merge([a, b]).meta["shards"] == {"indices": [0, 1], "count": 2}
    save_masks(workdir / "m.safetensors", [BlockMasks(mlp=torch.tensor([0, 2]), attn=torch.tensor([[0, 1], [1, 2]])) for _ in SHAPES],
               identity=IDENTITY, shapes=SHAPES, options={}, stats_fingerprint="x")
    masks, _ = load_masks(workdir / "m.safetensors", SHAPES)
    assert masks[1].attn.tolist() == [[0, 1], [1, 2]]


def test_statistics_from_before_the_count_rename_still_load(workdir: Path) -> None:
    """Files written when the sample counts were called images/skipped_images read as samples."""
    tensors, meta = _valid_stats(0)
    old = {("images" if k == "samples" else "skipped_images" if k == "skipped_samples" else k): v for k, v in meta.items()}
    old["images"], old["skipped_images"] = 7, 1
    _write(workdir / "old.safetensors", tensors, old)
    loaded = Statistics.load(workdir / "old.safetensors")
    assert (loaded.meta["samples"], loaded.meta["skipped_samples"]) == (7, 1)
    assert "images" not in loaded.meta and "skipped_images" not in loaded.meta


@FUZZ
@given(data=st.data())
def test_corrupt_statistics_raise_corp_errors_only(workdir: Path, data: st.DataObject) -> None:
    tensors, meta = _valid_stats(0)
    tensors, meta, raw, byte_edit = data.draw(corruptions(tensors, meta))
    path = workdir / "fuzz.stats.safetensors"
    _write(path, tensors, meta, raw)
    _apply_bytes(path, byte_edit)
    try:
        stats = Statistics.load(path)
    except CorpError as e:
        event(f"refused: {str(e).split(': ', 1)[-1][:40]}")
        return
    event("loaded")
    # It loaded, so everything downstream must work on it or refuse it cleanly.
    _write(workdir / "shard1.safetensors", *_valid_stats(1))
    try:
        check_matches(stats, IDENTITY)
        check_plan(PruneOptions(), stats.meta["block_shapes"], stats.parts, None)
        merged = merge([stats, Statistics.load(workdir / "shard1.safetensors")])
        assert merged.meta["samples"] >= 1
    except CorpError:
        pass
    for b in stats.blocks:
        for part, fields in b.items():
            assert set(fields) == set(FIELDS[part])
            assert all(torch.isfinite(t).all() for t in fields.values() if t.dtype.is_floating_point)


@FUZZ
@given(data=st.data())
def test_corrupt_masks_raise_corp_errors_only(workdir: Path, data: st.DataObject) -> None:
    good = workdir / "good.masks.safetensors"
    save_masks(good, [BlockMasks(mlp=torch.tensor([0, 2, 3]), attn=torch.tensor([[0, 1], [1, 2]])) for _ in SHAPES],
               identity=IDENTITY, shapes=SHAPES, options={"target": "both"}, stats_fingerprint="sha256:x")
    from corp_cli.artifacts import read_safetensors

    tensors, meta = read_safetensors(good, kind="masks")
    tensors, meta, raw, byte_edit = data.draw(corruptions(tensors, meta))
    path = workdir / "fuzz.masks.safetensors"
    _write(path, tensors, meta, raw)
    _apply_bytes(path, byte_edit)
    for shapes in (SHAPES, None):
        try:
            masks, _ = load_masks(path, shapes)
        except CorpError:
            continue
        for i, m in enumerate(masks):
            if m.mlp is not None:
                assert m.mlp.dtype == torch.int64 and 0 <= int(m.mlp.min()) and int(m.mlp.max()) < SHAPES[i]["mlp_hidden"]
            if m.attn is not None:
                assert m.attn.shape[0] == SHAPES[i]["num_heads"] and int(m.attn.max()) < SHAPES[i]["head_dim"]


@FUZZ
@given(blob=st.binary(max_size=300), kind=st.sampled_from(["stats", "masks"]))
def test_random_bytes_are_refused_cleanly(workdir: Path, blob: bytes, kind: str) -> None:
    path = workdir / f"random.{kind}.safetensors"
    path.write_bytes(blob)
    with pytest.raises(CorpError):
        if kind == "stats":
            Statistics.load(path)
        else:
            load_masks(path, SHAPES)
