"""Calibration across processes and nodes on torch.distributed (launched by torchrun or a scheduler).

Each rank streams a disjoint slice of the samples a single process would select (positions
congruent to its rank modulo the world size), accumulates its sums, and the float64 sums
are then added across ranks with all_reduce. Rank 0 alone writes artifacts and prints.

Failures: every rank reports, after its pass, whether it succeeded; if any failed, all of
them stop with an error naming the rank and why, and nothing is written. A rank that dies
without reporting (killed) is noticed by torchrun, which stops the others; without torchrun,
the process-group timeout (CORP_DIST_TIMEOUT_S) bounds the wait.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from corp_cli.errors import EXIT_RUNTIME, CorpError, InputError

log = logging.getLogger(__name__)

TIMEOUT_ENV = "CORP_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 1800.0
# Test hooks, not features: make rank R raise (FAIL) or die with SIGKILL (KILL) after its first batch.
TEST_FAIL_ENV = "CORP_TEST_FAIL_RANK"
TEST_KILL_ENV = "CORP_TEST_KILL_RANK"


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int

    @property
    def main(self) -> bool:
        return self.rank == 0


def from_env() -> Dist | None:
    """The launcher's world (WORLD_SIZE, RANK, LOCAL_RANK), when there is more than one process."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise InputError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (set by torchrun)") from None
    if world <= 1:
        return None
    if not 0 <= rank < world:
        raise InputError(f"RANK {rank} is outside WORLD_SIZE {world}")
    return Dist(rank=rank, world=world, local_rank=local)


def start(d: Dist, device: str) -> torch.device:
    """Join the process group (NCCL on CUDA, one GPU per local rank; gloo on CPU); returns this rank's device."""
    import torch.distributed as dist

    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    dev = torch.device("cuda", d.local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout)
    log.info("rank %d of %d on %s", d.rank, d.world, dev)
    return dev


def stop() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def report(d: Dist, error: BaseException | None) -> None:
    """Every rank says how its pass went; if any rank failed, every rank raises an error naming it."""
    import torch.distributed as dist

    mine = None if error is None else f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    statuses: list[str | None] = [None] * d.world
    dist.all_gather_object(statuses, mine)
    failed = [(r, why) for r, why in enumerate(statuses) if why is not None]
    if failed:
        rank, why = failed[0]
        raise CorpError(f"rank {rank} of {d.world} failed: {why}; no statistics were written",
                        exit_code=getattr(error, "exit_code", EXIT_RUNTIME) if error is not None else EXIT_RUNTIME)


def all_sum(blocks: list[dict[str, dict[str, Tensor]]], device: torch.device) -> None:
    """Add every rank's sums in place (in a fixed order: block, part, name)."""
    import torch.distributed as dist

    for b in blocks:
        for part in sorted(b):
            for name in sorted(b[part]):
                t = b[part][name].to(device)
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
                b[part][name] = t.cpu()


def sum_ints(values: list[int], device: torch.device) -> list[int]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [int(x) for x in t.cpu()]


def test_hooks(d: Dist | None, batches_done: int) -> None:
    """The failure-injection hooks of the distributed tests (no effect unless their variables are set)."""
    if d is None or batches_done != 1:
        return
    if os.environ.get(TEST_FAIL_ENV) == str(d.rank):
        raise RuntimeError(f"corp test hook: injected failure on rank {d.rank}")
    if os.environ.get(TEST_KILL_ENV) == str(d.rank):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


class BlockSync:
    """prune --sequential across ranks: every block's sums added over the ranks before it is planned.

    Each rank holds the streams of its share of the items; the plans and the folds are computed
    from the summed statistics, so every rank prunes its copy the same way. Before each
    collective every rank says how its pass went (report), so a rank that failed stops every
    rank with one error instead of leaving them waiting in all_reduce.
    """

    def __init__(self, d: Dist, device: torch.device) -> None:
        self.d, self.device = d, device

    def report(self, error: BaseException | None) -> None:
        report(self.d, error)

    def sums(self, st: dict[str, dict[str, Tensor]]) -> None:
        all_sum([st], self.device)

    def floats(self, values: list[float]) -> list[float]:
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return [float(x) for x in t.cpu()]

    def ints(self, values: list[int]) -> list[int]:
        return sum_ints(values, self.device)

    def test_hooks(self, block: int) -> None:
        """The failure-injection hooks (test_hooks), fired in block 1 of a sequential prune: mid-run."""
        test_hooks(self.d, block)
