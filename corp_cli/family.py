"""The model-family interface: everything corp asks of an architecture, and nothing more.

A family (one file under corp_cli/families/) claims the model specs it understands,
loads the dense model and its preprocessing, exposes each block's MLP and attention
(where the hidden units h, the queries/keys and the attention output o are read, which
weights rank them, how narrower modules are installed), describes and rebuilds its
architecture for the checkpoint, counts the FLOPs outside the blocks (and inside them
where its pruned layout is not the plain one), and says how it is exported and evaluated. Shared code calls these methods and never asks which family it holds; core
modules never import a family: corp_cli.registry loads them by module name.

The math is not here: every family feeds the same engine functions (one MLP solve path,
used for the attention output too, one Q/K solve path). A family only moves tensors
between its modules and the engine.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from corp_cli.errors import UnsupportedModelError

if TYPE_CHECKING:
    from corp_cli.export_spec import ExportSpec

# One batch of model inputs by name: {"pixel_values": x} for images, {"input_ids",
# "attention_mask", ...} for text. An "attention_mask" marks the real tokens: only those
# enter the statistics.
Batch = dict[str, Tensor]
Hook = torch.utils.hooks.RemovableHandle


@dataclass(frozen=True)
class BlockShape:
    """The widths of one block: what statistics and masks are shaped by."""

    dim: int
    mlp_hidden: int
    num_heads: int
    head_dim: int  # the dense per-head width (Q/K statistics and masks are shaped by it)
    qk_dim: int  # kept Q/K dims per head (== head_dim when unpruned)
    v_dim: int = 0  # kept value / output dims per head; 0 means head_dim (unpruned)
    # key/value heads under grouped-query attention; None: one per query head (recorded only when set)
    kv_heads: int | None = None

    def __post_init__(self) -> None:
        if self.v_dim == 0:
            object.__setattr__(self, "v_dim", self.head_dim)

    def to_dict(self) -> dict[str, int]:
        d = {"dim": self.dim, "mlp_hidden": self.mlp_hidden, "num_heads": self.num_heads,
             "head_dim": self.head_dim, "qk_dim": self.qk_dim}
        if self.v_dim != self.head_dim:  # only then: records of models without V/O pruning stay as they were
            d["v_dim"] = self.v_dim
        if self.kv_heads is not None:
            d["kv_heads"] = self.kv_heads
        return d


@dataclass(frozen=True)
class ModelIdentity:
    """What statistics and masks must match: the architecture, its options, its weights, its head."""

    name: str
    checkpoint: str  # "sha256:<hex>" of local weights, or "timm-pretrained:<name>.<tag>"
    num_classes: int
    # constructor options beyond the defaults (e.g. img_size): a model built otherwise is another model
    model_args: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "checkpoint": self.checkpoint, "num_classes": self.num_classes}
        if self.model_args:  # only when set, so records of default-built models keep their bytes
            d["model_args"] = dict(self.model_args)
        return d

    def describe(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in sorted(self.model_args.items()))
        return f"{self.name} ({self.checkpoint}, {self.num_classes} classes{', ' + args if args else ''})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ModelIdentity) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash((self.name, self.checkpoint, self.num_classes))

    @staticmethod
    def from_dict(d: Any) -> ModelIdentity:
        """From artifact metadata, which may be foreign: anything malformed is a ValueError."""
        if not isinstance(d, dict):
            raise ValueError(f"model record must be an object, got {type(d).__name__}")
        name, ckpt, ncls = d.get("name"), d.get("checkpoint"), d.get("num_classes")
        if not isinstance(name, str) or not name or not isinstance(ckpt, str) or not ckpt:
            raise ValueError("model record needs non-empty 'name' and 'checkpoint' strings")
        if isinstance(ncls, bool) or not isinstance(ncls, int) or ncls < 0:
            raise ValueError(f"model record has num_classes {ncls!r}, expected an integer >= 0")
        args = d.get("model_args", {})
        if not isinstance(args, dict):
            raise ValueError(f"model record has model_args {args!r}, expected an object")
        return ModelIdentity(name=name, checkpoint=ckpt, num_classes=ncls, model_args=args)


# The model options a command may be given, by the name families declare support with,
# and the flag that sets each (for the one-line refusal).
OPTION_FLAGS: dict[str, str] = {
    "checkpoint": "--checkpoint",
    "num_classes": "--num-classes",
    "pretrained_cfg": "--pretrained-cfg",
    "preprocessing": "--mean/--std/--input-size/--interpolation/--crop-pct/--crop-mode",
    "model_args": "--model-arg",
    "seq_len": "--seq-len",
}
# Why an option does not apply, where a family gives no reason of its own.
OPTION_REASONS: dict[str, str] = {
    "seq_len": "it sets the token windows of a causal language model (calibration and evaluation text is cut into "
               "windows of that many tokens)",
}


@dataclass(frozen=True)
class ModelOptions:
    """What the user said about the dense model besides its name; None/empty means not given."""

    checkpoint: Path | None = None
    num_classes: int | None = None
    pretrained_cfg: Path | None = None
    preprocessing: Mapping[str, Any] = field(default_factory=dict)  # image preprocessing overrides
    model_args: Mapping[str, Any] = field(default_factory=dict)  # constructor options (timm kwargs)
    seq_len: int | None = None  # a causal LM's token window length

    def given(self) -> list[str]:
        """The option names that were set, in OPTION_FLAGS order."""
        values = {"checkpoint": self.checkpoint, "num_classes": self.num_classes,
                  "pretrained_cfg": self.pretrained_cfg,
                  "preprocessing": {k: v for k, v in self.preprocessing.items() if v is not None},
                  "model_args": self.model_args, "seq_len": self.seq_len}
        return [k for k in OPTION_FLAGS if values[k] not in (None, {}, [])]

    def flags(self, name: str) -> str:
        """The flag(s) the user actually typed for option `name`."""
        if name == "preprocessing":
            set_ = [k for k, v in self.preprocessing.items() if v is not None]
            return "/".join(f"--{k.replace('_', '-')}" for k in set_) or OPTION_FLAGS[name]
        return OPTION_FLAGS[name]


@dataclass
class Loaded:
    """A dense (or pruned) model in eval mode, with what the rest of corp needs to know about it."""

    model: nn.Module
    family: ModelFamily
    identity: ModelIdentity
    preprocessing: Any  # preprocess.Preprocessing (images) or text.TextPreprocessing
    checkpoint_meta: dict[str, str] = field(default_factory=dict)
    classes: list[str] | None = None
    # constructor options a rebuild needs besides the architecture name (timm create kwargs)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    # where the model was read from (a folder, for tokenizer files and as a default reference)
    source_dir: Path | None = None

    @property
    def modality(self) -> str:
        return self.preprocessing.kind


@dataclass
class Outputs:
    """What evaluation compares: classifier logits (None for a backbone) and the pooled feature."""

    logits: Tensor | None
    features: Tensor


@dataclass(frozen=True)
class MlpWeights:
    """One block's MLP as the ranker and the solve see it.

    `inputs` are the weights whose rows are the hidden units (fc1; gate and up for a gated
    MLP); `out_weight` (out, D) / `out_bias` is the projection the hidden units feed (fc2).
    """

    inputs: list[Tensor]
    out_weight: Tensor
    out_bias: Tensor | None


@dataclass(frozen=True)
class AttentionCut:
    """What block i's attention keeps, with the corrections folded in (see ModelFamily.install_attention).

    Rows of `qk_keep`, `qk_m` and `v_keep` are the kept heads, in `heads` order (under
    grouped-query attention `qk_keep`/`v_keep` rows are the kept kv heads, see `kv_heads`). Per-head
    widths are equal inside the block, so the result is a regular narrower attention.
    """

    heads: Tensor  # (Hk,) kept heads, ascending
    qk_keep: Tensor | None  # (Hk, ds) kept Q/K dims of each kept head, ascending; None: all of them
    # (Hk, ds, ds) logit correction folded into the kept Q/K rows (with qk_keep); under rotary embeddings
    # (Hk, d, ds), every dim of the query head mixed into its kept ones (engine.fold_rotary_mix)
    qk_m: Tensor | None
    v_keep: Tensor | None  # (Hk, dv) kept value dims of each kept head, ascending; None: all of them
    out_weight: Tensor  # (out, Hk*dv) the output projection over the kept dims, compensation folded in
    out_bias: Tensor | None
    balanced: bool = True  # how the logit correction is split between the Q and K rows
    # grouped-query attention: the kept key/value heads, ascending; then the rows of `qk_keep` and `v_keep`
    # are these kv heads (a kv head's dims are its whole group's) while `qk_m` stays per kept query head
    kv_heads: Tensor | None = None


@dataclass(frozen=True)
class StreamContext:
    """What every block takes besides the hidden state (stream_start): positional and keyword arguments.

    `key` names the keyword the hidden state is passed as, where block 0 was called with it so.
    """

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    key: str | None = None


class _StreamStarted(Exception):
    """Raised from block 0's pre-hook: the stream's start is known, the rest of the forward is not needed."""


class ModelFamily(abc.ABC):
    """One architecture family. Instances are stateless; every method takes the model."""

    name: str = ""  # recorded in checkpoints as architecture["family"]
    modality: str = "image"  # "image" or "text": which data sources and preprocessing apply
    # How text data is cut into samples: "sentence" (encoders) or "document" (causal LMs: whole
    # documents, cut into windows of --seq-len tokens). Images ignore it.
    text_unit: str = "sentence"
    # The ModelOptions this family honours; any other one given is refused in one line.
    options: frozenset[str] = frozenset()
    # Why an option does not apply, keyed by option name, for the refusal line.
    option_reasons: Mapping[str, str] = {}
    # For README / --help: example names and what can be pruned.
    examples: tuple[str, ...] = ()
    summary: str = ""
    # Whether generation keeps a key/value cache per token (decoders): then corp counts its bytes
    caches_keys_values: bool = False

    # ---- specs and loading

    @abc.abstractmethod
    def claim(self, spec: str) -> bool:
        """Whether `spec` (a CLI MODEL argument) names a model of this family. Cheap: no weights."""

    def near_miss(self, spec: str) -> tuple[str, str] | None:
        """For a spec this family recognises as its library's but cannot prune: (what it is, what this family prunes)."""
        return None

    def candidates(self, spec: str) -> list[str]:
        """Full names this family would accept for a short `spec` (e.g. deit_base); [] if none."""
        return []

    def check(self, spec: str, options: ModelOptions) -> None:
        """Everything that can be checked without reading weights (shapes on the meta device, files)."""

    def meta_model(self, spec: str, options: ModelOptions) -> nn.Module | None:
        """The model's modules on the meta device (shapes, no weights) for a plan; None: load it for real."""
        return None

    def item_bytes(self, model: nn.Module) -> int:
        """Bytes of one preprocessed input item (a plan's input-batch term)."""
        return 0

    @abc.abstractmethod
    def load(self, spec: str, options: ModelOptions, device: torch.device) -> Loaded:
        """The dense model in eval mode on `device`, its identity and preprocessing."""

    @abc.abstractmethod
    def owns(self, model: nn.Module) -> bool:
        """Whether an in-memory module belongs to this family."""

    @abc.abstractmethod
    def adopt(self, model: nn.Module, model_kwargs: dict[str, Any] | None = None) -> Loaded:
        """Describe a user's in-memory module (the Python API): identity from its weights, default preprocessing.

        `model_kwargs` are the constructor options a rebuild needs, where the family cannot read them off the module.
        """

    # ---- blocks

    @abc.abstractmethod
    def num_blocks(self, model: nn.Module) -> int: ...

    @abc.abstractmethod
    def shape(self, model: nn.Module, i: int) -> BlockShape: ...

    def forward(self, model: nn.Module, batch: Batch) -> Any:
        """The model's own full forward on one batch (what a benchmark times)."""
        return model(**batch)

    @abc.abstractmethod
    def forward_trunk(self, model: nn.Module, batch: Batch) -> Any:
        """Run the blocks on one batch (the classifier head is not pruned, so it may be skipped)."""

    # MLP

    def mlp_refusal(self, model: nn.Module, i: int) -> str | None:
        """Why block i's MLP cannot be pruned correctly, or None when it can."""
        return None

    @abc.abstractmethod
    def mlp_hook(self, model: nn.Module, i: int, emit: Callable[[Tensor], Tensor | None]) -> list[Hook]:
        """Hooks that call emit(h) with block i's hidden activations (..., D) on every forward.

        When emit returns a tensor, it replaces h for the rest of the forward (the contract
        test builds its masked reference this way).
        """

    @abc.abstractmethod
    def mlp_weights(self, model: nn.Module, i: int) -> MlpWeights: ...

    @abc.abstractmethod
    def narrow_mlp(self, model: nn.Module, i: int, keep: Tensor, out_weight: Tensor, out_bias: Tensor | None) -> None:
        """Install narrower MLP modules in block i: input rows `keep`, the given (folded) output projection."""

    # attention (Q/K)

    def qk_refusal(self, model: nn.Module, i: int) -> str | None:
        """Why block i's Q/K dims cannot be pruned, or None when they can."""
        return f"{self.name} models do not support Q/K pruning (prune --target mlp instead)"

    def qk_hook(self, model: nn.Module, i: int,
                emit: Callable[[Tensor, Tensor], tuple[Tensor, Tensor] | None]) -> list[Hook]:
        """Hooks that call emit(q, k), each (B, H, N, d) as they enter the logits, on every forward.

        When emit returns (q', k'), those enter the logits instead.
        """
        raise UnsupportedModelError(self.qk_refusal(model, i) or f"{self.name}: no Q/K hook")

    def qk_weights(self, model: nn.Module, i: int) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
        """W_Q, b_Q, W_K, b_K as (H*d, dim) row blocks (for the magnitude ranker)."""
        raise UnsupportedModelError(self.qk_refusal(model, i) or f"{self.name}: no Q/K weights")

    def softmax_scale(self, model: nn.Module, i: int) -> float:
        raise UnsupportedModelError(self.qk_refusal(model, i) or f"{self.name}: no softmax scale")

    def rotary_pairs(self, model: nn.Module, i: int) -> Tensor | None:
        """(P, 2) the two dims of each rotary frequency pair within a head of block i; None: no rotary embedding.

        Q/K pruning then removes whole pairs (the same in a kv head and its query heads), and
        the correction mixes every dim of each query head into its kept dims (with statistics before
        the rotation; a complex scale per kept pair with pooled ones), folded into the query rows only
        (narrow_qk / install_attention get balanced=False); engine "rotary Q/K pairs".
        """
        return None

    def rotary_offsets(self, model: nn.Module, i: int) -> tuple[Tensor, Tensor] | None:
        """(angles (L, P), weights (L,)) of the (query, key) relative rotations block i's logits see.

        angles[l, p] is pair p's key angle minus its query angle (a token without rotation has
        angle 0), weights how often offset l occurs. Given, qk_hook emits q and k BEFORE the
        rotation and the fit is positional (engine.rotary_qk_compensation); None: after it, pooled.
        """
        return None

    def narrow_qk(self, model: nn.Module, i: int, keep: Tensor, m: Tensor, *, balanced: bool) -> None:
        """Install Q/K-narrow attention in block i: kept dims (H, ds), folded correction M (H, ds, ds)."""
        raise UnsupportedModelError(self.qk_refusal(model, i) or f"{self.name}: Q/K pruning unsupported")

    # attention values and output (V/O dims, whole heads)

    def vo_refusal(self, model: nn.Module, i: int) -> str | None:
        """Why block i's value/output dims and heads cannot be pruned, or None when they can."""
        return (f"{self.name} models do not support value/output or head pruning "
                "(prune --target mlp" + (",qk" if self.qk_refusal(model, i) is None else "") + " instead)")

    def vo_hook(self, model: nn.Module, i: int, emit: Callable[[Tensor], Tensor | None]) -> list[Hook]:
        """Hooks that call emit(o) with block i's attention output before its projection (..., H*d), heads concatenated.

        When emit returns a tensor, it replaces o for the rest of the forward.
        """
        raise UnsupportedModelError(self.vo_refusal(model, i) or f"{self.name}: no V/O hook")

    def vo_weights(self, model: nn.Module, i: int) -> MlpWeights:
        """The value rows (H*d, dim) as `inputs` and the output projection (out, H*d) that o feeds."""
        raise UnsupportedModelError(self.vo_refusal(model, i) or f"{self.name}: no V/O weights")

    def install_attention(self, model: nn.Module, i: int, cut: AttentionCut) -> None:
        """Install block i's attention narrowed to `cut`: kept heads, Q/K dims (correction folded), value dims and projection."""
        raise UnsupportedModelError(self.vo_refusal(model, i) or f"{self.name}: V/O pruning unsupported")

    # ---- sequential calibration: the residual stream between blocks (corp_cli/sequential.py)

    def block_module(self, model: nn.Module, i: int) -> nn.Module:
        """Block i as one module: run_block calls it on the hidden state at its input."""
        raise UnsupportedModelError(f"{self.name} models do not support --sequential (no block module)")

    def stream_start(self, model: nn.Module, batch: Batch) -> tuple[Tensor, StreamContext]:
        """The hidden state at block 0's input for `batch`, and whatever else the blocks take.

        The default runs the trunk until block 0 is called and keeps its arguments (a forward
        pre-hook with kwargs): the masks, rotary tables and position embeddings every block is
        given alike. Families override only where a block's call is not of that form.
        """
        seen: dict[str, Any] = {}

        def grab(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            seen["args"], seen["kwargs"] = args, kwargs
            raise _StreamStarted

        handle = self.block_module(model, 0).register_forward_pre_hook(grab, with_kwargs=True)
        try:
            self.forward_trunk(model, batch)
        except _StreamStarted:
            pass
        finally:
            handle.remove()
        if "args" not in seen:
            raise UnsupportedModelError(f"{self.name}: block 0 was never called by the forward")
        args, kwargs = seen["args"], dict(seen["kwargs"])
        if args:
            return args[0], StreamContext(args=tuple(args[1:]), kwargs=kwargs)
        key = next((k for k in ("hidden_states", "x") if isinstance(kwargs.get(k), Tensor)), None)
        if key is None:
            raise UnsupportedModelError(f"{self.name}: cannot tell block 0's hidden-state argument")
        hidden = kwargs.pop(key)
        return hidden, StreamContext(args=(), kwargs=kwargs, key=key)

    def run_block(self, model: nn.Module, i: int, hidden: Tensor, ctx: StreamContext) -> Tensor:
        """Block i on `hidden` (its input) with the context stream_start gave: its output hidden state."""
        blk = self.block_module(model, i)
        out = blk(**{ctx.key: hidden}, **ctx.kwargs) if ctx.key else blk(hidden, *ctx.args, **ctx.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    def sublayer_hook(self, model: nn.Module, i: int, part: str, emit: Callable[[Tensor, Tensor], None]) -> list[Hook]:
        """Hooks that call emit(y, s) on every forward of block i's `part` ("mlp" or "vo").

        y is the output projection's output (fc2 / down_proj, or the attention's proj / o_proj),
        s the residual sum it enters, s = base + gamma * y (gamma: sublayer_scale): the block
        output in a pre-norm block, the LayerNorm's input in a post-norm one.
        """
        proj, after, after_is_input = self.sublayer_modules(model, i, part)
        return residual_hooks(proj, after, after_is_input, emit)

    def sublayer_modules(self, model: nn.Module, i: int, part: str) -> tuple[nn.Module, nn.Module, bool]:
        """(the output projection whose output is y, the module where s is read, whether s is that module's input)."""
        raise UnsupportedModelError(f"{self.name} models do not support --sequential for the {part} (no residual sum)")

    def sublayer_scale(self, model: nn.Module, i: int, part: str) -> Tensor | None:
        """gamma of s = base + gamma * y for block i's `part` (a layer scale), or None for 1."""
        return None

    # ---- the compacted checkpoint

    @abc.abstractmethod
    def architecture(self, loaded: Loaded) -> dict[str, Any]:
        """Self-description of the (possibly pruned) model: enough to rebuild it with no other file."""

    @abc.abstractmethod
    def build(self, arch: dict[str, Any]) -> nn.Module:
        """The model `arch` describes, with the recorded widths; its weights are loaded right after."""

    def checkpoint_meta(self, arch: dict[str, Any]) -> dict[str, Any]:
        """Extra metadata for the checkpoint (e.g. how a stock library can load it)."""
        return {}

    def write_extras(self, loaded: Loaded, arch: dict[str, Any], folder: Path) -> None:
        """Files written beside model.safetensors (tokenizer, a library-native config)."""

    def reloaded(self, model: nn.Module, meta: dict[str, Any], folder: Path) -> Loaded:
        """Wrap a rebuilt pruned model: identity of its base, preprocessing from the metadata."""
        from corp_cli.errors import ArtifactError
        from corp_cli.labels import parse_classes
        from corp_cli.preprocess import preprocessing_from_dict

        try:
            identity = ModelIdentity.from_dict(meta.get("base"))
            prep = preprocessing_from_dict(meta["preprocessing"])
        except (KeyError, ValueError) as e:
            raise ArtifactError(f"{folder}: pruned model metadata lacks its base or preprocessing record ({e})") from None
        return Loaded(model=model, family=self, identity=identity, preprocessing=prep,
                      classes=parse_classes(meta.get("classes")),
                      model_kwargs=dict(meta["architecture"].get("model_kwargs") or {}), source_dir=folder)

    def reload_case(self, arch: dict[str, Any]) -> str | None:
        """How a pruned checkpoint of `arch` is reloaded, in one line for the prune command (None: nothing to say)."""
        return None

    def stock_loader(self, arch: dict[str, Any]) -> Callable[[], nn.Module] | None:
        """A builder using only the model's own library classes (no corp modules), when the pruning allows one."""
        return None

    def checkpoint_state(self, model: nn.Module) -> dict[str, Tensor]:
        """The tensors model.safetensors stores (a family may store a tied copy once)."""
        return {k: v.contiguous() for k, v in model.state_dict().items()}

    def load_state(self, model: nn.Module, state: dict[str, Tensor]) -> None:
        """Load checkpoint_state's tensors into a freshly built model; a mismatch raises RuntimeError."""
        model.load_state_dict(state, strict=True)

    # ---- counting, evaluation, export, benchmark

    @abc.abstractmethod
    def tokens_per_item(self, model: nn.Module) -> int:
        """Sequence length one item runs at (patches + prefix tokens; a text model's max length)."""

    @abc.abstractmethod
    def outer_flops(self, model: nn.Module, tokens: int) -> int:
        """FLOPs outside the blocks per item: the stem (patch embedding) and the heads."""

    def layout_flops(self, model: nn.Module, i: int, shape: BlockShape, tokens: int) -> dict[str, int] | None:
        """FLOPs of block i at `shape` (as it is, or as pruning would make it), where its layout is not the plain one.

        None (the default): the plain layout, which corp counts from the shape alone
        (corp_cli.flops.block_flops). A family whose pruned modules do other matmul work
        (e.g. full-width Q/K projections followed by per-head maps) counts it here.
        """
        return None

    @abc.abstractmethod
    def outputs(self, loaded: Loaded, batch: Batch) -> Outputs:
        """Logits (None without a classifier) and the pooled feature the head or the user sees."""

    @abc.abstractmethod
    def export_spec(self, loaded: Loaded, meta: dict[str, Any], folder: Path) -> ExportSpec: ...

    @abc.abstractmethod
    def example_batch(self, loaded: Loaded, batch_size: int, *, dtype: torch.dtype, device: torch.device) -> Batch:
        """A fixed random full-size input (benchmark)."""

    def evaluation(self, model: nn.Module) -> str:
        """What `corp evaluate` scores: 'classifier' (labels when there are any), 'embedding', or 'lm'.

        'lm': a causal language model; outputs() gives next-token logits (B, N, V) for every
        position, scored as perplexity of the batch's input_ids (real tokens only) and as
        fidelity of the next-token distributions to a reference.
        """
        return "classifier" if self.has_classifier(model) else "embedding"

    def has_classifier(self, model: nn.Module) -> bool:
        return False

    def describe(self) -> str:
        return self.summary or self.name

    # ---- causal language models (evaluation() == "lm"; families that honour the seq_len option)

    def with_seq_len(self, loaded: Loaded, seq_len: int) -> Loaded:
        """`loaded` with its token windows `seq_len` long (--seq-len); refused where there are none."""
        raise UnsupportedModelError(f"--seq-len does not apply to {self.name} models: {OPTION_REASONS['seq_len']}")

    def generate(self, loaded: Loaded, batch: Batch, new_tokens: int) -> Tensor:
        """Greedy generation of exactly `new_tokens` tokens after `batch` with the KV cache (decode benchmark)."""
        raise UnsupportedModelError(f"{self.name} models do not generate text")


def residual_hooks(proj: nn.Module, after: nn.Module, after_is_input: bool,
                   emit: Callable[[Tensor, Tensor], None]) -> list[Hook]:
    """emit(y, s): y the output of `proj`, s the input (or output) of `after`, which runs after it in the block."""
    pending: list[Tensor] = []

    def on_y(_m: nn.Module, _a: Any, out: Tensor) -> None:
        pending.append(out)

    def first(x: Any) -> Tensor:
        return x[0] if isinstance(x, (tuple, list)) else x

    def on_s(x: Any) -> None:
        emit(pending.pop(), first(x))

    late = (after.register_forward_pre_hook(lambda _m, args: on_s(args[0])) if after_is_input
            else after.register_forward_hook(lambda _m, _a, out: on_s(out)))
    return [proj.register_forward_hook(on_y), late]


def item_name(modality: str) -> str:
    """What one sample is called in summaries; counts in files are modality-neutral."""
    return "texts" if modality == "text" else "images"


def iter_blocks(family: ModelFamily, model: nn.Module) -> Iterator[int]:
    return iter(range(family.num_blocks(model)))
