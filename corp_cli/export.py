"""Export a pruned model to a file that runs without corp, timm or transformers: a torch.export archive or ONNX.

The model is rebuilt from its checkpoint (load_pruned), traced once, saved atomically,
then reloaded from the temporary file and checked against the eager model before it is
renamed into place: a file under the final name always loads and matches.

What is traced is described by an ExportSpec, which the model's family builds: the module
(the model itself, or a wrapper that returns plain tensors), its named inputs and
outputs, and which of their dimensions are symbolic. timm ViTs take `image` and return
`logits`; HF text encoders take `input_ids` + `attention_mask` (batch and sequence
dynamic) and return `last_hidden_state` + `sentence_embedding`; HF ViT/DeiT take
`pixel_values`.

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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from torch import Tensor

from corp_cli import __version__
from corp_cli.artifacts import (
    FORMAT_VERSION,
    canonical_json,
    check_out_file,
    sha256_file,
    write_json_atomic,
)
from corp_cli.compact import MODEL_FILE, load_pruned_loaded, read_pruned
from corp_cli.export_spec import ExportSpec, as_outputs
from corp_cli.errors import InputError, NumericalError

log = logging.getLogger(__name__)

ExportFormat = Literal["torch-export", "onnx"]
FORMATS: tuple[str, ...] = ("torch-export", "onnx")
SUFFIX = {"torch-export": ".pt2", "onnx": ".onnx"}
ONNX_INSTALL_HINT = "pip install 'corp-cli[onnx]'"
# opset 18 is the oldest the dynamo exporter targets natively and is widely supported by runtimes.
ONNX_OPSET = 18
# torch.export specialises a size-1 (or 0) example dimension to a constant, so a dynamic
# batch has to be traced with at least 2 examples.
MIN_DYNAMIC_TRACE_BATCH = 2
# Exported vs eager: same kernels in float32, so differences are rounding-level; anything
# above this (relative to the output scale) means the export changed the computation.
VERIFY_RTOL = 1e-4
VERIFY_ATOL = 1e-5

T = TypeVar("T")


@dataclass
class ExportResult:
    path: Path
    format: str
    dynamic_batch: bool
    input_shape: list[int | str]  # the first input's shape
    max_abs_diff: float | None  # exported vs eager on a random batch; None when not checked
    exporter: str
    metadata_path: Path | None = None
    notes: list[str] = field(default_factory=list)
    inputs: list[dict[str, Any]] = field(default_factory=list)  # name, shape, dtype of every input
    outputs: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.path),
            "format": self.format,
            "exporter": self.exporter,
            "dynamic_batch": self.dynamic_batch,
            "input_shape": self.input_shape,
            "inputs": self.inputs,
            "outputs": self.outputs,
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

    dynamic_batch=True makes the batch dimension symbolic (and, for text encoders, the
    sequence dimension); batch_size is then only the tracing example, at least 2. If the
    exporter cannot keep them symbolic the export is redone with a static batch of
    `batch_size` (and the model's max_length as sequence length) and a warning says so.
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
    loaded = load_pruned_loaded(src)
    ckpt = src / MODEL_FILE if src.is_dir() else src
    spec = loaded.family.export_spec(loaded, meta, ckpt.parent)
    info = _export_info(meta, ckpt, fmt, spec)
    if fmt == "torch-export":
        result = _export_torch(spec, out_path, dynamic_batch, batch_size, verify, info)
    else:
        result = _export_onnx(spec, out_path, dynamic_batch, batch_size, verify, info)
    log.info("exported %s as %s (%s shapes) to %s", ckpt, fmt, "dynamic" if result.dynamic_batch else "static", result.path)
    return result


def _export_info(meta: dict[str, Any], ckpt: Path, fmt: str, spec: ExportSpec) -> dict[str, Any]:
    """What the exported file is: the pruned architecture and its provenance, from the checkpoint."""
    keep = ("architecture", "base", "options", "preprocessing", "classes", "stats", "stock_timm", "tool_version")
    return {
        "kind": "export",
        "format_version": FORMAT_VERSION,
        "export_format": fmt,
        "corp_version": __version__,
        "torch_version": torch.__version__,
        "family": meta.get("architecture", {}).get("family"),
        "source": {"checkpoint": str(ckpt), "sha256": sha256_file(ckpt)},
        **spec.extra_meta,
        **{k: meta[k] for k in keep if k in meta},
    }


def _dynamic_dim(name: str, lo: int, hi: int) -> Any:
    return torch.export.Dim(name, min=lo, max=hi)


def _dynamic_shapes(spec: ExportSpec) -> tuple[dict[int, Any], ...]:
    # one Dim object per name, shared by every input that has it: they must agree
    dims = {name: _dynamic_dim(name, lo, hi) for name, (lo, hi) in spec.dim_bounds.items()}
    return tuple({axis: dims[name] for axis, name in d.items()} for d in spec.input_dims)


def _fallback_note(e: BaseException, spec: ExportSpec, batch_size: int) -> str:
    lines = str(e).strip().splitlines()
    first = lines[0] if lines else type(e).__name__
    if spec.static_seq is None:
        what, static = "the batch dimension", f"a static batch of {batch_size}"
    else:
        what, static = "the batch and sequence dimensions", f"a static batch of {batch_size} and sequence length {spec.static_seq}"
    return f"{what} could not be made dynamic ({type(e).__name__}: {first}); exported with {static} instead"


def _traced(
    spec: ExportSpec, dynamic: bool, batch_size: int, export: Callable[[tuple[Tensor, ...], Any], T],
) -> tuple[T, bool, tuple[Tensor, ...], list[str]]:
    """export(example, dynamic_shapes or None), retried with static shapes if the dynamic one fails.

    Returns (its result, whether it is dynamic, the example traced, notes).
    """
    notes: list[str] = []
    gen = torch.Generator().manual_seed(0)
    if dynamic:
        example = spec.make_inputs(max(batch_size, MIN_DYNAMIC_TRACE_BATCH), spec.trace_seq, gen)
        try:
            with _quiet_exporters():
                return export(example, _dynamic_shapes(spec)), True, example, notes
        except Exception as e:  # exporter failures have no common base class
            note = _fallback_note(e, spec, batch_size)
            log.warning("%s", note)
            notes.append(note)
    example = spec.make_inputs(batch_size, spec.static_seq, gen)
    with _quiet_exporters():
        return export(example, None), False, example, notes


def _check_inputs(spec: ExportSpec, dynamic: bool, example: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Inputs for the verification: other values, and in a dynamic export other sizes than the trace."""
    gen = torch.Generator().manual_seed(1)
    if dynamic:
        return spec.make_inputs(int(example[0].shape[0]) + 1, spec.check_seq, gen)
    return spec.make_inputs(int(example[0].shape[0]), spec.static_seq, gen)


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


def _check_all(what: str, spec: ExportSpec, got: Sequence[Tensor], expected: Sequence[Tensor]) -> dict[str, float]:
    if len(got) != len(expected):
        raise NumericalError(f"exported {what} returned {len(got)} outputs, expected {len(expected)}; nothing was written")
    many = len(expected) > 1
    return {
        name: _check(f"{what} ({name})" if many else what, g, e)
        for name, g, e in zip(spec.output_names, got, expected)
    }


def _verification(diffs: dict[str, float] | None, check: tuple[Tensor, ...], spec: ExportSpec) -> dict[str, Any] | None:
    if diffs is None:
        return None
    shape = {"batch": int(check[0].shape[0])}
    if spec.static_seq is not None:
        shape["sequence"] = int(check[0].shape[1])
    return {"max_abs_diff": max(diffs.values()), "per_output": diffs, **shape}


def _io_entries(
    names: list[str], dims: list[dict[int, str]], tensors: Sequence[Tensor], infos: list[dict[str, Any]], dynamic: bool,
) -> list[dict[str, Any]]:
    entries = []
    for i, (name, t) in enumerate(zip(names, tensors)):
        shape: list[int | str] = [dims[i].get(a, n) if dynamic else n for a, n in enumerate(t.shape)]
        dtype = str(t.dtype).removeprefix("torch.")
        entries.append({"name": name, "shape": shape, "dtype": dtype, **(infos[i] if i < len(infos) else {})})
    return entries


def _describe(
    spec: ExportSpec, dynamic: bool, example: tuple[Tensor, ...], expected: tuple[Tensor, ...],
) -> dict[str, Any]:
    return {
        "dynamic_batch": dynamic,
        # every symbolic dimension and the sizes it accepts; empty for a static export
        "dynamic_dims": {n: list(b) for n, b in spec.dim_bounds.items()} if dynamic else {},
        "inputs": _io_entries(spec.input_names, spec.input_dims, example, spec.input_info, dynamic),
        "outputs": _io_entries(spec.output_names, spec.output_dims, expected, spec.output_info, dynamic),
    }


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
    spec: ExportSpec, out: Path, dynamic: bool, batch_size: int, verify: bool, info: dict[str, Any],
) -> ExportResult:
    def export(example: tuple[Tensor, ...], shapes: Any) -> Any:
        return torch.export.export(spec.module, example, dynamic_shapes=shapes)

    ep, dynamic, example, notes = _traced(spec, dynamic, batch_size, export)
    check = _check_inputs(spec, dynamic, example)
    expected = spec.run(check)
    diffs: dict[str, float] | None = None
    with _atomic_named(out) as tmp:
        torch.export.save(ep, str(tmp))
        if verify:
            # reload from the bytes just written: checks the archive, not the in-memory program
            loaded = torch.export.load(str(tmp)).module()
            with torch.no_grad():
                diffs = _check_all("program", spec, as_outputs(loaded(*check)), expected)
    desc = _describe(spec, dynamic, example, expected)
    meta_path = metadata_path_for(out)
    sidecar = {
        **info,
        "file": out.name,
        "sha256": sha256_file(out),
        "exporter": f"torch.export {torch.__version__}",
        "load": spec.load_hint,
        **desc,
        "verification": _verification(diffs, check, spec),
        "notes": notes,
    }
    write_json_atomic(meta_path, sidecar)
    return _result(out, "torch-export", "torch.export", desc, diffs, meta_path, notes)


def _result(
    out: Path, fmt: str, exporter: str, desc: dict[str, Any], diffs: dict[str, float] | None,
    meta_path: Path | None, notes: list[str],
) -> ExportResult:
    inputs = [{k: e[k] for k in ("name", "shape", "dtype")} for e in desc["inputs"]]
    outputs = [{k: e[k] for k in ("name", "shape", "dtype")} for e in desc["outputs"]]
    return ExportResult(
        out, fmt, desc["dynamic_batch"], list(inputs[0]["shape"]), max(diffs.values()) if diffs else None,
        exporter, meta_path, notes, inputs, outputs,
    )


def _export_onnx(
    spec: ExportSpec, out: Path, dynamic: bool, batch_size: int, verify: bool, info: dict[str, Any],
) -> ExportResult:
    import onnx

    # The dynamo exporter (torch's default since 2.9) needs onnxscript; the legacy
    # TorchScript exporter needs only onnx and still handles timm ViTs.
    use_dynamo = importlib.util.find_spec("onnxscript") is not None
    exporter = "torch.onnx dynamo" if use_dynamo else "torch.onnx legacy (TorchScript)"
    if not use_dynamo:
        log.info("onnxscript is not installed; using the legacy TorchScript ONNX exporter")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent) as td:
        raw = Path(td) / "model.onnx"

        def export(example: tuple[Tensor, ...], shapes: Any) -> None:
            _onnx_export(spec, example, raw, shapes, use_dynamo)

        _, dynamic, example, notes = _traced(spec, dynamic, batch_size, export)
        proto = onnx.load(str(raw))
    check = _check_inputs(spec, dynamic, example)
    expected = spec.run(check)
    desc = _describe(spec, dynamic, example, expected)
    names = ", ".join(f"{n!r}: ..." for n in spec.input_names)
    meta = {
        **info,
        "exporter": f"{exporter} (torch {torch.__version__})",
        "load": f"onnxruntime.InferenceSession(path).run(None, {{{names}}}) -> [{', '.join(spec.output_names)}]",
        **desc,
        "notes": notes,
    }
    base = info.get("architecture", {}).get("base_model", "model")
    _set_metadata(proto, {"corp": canonical_json(meta), "corp.base_model": base, "corp.version": __version__})
    proto.doc_string = f"{base} pruned with corp {__version__} (CORP); see metadata_props['corp']"
    proto.producer_name = "corp-cli"
    proto.producer_version = __version__
    onnx.checker.check_model(proto)
    diffs: dict[str, float] | None = None
    with _atomic_named(out) as tmp:
        onnx.save(proto, str(tmp))
        if verify:
            diffs = _verify_onnx(tmp, spec, check, expected)
    return _result(out, "onnx", exporter, desc, diffs, None, notes)


def _onnx_export(spec: ExportSpec, example: tuple[Tensor, ...], path: Path, shapes: Any, use_dynamo: bool) -> None:
    kwargs: dict[str, Any] = {
        "input_names": spec.input_names,
        "output_names": spec.output_names,
        "opset_version": ONNX_OPSET,
        "dynamo": use_dynamo,
        "verbose": False,
    }
    if shapes is not None:
        if use_dynamo:
            kwargs["dynamic_shapes"] = shapes
        else:
            names = spec.input_names + spec.output_names
            kwargs["dynamic_axes"] = dict(zip(names, spec.input_dims + spec.output_dims))
    result = torch.onnx.export(spec.module, example, str(path), **kwargs)
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


def _verify_onnx(
    path: Path, spec: ExportSpec, check: tuple[Tensor, ...], expected: tuple[Tensor, ...],
) -> dict[str, float] | None:
    if importlib.util.find_spec("onnxruntime") is None:
        log.info("onnxruntime is not installed; the ONNX file was checked structurally but not run")
        return None
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {name: t.numpy() for name, t in zip(spec.input_names, check)}
    got = sess.run(spec.output_names, feed)
    return _check_all("ONNX model", spec, [torch.from_numpy(g) for g in got], expected)
