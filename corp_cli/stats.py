"""The statistics artifact: per-block float64 sums, their provenance, validation and merging."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from corp_cli import __version__, engine
from corp_cli.artifacts import FORMAT_VERSION, read_safetensors, save_safetensors_atomic, sha256_file
from corp_cli.errors import ArtifactError
from corp_cli.family import ModelIdentity

KIND = "stats"

# name -> (dtype, shape builder from the block shape dict)
_MLP_FIELDS = {
    "count": (torch.int64, lambda s: (1,)),
    "sum": (torch.float64, lambda s: (s["mlp_hidden"],)),
    "gram": (torch.float64, lambda s: (s["mlp_hidden"], s["mlp_hidden"])),
    "abs_hist": (torch.int64, lambda s: (s["mlp_hidden"], engine.HIST_BINS)),
}
_ATTN_FIELDS = {
    "count": (torch.int64, lambda s: (1,)),
    "q_gram": (torch.float64, lambda s: (s["num_heads"], s["head_dim"], s["head_dim"])),
    # under grouped-query attention keys are per kv head (DESIGN.md A)
    "k_gram": (torch.float64, lambda s: (s.get("kv_heads") or s["num_heads"], s["head_dim"], s["head_dim"])),
    "qk_sq": (torch.float64, lambda s: (s["num_heads"], s["head_dim"])),
}

def _o_width(s: dict[str, int]) -> int:
    return s["num_heads"] * s.get("v_dim", s["head_dim"])


# The attention output before its projection (the concatenated heads o): what V/O and head pruning solve on.
_VO_FIELDS = {
    "count": (torch.int64, lambda s: (1,)),
    "sum": (torch.float64, lambda s: (_o_width(s),)),
    "gram": (torch.float64, lambda s: (_o_width(s), _o_width(s))),
}
FIELDS = {"mlp": _MLP_FIELDS, "attn": _ATTN_FIELDS, "vo": _VO_FIELDS}


def _head_sq(s: dict[str, int]) -> tuple[int, int, int]:
    return (s["num_heads"], s["head_dim"], s["head_dim"])


# Regression targets a part MAY carry (sequential calibration, corp_cli/sequential.py): all of
# a group or none. Without them every path is the one-shot solve.
_TARGET_FIELDS: dict[str, dict[str, Any]] = {
    "mlp": {"t_cross": (torch.float64, lambda s: (s["dim"], s["mlp_hidden"])),
            "t_sum": (torch.float64, lambda s: (s["dim"],)), "t_sq": (torch.float64, lambda s: ())},
    "vo": {"t_cross": (torch.float64, lambda s: (s["dim"], _o_width(s))),
           "t_sum": (torch.float64, lambda s: (s["dim"],)), "t_sq": (torch.float64, lambda s: ())},
    "attn": {k: (torch.float64, _head_sq) for k in ("q_cross", "k_cross", "qd_gram", "kd_gram")},
}
OPTIONAL_FIELDS = _TARGET_FIELDS


def hist_spec() -> dict[str, int]:
    return {"exp_min": engine.HIST_EXP_MIN, "exp_max": engine.HIST_EXP_MAX, "sub": engine.HIST_SUB}


@dataclass
class Statistics:
    """Sums per block and part ('mlp', 'attn', 'vo'), plus metadata (provenance, shapes, shards)."""

    blocks: list[dict[str, dict[str, Tensor]]]
    meta: dict[str, Any]
    path: Path | None = None
    file_sha256: str | None = None

    @property
    def identity(self) -> ModelIdentity:
        return ModelIdentity.from_dict(self.meta["model"])

    @property
    def parts(self) -> list[str]:
        return list(self.meta["parts"])

    def fingerprint(self) -> str:
        """Identifies these statistics: the file's sha256 once saved or loaded."""
        return f"sha256:{self.file_sha256}" if self.file_sha256 else "unsaved"

    def tensors(self) -> dict[str, Tensor]:
        return {f"blocks.{i}.{part}.{k}": v for i, b in enumerate(self.blocks) for part, d in b.items() for k, v in d.items()}

    def save(self, path: Path) -> None:
        save_safetensors_atomic(path, self.tensors(), self.meta)
        self.path = Path(path)
        self.file_sha256 = sha256_file(path)

    @staticmethod
    def load(path: Path) -> Statistics:
        tensors, meta = read_safetensors(path, kind=KIND)
        meta = _renamed_counts(meta)
        blocks = _validate(tensors, meta, Path(path))
        return Statistics(blocks=blocks, meta=meta, path=Path(path), file_sha256=sha256_file(path))


# corp 0.x before the sample counts were renamed wrote them as images; read those files too.
_OLD_COUNT_KEYS = {"images": "samples", "skipped_images": "skipped_samples"}


def _renamed_counts(meta: Any) -> Any:
    if not isinstance(meta, dict):
        return meta  # validation says what is wrong with it
    out = dict(meta)
    for old, new in _OLD_COUNT_KEYS.items():
        if old in out and new not in out:
            out[new] = out.pop(old)
    return out


def new_meta(
    *, identity: ModelIdentity, shapes: list[dict[str, int]], parts: list[str], preprocessing: dict[str, Any],
    data: dict[str, Any], samples: int, tokens: int, seed: int, shard: tuple[int, int] | None,
    product_dtype: str, skipped_samples: int = 0, blocks: range | None = None, forward_dtype: Any = None,
) -> dict[str, Any]:
    index, count = shard if shard is not None else (0, 1)
    meta = {
        "kind": KIND,
        "format_version": FORMAT_VERSION,
        "tool_version": __version__,
        "model": identity.to_dict(),
        "block_shapes": shapes,
        "parts": parts,
        "preprocessing": preprocessing,
        "data": data,
        "synthetic": bool(data.get("synthetic", False)),
        "samples": samples,
        "tokens": tokens,
        "skipped_samples": skipped_samples,
        "seed": seed,
        "shards": {"indices": [index], "count": count},
        "product_dtype": product_dtype,
        "hist": hist_spec(),
    }
    # written only when they differ from the default, so files of default runs keep their bytes
    if blocks is not None and list(blocks) != list(range(len(shapes))):
        meta["blocks"] = list(blocks)
    if forward_dtype is not None and forward_dtype != torch.float32:
        meta["forward_dtype"] = str(forward_dtype).removeprefix("torch.")
    return meta


def covered_blocks(meta: dict[str, Any]) -> list[int]:
    """The blocks a statistics file holds sums for (all of them unless calibrated with --blocks)."""
    b = meta.get("blocks")
    return list(b) if isinstance(b, list) else list(range(len(meta["block_shapes"])))


def describe_blocks(blocks: list[int]) -> str:
    """0-11, or 0-5,8-11: ranges of block indices."""
    spans, start = [], None
    for i, b in enumerate(blocks):
        if start is None:
            start = b
        if i + 1 == len(blocks) or blocks[i + 1] != b + 1:
            spans.append(f"{start}-{b}" if b != start else str(b))
            start = None
    return ",".join(spans)


# Block-shape keys each part needs, to know its tensors' shapes.
_SHAPE_KEYS = {"mlp": ("mlp_hidden",), "attn": ("num_heads", "head_dim"), "vo": ("num_heads", "head_dim")}
_PRODUCT_DTYPES = ("float32", "float64")
_FORWARD_DTYPES = ("bfloat16", "float16")


def _is_count(v: Any, minimum: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= minimum


def _check_meta(meta: dict[str, Any]) -> tuple[list[dict[str, int]], list[str]]:
    """Types and ranges of every metadata field corp relies on; ValueError says which is wrong.

    The file may come from anywhere, so nothing downstream (merge, prune) should ever meet
    a field of the wrong type and crash on it.
    """
    shapes, parts = meta.get("block_shapes"), meta.get("parts")
    if not isinstance(parts, list) or not parts or not all(isinstance(p, str) for p in parts):
        raise ValueError(f"parts must be a non-empty list of {sorted(FIELDS)}")
    if set(parts) - set(FIELDS) or len(set(parts)) != len(parts):
        raise ValueError(f"parts {parts!r} must be distinct names among {sorted(FIELDS)}")
    if not isinstance(shapes, list) or not shapes:
        raise ValueError("block_shapes must be a non-empty list")
    for i, shape in enumerate(shapes):
        if not isinstance(shape, dict):
            raise ValueError(f"block_shapes[{i}] is not an object")
        for key in (k for p in parts for k in _SHAPE_KEYS[p]):
            if not _is_count(shape.get(key), 1):
                raise ValueError(f"block_shapes[{i}].{key} is {shape.get(key)!r}, expected a positive integer")
        if "v_dim" in shape and not _is_count(shape["v_dim"], 1):
            raise ValueError(f"block_shapes[{i}].v_dim is {shape['v_dim']!r}, expected a positive integer")
    ModelIdentity.from_dict(meta.get("model"))  # type: ignore[arg-type]
    shards = meta.get("shards")
    if not isinstance(shards, dict) or not _is_count(shards.get("count"), 1):
        raise ValueError("bad shard record (count)")
    indices = shards.get("indices")
    if (
        not isinstance(indices, list) or not indices
        or not all(_is_count(x) and x < shards["count"] for x in indices) or len(set(indices)) != len(indices)
    ):
        raise ValueError(f"bad shard record: indices {indices!r} must be distinct integers in [0, {shards['count']})")
    for key in ("samples", "tokens"):
        if not _is_count(meta.get(key), 1):
            raise ValueError(f"{key} is {meta.get(key)!r}, expected a positive integer")
    if not _is_count(meta.get("skipped_samples", 0)):
        raise ValueError(f"skipped_samples is {meta.get('skipped_samples')!r}, expected an integer >= 0")
    for key in ("data", "preprocessing"):
        if not isinstance(meta.get(key), dict):
            raise ValueError(f"{key} must be an object")
    if not isinstance(meta.get("synthetic"), bool):
        raise ValueError("synthetic must be true or false")
    if meta.get("product_dtype") not in _PRODUCT_DTYPES:
        raise ValueError(f"product_dtype {meta.get('product_dtype')!r} is not one of {_PRODUCT_DTYPES}")
    if meta.get("hist") != hist_spec():
        raise ValueError("histogram layout differs from this corp version")
    if "forward_dtype" in meta and meta["forward_dtype"] not in _FORWARD_DTYPES:
        raise ValueError(f"forward_dtype {meta['forward_dtype']!r} is not one of {_FORWARD_DTYPES}")
    if "blocks" in meta:
        b = meta["blocks"]
        if (not isinstance(b, list) or not b or not all(_is_count(x) and x < len(shapes) for x in b)
                or b != sorted(set(b))):
            raise ValueError(f"blocks {b!r} must be ascending, distinct indices of the model's {len(shapes)} blocks")
    return shapes, parts


def _validate(tensors: dict[str, Tensor], meta: dict[str, Any], path: Path) -> list[dict[str, dict[str, Tensor]]]:
    try:
        shapes, parts = _check_meta(meta)
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise ArtifactError(f"{path}: invalid statistics metadata ({e})") from None
    covered = covered_blocks(meta)
    expected = {
        f"blocks.{i}.{part}.{name}": (dtype, shape_fn)
        for i in covered for part in parts for name, (dtype, shape_fn) in FIELDS[part].items()
    }
    missing = sorted(set(expected) - set(tensors))
    optional = {
        f"blocks.{i}.{part}.{name}": spec
        for i in covered for part in parts for name, spec in OPTIONAL_FIELDS.get(part, {}).items()
    }
    for i in covered:
        for part in parts:
            names = [n for n in OPTIONAL_FIELDS.get(part, {}) if f"blocks.{i}.{part}.{n}" in tensors]
            if names and len(names) != len(OPTIONAL_FIELDS[part]):
                raise ArtifactError(f"{path}: block {i} {part} carries target sums {names} but not all of "
                                    f"{sorted(OPTIONAL_FIELDS[part])}")
    expected.update({k: v for k, v in optional.items() if k in tensors})
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ArtifactError(f"{path}: statistics tensors do not match their metadata (missing {missing[:3]}, unexpected {extra[:3]})")
    blocks: list[dict[str, dict[str, Tensor]]] = [{p: {} for p in parts} if i in covered else {} for i in range(len(shapes))]
    tokens = meta["tokens"]
    for key, (dtype, shape_fn) in expected.items():
        t = tensors[key]
        _, i, part, name = key.split(".")
        want = tuple(int(x) for x in shape_fn(shapes[int(i)]))
        if t.dtype != dtype or tuple(t.shape) != want:
            raise ArtifactError(f"{path}: tensor {key} is {t.dtype}{tuple(t.shape)}, expected {dtype}{want}")
        if t.dtype.is_floating_point and not bool(torch.isfinite(t).all()):
            raise ArtifactError(f"{path}: tensor {key} holds NaN or Inf")
        if name == "count" and int(t.sum()) <= 0:
            raise ArtifactError(f"{path}: tensor {key} counts no samples")
        if name == "abs_hist" and bool((t < 0).any()):
            raise ArtifactError(f"{path}: tensor {key} holds negative counts")
        # Sums of squares cannot be negative: a negative one means a corrupt or forged file.
        if name in ("gram", "q_gram", "k_gram") and bool((torch.diagonal(t, dim1=-2, dim2=-1) < 0).any()):
            raise ArtifactError(f"{path}: tensor {key} has a negative diagonal (not a sum of squares)")
        if name == "qk_sq" and bool((t < 0).any()):
            raise ArtifactError(f"{path}: tensor {key} holds negative sums of squares")
        blocks[int(i)][part][name] = t
    # `tokens` is the first covered block's count (see calibration.collect_statistics), and
    # the parts of one block see the same tokens; anything else is a forged or spliced file.
    for i in covered:
        b = blocks[i]
        counts = {p: int(b[p]["count"].sum()) for p in parts}
        if i == covered[0] and counts[parts[0]] != tokens:
            raise ArtifactError(f"{path}: block {i} counts {counts[parts[0]]} samples but the metadata says {tokens} tokens")
        if len(set(counts.values())) > 1:
            raise ArtifactError(f"{path}: block {i} parts count different samples {counts}")
    return blocks


def merge(items: list[Statistics], *, allow_gaps: bool = False) -> Statistics:
    """Join statistics of one calibration set: shards of the data (added), or ranges of the blocks (united).

    Anything else is refused: other models, options or data, overlapping shards, overlapping
    block ranges, and (unless allow_gaps) block ranges that leave blocks out.
    """
    if len(items) < 2:
        raise ArtifactError("merge needs at least two statistics files")
    first = items[0]
    keys = ("model", "block_shapes", "parts", "preprocessing", "product_dtype", "hist")
    for st in items:
        name = st.path or "input"
        for k in (*keys, "forward_dtype"):
            if st.meta.get(k) != first.meta.get(k):
                raise ArtifactError(
                    f"cannot merge {name} with {first.path}: different {k} "
                    f"({_short(st.meta.get(k))} vs {_short(first.meta.get(k))})"
                )
        if st.meta["data"].get("base_fingerprint") != first.meta["data"].get("base_fingerprint"):
            raise ArtifactError(f"cannot merge {name} with {first.path}: they come from different calibration data selections")
        if st.meta["shards"]["count"] != first.meta["shards"]["count"]:
            raise ArtifactError(f"cannot merge {name} with {first.path}: different shard counts")
    ranges = [tuple(covered_blocks(st.meta)) for st in items]
    if len(set(ranges)) > 1:
        return _merge_blocks(items, allow_gaps)
    return _merge_shards(items)


def _merge_shards(items: list[Statistics]) -> Statistics:
    first = items[0]
    seen: set[int] = set()
    for st in items:
        overlap = seen & set(st.meta["shards"]["indices"])
        if overlap:
            raise ArtifactError(f"cannot merge {st.path or 'input'}: shard(s) {sorted(overlap)} are already included "
                                "(overlapping shards)")
        seen |= set(st.meta["shards"]["indices"])
    blocks = [
        {part: {k: sum((st.blocks[i][part][k] for st in items[1:]), first.blocks[i][part][k].clone()) for k in d} for part, d in b.items()}
        for i, b in enumerate(first.blocks)
    ]
    meta = dict(first.meta)
    meta["tool_version"] = __version__
    meta["samples"] = sum(int(st.meta["samples"]) for st in items)
    meta["tokens"] = sum(int(st.meta["tokens"]) for st in items)
    meta["skipped_samples"] = sum(int(st.meta.get("skipped_samples", 0)) for st in items)
    meta["shards"] = {"indices": sorted(seen), "count": first.meta["shards"]["count"]}
    meta["data"] = {**first.meta["data"], "shard": None, "merged_from": [st.meta["data"].get("fingerprint") for st in items]}
    return Statistics(blocks=blocks, meta=meta)


def _merge_blocks(items: list[Statistics], allow_gaps: bool) -> Statistics:
    """Files of the same data that each hold some blocks (calibrate --blocks): one file with their union."""
    first = items[0]
    owner: dict[int, Path | str] = {}
    for st in items:
        name = st.path or "input"
        if st.meta["data"].get("fingerprint") != first.meta["data"].get("fingerprint") or (
            st.meta["shards"] != first.meta["shards"]
        ):
            raise ArtifactError(f"cannot merge {name} with {first.path}: block ranges must come from the same data "
                                "(and the same shards); merge shards of one block range first")
        if st.meta["samples"] != first.meta["samples"]:
            raise ArtifactError(f"cannot merge {name} with {first.path}: they counted different samples")
        for i in covered_blocks(st.meta):
            if i in owner:
                raise ArtifactError(f"cannot merge {name}: block {i} is also in {owner[i]} (overlapping block ranges)")
            owner[i] = name
    covered = sorted(owner)
    nblocks = len(first.meta["block_shapes"])
    missing = [i for i in range(nblocks) if i not in owner]
    if missing and not allow_gaps:
        raise ArtifactError(f"the files leave blocks {describe_blocks(missing)} out; calibrate them with --blocks "
                            "and merge them too, or pass --allow-gaps for a partial file")
    blocks: list[dict[str, dict[str, Tensor]]] = [{} for _ in range(nblocks)]
    for st in items:
        for i in covered_blocks(st.meta):
            blocks[i] = st.blocks[i]
    meta = dict(first.meta)
    meta["tool_version"] = __version__
    meta.pop("blocks", None)
    if missing:
        meta["blocks"] = covered
    meta["tokens"] = int(next(iter(blocks[covered[0]].values()))["count"].sum())
    return Statistics(blocks=blocks, meta=meta)


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) < 80 else text[:77] + "..."


def check_matches(stats: Statistics, identity: ModelIdentity, what: str = "model") -> None:
    if stats.identity != identity:
        raise ArtifactError(
            f"statistics {stats.path} were computed for {stats.identity.describe()} but the {what} is "
            f"{identity.describe()}; recalibrate with the same model, options and checkpoint"
        )


def check_block_shapes(stats: Statistics, shapes: list[dict[str, int]]) -> None:
    """Statistics whose identity matches must also have the model's block shapes (a forged file may not)."""
    if stats.meta["block_shapes"] != shapes:
        raise ArtifactError(
            f"statistics {stats.path} record block shapes that differ from the model {stats.identity.name}'s; "
            "recalibrate with this model"
        )


def check_preprocessing(stats: Statistics, preprocessing: dict[str, Any]) -> None:
    """The preprocessing flags of a run that reuses statistics must be the ones the statistics were made with."""
    def fields(d: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in d.items() if k != "source"}

    if fields(stats.meta["preprocessing"]) != fields(preprocessing):
        raise ArtifactError(
            f"statistics {stats.path} were calibrated with preprocessing {fields(stats.meta['preprocessing'])}, but the "
            f"preprocessing options given make it {fields(preprocessing)}; drop them or recalibrate with them"
        )


# What pruning each statistics part serves, and the --parts value that gathers it.
PART_USES = {"mlp": "MLP", "attn": "Q/K", "vo": "value/output (V/O) and head"}


def require_parts(stats: Statistics, needed: list[str]) -> None:
    """Refuse, in one line, statistics that lack a part the pruning needs (older files have no 'vo')."""
    missing = [p for p in needed if any(p not in b for b in stats.blocks)]
    if missing:
        have = ",".join(stats.blocks[0]) if stats.blocks else "none"
        uses = " and ".join(PART_USES[p] for p in missing)
        raise ArtifactError(
            f"statistics {stats.path or '(in memory)'} have parts {have} but {uses} pruning needs {', '.join(missing)} sums; "
            f"recalibrate with --parts {','.join(dict.fromkeys([*(stats.blocks[0] if stats.blocks else []), *missing]))}"
        )


def finite_or_raise(x: Tensor, where: str) -> None:
    if not bool(torch.isfinite(x).all()):
        from corp_cli.errors import NumericalError

        raise NumericalError(f"non-finite activations (NaN or Inf) in {where}; check the checkpoint and input preprocessing")

