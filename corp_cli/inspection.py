"""What a corp artifact is: `describe(path)` for statistics, masks, a pruned checkpoint or a report.

Every artifact is self-describing (one JSON metadata record per safetensors file, report.json
beside the checkpoint); this module reads those records back and puts them in one shape:
the model and its family, the tool version and provenance, the calibration data, the widths
every block keeps, parameters and FLOPs against the dense model, the predicted error per block,
and the Python line that reloads it. `corp inspect` prints it; `--json` prints the dict as is.

A file corp did not write, or one that is truncated or inconsistent, raises ArtifactError with
exit code 1 (DAMAGED_EXIT): inspecting it is what was asked, and the answer is that it is not
a usable artifact.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from corp_cli.errors import EXIT_RUNTIME, ArtifactError, CorpError

KINDS = ("stats", "masks", "checkpoint", "report")
DAMAGED_EXIT = EXIT_RUNTIME
# the parts a block row may hold, in table order; each is (kept, width) of its unit
PARTS = ("mlp", "qk", "heads", "vo")
SCHEMA_VERSION = 1  # of the dict describe() returns (`corp inspect --json`)

MODEL_FILE = "model.safetensors"
MASKS_FILE = "masks.safetensors"
REPORT_FILE = "report.json"
STATS_FILE = "stats.safetensors"


def describe(path: str | Path) -> dict[str, Any]:
    """The description of the artifact at `path` (a file, or a `corp prune` output folder).

    Keys (always present; None where the artifact does not say): schema_version, path, kind
    (one of KINDS), summary (one line), model ({name, checkpoint, num_classes[, model_args]}),
    family, tool_version, data ({spec, fingerprint, samples, tokens, synthetic, seed} of the
    calibration, stats_fingerprint), options (the prune options), blocks (one row per block:
    {"block": i, PART: [kept, width] for the parts it has, "predicted_error": {part: error}}),
    totals ({params_before, params_after, flops_before, flops_after, params_ratio, flops_ratio}),
    reload ({"python": line, "stock": line or None, "cli": line}), files (what lies beside it).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise ArtifactError(f"{p}: no such file or folder")  # a wrong path is bad usage (exit 2), not a damaged file
    try:
        if p.is_dir():
            if not (p / MODEL_FILE).is_file():
                inside = sorted(f.name for f in p.iterdir())[:5]
                raise ArtifactError(f"{p}: not a corp prune output folder (no {MODEL_FILE}; holds {inside or 'nothing'})")
            return _checkpoint(p / MODEL_FILE)
        if not p.is_file():
            raise ArtifactError(f"{p}: not a regular file")
        kind = _sniff(p)
        return {"stats": _stats, "masks": _masks, "model": _checkpoint, "report": _report}[kind](p)
    except CorpError as e:
        raise ArtifactError(str(e), exit_code=DAMAGED_EXIT) from None
    # metadata that parses but does not have the shape corp writes (a foreign or hand-edited file)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise ArtifactError(f"{p}: invalid corp metadata ({type(e).__name__}: {_first_line(e)})",
                            exit_code=DAMAGED_EXIT) from None


def _sniff(p: Path) -> str:
    """The artifact kind from the content (not the file name): a safetensors header's corp record, or report JSON."""
    with open(p, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{":
        from safetensors import safe_open

        from corp_cli.artifacts import parse_meta

        try:
            with safe_open(str(p), framework="pt", device="cpu") as h:
                raw = h.metadata() or {}
        except Exception as e:  # noqa: BLE001 - an untrusted header may make the reader raise anything
            raise ArtifactError(f"{p}: not a readable safetensors file ({_first_line(e)}); is it truncated?") from None
        kind = parse_meta(raw, p).get("kind")
        if kind not in ("stats", "masks", "model"):
            raise ArtifactError(f"{p}: a corp safetensors file of unknown kind {kind!r}; is it from a newer corp?")
        return str(kind)
    if head.lstrip()[:1] == b"{":
        return "report"
    raise ArtifactError(f"{p}: not a corp artifact (neither a corp safetensors file nor a report.json)")


# ---------------------------------------------------------------------------------------------
# one function per kind


def _stats(p: Path) -> dict[str, Any]:
    from corp_cli.stats import Statistics, covered_blocks

    stats = Statistics.load(p)
    meta = stats.meta
    shapes = meta["block_shapes"]
    covered = covered_blocks(meta)
    blocks = [_dense_row(i, s) for i, s in enumerate(shapes) if i in covered]
    name = stats.identity.name
    shards = meta.get("shards") or {}
    n_shards = len(shards.get("indices", [])) if isinstance(shards, dict) else 0
    shard_note = f", shards {n_shards}/{shards.get('count')}" if n_shards and shards.get("count", 1) != 1 else ""
    data = _data(meta.get("data"), meta)
    out = _base(p, "stats", stats.identity.to_dict(), meta.get("tool_version"))
    out.update({
        "summary": (f"corp statistics of {name}: parts {', '.join(stats.parts)}, {data['samples']} samples "
                    f"({data['tokens']} tokens){shard_note}, blocks {len(covered)}/{len(shapes)}"),
        "data": {**data, "stats_fingerprint": stats.fingerprint()},
        "blocks": blocks,
        "parts": stats.parts,
        "reload": _reload(f"from corp_cli.stats import Statistics; stats = Statistics.load({str(p)!r})",
                          f"corp prune {name}{_ckpt_flag(stats.identity.checkpoint)} --stats {p} --out pruned/"),
    })
    out["family"] = _family_of(name)
    return out


def _masks(p: Path) -> dict[str, Any]:
    from corp_cli.masks import load_masks

    masks, meta = load_masks(p)
    shapes = meta["block_shapes"]
    alloc = meta.get("allocation") if isinstance(meta.get("allocation"), list) else None
    blocks = []
    for i, (bm, s) in enumerate(zip(masks, shapes)):
        row = _dense_row(i, s)
        if bm.mlp is not None:
            row["mlp"] = [int(bm.mlp.numel()), s["mlp_hidden"]]
        if bm.heads is not None:
            row["heads"] = [int(bm.heads.numel()), s["num_heads"]]
        if bm.attn is not None:
            row["qk"] = [int(bm.attn.shape[1]), s["head_dim"]]
        if bm.vo is not None:
            row["vo"] = [int(bm.vo.shape[1]), s["head_dim"]]
        if alloc is not None and i < len(alloc) and isinstance(alloc[i], dict):
            row["predicted_error"] = _alloc_errors(alloc[i])
        blocks.append(row)
    identity = meta["model"]
    name = identity["name"]
    out = _base(p, "masks", identity, meta.get("tool_version"))
    opts = meta["options"]
    out.update({
        "summary": f"corp masks for {name}: target {opts.get('target')}, {_kept_phrase(blocks)}",
        "data": {**_data(None, {}), "stats_fingerprint": meta["stats_fingerprint"]},
        "options": opts,
        "blocks": blocks,
        "reload": _reload(f"from corp_cli.masks import load_masks; masks, meta = load_masks({str(p)!r})",
                          f"corp prune {name}{_ckpt_flag(identity['checkpoint'])} --stats STATS --masks {p} --out pruned/"),
    })
    out["family"] = _family_of(name)
    return out


def _checkpoint(p: Path) -> dict[str, Any]:
    from corp_cli.compact import load_pruned_loaded
    from corp_cli.flops import model_counts

    folder = p.parent
    loaded = load_pruned_loaded(p)  # rebuilds it and loads the weights strictly: a damaged file fails here
    meta = _checkpoint_header(p) or {}
    fam, model = loaded.family, loaded.model
    arch = meta["architecture"]
    report = _sibling_report(folder)
    dense_shapes = _sibling_shapes(folder)
    blocks = []
    for i in range(fam.num_blocks(model)):
        s = fam.shape(model, i)
        d = dense_shapes[i] if dense_shapes is not None and i < len(dense_shapes) else None
        row: dict[str, Any] = {"block": i, "mlp": [s.mlp_hidden, d["mlp_hidden"] if d else None],
                               "qk": [s.qk_dim, s.head_dim],
                               "heads": [s.num_heads, d["num_heads"] if d else None],
                               "vo": [s.v_dim, s.head_dim]}
        blocks.append(row)
    if report is not None:
        for row, rrow in zip(blocks, report_rows(report)):
            row["predicted_error"] = rrow.get("predicted_error", {})
    after = model_counts(model, family=fam)
    before = None
    if report is not None and isinstance(report.get("totals"), dict):
        t = report["totals"]
        before = {"params": t.get("params_before"), "flops": t.get("flops_before")}
    stats = meta.get("stats") if isinstance(meta.get("stats"), dict) else {}
    out = _base(p, "checkpoint", loaded.identity.to_dict(), meta.get("tool_version"))
    out.update({
        "family": fam.name,
        "data": {**_data(stats.get("data"), stats), "stats_fingerprint": stats.get("fingerprint")},
        "options": meta.get("options"),
        "blocks": blocks,
        "totals": _totals(before, {"params": after["params"], "flops": after["flops"]}),
        "architecture": {"base_model": arch.get("base_model"), "model_kwargs": arch.get("model_kwargs")},
        "reload": _reload_lines(folder, meta),
    })
    out["summary"] = (f"corp pruned {fam.name} checkpoint of {loaded.identity.name}: {_kept_phrase(blocks)}"
                      + _ratio_phrase(out["totals"]))
    return out


def _report(p: Path) -> dict[str, Any]:
    try:
        report = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError, OSError) as e:
        raise ArtifactError(f"{p}: not a corp report (not JSON: {_first_line(e)})") from None
    return describe_report(report, p)


def describe_report(report: Any, p: Path) -> dict[str, Any]:
    """describe() of a prune report already read (`corp prune` titles its report.png with the summary)."""
    if not isinstance(report, dict) or not {"corp_version", "model", "blocks", "totals"} <= set(report):
        raise ArtifactError(f"{p}: not a corp report (a JSON file without corp_version, model, blocks and totals)")
    from corp_cli.family import ModelIdentity

    try:
        identity = ModelIdentity.from_dict(report["model"])
    except ValueError as e:
        raise ArtifactError(f"{p}: invalid corp report ({e})") from None
    blocks = report_rows(report, p)
    t = report["totals"]
    if not isinstance(t, dict):
        raise ArtifactError(f"{p}: invalid corp report (totals is not an object)")
    stats = report.get("stats") if isinstance(report.get("stats"), dict) else {}
    out = _base(p, "report", identity.to_dict(), report.get("corp_version"))
    beside = _checkpoint_header(p.parent / MODEL_FILE)
    out.update({
        "data": {**_data(stats.get("data"), stats), "stats_fingerprint": stats.get("fingerprint")},
        "options": report.get("options"),
        "blocks": blocks,
        "totals": _totals({"params": t.get("params_before"), "flops": t.get("flops_before")},
                          {"params": t.get("params_after"), "flops": t.get("flops_after")}),
        "reload": (_reload_lines(p.parent, beside) if beside is not None else
                   _reload(f"import json; report = json.load(open({str(p)!r}))", None)),
    })
    out["family"] = _family_of(identity.name)
    out["summary"] = f"corp prune report of {identity.name}: {_kept_phrase(blocks)}" + _ratio_phrase(out["totals"])
    return out


# ---------------------------------------------------------------------------------------------
# rows, shared by the kinds and by the plot


def report_rows(report: dict[str, Any], path: Path | None = None) -> list[dict[str, Any]]:
    """Block rows (see describe) from a prune report's "blocks": kept widths and the predicted error applied.

    The error of a part is the compensated one, or the uncompensated one under --no-compensation
    (the error of what was actually done); Q/K is the sum over the kept heads' logit errors.
    """
    rows = []
    try:
        for b in report["blocks"]:
            row: dict[str, Any] = {"block": int(b["block"])}
            err: dict[str, float] = {}
            mlp, attn, vo = b.get("mlp"), b.get("attn"), b.get("vo")
            if mlp:
                row["mlp"] = [int(mlp["kept"]), int(mlp["width"])]
                err["mlp"] = float(_applied(mlp, "predicted_error"))
            if attn:
                row["qk"] = [int(attn["qk_kept"]), int(attn["head_dim"])]
                err["qk"] = float(sum(_applied(attn, "predicted_logit_error")))
            if vo:
                row["heads"] = [int(vo["heads_kept"]), int(vo["num_heads"])]
                row["vo"] = [int(vo["v_kept"]), int(vo["head_dim"])]
                err["vo"] = float(_applied(vo, "predicted_error"))
            row["predicted_error"] = err
            rows.append(row)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ArtifactError(f"{path or 'report'}: invalid corp report blocks ({type(e).__name__}: {e})") from None
    return rows


def _applied(entry: dict[str, Any], key: str) -> Any:
    return entry[f"{key}_compensated" if entry.get("compensated", True) else f"{key}_uncompensated"]


def _alloc_errors(rec: dict[str, Any]) -> dict[str, float]:
    """The per-part predicted errors a FLOPs-budget allocation recorded in the masks file."""
    out = {}
    for part in PARTS:
        e = rec.get(part)
        if isinstance(e, dict):
            v = e.get("predicted_error", e.get("predicted_logit_error"))
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[part] = float(v)
    return out


def _dense_row(i: int, s: dict[str, Any]) -> dict[str, Any]:
    try:
        return {"block": i, "mlp": [int(s["mlp_hidden"])] * 2, "qk": [int(s.get("qk_dim", s["head_dim"])), int(s["head_dim"])],
                "heads": [int(s["num_heads"])] * 2, "vo": [int(s.get("v_dim", s["head_dim"])), int(s["head_dim"])]}
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"block_shapes[{i}] is malformed ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------------------------------------
# helpers


def _base(p: Path, kind: str, model: dict[str, Any], tool_version: Any) -> dict[str, Any]:
    return {"schema_version": SCHEMA_VERSION, "path": str(p), "kind": kind, "summary": "", "model": model,
            "family": None, "tool_version": tool_version if isinstance(tool_version, str) else None,
            "data": _data(None, {}), "options": None, "blocks": [], "totals": None,
            "reload": _reload(None, None), "files": _siblings(p)}


def _reload(python: str | None, cli: str | None, stock: str | None = None) -> dict[str, str | None]:
    return {"python": python, "stock": stock, "cli": cli}


def _data(data: Any, meta: dict[str, Any]) -> dict[str, Any]:
    d = data if isinstance(data, dict) else {}
    return {"spec": d.get("spec"), "fingerprint": d.get("fingerprint"), "samples": meta.get("samples"),
            "tokens": meta.get("tokens"), "synthetic": meta.get("synthetic", d.get("synthetic")),
            "seed": meta.get("seed", d.get("seed")), "stats_fingerprint": None}


def _totals(before: dict[str, Any] | None, after: dict[str, Any]) -> dict[str, Any]:
    def ratio(key: str) -> float | None:
        b, a = (before or {}).get(key), after.get(key)
        ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b))
        return a / b if ok and b else None

    return {"params_before": (before or {}).get("params"), "params_after": after.get("params"),
            "flops_before": (before or {}).get("flops"), "flops_after": after.get("flops"),
            "params_ratio": ratio("params"), "flops_ratio": ratio("flops")}


def _ratio_phrase(t: dict[str, Any] | None) -> str:
    if not t or t.get("params_ratio") is None or t.get("flops_ratio") is None:
        return ""
    return f"; {100 * t['params_ratio']:.1f}% of the dense params, {100 * t['flops_ratio']:.1f}% of its FLOPs"


def _kept_phrase(blocks: list[dict[str, Any]]) -> str:
    """'12 blocks, MLP 538/768, Q/K 45/64' (a range where blocks differ)."""
    names = {"mlp": "MLP", "qk": "Q/K", "heads": "heads", "vo": "V/O"}
    parts = []
    for part in PARTS:
        pairs = [tuple(b[part]) for b in blocks if part in b]
        if not pairs or all(k == w for k, w in pairs):
            continue
        kept = sorted({k for k, _ in pairs})
        widths = sorted({w for _, w in pairs if w is not None})
        k = str(kept[0]) if len(kept) == 1 else f"{kept[0]}-{kept[-1]}"
        w = str(widths[0]) if len(widths) == 1 else ("?" if not widths else f"{widths[0]}-{widths[-1]}")
        parts.append(f"{names[part]} {k}/{w}")
    return f"{len(blocks)} blocks, " + (", ".join(parts) if parts else "nothing pruned")


def _siblings(p: Path) -> dict[str, str]:
    folder = p.parent
    return {f: str(folder / f) for f in (MODEL_FILE, MASKS_FILE, REPORT_FILE, STATS_FILE, "report.png")
            if (folder / f).is_file()}


def _sibling_report(folder: Path) -> dict[str, Any] | None:
    """report.json beside a checkpoint, where it is a readable corp report (else the checkpoint speaks alone)."""
    f = folder / REPORT_FILE
    if not f.is_file():
        return None
    try:
        report = json.loads(f.read_text())
        report_rows(report)
    except (ValueError, OSError, CorpError):
        return None
    return report if isinstance(report, dict) else None


def _sibling_shapes(folder: Path) -> list[dict[str, Any]] | None:
    """The dense block shapes, from masks.safetensors beside a checkpoint (its header only)."""
    f = folder / MASKS_FILE
    if not f.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(f), framework="pt", device="cpu") as h:
            meta = json.loads((h.metadata() or {}).get("corp", "null"))
        shapes = meta["block_shapes"]
        return shapes if isinstance(shapes, list) and all(isinstance(s, dict) for s in shapes) else None
    except Exception:  # noqa: BLE001 - a damaged sibling only means the dense widths are not known
        return None


def _checkpoint_header(f: Path) -> dict[str, Any] | None:
    """The corp record of a model checkpoint from its header alone (no tensors read); None if it is not one."""
    from corp_cli.loading import _corp_model_meta

    return _corp_model_meta(f) if f.is_file() else None


def _reload_lines(folder: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """How to load the pruned model: with corp, and with its own library alone where the pruning allows it."""
    d = str(folder)
    python = f"from corp_cli import load_pruned; model = load_pruned({d!r})"
    stock = None
    timm_rec, hf_rec = meta.get("stock_timm"), meta.get("stock_transformers")
    if isinstance(timm_rec, dict) and isinstance(timm_rec.get("model_name"), str):
        kwargs = timm_rec.get("kwargs") if isinstance(timm_rec.get("kwargs"), dict) else {}
        # JSON turned tuples into lists; timm wants tuples for sizes (as corp's own loader converts them)
        args = "".join(f", {k}={tuple(v) if isinstance(v, list) else v!r}" for k, v in sorted(kwargs.items()))
        stock = (f"import timm; from safetensors.torch import load_file; "
                 f"model = timm.create_model({timm_rec['model_name']!r}, pretrained=False{args}); "
                 f"model.load_state_dict(load_file({str(folder / MODEL_FILE)!r}))")
    elif isinstance(hf_rec, dict):
        stock = f"import transformers; model = transformers.AutoModelForCausalLM.from_pretrained({d!r})"
    return _reload(python, f"corp evaluate {d} --data DATA", stock)


def _family_of(name: str) -> str | None:
    """The family that claims a recorded model name (names only, no weights); None where none does here."""
    from corp_cli.loading import family_of_spec

    try:
        return family_of_spec(name).name
    except Exception:  # noqa: BLE001 - a name no family here claims (a folder gone, a newer corp) is just unknown
        return None


def _ckpt_flag(checkpoint: str) -> str:
    return " --checkpoint WEIGHTS" if checkpoint.startswith("sha256:") else ""


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:160] if text else type(e).__name__
