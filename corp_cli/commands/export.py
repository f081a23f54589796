"""`corp export`: write a pruned model as a torch.export archive or ONNX that runs without corp."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from corp_cli.commands import common as C
from corp_cli.errors import InputError


@C.handle_errors
def export_cmd(
    src: Annotated[Path, typer.Argument(metavar="DIR", help="corp prune output directory (or its model.safetensors).", show_default=False)],
    fmt: Annotated[str, typer.Option("--format", help="torch-export (.pt2 archive + .json sidecar) or onnx.")] = "torch-export",
    out: Annotated[Path | None, typer.Option("--out", help="Output file (default: DIR/model.pt2 or DIR/model.onnx).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Batch size of the traced example (the fixed batch when static).")] = 1,
    dynamic_batch: Annotated[
        bool,
        typer.Option(
            "--dynamic-batch/--static-batch",
            help="Symbolic batch dimension, and sequence dimension for text encoders (falls back to static, with a "
                 "warning, if the exporter cannot). Static text exports take sequences of exactly max_length tokens.",
        ),
    ] = True,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Reload the written file and compare it with the eager model.")] = True,
    overwrite: C.OverwriteOpt = False,
    json_out: C.JsonOpt = None,
) -> None:
    """Export a pruned model so that it loads with torch (or an ONNX runtime) alone: no corp, timm or transformers.

    timm ViTs: image -> logits.
    HF text encoders (BERT, e.g. MiniLM): input_ids, attention_mask -> last_hidden_state, sentence_embedding (tokenize with DIR/tokenizer).
    HF ViT/DeiT: pixel_values -> logits (classifiers) or the CLS embedding.
    HF decoder LMs (Llama, Qwen2, Mistral): input_ids -> next-token logits at every position (no KV cache).
    """
    # Imported here so `corp --help` does not pay for torch.export / onnx imports.
    from corp_cli.export import FORMATS, export_model

    if fmt not in FORMATS:
        raise InputError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    result = export_model(
        src, fmt, out, batch_size=batch_size, dynamic_batch=dynamic_batch, overwrite=overwrite, verify=verify
    )
    if C.write_json(json_out, result.to_dict()):
        return
    shapes = "dynamic batch" if result.dynamic_batch else f"static batch {result.input_shape[0]}"
    inputs = ", ".join(f"{i['name']} {list(i['shape'])}" for i in result.inputs)
    check = f", max |diff| vs eager {result.max_abs_diff:.2g}" if result.max_abs_diff is not None else ", not run-checked"
    C.out.print(f"exported {fmt} -> {result.path} ({shapes}, input {inputs}{check})")
    if result.metadata_path is not None:
        C.out.print(f"metadata -> {result.metadata_path}")
