"""Prune options from their three sources: defaults < a YAML preset (--config) < explicit flags; and --masks.

Preset keys are PruneOptions field names (with `lambda` for `lam`, `sparsity` setting every
part's sparsity) plus `blocks:`, a map from block index to per-block overrides. An unknown
key is an error, never ignored. check_plan refuses, from block shapes alone, what pruning
would refuse later, so a bad option fails before any expensive work.
"""

from __future__ import annotations

import logging
import math
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import yaml

from corp_cli.errors import ArtifactError, InputError
from corp_cli.family import ModelIdentity
from corp_cli.pruning import BLOCK_OVERRIDABLE, BlockMasks, PruneOptions, stats_parts_for, target_name

log = logging.getLogger(__name__)

_ALIASES = {"lambda": "lam"}
# What `sparsity` (flag, preset key or per-block key) sets: every part's sparsity.
SPARSITIES = ("mlp_sparsity", "attn_sparsity", "vo_sparsity", "head_sparsity")


def load_prune_config(path: Path) -> dict[str, Any]:
    """PruneOptions keyword arguments from a YAML preset (not yet validated as a whole)."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise InputError(f"--config {path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise InputError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InputError(f"--config {path}: expected a mapping of option names to values")
    names = {f.name for f in fields(PruneOptions)} - {"block_overrides"}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        k = _ALIASES.get(str(key).replace("-", "_"), str(key).replace("-", "_"))
        if k == "sparsity":
            for name in SPARSITIES:
                out.setdefault(name, value)
        elif k == "blocks":
            out["block_overrides"] = _blocks(value, path)
        elif k == "model_kwargs":  # timm.create_model options of the model the preset is for
            if not isinstance(value, dict) or not all(isinstance(x, str) for x in value):
                raise InputError(f"--config {path}: model_kwargs must map option names to values")
            out["model_kwargs"] = dict(value)
        elif k in names:
            if k == "lam" and value == "auto":
                value = None
            out[k] = value
        else:
            raise InputError(f"--config {path}: unknown key {key!r}; allowed: {', '.join(sorted(names | {'sparsity', 'lambda', 'blocks', 'model_kwargs'}))}")
    return out


def _blocks(value: Any, path: Path) -> dict[int, dict[str, Any]]:
    if not isinstance(value, dict):
        raise InputError(f"--config {path}: 'blocks' must map block indices to option mappings")
    res: dict[int, dict[str, Any]] = {}
    for idx, ov in value.items():
        try:
            i = int(idx)
        except (TypeError, ValueError):
            raise InputError(f"--config {path}: block key {idx!r} is not an integer index") from None
        if not isinstance(ov, dict):
            raise InputError(f"--config {path}: block {i} must map option names to values")
        clean: dict[str, Any] = {}
        for k, v in ov.items():
            kk = str(k).replace("-", "_")
            if kk == "sparsity":
                clean.update(dict.fromkeys(SPARSITIES, v))
            elif kk in BLOCK_OVERRIDABLE:
                clean[kk] = v
            else:
                raise InputError(f"--config {path}: block {i} has unknown key {k!r}; allowed: {', '.join(BLOCK_OVERRIDABLE)}")
        res[i] = clean
    return res


def parse_lambda(text: str | None) -> float | None | str:
    """'auto' -> None (automatic), a number -> float, absent -> sentinel 'unset'."""
    if text is None:
        return "unset"
    if text.strip().lower() == "auto":
        return None
    try:
        v = float(text)
    except ValueError:
        raise InputError(f"--lambda must be 'auto' or a number, got {text!r}") from None
    if not math.isfinite(v) or v < 0:
        raise InputError(f"--lambda must be 'auto' or a finite number >= 0, got {text!r}")
    return v


def build_options(config: dict[str, Any], cli: dict[str, Any]) -> PruneOptions:
    """Defaults (PruneOptions) < --config YAML (as load_prune_config read it) < explicit CLI flags."""
    merged = dict(config)
    sparsity = cli.pop("sparsity")
    if sparsity is not None:
        merged.update(dict.fromkeys(SPARSITIES, sparsity))
    for k, v in cli.items():
        if k == "lam":
            if v != "unset":
                merged[k] = v  # None here means an explicit 'auto'
        elif v is not None:
            merged[k] = v
    for name in SPARSITIES:
        v = merged.get(name)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or math.isnan(v)):
            raise InputError(f"--{name.replace('_', '-')} must be a number in [0, 1), got {v!r}")
    return PruneOptions(**merged)


# Options that only mean something for one part: given where the target does not prune that
# part, they are refused (flags) or warned about (preset keys), never silently ignored.
PART_OPTIONS = {
    "mlp": {"mlp_sparsity": "--mlp-sparsity", "ranker": "--ranker", "min_keep": "--min-keep", "round_to": "--round-to"},
    "qk": {"attn_sparsity": "--attn-sparsity", "qk_ranker": "--qk-ranker", "min_qk_dim": "--min-qk-dim",
           "qk_balanced": "--qk-fold"},
    "vo": {"vo_sparsity": "--vo-sparsity", "vo_ranker": "--vo-ranker"},
    "heads": {"head_sparsity": "--head-sparsity", "head_ranker": "--head-ranker", "q_head_sparsity": "--q-head-sparsity"},
}
# With --flops-budget the allocator chooses every width: these flags have nothing left to set.
BUDGET_REPLACES = {"sparsity": "--sparsity", "mlp_sparsity": "--mlp-sparsity", "attn_sparsity": "--attn-sparsity",
                   "vo_sparsity": "--vo-sparsity", "head_sparsity": "--head-sparsity",
                   "q_head_sparsity": "--q-head-sparsity"}


def check_options_apply(opts: PruneOptions, flags: dict[str, Any], config: dict[str, Any] | None = None,
                        config_path: Path | None = None) -> None:
    """Refuse part-specific flags (given, i.e. not None) that the final target does not prune."""
    if opts.budgeted:
        given = [flag for key, flag in BUDGET_REPLACES.items() if flags.get(key) is not None]
        if given:
            which = "--flops-budget" if opts.flops_budget is not None else "--kv-budget"
            raise InputError(f"{which} chooses every block's sparsities; drop {', '.join(given)}")
    part_name = {"mlp": "MLP", "qk": "Q/K", "vo": "V/O", "heads": "head"}
    for part, names in PART_OPTIONS.items():
        if part in opts.parts:
            continue
        given = [flag for key, flag in names.items() if flags.get(key) is not None]
        if given:
            raise InputError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to {part_name[part]} pruning, "
                             f"but the target is {opts.target}: drop {'it' if len(given) == 1 else 'them'} or change --target")
        preset = [key for key in names if key in (config or {})]
        if preset:
            log.warning("--config %s: %s do not apply to target %s", config_path, ", ".join(preset), opts.target)


# The options that choose masks; with --masks the file's own record of them is what applied.
MASK_CHOOSERS = ("mlp_sparsity", "attn_sparsity", "ranker", "qk_ranker", "round_to", "min_keep", "min_qk_dim",
                 "vo_sparsity", "head_sparsity", "vo_ranker", "head_ranker", "flops_budget", "q_head_sparsity",
                 "kv_budget")


def masks_target(masks: list[BlockMasks]) -> str:
    """The target a masks file holds: the parts it prunes in some block."""
    held = {"mlp": "mlp", "attn": "qk", "vo": "vo", "heads": "heads"}
    parts = tuple(p for p in ("mlp", "qk", "vo", "heads")
                  if any(getattr(m, k) is not None for m in masks for k, v in held.items() if v == p))
    return target_name(parts or ("mlp",))


def options_for_masks(
    opts: PruneOptions, masks: list[BlockMasks], mmeta: dict[str, Any], *,
    explicit_target: str | None, config: dict[str, Any] | None = None, config_path: Path | None = None,
) -> PruneOptions:
    """The options recorded for a --masks run: what the masks prune, and how the masks' own run chose them.

    The target is what the masks hold, so a --target (or a --config preset's target) that
    disagrees is an error rather than a record that says one thing while the checkpoint
    does another. A preset's other mask-choosing keys are superseded by the masks: said in
    a warning, since a preset is often shared between runs that rank and runs that reapply.
    """
    held = masks_target(masks)
    if explicit_target is not None and target_name(PruneOptions(target=explicit_target).parts) != held:
        raise InputError(f"--masks hold target {held} (what they prune), but --target is {explicit_target}: "
                         "drop --target or use matching masks")
    config = config or {}
    if explicit_target is None and target_name(PruneOptions(target=config.get("target", held)).parts) != held:
        raise InputError(f"--masks hold target {held} (what they prune), but --config {config_path} sets target "
                         f"{config['target']}: pass --target {held} or use matching masks")
    superseded = [k for k in (*MASK_CHOOSERS, "block_overrides") if k in config]
    if superseded:
        log.warning("--config %s: %s superseded by --masks, which fix the kept units", config_path, ", ".join(superseded))
    recorded = mmeta.get("options") or {}
    chosen = {k: recorded[k] for k in MASK_CHOOSERS if k in recorded}
    try:
        return replace(opts, target=held, **chosen)  # type: ignore[arg-type]
    except (TypeError, InputError) as e:
        raise ArtifactError(f"--masks: the options recorded in the masks file are invalid ({e})") from None


def check_plan(
    opts: PruneOptions, shapes: list[dict[str, int]], parts: list[str], masks: list[BlockMasks] | None,
) -> None:
    """What plan_masks/apply_masks would refuse, checked from shapes alone, before any expensive work."""
    nblocks = len(shapes)
    bad = [i for i in opts.block_overrides if not (isinstance(i, int) and 0 <= i < nblocks)]
    if bad:
        raise InputError(f"per-block overrides name block(s) {bad}, but the model has blocks 0..{nblocks - 1}")
    for i, shape in enumerate(shapes):
        try:
            o = opts.for_block(i)  # validates the block's overrides (sparsity range, floors)
        except TypeError as e:
            raise InputError(f"block {i} override has a value of the wrong type ({e})") from None
        if masks is not None:
            for part, kept in (("mlp", masks[i].mlp), ("attn", masks[i].attn), ("vo", masks[i].vo), ("vo", masks[i].heads)):
                if kept is not None and part not in parts:
                    raise InputError(f"--masks prune block {i}'s {part}, but the statistics have no {part} sums; "
                                     f"recalibrate with --parts {','.join(dict.fromkeys([*parts, part]))}")
            continue
        need_vo = o.active("vo") or o.active("heads")
        if need_vo and "vo" not in parts:
            missing = stats_parts_for([p for p in ("vo", "heads") if o.active(p)])
            raise InputError(f"these statistics have no V/O sums (parts {','.join(parts)}), which V/O and head pruning "
                             f"need; recalibrate with --parts {','.join(dict.fromkeys([*parts, *missing]))}")
        if o.active("mlp"):
            if "mlp" not in parts:
                raise InputError("these statistics have no MLP sums; recalibrate with --parts mlp,attn")
            if o.min_keep > shape["mlp_hidden"]:
                raise InputError(f"block {i}: --min-keep {o.min_keep} exceeds its {shape['mlp_hidden']} MLP units")
        if o.active("qk"):
            if "attn" not in parts:
                raise InputError("these statistics have no attention sums; recalibrate with --parts mlp,attn or use --target mlp")
            if o.min_qk_dim > shape["head_dim"]:
                raise InputError(f"block {i}: --min-qk-dim {o.min_qk_dim} exceeds the head dim {shape['head_dim']}")


def check_masks_for(masks_path: Path, mmeta: dict[str, Any], identity: ModelIdentity, shapes: list[dict[str, int]], what: str) -> None:
    if mmeta["model"] != identity.to_dict():
        raise ArtifactError(f"--masks {masks_path} were made for {mmeta['model']}, not the {what} {identity.to_dict()}")
    if mmeta["block_shapes"] != shapes:
        raise ArtifactError(f"--masks {masks_path} were made for a model with different block shapes than the {what}")
