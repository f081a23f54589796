"""Streaming calibration: one pass over the data, the family's hooks feed each block's sums to the engine.

Memory is the model plus the sums: activations are reduced batch by batch and dropped.
Only real tokens enter the sums: a batch's "attention_mask" (text) drops the padding.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from corp_cli import engine
from corp_cli.errors import EXIT_RUNTIME, CorpError, InputError
from corp_cli.family import Batch, Loaded, ModelFamily
from corp_cli.stats import Statistics, finite_or_raise, new_meta

log = logging.getLogger(__name__)

PARTS = ("mlp", "attn")  # the default; "vo" (V/O dims and heads) is gathered when asked for


@dataclass
class CalibrationSums:
    blocks: list[dict[str, dict[str, Tensor]]]
    samples: int  # images, or token sequences
    tokens: int


def as_batch(x: Tensor | Batch) -> Batch:
    """A bare tensor is a batch of images."""
    return x if isinstance(x, dict) else {"pixel_values": x}


class _StopForward(Exception):
    """Raised from the last needed block's hook: the rest of the forward computes nothing corp reads."""


def is_out_of_memory(e: BaseException) -> bool:
    """An allocation failure of the forward (CUDA or CPU allocator), as opposed to any other error."""
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def split_batch(batch: Batch) -> tuple[Batch, Batch]:
    n = int(next(iter(batch.values())).shape[0])
    half = n // 2
    return {k: v[:half] for k, v in batch.items()}, {k: v[half:] for k, v in batch.items()}


def collect_statistics(
    model: nn.Module,
    batches: Iterable[Tensor | Batch],
    *,
    family: ModelFamily | None = None,
    parts: tuple[str, ...] = PARTS,
    product_dtype: torch.dtype = torch.float32,
    on_batch: Callable[[int], None] | None = None,
    blocks: range | None = None,
    forward_dtype: torch.dtype | None = None,
) -> CalibrationSums:
    """Run the model over `batches` and accumulate every block's sufficient statistics.

    A batch is an image tensor or a dict of model inputs; with an `attention_mask` only
    the masked-in tokens are counted. product_dtype is the dtype of the per-batch Gram
    products (float32 is ~2x faster on CPU; sums are float64 either way); forward_dtype
    (bfloat16/float16) runs the forward under autocast. `blocks` restricts the statistics
    to a range of blocks (the forward stops after the last of them).

    A batch's sums are added only once its whole forward has succeeded: a batch that runs
    out of memory is discarded and run again as two halves, down to one sample.
    on_batch(n_samples) is called after each batch.
    """
    from corp_cli.registry import family_of

    fam = family or family_of(model)
    nblocks = fam.num_blocks(model)
    covered = blocks if blocks is not None else range(nblocks)
    acc: dict[int, dict[str, dict[str, Tensor] | None]] = {i: {p: None for p in parts} for i in covered}
    current: dict[tuple[int, str], dict[str, Tensor]] = {}  # the sums of the batch being run
    token_mask: list[Tensor | None] = [None]  # the current batch's real tokens, set before its forward
    # the last hook to fire in a block: the MLP, else the attention output, else the queries/keys
    last = (covered[-1], next(p for p in ("mlp", "vo", "attn") if p in parts))
    stop_early = covered[-1] < nblocks - 1

    def real_tokens(h: Tensor) -> Tensor:
        m = token_mask[0]
        return h if m is None else h[m]

    def real_heads(x: Tensor) -> Tensor:
        """(B, H, N, d) -> the real tokens of all sequences as one sequence (1, H, T, d).

        The statistics are per-token sums, so which sequence a token came from does not matter.
        """
        m = token_mask[0]
        return x if m is None else x.transpose(1, 2)[m].unsqueeze(0).transpose(1, 2)

    def add(i: int, part: str, st: dict[str, Tensor]) -> None:
        key = (i, part)
        current[key] = st if key not in current else engine.add_stats(current[key], st)
        if stop_early and (i, part) == last:
            raise _StopForward

    def on_mlp(i: int) -> Callable[[Tensor], None]:
        def emit(h: Tensor) -> None:
            st = engine.mlp_batch_stats(real_tokens(h.detach()), product_dtype)
            finite_or_raise(st["sum"], f"block {i} MLP hidden units")
            add(i, "mlp", st)
        return emit

    def on_qk(i: int) -> Callable[[Tensor, Tensor], None]:
        def emit(q: Tensor, k: Tensor) -> None:
            st = engine.qk_batch_stats(real_heads(q.detach()), real_heads(k.detach()), product_dtype)
            finite_or_raise(st["qk_sq"], f"block {i} attention queries/keys")
            add(i, "attn", st)
        return emit

    def on_vo(i: int) -> Callable[[Tensor], None]:
        def emit(o: Tensor) -> None:
            st = engine.gram_batch_stats(real_tokens(o.detach()), product_dtype)
            finite_or_raise(st["sum"], f"block {i} attention outputs")
            add(i, "vo", st)
        return emit

    param = next(model.parameters())
    autocast = (torch.autocast(param.device.type, dtype=forward_dtype) if forward_dtype is not None
                else contextlib.nullcontext())

    def run(batch: Batch) -> int:
        """One batch's forward; its sums join the totals only if all of it ran. Returns its samples."""
        n = int(next(iter(batch.values())).shape[0])
        current.clear()
        mask = batch.get("attention_mask")
        token_mask[0] = mask.bool() if mask is not None else None
        try:
            with autocast:
                fam.forward_trunk(model, batch)
        except _StopForward:
            pass
        except Exception as e:  # noqa: BLE001 - only allocation failures are retried, the rest re-raised
            current.clear()
            if not is_out_of_memory(e):
                raise
            if param.device.type == "cuda":
                torch.cuda.empty_cache()
            if n == 1:
                raise CorpError(f"out of memory on a single sample ({_first_line(e)}); a smaller --batch-size cannot "
                                "help: use a device with more memory, --dtype bf16, or fewer blocks at once (--blocks)",
                                exit_code=EXIT_RUNTIME) from None
            first, second = split_batch(batch)
            log.warning("out of memory on a batch of %d; running it as %d + %d", n, n // 2, n - n // 2)
            return run(first) + run(second)
        for (i, part), st in current.items():
            acc[i][part] = engine.add_stats(acc[i][part], st)
        current.clear()
        return n

    handles: list[Any] = []
    try:
        for i in covered:
            if "mlp" in parts:
                handles += fam.mlp_hook(model, i, on_mlp(i))
            if "attn" in parts:
                handles += fam.qk_hook(model, i, on_qk(i))
            if "vo" in parts:
                handles += fam.vo_hook(model, i, on_vo(i))
        samples = 0
        with torch.inference_mode():
            for x in batches:
                batch = {k: v.to(param.device, dtype=param.dtype) if v.is_floating_point() else v.to(param.device)
                         for k, v in as_batch(x).items()}
                n = run(batch)
                samples += n
                if on_batch is not None:
                    on_batch(n)
    finally:
        for h in handles:
            h.remove()
    if samples == 0:
        raise ValueError("no calibration samples were processed")
    out_blocks: list[dict[str, dict[str, Tensor]]] = [{} for _ in range(nblocks)]
    for i, b in acc.items():
        for p, d in b.items():
            if d is None:
                raise RuntimeError(f"block {i}: no {p} activations were observed")
            out_blocks[i][p] = {k: v.cpu() for k, v in d.items()}
    tokens = int(next(iter(out_blocks[covered[0]].values()))["count"].sum())
    return CalibrationSums(blocks=out_blocks, samples=samples, tokens=tokens)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:160] if text else type(e).__name__


def block_shapes(loaded_or_model: Loaded | nn.Module, family: ModelFamily | None = None) -> list[dict[str, int]]:
    """Per-block shapes as recorded in statistics and masks metadata."""
    if isinstance(loaded_or_model, Loaded):
        model, fam = loaded_or_model.model, loaded_or_model.family
    else:
        from corp_cli.registry import family_of

        model, fam = loaded_or_model, family or family_of(loaded_or_model)
    return [fam.shape(model, i).to_dict() for i in range(fam.num_blocks(model))]


def check_parts(loaded: Loaded, parts: tuple[str, ...]) -> None:
    """Refuse attention statistics for blocks whose Q/K (or V/O) cannot be hooked, before the pass."""
    fam, model = loaded.family, loaded.model
    for i in range(fam.num_blocks(model)):
        why = fam.qk_refusal(model, i) if "attn" in parts else None
        why = why or (fam.vo_refusal(model, i) if "vo" in parts else None)
        if why is not None:
            allowed = [p for p in parts if p == "mlp" or (p == "attn" and fam.qk_refusal(model, i) is None)
                       or (p == "vo" and fam.vo_refusal(model, i) is None)]
            raise InputError(f"{why}; calibrate with --parts {','.join(allowed) or 'mlp'}")


def calibrate(
    loaded: Loaded,
    source: Any,
    *,
    batch_size: int = 32,
    workers: int = 0,
    parts: tuple[str, ...] = PARTS,
    product_dtype: torch.dtype = torch.float32,
    on_batch: Callable[[int], None] | None = None,
    blocks: range | None = None,
    forward_dtype: torch.dtype | None = None,
) -> Statistics:
    """Stream `source` (an image or text source of the model's modality) through the model once."""
    check_parts(loaded, parts)
    prep = loaded.preprocessing
    batches = (b for b, _ in prep.batches(source, batch_size, workers))
    try:
        sums = collect_statistics(loaded.model, batches, family=loaded.family, parts=parts,
                                  product_dtype=product_dtype, on_batch=on_batch, blocks=blocks,
                                  forward_dtype=forward_dtype)
    except ValueError as e:
        if "no calibration samples" in str(e):
            what = "text could be read" if loaded.modality == "text" else "image could be decoded"
            raise InputError(f"no calibration {what} from {source.spec} ({source.skipped} skipped)") from None
        raise
    if source.skipped:
        log.warning("%d calibration image(s) could not be decoded and were skipped", source.skipped)
    meta = new_meta(
        identity=loaded.identity,
        shapes=block_shapes(loaded),
        parts=list(parts),
        preprocessing=prep.to_dict(),
        data=source.describe(),
        samples=sums.samples,
        tokens=sums.tokens,
        seed=source.seed,
        shard=source.shard,
        product_dtype=str(product_dtype).removeprefix("torch."),
        skipped_samples=source.skipped,
        blocks=blocks,
        forward_dtype=forward_dtype,
    )
    return Statistics(blocks=sums.blocks, meta=meta)
