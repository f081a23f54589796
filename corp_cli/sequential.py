"""Sequential calibration: blocks pruned in order, each on the already-pruned model's activations.

Two streams of hidden states are kept at the current block's input, for every calibration
batch: the dense model's (X_d) and the pruned model's (X_p). Block l is then handled with
one pass per step over those stored activations, never a full forward (docs/method.md §10):

1. the dense block l on X_d gives the dense targets (q_d, k_d as they enter the logits, the
   residual sums s_d) and X_d for block l+1; the block on X_p gives the pruned-stream
   attention features, with their cross statistics against the dense ones: its attention
   is pruned;
2. block l (pruned attention, dense MLP) on X_p gives the hidden units h_p and the MLP's
   target: its MLP is pruned;
3. the pruned block l on X_p gives X_p for block l+1, and the error it actually left on the
   stream, E||X_p - X_d||^2, beside the predicted one (the report).

The target of every part is either the dense stream's ("dense": the output projection's
output y is fit to t = y_p + (s_d - s_p) / gamma, the logits to q_d^T k_d) or the pruned
block's own ("self": SparseGPT-style; the paper's solve on the pruned stream's moments).
The solves are the engine's; the stream is the family's (stream_start, run_block,
sublayer_hook); the masks and folds are pruning.py's, block by block.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from corp_cli import engine
from corp_cli.calibration import as_batch, is_out_of_memory
from corp_cli.errors import EXIT_RUNTIME, CorpError, InputError, UnsupportedModelError
from corp_cli.family import Batch, Loaded, ModelFamily, StreamContext
from corp_cli.pruning import BlockMasks, PruneOptions, Widths, apply_block, check_block, keep_counts, plan_block
from corp_cli.stats import finite_or_raise

log = logging.getLogger(__name__)

# dense: fit to the dense stream; self: to the block's own output on the pruned stream; blend: the
# dense fit shrunk toward the self fit, by how much chosen by 2-fold cross-validation (engine)
TARGETS = ("dense", "self", "blend")
DEFAULT_TARGET = "blend"  # what the held-out evidence favours (docs/sequential.md)
# stream: every block ranks its units on its pruned-stream statistics; dense: the units a one-shot prune
# chooses on the dense statistics, only the corrections fit sequentially (what won on ImageNet, docs/sequential.md)
RANKINGS = ("stream", "dense")
DEFAULT_RANKING = "stream"
ATTN_PARTS = ("qk", "vo", "heads")

Progress = Callable[[str, "int | None", str], AbstractContextManager[Callable[[int], None]]]


# Environment: SCRATCH_ENV=1 keeps the streams in the scratch file whatever the plan says;
# TEST_PAUSE_ENV="BLOCK:SECONDS" (tests) announces block BLOCK on stderr and sleeps, so that a
# test can interrupt a run in the middle of a block.
SCRATCH_ENV = "CORP_SEQUENTIAL_SCRATCH"
TEST_PAUSE_ENV = "CORP_TEST_SEQUENTIAL_PAUSE"


def _test_pause(i: int) -> None:
    spec = os.environ.get(TEST_PAUSE_ENV)
    if not spec:
        return
    block, _, seconds = spec.partition(":")
    if int(block) == i:
        import sys
        import time

        sys.stderr.write(f"corp test hook: pausing in sequential block {i}\n")
        sys.stderr.flush()
        time.sleep(float(seconds or 60))


def check_target(target: str) -> str:
    if target not in TARGETS:
        raise InputError(f"--sequential-target must be one of {', '.join(TARGETS)}, not {target!r}")
    return target


def check_ranking(ranking: str) -> str:
    if ranking not in RANKINGS:
        raise InputError(f"--sequential-ranking must be one of {', '.join(RANKINGS)}, not {ranking!r}")
    return ranking


def check_dense_ranking(ranking: str, *, masks: bool, budgeted: bool) -> None:
    """Dense ranking chooses the units itself, from the one-shot pass: given masks or a budget already do."""
    if ranking == "dense" and masks:
        raise InputError("--sequential-ranking dense with --masks: the masks already fix the units; drop one")
    if ranking == "dense" and budgeted:
        raise InputError("--sequential-ranking dense with a budget: a budget already allocates on the dense "
                         "statistics for the blocks not reached yet; drop one")


class _Stop(Exception):
    """Raised from a hook once everything a pass reads has been seen: the rest of the block is not needed."""


@dataclass
class _Item:
    """One calibration batch in both streams at the current block's input."""

    dense: Tensor
    pruned: Tensor
    ctx: StreamContext
    mask: Tensor | None  # the real tokens (B, N) of a text batch; None: every token
    fold: int = 0  # its cross-validation fold (blend): kept by both halves when it is split
    tail: bool = True  # the last piece of a calibration batch (an out-of-memory split): progress counts these
    s_mlp: Tensor | None = None  # the dense residual sum after the MLP, between passes 1 and 2


def _split_value(v: Any, n: int, rows: slice | Tensor) -> Any:
    """A block argument's `rows` of the batch: tensors (and tuples of them) whose first dim is the batch size.

    Anything else (a broadcast (1, ...) mask, a rotary table, a flag) is kept whole.
    """
    if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == n:
        return v[rows if isinstance(rows, slice) else rows.to(v.device)]
    if isinstance(v, tuple):
        return tuple(_split_value(x, n, rows) for x in v)
    return v


def _take(it: _Item, rows: slice | Tensor, fold: int, tail: bool) -> _Item:
    """The item's batch `rows` (a slice keeps a scratch slot's view; an index tensor copies) as an item."""
    n = int(it.dense.shape[0])
    ctx = StreamContext(args=tuple(_split_value(x, n, rows) for x in it.ctx.args),
                        kwargs={k: _split_value(v, n, rows) for k, v in it.ctx.kwargs.items()}, key=it.ctx.key)
    return _Item(dense=_split_value(it.dense, n, rows), pruned=_split_value(it.pruned, n, rows), ctx=ctx,
                 mask=_split_value(it.mask, n, rows), fold=fold, tail=tail,
                 s_mlp=_split_value(it.s_mlp, n, rows))


def _split_item(it: _Item) -> tuple[_Item, _Item]:
    """An item as two halves of its batch (after an out-of-memory failure on it)."""
    half = int(it.dense.shape[0]) // 2
    return _take(it, slice(None, half), it.fold, False), _take(it, slice(half, None), it.fold, it.tail)


def _fold_pieces(it: _Item, first: int, rank: int, world: int, batch_size: int) -> list[_Item]:
    """A rank's batch as at most two items, each of one cross-validation fold: the single process's folds.

    Rank `rank` holds the samples at global positions rank + world * l (l: its own running count, the
    batch's rows starting at `first`), and a single process puts position p in fold (p // batch_size) % 2.
    """
    n = int(it.dense.shape[0])
    folds = (rank + world * (first + torch.arange(n))) // batch_size % 2
    pieces = [(f, torch.nonzero(folds == f).flatten()) for f in (0, 1) if bool((folds == f).any())]
    if len(pieces) == 1:
        it.fold = pieces[0][0]
        return [it]
    return [_take(it, rows, f, tail=j == len(pieces) - 1) for j, (f, rows) in enumerate(pieces)]


def _each(items: list[_Item], step: Callable[[_Item], None], advance: Callable[[int], None], device: torch.device,
          i: int) -> None:
    """step(item) for every item; an item that runs out of memory is split in two (in `items`, for the
    later passes too) and its halves run, down to one sample. step must change nothing before it succeeds."""
    j = 0
    while j < len(items):
        it = items[j]
        try:
            step(it)
        except Exception as e:  # noqa: BLE001 - only allocation failures are retried, the rest re-raised
            if not is_out_of_memory(e):
                raise
            if device.type == "cuda":
                torch.cuda.empty_cache()
            n = int(it.dense.shape[0])
            if n == 1:
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
                raise CorpError(f"out of memory in sequential block {i} on a single sample ({first}); use a device "
                                "with more memory or --dtype bf16", exit_code=EXIT_RUNTIME) from None
            log.warning("out of memory in sequential block %d on a batch of %d; running it as %d + %d",
                        i, n, n // 2, n - n // 2)
            items[j:j + 1] = _split_item(it)
            continue
        if it.tail:
            advance(1)
        j += 1


def _synced(sync: Any, fn: Callable[[], None]) -> None:
    """fn(); across ranks, then every rank says how it went: a failure anywhere raises on every rank (one line)."""
    if sync is None:
        fn()
        return
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - reported to every rank, which all raise the same error
        sync.report(e)
        raise
    sync.report(None)


def _merge(st: dict[str, dict[str, Tensor]], local: dict[str, dict[str, Tensor]]) -> None:
    for part, d in local.items():
        st[part] = engine.add_stats(st.get(part), d)


@dataclass
class SequentialRun:
    """What a sequential prune produced: the masks, the per-block report, the statistics it fit to."""

    masks: list[BlockMasks]
    blocks: list[dict[str, Any]]
    stats: list[dict[str, dict[str, Tensor]]]
    samples: int
    tokens: int
    stream_bytes: int
    scratch: bool = False
    notes: list[str] = field(default_factory=list)
    allocation: dict[str, Any] | None = None  # what --flops-budget chose, block by block (_Budget.report)


class StreamStore:
    """The two streams' activations, in memory or in an unlinked memory-mapped scratch file.

    The scratch file is created and unlinked at once (tempfile.TemporaryFile), so nothing is
    left on disk whatever ends the process, SIGKILL included.
    """

    def __init__(self, scratch: bool) -> None:
        self.scratch = scratch
        self._file: Any = None
        self._offset = 0

    def put(self, old: Tensor, new: Tensor) -> Tensor:
        """`new` where `old` was: written over the scratch slot (same shape), or simply the new tensor in memory."""
        if not self.scratch:
            return new
        with torch.inference_mode(False), torch.no_grad():  # the slots are ordinary tensors (see keep)
            old.copy_(new.to(old.dtype))
        return old

    def keep(self, x: Tensor) -> Tensor:
        """A place for x: x itself in memory, or a new slot of the scratch file holding a copy of it."""
        if not self.scratch:
            return x
        import numpy as np

        if self._file is None:
            self._file = tempfile.TemporaryFile(prefix="corp-sequential-")
        x = x.detach().to("cpu").contiguous()
        nbytes = x.numel() * x.element_size()
        self._file.truncate(self._offset + nbytes)
        arr = np.memmap(self._file, dtype=np.uint8, mode="r+", offset=self._offset, shape=(nbytes,))
        # made outside inference mode, so that put() may write over them later
        with torch.inference_mode(False), torch.no_grad():
            out = torch.from_numpy(arr).view(x.dtype).reshape(x.shape)
            out.copy_(x)
        self._offset += nbytes
        return out

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _real(x: Tensor, mask: Tensor | None) -> Tensor:
    """(B, N, ...) -> the real tokens (T, ...)."""
    return x.reshape(-1, x.shape[-1]) if mask is None else x[mask]


def _real_heads(x: Tensor, mask: Tensor | None) -> Tensor:
    """(B, H, N, d) -> (1, H, T, d) over the real tokens."""
    return x if mask is None else x.transpose(1, 2)[mask].unsqueeze(0).transpose(1, 2)


def _add(acc: dict[str, dict[str, Tensor]], part: str, st: dict[str, Tensor], fold: int | None = None) -> None:
    """Add one batch's sums; with the dense target the first fold's are also kept (cv_ keys, engine.split_folds)."""
    if fold in (0, 1) and engine.has_target(st):
        st = {**st, **{engine.CV_PREFIX + k: v if fold == 0 else torch.zeros_like(v) for k, v in st.items()}}
    acc[part] = engine.add_stats(acc.get(part), st)


def prune_sequential(
    loaded: Loaded,
    batches: Iterable[Tensor | Batch],
    opts: PruneOptions,
    *,
    target: str = DEFAULT_TARGET,
    ranking: str = DEFAULT_RANKING,
    masks: list[BlockMasks] | None = None,
    product_dtype: torch.dtype = torch.float32,
    forward_dtype: torch.dtype | None = None,
    scratch: bool | None = None,
    progress: Progress | None = None,
    sync: Any = None,
    batch_size: int | None = None,
) -> SequentialRun:
    """Prune `loaded.model` in place, block by block, on the pruned stream (module docstring).

    `masks` fixes what every block keeps (their widths and units; the corrections are
    re-fit sequentially). `ranking` "dense" (no `masks`, no budget) takes the masks a one-shot prune with
    `opts` chooses on the dense statistics of a first pass, then fits as if they had been given. `scratch` keeps the streams in an unlinked memory-mapped file
    (None: in memory). `sync` (distributed.BlockSync) adds every block's sums over the ranks of a
    torch.distributed world, each rank giving its share of the samples (rank r: positions r, r + world, ...);
    the blend target then needs `batch_size`, the single process's, to give every sample its fold.
    """
    check_target(target)
    check_dense_ranking(check_ranking(ranking), masks=masks is not None, budgeted=opts.budgeted)
    dense_ranked = ranking == "dense"
    fam, model = loaded.family, loaded.model
    nblocks = fam.num_blocks(model)
    budgeted = opts.budgeted and masks is None
    prepass = budgeted or dense_ranked
    if sync is not None and target == "blend" and batch_size is None:
        raise InputError("the blend target across ranks needs the calibration batch size, for its folds")
    if masks is not None and len(masks) != nblocks:
        raise InputError(f"{len(masks)} block masks for a model with {nblocks} blocks")
    # under a budget every part of the target is gathered; the widths are chosen block by block (_Budget)
    plans = [{p: 0 for p in opts.parts} if budgeted else _block_counts(fam, model, i, opts, masks)
             for i in range(nblocks)]
    for i, counts in enumerate(plans):
        check_block(fam, model, i, opts.for_block(i), list(counts))
        for part in ("mlp", "vo") if target == "dense" else ():
            if part == "mlp" and "mlp" in counts or part == "vo" and ({"vo", "heads"} & set(counts)):
                try:
                    fam.sublayer_modules(model, i, part)
                except NotImplementedError:
                    raise UnsupportedModelError(f"{fam.name}: block {i} has no residual sum for the dense target; "
                                                "use --sequential-target self") from None
    progress = progress or (lambda _d, _t, _u: contextlib.nullcontext(lambda _n: None))
    param = next(model.parameters())
    autocast = (torch.autocast(param.device.type, dtype=forward_dtype) if forward_dtype is not None
                else contextlib.nullcontext())
    dense = copy.deepcopy(model)  # the dense reference: its blocks advance X_d and give the targets
    store = StreamStore(bool(scratch) or os.environ.get(SCRATCH_ENV) == "1")
    items: list[_Item] = []
    samples = tokens = 0
    budget: _Budget | None = None
    dense_sums: list[dict[str, dict[str, Tensor]]] = []  # the one-shot pre-pass's (a budget, or dense ranking)

    def started(x: Tensor | Batch) -> Batch:
        """One batch on the model's device, its stream start kept in both streams."""
        nonlocal samples, tokens
        b = {k: v.to(param.device, dtype=param.dtype) if v.is_floating_point() else v.to(param.device)
             for k, v in as_batch(x).items()}
        with torch.inference_mode(), autocast:
            hidden, ctx = fam.stream_start(model, b)
        m = b.get("attention_mask")
        mask = m.bool() if m is not None else None
        it = _Item(dense=hidden, pruned=hidden, ctx=ctx, mask=mask, fold=len(items) % 2)
        if sync is None or target != "blend":
            pieces = [it]
        else:
            assert batch_size is not None  # checked above
            pieces = _fold_pieces(it, samples, sync.d.rank, sync.d.world, batch_size)
        for piece in pieces:  # kept only once split: a scratch slot holds one piece
            piece.dense, piece.pruned = store.keep(piece.dense), store.keep(piece.pruned)
        items.extend(pieces)
        samples += int(hidden.shape[0])
        tokens += int(mask.sum()) if mask is not None else int(hidden.shape[0] * hidden.shape[1])
        return b

    def start() -> None:
        if prepass:
            # the cheap one-shot pass: dense statistics of every block, for the blocks not reached yet
            from corp_cli.calibration import collect_statistics
            from corp_cli.pruning import stats_parts_for

            try:
                sums = collect_statistics(dense, (started(x) for x in batches), family=fam,
                                          parts=tuple(stats_parts_for(list(opts.parts))), product_dtype=product_dtype,
                                          forward_dtype=forward_dtype)
            except ValueError:
                if items:
                    raise
                raise InputError("no calibration samples were processed") from None
            dense_sums.extend(sums.blocks)
        else:
            for x in batches:
                started(x)
        if not items:
            raise InputError("no calibration samples were processed")

    try:
        _synced(sync, start)
        if prepass and sync is not None:  # every rank chooses from the same sums, those of all the ranks' batches
            for b in dense_sums:
                sync.sums(b)
        if budgeted:
            budget = _Budget(fam, model, opts, dense_sums)
        if dense_ranked:
            from corp_cli.pruning import plan_masks
            from corp_cli.stats import Statistics

            masks = plan_masks(model, Statistics(blocks=dense_sums, meta={}), opts, family=fam)
            plans = [_block_counts(fam, model, i, opts, masks) for i in range(nblocks)]
        nbatches = sum(it.tail for it in items)  # the calibration batches; a fold's or memory's split makes pieces
        stream_bytes = 2 * sum(it.dense.numel() * it.dense.element_size() for it in items)
        out_masks: list[BlockMasks] = []
        entries: list[dict[str, Any]] = []
        all_stats: list[dict[str, dict[str, Tensor]]] = []
        for i in range(nblocks):
            o = opts.for_block(i)
            _test_pause(i)
            with progress(f"sequential: block {i + 1}/{nblocks}", 3 * nbatches, "batches") as advance:
                bm, entry, st = _block(fam, model, dense, i, items, o, plans[i], target, product_dtype, autocast,
                                       masks[i] if masks is not None else None, advance, store, sync, budget)
            out_masks.append(bm)
            entries.append(entry)
            all_stats.append({p: {k: v.cpu() for k, v in d.items()} for p, d in st.items()})
        if sync is not None:
            samples, tokens = sync.ints([samples, tokens])
            stream_bytes = sync.ints([stream_bytes])[0]
    finally:
        store.close()
    return SequentialRun(masks=out_masks, blocks=entries, stats=all_stats, samples=samples, tokens=tokens,
                         stream_bytes=stream_bytes, scratch=store.scratch,
                         allocation=budget.report(model) if budget is not None else None)


class _Budget:
    """--flops-budget, sequentially: block l's widths from an allocation over the whole model in which blocks
    0..l-1 are pinned to what they got, block l is scored on its sequential statistics and blocks l+1.. on
    the dense ones of the one-shot pass. Each allocation keeps the budget with the earlier choices fixed, and
    the previous allocation's widths for the blocks still free remain a feasible choice, so every step is
    feasible and the last one (every other part pinned) holds the budget for the whole model."""

    def __init__(self, fam: ModelFamily, model: nn.Module, opts: PruneOptions,
                 dense_stats: list[dict[str, dict[str, Tensor]]]) -> None:
        from corp_cli.flops import model_counts

        self.fam, self.opts, self.dense_stats = fam, opts, dense_stats
        counts = model_counts(model, family=fam)
        self.dense_flops, self.dense_kv = int(counts["flops"]), counts.get("kv_bytes_per_token")
        self.blocks: list[dict[str, Any]] = [{"block": i} for i in range(len(dense_stats))]

    def choose(self, model: nn.Module, i: int, st: dict[str, dict[str, Tensor]], take: list[str],
               pinned: tuple[str, ...] = ()) -> Widths:
        """Block i's kept counts of the parts in `take` (those kept whole left out), `pinned` parts of it fixed."""
        from corp_cli.allocation import allocate
        from corp_cli.stats import Statistics

        n = len(self.dense_stats)
        parts = list(self.opts.parts)
        blocks = [{} if j < i else {**self.dense_stats[j], **st} if j == i else self.dense_stats[j] for j in range(n)]
        free = [[] if j < i else [p for p in parts if p not in pinned] if j == i else parts for j in range(n)]
        a = allocate(self.fam, model, Statistics(blocks=blocks, meta={}), self.opts, free=free,
                     dense_flops=self.dense_flops, dense_kv=self.dense_kv)
        self.blocks[i].update({p: r for p, r in a.blocks[i].items() if p in take})
        return {p: w for p, w in a.widths[i].items() if p in take or (p == "q_heads" and "heads" in take)}

    def report(self, model: nn.Module) -> dict[str, Any]:
        from corp_cli.flops import model_counts, shape_flops

        counts = model_counts(model, family=self.fam)
        flops = int(counts["flops"])
        for i, b in enumerate(self.blocks):
            b["flops"] = int(shape_flops(self.fam, model, i, self.fam.shape(model, i), counts["tokens"])["total"])
        out = {"flops_budget": self.opts.flops_budget, "dense_flops": self.dense_flops, "flops": flops,
               "flops_ratio": flops / self.dense_flops, "sequential": True, "blocks": self.blocks}
        if self.dense_kv is not None and self.opts.kv_budget is not None:
            kv = int(counts["kv_bytes_per_token"])
            out.update(kv_budget=self.opts.kv_budget, dense_kv_bytes_per_token=self.dense_kv, kv_bytes_per_token=kv,
                       kv_ratio=kv / self.dense_kv)
        return out


def _block_counts(fam: ModelFamily, model: nn.Module, i: int, opts: PruneOptions,
                  masks: list[BlockMasks] | None) -> Widths:
    if masks is None:
        return keep_counts(opts.for_block(i), fam.shape(model, i))
    bm, counts = masks[i], {}
    if bm.mlp is not None:
        counts["mlp"] = int(bm.mlp.numel())
    if bm.attn is not None:
        counts["qk"] = int(bm.attn.shape[1])
    if bm.vo is not None:
        counts["vo"] = int(bm.vo.shape[1])
    if bm.heads is not None:
        counts["heads"] = int(bm.heads.numel())
    return counts


def _run(fam: ModelFamily, model: nn.Module, i: int, x: Tensor, ctx: StreamContext, hooks: list[Any],
         autocast: Any) -> Tensor | None:
    """Block i on x with `hooks` (removed after); None when a hook stopped it early (everything read was seen)."""
    try:
        with torch.inference_mode(), autocast:
            return fam.run_block(model, i, x, ctx)
    except _Stop:
        return None
    finally:
        for h in hooks:
            h.remove()


def _block(fam: ModelFamily, model: nn.Module, dense: nn.Module, i: int, items: list[_Item], o: PruneOptions,
           counts: Widths, target: str, product_dtype: torch.dtype, autocast: Any, preset: BlockMasks | None,
           advance: Callable[[int], None], store: StreamStore, sync: Any = None,
           budget: _Budget | None = None) -> tuple[BlockMasks, dict[str, Any], dict[str, dict[str, Tensor]]]:
    """Block i: the three passes of the module docstring; (its masks, its report entry, its statistics)."""
    want_dense = target in ("dense", "blend")
    folds = target == "blend"
    attn_counts = {p: v for p, v in counts.items() if p in ATTN_PARTS}
    qk = "qk" in attn_counts
    vo = bool({"vo", "heads"} & set(attn_counts))
    st: dict[str, dict[str, Tensor]] = {}
    device = next(model.parameters()).device

    # pass 1: the dense block on X_d (targets, next X_d) and, where attention is pruned, the block on X_p;
    # the item and the sums change only once both have run (an out-of-memory retry starts it again)
    def pass1(it: _Item) -> None:
        seen: dict[str, Any] = {}
        hooks: list[Any] = []
        if want_dense and qk:
            hooks += fam.qk_hook(dense, i, lambda q, k: seen.__setitem__("qk", (q.detach(), k.detach())))
        if want_dense and vo:
            hooks += fam.sublayer_hook(dense, i, "vo", lambda _y, s: seen.__setitem__("s_vo", s.detach()))
        if want_dense and "mlp" in counts:
            hooks += fam.sublayer_hook(dense, i, "mlp", lambda _y, s: seen.__setitem__("s_mlp", s.detach()))
        nd = _run(fam, dense, i, it.dense, it.ctx, hooks, autocast)
        assert nd is not None  # nothing stops the dense block early
        local: dict[str, dict[str, Tensor]] = {}
        if attn_counts:
            _attention_stats(fam, model, i, it, seen, local, qk, vo, want_dense, product_dtype, autocast,
                             it.fold if folds else None)
        it.dense = store.put(it.dense, nd)  # the old X_d is read by nothing else
        it.s_mlp = seen.get("s_mlp")
        _merge(st, local)

    def pass1_all() -> None:
        if sync is not None:
            sync.test_hooks(i)
        _each(items, pass1, advance, device, i)

    _synced(sync, pass1_all)
    if sync is not None and attn_counts:
        sync.sums(st)
    entry: dict[str, Any] = {"block": i}
    bm = BlockMasks()
    if attn_counts:
        if preset is not None:
            a = preset
        else:
            ac = attn_counts if budget is None else budget.choose(model, i, st, list(attn_counts))
            a = plan_block(fam, model, i, st, o, ac) if ac else BlockMasks()
        bm = BlockMasks(attn=a.attn, vo=a.vo, heads=a.heads)
        if a.attn is not None or a.vo is not None or a.heads is not None:
            entry.update(apply_block(fam, model, i, st, BlockMasks(attn=a.attn, vo=a.vo, heads=a.heads), o))

    # pass 2: block i with its pruned attention and dense MLP on X_p: the MLP's features and target
    if "mlp" in counts:
        def pass2(it: _Item) -> None:
            local: dict[str, dict[str, Tensor]] = {}
            _mlp_stats(fam, model, i, it, it.s_mlp, local, want_dense, product_dtype, autocast,
                       it.fold if folds else None)
            it.s_mlp = None
            _merge(st, local)

        _synced(sync, lambda: _each(items, pass2, advance, device, i))
        if sync is not None:
            sync.sums({"mlp": st["mlp"]})  # the attention's were summed before its plan
        if preset is not None:
            keep = preset.mlp
        else:
            mc = ({"mlp": counts["mlp"]} if budget is None
                  else budget.choose(model, i, st, ["mlp"], pinned=tuple(attn_counts)))
            keep = plan_block(fam, model, i, st, o, mc).mlp if mc else None
        bm.mlp = keep
        if keep is not None:
            entry.update({k: v for k, v in apply_block(fam, model, i, st, BlockMasks(mlp=keep), o).items()
                          if k != "block"})
    else:
        advance(sum(it.tail for it in items))

    # pass 3: the pruned block on X_p: the next X_p, and the error it left on the stream
    acc = {"err": 0.0, "energy": 0.0, "n": 0}

    def pass3(it: _Item) -> None:
        with torch.inference_mode(), autocast:
            np_ = fam.run_block(model, i, it.pruned, it.ctx)
        d = _real(it.dense, it.mask).double()
        p = _real(np_, it.mask).double()
        e2, en = float((p - d).square().sum()), float(d.square().sum())
        it.pruned = store.put(it.pruned, np_)
        acc["err"] += e2
        acc["energy"] += en
        acc["n"] += d.shape[0]

    _synced(sync, lambda: _each(items, pass3, advance, device, i))
    err, energy, n = acc["err"], acc["energy"], acc["n"]
    if sync is not None:
        err, energy, n = sync.floats([err, energy, float(n)])
    entry["sequential"] = {"target": target, "measured_stream_error": err / n,
                           "measured_stream_error_relative": err / energy if energy > 0 else 0.0}
    return bm, entry, st


def _attention_stats(fam: ModelFamily, model: nn.Module, i: int, it: _Item, seen: dict[str, Any],
                     st: dict[str, dict[str, Tensor]], qk: bool, vo: bool, want_dense: bool,
                     product_dtype: torch.dtype, autocast: Any, fold: int | None) -> None:
    """The block (dense still) on X_p, up to its attention's residual sum: Q/K and o statistics."""
    mask = it.mask
    pending: dict[str, Tensor] = {}
    gamma = fam.sublayer_scale(model, i, "vo") if vo and want_dense else None

    def on_qk(q: Tensor, k: Tensor) -> None:
        qp, kp = _real_heads(q.detach(), mask), _real_heads(k.detach(), mask)
        s = engine.qk_batch_stats(qp, kp, product_dtype)
        finite_or_raise(s["qk_sq"], f"block {i} attention queries/keys (pruned stream)")
        if want_dense:
            qd, kd = seen["qk"]
            s.update(engine.qk_cross_batch_stats(qp, kp, _real_heads(qd, mask), _real_heads(kd, mask), product_dtype))
        _add(st, "attn", s, fold)
        if not vo:
            raise _Stop

    def on_o(o: Tensor) -> None:
        pending["o"] = _real(o.detach(), mask)
        if not want_dense:
            s = engine.gram_batch_stats(pending["o"], product_dtype)
            finite_or_raise(s["sum"], f"block {i} attention outputs (pruned stream)")
            _add(st, "vo", s)
            raise _Stop

    def on_sum(y: Tensor, s_p: Tensor) -> None:
        o = pending.pop("o")
        t = y.detach() + (seen["s_vo"] - s_p.detach()) / (gamma if gamma is not None else 1.0)
        s = engine.gram_batch_stats(o, product_dtype)
        s.update(engine.target_batch_stats(_real(t, mask), o, product_dtype))
        finite_or_raise(s["t_sum"], f"block {i} attention output target")
        _add(st, "vo", s, fold)
        raise _Stop

    hooks: list[Any] = []
    if qk:
        hooks += fam.qk_hook(model, i, on_qk)
    if vo:
        hooks += fam.vo_hook(model, i, on_o)
        if want_dense:
            hooks += fam.sublayer_hook(model, i, "vo", on_sum)
    _run(fam, model, i, it.pruned, it.ctx, hooks, autocast)


def _mlp_stats(fam: ModelFamily, model: nn.Module, i: int, it: _Item, s_dense: Tensor | None,
               st: dict[str, dict[str, Tensor]], want_dense: bool, product_dtype: torch.dtype, autocast: Any,
               fold: int | None) -> None:
    """Block i (pruned attention, dense MLP) on X_p: the hidden units, and with the dense target its target."""
    mask = it.mask
    pending: dict[str, Tensor] = {}
    gamma = fam.sublayer_scale(model, i, "mlp") if want_dense else None

    def on_h(h: Tensor) -> None:
        hr = _real(h.detach(), mask)
        s = engine.mlp_batch_stats(hr, product_dtype)
        finite_or_raise(s["sum"], f"block {i} MLP hidden units (pruned stream)")
        if want_dense:
            pending["h"], pending["st"] = hr, s
            return
        _add(st, "mlp", s)
        raise _Stop

    def on_sum(y: Tensor, s_p: Tensor) -> None:
        assert s_dense is not None
        t = y.detach() + (s_dense - s_p.detach()) / (gamma if gamma is not None else 1.0)
        s = pending.pop("st")
        s.update(engine.target_batch_stats(_real(t, mask), pending.pop("h"), product_dtype))
        finite_or_raise(s["t_sum"], f"block {i} MLP target")
        _add(st, "mlp", s, fold)
        raise _Stop

    hooks = fam.mlp_hook(model, i, on_h)
    if want_dense:
        hooks += fam.sublayer_hook(model, i, "mlp", on_sum)
    _run(fam, model, i, it.pruned, it.ctx, hooks, autocast)


def extra_bytes(fam: ModelFamily, model: nn.Module, samples: int) -> int:
    """The extra memory of --sequential: the streams at one block's input, plus the dense reference's weights.

    X_d and X_p, and while a block is in hand the dense residual sums its MLP is fit to (one
    more stream): 3 x samples x tokens x dim, in the model's dtype.
    """
    p = next(model.parameters())
    weights = sum(q.numel() * q.element_size() for q in model.parameters())
    return 3 * samples * fam.tokens_per_item(model) * fam.shape(model, 0).dim * p.element_size() + weights
