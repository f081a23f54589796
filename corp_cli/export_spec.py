"""What an export traces, as a model family describes it: module, named inputs and outputs, symbolic dims.

Kept apart from corp_cli.export (which runs the exporters) so a family can describe its
export without the family interface depending on the export machinery.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

BATCH = "batch"
SEQUENCE = "sequence"
# Upper bound recorded for the symbolic batch; only bounds shape guards, allocates nothing.
MAX_DYNAMIC_BATCH = 1 << 16

# (batch, sequence length or None, generator) -> example inputs, in input_names order
MakeInputs = Callable[[int, int | None, torch.Generator], tuple[Tensor, ...]]


@dataclass
class ExportSpec:
    """What is traced: a module taking positional tensors and returning a tensor or a tuple of them."""

    module: nn.Module
    input_names: list[str]
    output_names: list[str]
    # per input / output: which dims are symbolic in a dynamic export, e.g. {0: "batch", 1: "sequence"}
    input_dims: list[dict[int, str]]
    output_dims: list[dict[int, str]]
    dim_bounds: dict[str, tuple[int, int]]  # symbolic dim name -> (min, max)
    make_inputs: MakeInputs
    load_hint: str
    # sequence lengths: of a static export, of the dynamic trace, and of the dynamic check
    # (a length other than the trace's, so the check proves the dimension really is symbolic);
    # all None for inputs without a sequence dimension
    static_seq: int | None = None
    trace_seq: int | None = None
    check_seq: int | None = None
    # free-form descriptions merged into each input's / output's metadata entry
    input_info: list[dict[str, Any]] = field(default_factory=list)
    output_info: list[dict[str, Any]] = field(default_factory=list)
    extra_meta: dict[str, Any] = field(default_factory=dict)

    def run(self, inputs: Sequence[Tensor]) -> tuple[Tensor, ...]:
        with torch.no_grad():
            return as_outputs(self.module(*inputs))



def as_outputs(out: Tensor | Sequence[Tensor]) -> tuple[Tensor, ...]:
    return (out,) if isinstance(out, Tensor) else tuple(out)


def image_spec(module: nn.Module, chw: tuple[int, int, int], input_name: str, output_name: str,
               description: str) -> ExportSpec:
    """One image tensor in (dynamic batch), one tensor out."""
    c, h, w = chw

    def make(batch: int, _seq: int | None, gen: torch.Generator) -> tuple[Tensor, ...]:
        return (torch.randn(batch, c, h, w, generator=gen),)

    return ExportSpec(
        module=module.eval(), input_names=[input_name], output_names=[output_name],
        input_dims=[{0: BATCH}], output_dims=[{0: BATCH}], dim_bounds={BATCH: (1, MAX_DYNAMIC_BATCH)},
        make_inputs=make, load_hint=f"torch.export.load(path).module()({input_name}) -> {output_name}",
        input_info=[{"description": "normalised images; see preprocessing"}],
        output_info=[{"description": description}],
    )
