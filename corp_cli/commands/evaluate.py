"""`corp evaluate`: top-1/top-5 on labelled images and fidelity to a reference (dense) model."""

from __future__ import annotations

import logging
import platform
from pathlib import Path
from typing import Annotated, Any

import timm
import torch
import typer
from rich.table import Table
from torch import nn

from corp_cli import __version__
from corp_cli.artifacts import write_json_atomic
from corp_cli.commands import common as C
from corp_cli.data import ImageSource, make_batches, open_source
from corp_cli.errors import InputError
from corp_cli.evaluate import evaluate, label_remap
from corp_cli.loading import is_pruned_path, load_any, same_preprocessing
from corp_cli.models import resolve_device
from corp_cli.preprocess import Preprocessing

log = logging.getLogger(__name__)

ReferenceOpt = Annotated[
    str | None,
    typer.Option("--reference", help="Reference model (timm name, or a pruned DIR) for fidelity / side-by-side figures."),
]
ReferenceCkptOpt = Annotated[
    Path | None,
    typer.Option("--reference-checkpoint", help="Local weights of --reference (needed when the model was pruned from a local checkpoint)."),
]


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "corp_version": __version__,
        "torch_version": torch.__version__,
        "timm_version": timm.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    return env


def load_reference(
    model_arg: str, desc: dict[str, Any], reference: str | None, reference_checkpoint: Path | None, device: torch.device,
) -> tuple[nn.Module, dict[str, Any], Preprocessing] | None:
    """The reference model, if asked for; a pruned model's base is the natural default name."""
    if reference is None and reference_checkpoint is None:
        return None
    base = desc.get("base") or {}
    if reference is None:
        if desc["kind"] != "pruned":
            raise InputError("--reference-checkpoint needs --reference MODEL")
        reference = str(base["name"])
    if reference_checkpoint is not None:
        C.existing_file(reference_checkpoint, "--reference-checkpoint")
    elif (
        desc["kind"] == "pruned" and not is_pruned_path(reference)
        and reference.split(".", 1)[0] == base.get("name") and str(base.get("checkpoint", "")).startswith("sha256:")
    ):
        raise InputError(
            f"{model_arg} was pruned from local weights ({str(base['checkpoint'])[:23]}...); "
            "pass those dense weights with --reference-checkpoint PATH"
        )
    ref_model, ref_desc, ref_prep = load_any(reference, reference_checkpoint, None, device, command="evaluate")
    if desc["kind"] == "pruned" and ref_desc.get("identity") is not None and ref_desc["identity"] != base:
        log.warning("the reference %s is not the model %s was pruned from (%s)", ref_desc["identity"], model_arg, base)
        ref_desc["matches_base"] = False
    elif desc["kind"] == "pruned":
        ref_desc["matches_base"] = ref_desc.get("identity") == base
    return ref_model, ref_desc, ref_prep


def open_eval_source(
    data: str, samples: int | None, seed: int, labels: bool | None, class_names: list[str] | None
) -> ImageSource:
    """Labels when asked for; in auto mode, when the source has them (class folders, a label column)."""
    if labels and data == "synthetic":
        raise InputError("--labels: synthetic images have no labels (use --reference for fidelity)")
    if labels is not None or data == "synthetic":
        return open_source(data, samples=samples, seed=seed, labels=bool(labels), class_names=class_names)
    try:
        return open_source(data, samples=samples, seed=seed, labels=True, class_names=class_names)
    except InputError as e:
        log.info("no labels in %s (%s); measuring fidelity only", data, e)
        return open_source(data, samples=samples, seed=seed, labels=False, class_names=class_names)


@C.handle_errors
def evaluate_cmd(
    model: Annotated[str, typer.Argument(help="timm model name (with --checkpoint) or a pruned DIR from `corp prune`.", show_default=False)],
    data: Annotated[str, typer.Option("--data", help="Image folder (synset class folders give labels), hf:NAME[:CONFIG][@SPLIT], or synthetic.")],
    reference: ReferenceOpt = None,
    reference_checkpoint: ReferenceCkptOpt = None,
    labels: Annotated[bool | None, typer.Option("--labels/--no-labels", help="Score against labels (default: when the data has them).")] = None,
    samples: Annotated[int | None, typer.Option("--samples", min=1, help="Evaluate on this many images (seeded subset) (default: all).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed for choosing the --samples subset of a folder.")] = 0,
    checkpoint: C.CheckpointOpt = None,
    num_classes: C.NumClassesOpt = None,
    pretrained_cfg: C.PretrainedCfgOpt = None,
    mean: C.MeanOpt = None,
    std: C.StdOpt = None,
    input_size: C.InputSizeOpt = None,
    interpolation: C.InterpOpt = None,
    crop_pct: C.CropPctOpt = None,
    crop_mode: C.CropModeOpt = None,
    device: C.DeviceOpt = "auto",
    batch_size: C.BatchSizeOpt = 64,
    workers: C.WorkersOpt = C.DEFAULT_WORKERS,
    json_out: C.JsonOpt = None,
) -> None:
    """Evaluate MODEL: top-1/top-5 with labels; agreement, KL and feature cosine against --reference."""
    from corp_cli.hf.evaluate import hf_evaluate_cmd, is_hf_target

    if is_hf_target(model):  # HF encoders: fidelity of the pooled embeddings to the reference
        return hf_evaluate_cmd(model, data=data, reference=reference, samples=samples, seed=seed, device=device,
                               batch_size=batch_size, json_out=json_out)
    dev = resolve_device(device)
    if checkpoint is not None:
        C.existing_file(checkpoint, "checkpoint")
    overrides = C.preprocessing_overrides(mean, std, input_size, interpolation, crop_pct, crop_mode)
    net, desc, prep = load_any(model, checkpoint, num_classes, dev, pretrained_cfg=pretrained_cfg, overrides=overrides, command="evaluate")
    source = open_eval_source(data, samples, seed, labels, desc.get("classes"))
    ref = load_reference(model, desc, reference, reference_checkpoint, dev)
    if not source.labels and ref is None:
        raise InputError(f"{data} has no labels and no --reference was given: nothing to score (pass --reference MODEL)")
    if ref is not None and not same_preprocessing(prep, ref[2]):
        log.warning("the reference's own preprocessing differs; both models are fed %s's preprocessing", model)
    remap = label_remap(source, desc["num_classes"], desc.get("classes")) if source.labels else None
    total = source.num_items if source.num_items is not None else samples
    with C.progress_bar(f"evaluating {desc['name']}", total) as advance:
        run = evaluate(
            net, make_batches(source, prep.transform(), batch_size, workers), reference=ref[0] if ref else None,
            remap=remap, device=dev, on_batch=advance,
        )
    report = {
        "command": "evaluate",
        "model": desc,
        "reference": ref[1] if ref else None,
        "data": source.describe(),
        "synthetic": source.synthetic,
        "preprocessing": prep.to_dict(),
        "batch_size": batch_size,
        "environment": environment(dev),
        "results": run.result,
        "seconds": round(run.seconds, 3),
        "forward_seconds": round(run.model_seconds, 3),
        "samples_per_second": round(run.result["samples"] / max(run.seconds, 1e-9), 2),
    }
    if run.result["samples"] == 0:
        raise InputError(f"{data}: no image could be decoded")
    if not C.write_json(json_out, report):
        print_report(report)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def print_report(report: dict[str, Any]) -> None:
    res = report["results"]
    # a reference column only carries numbers when there are labels to score it on
    has_ref = report["reference"] is not None and bool(res.get("reference_accuracy"))
    table = Table(title=f"corp evaluate {report['model']['name']} ({report['model']['kind']}) on {report['data']['spec']}")
    table.add_column("metric")
    table.add_column("model", justify="right")
    if has_ref:
        table.add_column("reference", justify="right")
    acc, ref_acc = res.get("accuracy"), res.get("reference_accuracy") or {}
    if acc:
        for k in ("top1", "top5"):
            row = [k.replace("top", "top-"), _pct(acc[k])]
            table.add_row(*row, _pct(ref_acc.get(k))) if has_ref else table.add_row(*row)
    fid = res.get("fidelity")
    if fid:
        extra = [""] if has_ref else []
        table.add_row("top-1 agreement", _pct(fid["top1_agreement"]), *extra)
        table.add_row("KL(ref || model) mean", f"{fid['kl_mean']:.4g}", *extra)
        table.add_row("KL(ref || model) max", f"{fid['kl_max']:.4g}", *extra)
        table.add_row("feature cosine mean", f"{fid['feature_cosine_mean']:.5f}", *extra)
        table.add_row("feature cosine min", f"{fid['feature_cosine_min']:.5f}", *extra)
    C.out.print(table)
    n_lab = f", {acc['labelled']} labelled" if acc else ""
    synth = "  [SYNTHETIC images: smoke test only]" if report["synthetic"] else ""
    skipped = report["data"].get("skipped") or 0
    C.out.print(
        f"{res['samples']} images{n_lab}{f', {skipped} skipped' if skipped else ''}, "
        f"{report['seconds']:.1f}s ({report['samples_per_second']:.1f} images/s){synth}"
    )
