"""Streaming calibration: one pass over the data, hooks feed each block's sums to the engine.

Memory is the model plus the sums: activations are reduced batch by batch and dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from corp_cli import engine
from corp_cli.adapters import adapter_for
from corp_cli.data import ImageSource, make_batches
from corp_cli.errors import InputError
from corp_cli.models import LoadedModel
from corp_cli.preprocess import Preprocessing
from corp_cli.stats import Statistics, finite_or_raise, new_meta

log = logging.getLogger(__name__)

PARTS = ("mlp", "attn")


@dataclass
class CalibrationSums:
    blocks: list[dict[str, dict[str, Tensor]]]
    samples: int  # images, or token sequences
    tokens: int


def collect_statistics(
    model: nn.Module,
    batches: Iterable[Tensor | dict[str, Tensor]],
    *,
    parts: tuple[str, ...] = PARTS,
    product_dtype: torch.dtype = torch.float32,
    on_batch: Callable[[int], None] | None = None,
) -> CalibrationSums:
    """Run the model over `batches` and accumulate every block's sufficient statistics.

    A batch is an image tensor, or a dict of model inputs with an `attention_mask` (text);
    for dicts only the masked-in tokens are counted.

    product_dtype is the dtype of the per-batch Gram products (float32 is ~2x faster on
    CPU; sums are float64 either way). on_batch(n_samples) is called after each batch.
    """
    ad = adapter_for(model)
    nblocks = len(ad.blocks)
    acc: list[dict[str, dict[str, Tensor] | None]] = [{p: None for p in parts} for _ in range(nblocks)]
    pending_q: dict[int, Tensor] = {}
    handles = []
    # Tokenised text comes as dict batches with an attention mask: only real tokens, never
    # padding, may enter the sums. The mask of the current batch is set before its forward.
    token_mask: list[Tensor | None] = [None]
    # Families whose q/k sites emit (B, N, H*d) say how to reach (B, H, N, d) (and drop padding).
    qk_heads = getattr(ad, "qk_heads", None)

    def real_tokens(h: Tensor) -> Tensor:
        m = token_mask[0]
        return h if m is None else h[m]

    def heads(i: int, out: Tensor) -> Tensor:
        return out if qk_heads is None else qk_heads(i, out, token_mask[0])

    def mlp_hook(i: int):
        def hook(_mod: nn.Module, args: tuple[Tensor, ...]) -> None:
            st = engine.mlp_batch_stats(real_tokens(args[0].detach()), product_dtype)
            finite_or_raise(st["sum"], f"block {i} MLP hidden units")
            acc[i]["mlp"] = engine.add_stats(acc[i]["mlp"], st)
        return hook

    def q_hook(i: int):
        def hook(_mod: nn.Module, _args: tuple[Tensor, ...], out: Tensor) -> None:
            pending_q[i] = heads(i, out.detach())
        return hook

    def k_hook(i: int):
        def hook(_mod: nn.Module, _args: tuple[Tensor, ...], out: Tensor) -> None:
            st = engine.qk_batch_stats(pending_q.pop(i), heads(i, out.detach()), product_dtype)
            finite_or_raise(st["qk_sq"], f"block {i} attention queries/keys")
            acc[i]["attn"] = engine.add_stats(acc[i]["attn"], st)
        return hook

    for i in range(nblocks):
        if "mlp" in parts:
            handles.append(ad.mlp_hidden_site(i).register_forward_pre_hook(mlp_hook(i)))
        if "attn" in parts:
            q_site, k_site = ad.qk_sites(i)
            handles.append(q_site.register_forward_hook(q_hook(i)))
            handles.append(k_site.register_forward_hook(k_hook(i)))
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    samples = 0
    tokens = 0
    try:
        with torch.inference_mode():
            for x in batches:
                if isinstance(x, dict):  # model inputs (token ids + attention mask): run the encoder trunk
                    x = {k: v.to(device) for k, v in x.items()}
                    token_mask[0] = x["attention_mask"].bool()
                    ad.forward_trunk(x)
                    samples += int(token_mask[0].shape[0])
                    if on_batch is not None:
                        on_batch(int(token_mask[0].shape[0]))
                    continue
                x = x.to(device=device, dtype=dtype)
                if hasattr(ad, "forward_trunk"):
                    ad.forward_trunk(x)
                else:
                    model.forward_features(x)  # the classifier head is not pruned; skip it
                samples += x.shape[0]
                if on_batch is not None:
                    on_batch(x.shape[0])
    finally:
        for h in handles:
            h.remove()
    if samples == 0:
        raise ValueError("no calibration samples were processed")
    blocks: list[dict[str, dict[str, Tensor]]] = []
    for i, b in enumerate(acc):
        out: dict[str, dict[str, Tensor]] = {}
        for p, d in b.items():
            if d is None:
                raise RuntimeError(f"block {i}: no {p} activations were observed")
            out[p] = {k: v.cpu() for k, v in d.items()}
        blocks.append(out)
    first = blocks[0]
    tokens = int(next(iter(first.values()))["count"].sum())
    return CalibrationSums(blocks=blocks, samples=samples, tokens=tokens)


def block_shapes(model: nn.Module) -> list[dict[str, int]]:
    """Per-block shapes as recorded in statistics and masks metadata."""
    ad = adapter_for(model)
    return [ad.shape(i).to_dict() for i in range(len(ad.blocks))]


def calibrate(
    loaded: LoadedModel,
    preprocessing: Preprocessing,
    source: ImageSource,
    *,
    batch_size: int = 32,
    workers: int = 0,
    parts: tuple[str, ...] = PARTS,
    product_dtype: torch.dtype = torch.float32,
    on_batch: Callable[[int], None] | None = None,
) -> Statistics:
    """Stream `source` through the model once; return statistics with full provenance."""
    batches = (x for x, _ in make_batches(source, preprocessing.transform(), batch_size, workers))
    try:
        sums = collect_statistics(loaded.model, batches, parts=parts, product_dtype=product_dtype, on_batch=on_batch)
    except ValueError as e:
        if "no calibration samples" in str(e):
            raise InputError(
                f"no calibration image could be decoded from {source.spec} ({source.skipped} skipped)"
            ) from None
        raise
    if source.skipped:
        log.warning("%d calibration image(s) could not be decoded and were skipped", source.skipped)
    meta = new_meta(
        identity=loaded.identity,
        shapes=block_shapes(loaded.model),
        parts=list(parts),
        preprocessing=preprocessing.to_dict(),
        data=source.describe(),
        samples=sums.samples,
        tokens=sums.tokens,
        seed=source.seed,
        shard=source.shard,
        product_dtype=str(product_dtype).removeprefix("torch."),
        skipped_samples=source.skipped,
    )
    return Statistics(blocks=sums.blocks, meta=meta)
