"""The decisions every prune makes, whoever asks: `corp prune` (corp_cli.prune_job) and api.prune call these.

So the command and the Python API refuse the same combinations with the same one-line
message, choose the same default target (and say so in the same warning), and dispatch the
same way: `sequential_choice` says whether a prune is sequential and how, `check_for_model`
settles the target and refuses what the model cannot do, on its shapes alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torch import nn

from corp_cli.errors import InputError
from corp_cli.family import ModelFamily
from corp_cli.pruning import PruneOptions, check_prunable, default_target

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SequentialChoice:
    """A sequential prune's settings, checked (corp_cli.sequential)."""

    target: str
    ranking: str


def sequential_choice(sequential: bool, *, stats_given: bool, target: str | None, ranking: str | None,
                      masks_given: bool, budgeted: bool) -> SequentialChoice | None:
    """The sequential target and ranking (None: the library defaults), or None for a one-shot prune.

    Refuses what applies with --sequential only, precomputed statistics with it, and a dense
    ranking where masks or a budget already choose the units.
    """
    from corp_cli.sequential import DEFAULT_RANKING, DEFAULT_TARGET, check_dense_ranking, check_ranking, check_target

    if sequential and stats_given:
        raise InputError("--stats with --sequential: precomputed statistics come from the dense model and cannot be "
                         "sequential; drop --stats (it calibrates from --calib-data)")
    if target is not None and not sequential:
        raise InputError("--sequential-target applies with --sequential only")
    if ranking is not None and not sequential:
        raise InputError("--sequential-ranking applies with --sequential only")
    if not sequential:
        return None
    choice = SequentialChoice(check_target(target or DEFAULT_TARGET), check_ranking(ranking or DEFAULT_RANKING))
    check_dense_ranking(choice.ranking, masks=masks_given, budgeted=budgeted)
    return choice


def default_target_for(opts: PruneOptions, fam: ModelFamily, model: nn.Module) -> PruneOptions:
    """The default --target: what the model allows (said in a warning when that is less than the default)."""
    target = default_target(fam, model)
    if target == opts.target:
        return opts
    refusals = (fam.qk_refusal(model, i) for i in range(fam.num_blocks(model)))
    # a rotary model refuses nothing: its Q/K pairs are left alone unless asked for
    why = next((r for r in refusals if r is not None),
               f"{fam.name}: rotary Q/K dims are pruned (in pairs) only when --target asks for them (qk, attn, "
               "both or all)")
    log.warning("%s; pruning --target %s", why, target)
    return replace(opts, target=target)


def check_for_model(opts: PruneOptions, fam: ModelFamily, model: nn.Module, *, target_given: bool,
                    flags: dict[str, Any], config: dict[str, Any] | None = None,
                    config_path: Path | None = None) -> PruneOptions:
    """The options as they apply to this model (its shapes suffice: a meta-device model will do).

    The default target where none was given; then the part options given (`flags`, by
    PruneOptions name; None: not given) that the target does not prune are refused, and so is
    a part the family cannot prune in some block.
    """
    from corp_cli.config import check_options_apply

    if not target_given:
        opts = default_target_for(opts, fam, model)
    check_options_apply(opts, flags, config, config_path)
    check_prunable(fam, model, opts)
    return opts
