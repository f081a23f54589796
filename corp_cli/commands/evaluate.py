"""`corp evaluate`: top-1/top-5 on labelled data and fidelity to a reference (dense) model, for any family."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from corp_cli import defaults as D
from corp_cli.commands import common as C
from corp_cli.errors import InputError

log = logging.getLogger(__name__)

ReferenceOpt = Annotated[
    str | None,
    typer.Option("--reference", help="Reference model (a model name, folder, or a pruned DIR) for fidelity / side-by-side figures (default for a pruned Hugging Face model: the folder it was pruned from)."),
]
ReferenceCkptOpt = Annotated[
    Path | None,
    typer.Option("--reference-checkpoint", help="Local weights of --reference (needed when the model was pruned from a local checkpoint)."),
]


def load_reference(model_arg: str, desc: dict[str, Any], reference: str | None, reference_checkpoint: Path | None,
                   device: Any) -> tuple[Any, dict[str, Any]] | None:
    """The reference model, if asked for or recorded; a pruned model's base is the natural default."""
    from corp_cli.family import ModelOptions
    from corp_cli.loading import describe, findable, is_pruned_path, load_any

    base = desc.get("base") or {}
    if reference is None and reference_checkpoint is None:
        src = desc.get("source") if desc["kind"] == "pruned" else None
        if not src or not findable(str(src)):
            return None
        reference = str(src)
    if reference is None:
        if desc["kind"] != "pruned":
            raise InputError("--reference-checkpoint needs --reference MODEL")
        reference = str(base["name"])
    if reference_checkpoint is not None:
        C.existing_file(reference_checkpoint, "--reference-checkpoint")
        if not is_pruned_path(reference):
            from corp_cli.registry import resolve

            ref_fam, _ = resolve(reference)
            if "checkpoint" not in ref_fam.options:
                why = ref_fam.option_reasons.get("checkpoint", "it does not apply to this model")
                raise InputError(f"--reference-checkpoint does not apply to {ref_fam.name} models: {why}")
    elif (
        desc["kind"] == "pruned" and not is_pruned_path(reference)
        and reference.split(".", 1)[0] == base.get("name") and str(base.get("checkpoint", "")).startswith("sha256:")
        and desc.get("source") is None
    ):
        raise InputError(
            f"{model_arg} was pruned from local weights ({str(base['checkpoint'])[:23]}...); "
            "pass those dense weights with --reference-checkpoint PATH"
        )
    ref = load_any(reference, ModelOptions(checkpoint=reference_checkpoint), device)
    ref_desc = describe(ref, reference, pruned=is_pruned_path(reference))
    if desc["kind"] == "pruned" and ref_desc.get("identity") is not None:
        ref_desc["matches_base"] = ref_desc["identity"] == base
        if not ref_desc["matches_base"]:
            log.warning("the reference %s is not the model %s was pruned from (%s)", ref_desc["identity"], model_arg, base)
    return ref, ref_desc


def open_eval_source(data: str, loaded: Any, samples: int | None, seed: int, labels: bool | None) -> Any:
    """Labels when asked for; in auto mode, when the model has a classifier and the source has labels."""
    from corp_cli.sources import open_data

    classifier = loaded.family.has_classifier(loaded.model) and loaded.modality == "image"
    if labels and not classifier:
        raise InputError(f"--labels: {loaded.identity.name} has no classifier to score labels with "
                         "(it is scored on fidelity to --reference)")
    if labels and data == "synthetic":
        raise InputError("--labels: synthetic images have no labels (use --reference for fidelity)")
    if labels is None and not classifier:
        scored = ("perplexity and next-token fidelity" if loaded.family.evaluation(loaded.model) == "lm"
                  else "the fidelity of its pooled features")
        C.err.print(f"note: {loaded.identity.name} has no classifier: scoring {scored}, no labels", markup=False,
                    soft_wrap=True)
        labels = False
    kw = {"samples": samples, "seed": seed, "class_names": loaded.classes, "text_unit": loaded.family.text_unit}
    if labels is not None or data == "synthetic":
        return open_data(data, loaded.modality, labels=bool(labels), **kw)
    try:
        return open_data(data, loaded.modality, labels=True, **kw)
    except InputError as e:
        log.info("no labels in %s (%s); measuring fidelity only", data, e)
        return open_data(data, loaded.modality, labels=False, **kw)


@C.handle_errors
def evaluate_cmd(
    model: Annotated[str, typer.Argument(help="A model name / folder (with --checkpoint for timm weights) or a pruned DIR from `corp prune`.", show_default=False)],
    data: Annotated[str, typer.Option("--data", help="Images: a folder (synset class folders give labels), hf:NAME\\[:CONFIG]\\[@SPLIT] or synthetic. Text: text:pydoc@eval, text:FILE or hf:NAME.")],
    reference: ReferenceOpt = None,
    reference_checkpoint: ReferenceCkptOpt = None,
    labels: Annotated[bool | None, typer.Option("--labels/--no-labels", help="Score against labels (default: when the model has a classifier and the data has labels).")] = None,
    samples: Annotated[int | None, typer.Option("--samples", min=1, help="Evaluate on this many items (seeded subset) (default: all).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed for choosing the --samples subset.")] = D.SEED,
    checkpoint: C.CheckpointOpt = None,
    num_classes: C.NumClassesOpt = None,
    model_arg: C.ModelArgOpt = None,
    pretrained_cfg: C.PretrainedCfgOpt = None,
    mean: C.MeanOpt = None,
    std: C.StdOpt = None,
    input_size: C.InputSizeOpt = None,
    interpolation: C.InterpOpt = None,
    crop_pct: C.CropPctOpt = None,
    crop_mode: C.CropModeOpt = None,
    seq_len: C.SeqLenOpt = None,
    device: C.DeviceOpt = D.DEVICE,
    batch_size: C.BatchSizeOpt = D.EVAL_BATCH_SIZE,
    workers: C.WorkersOpt = None,
    json_out: C.JsonOpt = None,
) -> None:
    """Evaluate MODEL: top-1/top-5 with labels; agreement, KL, feature cosine and nearest-neighbour agreement against a reference; perplexity and next-token KL/agreement for causal language models."""
    from corp_cli.devices import environment, resolve_device
    from corp_cli.evaluate import evaluate, label_remap
    from corp_cli.loading import describe, is_pruned_path, load_any

    dev = resolve_device(device)
    options = C.model_options(checkpoint, num_classes, pretrained_cfg, model_arg, seq_len=seq_len, mean=mean, std=std,
                              input_size=input_size,
                              interpolation=interpolation, crop_pct=crop_pct, crop_mode=crop_mode)
    loaded = load_any(model, options, dev)
    n_workers = C.workers_for(loaded.modality, workers)
    desc = describe(loaded, model, pruned=is_pruned_path(model))
    source = open_eval_source(data, loaded, samples, seed, labels)
    ref = load_reference(model, desc, reference, reference_checkpoint, dev)
    lm = loaded.family.evaluation(loaded.model) == "lm"  # perplexity needs no labels and no reference
    if not source.labels and ref is None and not lm:
        raise InputError(f"{data} gives no labels to score {loaded.identity.name} on and no --reference was given: "
                         "nothing to score (pass --reference MODEL)")
    if ref is not None:
        if ref[0].modality != loaded.modality:
            raise InputError(f"the reference is a {ref[0].modality} model but {model} is a {loaded.modality} model")
        if (ref[0].family.evaluation(ref[0].model) == "lm") != lm:
            raise InputError(f"{model} and the reference {ref[1]['spec']} must both be causal language models, or "
                             "neither: next-token scores compare next-token predictions")
        if _fields(ref[0].preprocessing.to_dict()) != _fields(loaded.preprocessing.to_dict()):
            log.warning("the reference's own preprocessing differs; both models are fed %s's preprocessing", model)
    remap = label_remap(source, loaded.identity.num_classes, loaded.classes) if source.labels else None
    unit = C.sample_unit(loaded.preprocessing.to_dict())
    with C.progress_bar(f"evaluating {desc['name']}", loaded.preprocessing.count(source), unit=unit) as advance:
        run = evaluate(loaded, loaded.preprocessing.batches(source, batch_size, n_workers),
                       reference=ref[0] if ref else None, remap=remap, device=dev, on_batch=advance)
    if run.result["samples"] == 0:
        raise InputError(f"{data}: no item could be read")
    report = {
        "command": "evaluate",
        "model": desc,
        "reference": ref[1] if ref else None,
        "data": source.describe(),
        "synthetic": bool(getattr(source, "synthetic", False)),
        "preprocessing": loaded.preprocessing.to_dict(),
        "batch_size": batch_size,
        "environment": environment(dev),
        "results": run.result,
        "seconds": round(run.seconds, 3),
        "forward_seconds": round(run.model_seconds, 3),
        "samples_per_second": round(run.result["samples"] / max(run.seconds, 1e-9), 2),
    }
    if not C.write_json(json_out, report):
        print_report(report)


def _fields(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in ("source", "tokenizer")}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def print_report(report: dict[str, Any]) -> None:
    res = report["results"]
    # a reference column only carries numbers when there are labels to score it on
    has_ref = report["reference"] is not None and bool(res.get("reference_accuracy"))
    title = f"corp evaluate {report['model']['name']} ({report['model']['kind']}) on {report['data']['spec']}"
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("model", justify="right")
    if has_ref:
        table.add_column("reference", justify="right")
    if "perplexity" in res:
        _lm_rows(table, res, report["reference"] is not None)
    acc, ref_acc = res.get("accuracy"), res.get("reference_accuracy") or {}
    if acc:
        for k in ("top1", "top5"):
            row = [k.replace("top", "top-"), _pct(acc[k])]
            table.add_row(*row, _pct(ref_acc.get(k))) if has_ref else table.add_row(*row)
    fid = res.get("fidelity")
    if fid and "perplexity" not in res:
        extra = [""] if has_ref else []
        if "top1_agreement" in fid:
            table.add_row("top-1 agreement", _pct(fid["top1_agreement"]), *extra)
            table.add_row("KL(ref || model) mean", f"{fid['kl_mean']:.4g}", *extra)
            table.add_row("KL(ref || model) max", f"{fid['kl_max']:.4g}", *extra)
        table.add_row("feature cosine mean", f"{fid['feature_cosine_mean']:.5f}", *extra)
        table.add_row("feature cosine min", f"{fid['feature_cosine_min']:.5f}", *extra)
        if "nn_agreement" in fid:
            table.add_row("nearest-neighbour agreement", _pct(fid["nn_agreement"]), *extra)
    C.out.print(table)
    unit = C.sample_unit(report["preprocessing"])
    if "perplexity" in res:
        C.out.print(f"{report['data']['count']} {unit} in {res['samples']} windows of <= "
                    f"{report['preprocessing']['max_length']} tokens, {res['tokens']} predicted tokens, "
                    f"{report['seconds']:.1f}s ({res['tokens'] / max(report['seconds'], 1e-9):,.0f} tokens/s)")
        return
    n_lab = f", {acc['labelled']} labelled" if acc else ""
    synth = "  [SYNTHETIC images: smoke test only]" if report["synthetic"] else ""
    skipped = report["data"].get("skipped") or 0
    C.out.print(
        f"{res['samples']} {unit}{n_lab}{f', {skipped} skipped' if skipped else ''}, "
        f"{report['seconds']:.1f}s ({report['samples_per_second']:.1f} {unit}/s){synth}"
    )


def _lm_rows(table: Table, res: dict[str, Any], has_ref: bool) -> None:
    """Perplexity beside the reference's on the same tokens, then next-token fidelity to it."""
    if has_ref and "reference_perplexity" in res:
        table.add_column("reference", justify="right")
        table.add_row("perplexity", f"{res['perplexity']:.4f}", f"{res['reference_perplexity']:.4f}")
    else:
        table.add_row("perplexity", f"{res['perplexity']:.4f}")
    fid = res.get("fidelity")
    if fid:
        table.add_row("top-1 next-token agreement", _pct(fid["top1_agreement"]), "")
        table.add_row("KL(ref || model) mean / token", f"{fid['kl_mean']:.4g}", "")
        table.add_row("KL(ref || model) max", f"{fid['kl_max']:.4g}", "")
