"""Export a pruned model to a file that runs without corp or timm: a torch.export archive or ONNX.

The model is rebuilt from its checkpoint (load_pruned), traced once, saved atomically,
then reloaded from the temporary file and checked against the eager model before it is
renamed into place: a file under the final name always loads and matches.

What the exported file is travels with it: in ONNX `metadata_props` (key "corp", one
JSON object), and for the .pt2 archive, which has no free-form metadata, in a sidecar
`<out>.json` written after the archive.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from corp_cli import __version__
from corp_cli.artifacts import (
    FORMAT_VERSION,
    canonical_json,
    check_out_file,
    sha256_file,
    write_json_atomic,
)
from corp_cli.compact import MODEL_FILE, load_pruned, read_pruned
from corp_cli.hf import refuse_hf
from corp_cli.errors import InputError, NumericalError

log = logging.getLogger(__name__)

ExportFormat = Literal["torch-export", "onnx"]
FORMATS: tuple[str, ...] = ("torch-export", "onnx")
SUFFIX = {"torch-export": ".pt2", "onnx": ".onnx"}
ONNX_INSTALL_HINT = "pip install 'corp-cli[onnx]'"
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
# opset 18 is the oldest the dynamo exporter targets natively and is widely supported by runtimes.
ONNX_OPSET = 18
# torch.export specialises a size-1 (or 0) example dimension to a constant, so a dynamic
# batch has to be traced with at least 2 images.
MIN_DYNAMIC_TRACE_BATCH = 2
# Upper bound recorded for the symbolic batch; only bounds shape guards, allocates nothing.
MAX_DYNAMIC_BATCH = 1 << 16
# Exported vs eager: same kernels in float32, so differences are rounding-level; anything
# above this (relative to the output scale) means the export changed the computation.
VERIFY_RTOL = 1e-4
VERIFY_ATOL = 1e-5


@dataclass
class ExportResult:
    path: Path
    format: str
    dynamic_batch: bool
    input_shape: list[int | str]
    max_abs_diff: float | None  # exported vs eager on a random batch; None when not checked
    exporter: str
    metadata_path: Path | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.path),
            "format": self.format,
            "exporter": self.exporter,
            "dynamic_batch": self.dynamic_batch,
            "input_shape": self.input_shape,
            "max_abs_diff": self.max_abs_diff,
            "metadata": str(self.metadata_path) if self.metadata_path else None,
            "notes": self.notes,
        }


def onnx_available() -> bool:
    return importlib.util.find_spec("onnx") is not None


def require_onnx() -> None:
    if not onnx_available():
        raise InputError(f"--format onnx needs the onnx package, which is not installed: {ONNX_INSTALL_HINT}")


def default_out(src: Path, fmt: str) -> Path:
    """<dir>/model.pt2 (or .onnx) beside the checkpoint."""
    ckpt = src / MODEL_FILE if src.is_dir() else src
    return ckpt.with_suffix(SUFFIX[fmt])


def metadata_path_for(out: Path) -> Path:
    return out.with_name(out.name + ".json")


def input_shape_of(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) the model accepts: timm ViTs check the patch-embed size strictly."""
    pe = model.patch_embed
    h, w = (int(s) for s in pe.img_size)
    return int(pe.proj.in_channels), h, w


def export_model(
    src: str | Path,
    fmt: str,
    out: str | Path | None = None,
    *,
    batch_size: int = 1,
    dynamic_batch: bool = True,
    overwrite: bool = False,
    verify: bool = True,
) -> ExportResult:
    """Export the pruned model in `src` (a corp output dir or its model.safetensors).

    dynamic_batch=True makes the batch dimension symbolic (batch_size is then only the
    tracing example, at least 2); if the exporter cannot keep it symbolic the export is
    redone with a static batch of `batch_size` and a warning says so.
    """
    if fmt not in FORMATS:
        raise InputError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {batch_size}")
    if fmt == "onnx":
        require_onnx()
    src = Path(src)
    if not src.exists():
        raise InputError(f"{src}: no such corp output directory or checkpoint")
    out_path = Path(out) if out is not None else default_out(src, fmt)
    check_out_file(out_path, overwrite=overwrite)
    if fmt == "torch-export":
        check_out_file(metadata_path_for(out_path), overwrite=overwrite)

    _, meta = read_pruned(src)
    refuse_hf("export", src, meta.get("architecture", {}).get("family"))
    model = load_pruned(src)
    ckpt = src / MODEL_FILE if src.is_dir() else src
    c, h, w = input_shape_of(model)
    gen = torch.Generator().manual_seed(0)
    trace_batch = max(batch_size, MIN_DYNAMIC_TRACE_BATCH) if dynamic_batch else batch_size
    example = torch.randn(trace_batch, c, h, w, generator=gen)
    # A second batch of another size shows a dynamic export really is dynamic.
    check_batch = trace_batch + 1 if dynamic_batch else batch_size
    check_x = torch.randn(check_batch, c, h, w, generator=gen)
    with torch.no_grad():
        expected = model(check_x)

    info = _export_info(meta, ckpt, fmt)
    if fmt == "torch-export":
        result = _export_torch(model, example, out_path, dynamic_batch, batch_size, check_x, expected, verify, info)
    else:
        result = _export_onnx(model, example, out_path, dynamic_batch, batch_size, check_x, expected, verify, info)
    log.info("exported %s as %s (%s batch) to %s", ckpt, fmt, "dynamic" if result.dynamic_batch else "static", result.path)
    return result


def _export_info(meta: dict[str, Any], ckpt: Path, fmt: str) -> dict[str, Any]:
    """What the exported file is: the pruned architecture and its provenance, from the checkpoint."""
    keep = ("architecture", "base", "options", "preprocessing", "classes", "stats", "stock_timm", "tool_version")
    return {
        "kind": "export",
        "format_version": FORMAT_VERSION,
        "export_format": fmt,
        "corp_version": __version__,
        "torch_version": torch.__version__,
        "source": {"checkpoint": str(ckpt), "sha256": sha256_file(ckpt)},
        **{k: meta[k] for k in keep if k in meta},
    }


def _dynamic_dim() -> Any:
    return torch.export.Dim("batch", min=1, max=MAX_DYNAMIC_BATCH)


def _static_example(example: Tensor, batch_size: int) -> Tensor:
    return example[:batch_size] if example.shape[0] >= batch_size else example[:1].expand(batch_size, -1, -1, -1).contiguous()


def _fallback_note(e: BaseException, batch_size: int) -> str:
    lines = str(e).strip().splitlines()
    first = lines[0] if lines else type(e).__name__
    return (
        f"the batch dimension could not be made dynamic ({type(e).__name__}: {first}); "
        f"exported with a static batch of {batch_size} instead"
    )


def _check(name: str, got: Tensor, expected: Tensor) -> float:
    got = got.detach().float()
    if got.shape != expected.shape:
        raise NumericalError(f"exported {name} returned shape {tuple(got.shape)}, expected {tuple(expected.shape)}")
    diff = float((got - expected).abs().max())
    tol = VERIFY_ATOL + VERIFY_RTOL * float(expected.abs().max())
    if not diff <= tol:  # also catches NaN
        raise NumericalError(
            f"exported {name} disagrees with the eager model (max abs diff {diff:.3g} > {tol:.3g}); nothing was written"
        )
    return diff


@contextlib.contextmanager
def _atomic_named(final: Path) -> Iterator[Path]:
    """Like artifacts.atomic_path, but the temp file keeps the final name (in a hidden sibling dir).

    torch.export.save/load insist on a `.pt2` suffix, so a `.tmp` name will not do.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    td = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        tmp = td / final.name
        yield tmp
        os.replace(tmp, final)
    finally:
        shutil.rmtree(td, ignore_errors=True)


@contextlib.contextmanager
def _quiet_exporters() -> Iterator[None]:
    # Tracer and deprecation chatter is about the exporters' internals, not the user's model.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _export_torch(
    model: nn.Module, example: Tensor, out: Path, dynamic: bool, batch_size: int,
    check_x: Tensor, expected: Tensor, verify: bool, info: dict[str, Any],
) -> ExportResult:
    notes: list[str] = []
    ep = None
    with _quiet_exporters():
        if dynamic:
            try:
                ep = torch.export.export(model, (example,), dynamic_shapes=({0: _dynamic_dim()},))
            except Exception as e:  # exporter failures have no common base class
                note = _fallback_note(e, batch_size)
                log.warning("%s", note)
                notes.append(note)
                dynamic = False
        if ep is None:
            example = _static_example(example, batch_size)
            ep = torch.export.export(model, (example,))
    if not dynamic and check_x.shape[0] != batch_size:
        # the check batch was drawn for a dynamic export; a static program only takes batch_size
        check_x = _static_example(check_x, batch_size)
        with torch.no_grad():
            expected = model(check_x)
    diff: float | None = None
    with _atomic_named(out) as tmp:
        torch.export.save(ep, str(tmp))
        if verify:
            # reload from the bytes just written: checks the archive, not the in-memory program
            loaded = torch.export.load(str(tmp)).module()
            with torch.no_grad():
                diff = _check("program", loaded(check_x), expected)
    shape: list[int | str] = ["batch" if dynamic else batch_size, *example.shape[1:]]
    meta_path = metadata_path_for(out)
    sidecar = {
        **info,
        "file": out.name,
        "sha256": sha256_file(out),
        "exporter": f"torch.export {torch.__version__}",
        "load": "torch.export.load(path).module()(x)",
        "input": {"name": INPUT_NAME, "shape": shape, "dtype": "float32", "dynamic_batch": dynamic},
        "output": {"name": OUTPUT_NAME, "shape": ["batch" if dynamic else batch_size, int(expected.shape[-1])]},
        "verification": {"max_abs_diff": diff, "batch": int(check_x.shape[0])} if diff is not None else None,
        "notes": notes,
    }
    write_json_atomic(meta_path, sidecar)
    return ExportResult(out, "torch-export", dynamic, shape, diff, "torch.export", meta_path, notes)


def _export_onnx(
    model: nn.Module, example: Tensor, out: Path, dynamic: bool, batch_size: int,
    check_x: Tensor, expected: Tensor, verify: bool, info: dict[str, Any],
) -> ExportResult:
    import onnx

    # The dynamo exporter (torch's default since 2.9) needs onnxscript; the legacy
    # TorchScript exporter needs only onnx and still handles these models.
    use_dynamo = importlib.util.find_spec("onnxscript") is not None
    exporter = "torch.onnx dynamo" if use_dynamo else "torch.onnx legacy (TorchScript)"
    if not use_dynamo:
        log.info("onnxscript is not installed; using the legacy TorchScript ONNX exporter")
    notes: list[str] = []
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent) as td:
        raw = Path(td) / "model.onnx"
        try:
            _onnx_export(model, example, raw, dynamic, use_dynamo)
        except Exception as e:  # exporter failures have no common base class
            if not dynamic:
                raise
            note = _fallback_note(e, batch_size)
            log.warning("%s", note)
            notes.append(note)
            dynamic = False
            example = _static_example(example, batch_size)
            _onnx_export(model, example, raw, dynamic, use_dynamo)
        proto = onnx.load(str(raw))
    if not dynamic and check_x.shape[0] != batch_size:
        check_x = _static_example(check_x, batch_size)
        with torch.no_grad():
            expected = model(check_x)
    shape: list[int | str] = ["batch" if dynamic else batch_size, *example.shape[1:]]
    meta = {
        **info,
        "exporter": f"{exporter} (torch {torch.__version__})",
        "input": {"name": INPUT_NAME, "shape": shape, "dtype": "float32", "dynamic_batch": dynamic},
        "output": {"name": OUTPUT_NAME, "shape": ["batch" if dynamic else batch_size, int(expected.shape[-1])]},
        "notes": notes,
    }
    base = info.get("architecture", {}).get("base_model", "model")
    _set_metadata(proto, {"corp": canonical_json(meta), "corp.base_model": base, "corp.version": __version__})
    proto.doc_string = f"{base} pruned with corp {__version__} (CORP); see metadata_props['corp']"
    proto.producer_name = "corp-cli"
    proto.producer_version = __version__
    onnx.checker.check_model(proto)
    diff: float | None = None
    with _atomic_named(out) as tmp:
        onnx.save(proto, str(tmp))
        if verify:
            diff = _verify_onnx(tmp, check_x, expected)
    return ExportResult(out, "onnx", dynamic, shape, diff, exporter, None, notes)


def _onnx_export(model: nn.Module, example: Tensor, path: Path, dynamic: bool, use_dynamo: bool) -> None:
    kwargs: dict[str, Any] = {
        "input_names": [INPUT_NAME],
        "output_names": [OUTPUT_NAME],
        "opset_version": ONNX_OPSET,
        "dynamo": use_dynamo,
        "verbose": False,
    }
    if dynamic:
        if use_dynamo:
            kwargs["dynamic_shapes"] = ({0: _dynamic_dim()},)
        else:
            kwargs["dynamic_axes"] = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    with _quiet_exporters():
        result = torch.onnx.export(model, (example,), str(path), **kwargs)
    if use_dynamo and not path.exists() and result is not None:
        result.save(str(path))


def _set_metadata(proto: Any, entries: dict[str, str]) -> None:
    kept = [p for p in proto.metadata_props if p.key not in entries]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for k, v in entries.items():
        prop = proto.metadata_props.add()
        prop.key = k
        prop.value = v


def _verify_onnx(path: Path, check_x: Tensor, expected: Tensor) -> float | None:
    if importlib.util.find_spec("onnxruntime") is None:
        log.info("onnxruntime is not installed; the ONNX file was checked structurally but not run")
        return None
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = sess.run([OUTPUT_NAME], {INPUT_NAME: check_x.numpy()})
    return _check("ONNX model", torch.from_numpy(got), expected)
