"""Hugging Face decoder language models of the Llama layout: Llama, Qwen2, Mistral (`...ForCausalLM`).

Layer i: `model.layers[i].mlp` is a gated MLP, down_proj(act(gate_proj(x)) * up_proj(x)), and
`self_attn.{q,k,v,o}_proj` attend with rotary position embeddings, often with fewer key/value
heads than query heads (grouped-query attention); RMSNorm around both. The hidden units h are
down_proj's input: CORP's MLP compensation is unchanged for a gated MLP (h_P is predicted from
h_S by the same ridge and the correction folds into down_proj); a unit's gate and up rows are
removed together.

Attention (docs/decoder-attention.md): value/output dims and whole key/value heads under
grouped-query attention (a kv head's value dims are dims of every query head of its group, so
the removed set of o is their union and o_proj's correction is fitted over all of o, without
intercept: o_proj has no bias), query heads inside each group, and rotary Q/K frequency pairs
(the same pairs in a kv head and its query heads; every dim of each query head mixed into its kept
ones, folded into W_Q, fitted at the window's first ROTARY_OFFSETS relative offsets). Pruned blocks run in
decoder_attention.DecoderAttention. Q/K pairs are pruned when asked for (--target qk), not by
default.

Text is read as documents cut into windows of --seq-len tokens (text.LmTextPreprocessing)
under the causal mask; only real tokens enter the statistics and the scores. `corp evaluate`
scores perplexity and the next-token fidelity to the dense model (evaluation() == "lm").

The pruned folder is a plain transformers folder when every layer keeps the same number of
units and the same heads at the full head width in the stock grouping (kv heads and/or query
heads per group removed alike everywhere): config.json with the narrower intermediate_size and
head counts, model.safetensors (corp's metadata
rides in its header; a tied lm_head is stored once, as transformers stores it),
generation_config.json and the tokenizer files, so `AutoModelForCausalLM.from_pretrained(DIR)`
and `AutoTokenizer.from_pretrained(DIR)` load it. Per-layer widths that differ are recorded
in the checkpoint's architecture, and `corp_cli.load_pruned` rebuilds them; no config.json is
written then, since transformers would refuse its shapes.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from corp_cli import engine
from corp_cli.errors import ArtifactError, InputError, UnsupportedModelError
from corp_cli.family import AttentionCut, Batch, BlockShape, Hook, Loaded, MlpWeights, ModelOptions, Outputs
from corp_cli.families.decoder_attention import DecoderAttention, rope_dims_of_pairs
from corp_cli.families.hf_common import ELEMENTWISE_ACTS, HFFamily, config_dict, linear_rows
from corp_cli.hub import transformers_module
from corp_cli.text import LmTextPreprocessing

# The default token window: the model's context, but no longer than this (a 32k-context model
# calibrated on 32k windows would need 64x the activation memory for little gain).
MAX_DEFAULT_SEQ_LEN = 512
# Files beside the weights a tokenizer (and generation) needs; copied into the pruned folder.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)
# Relative offsets the rotary ranker and fit weigh: the first this many, where a decoder's attention puts its
# mass (stories260K: 90-99% of every layer's within 64 tokens, 33-77% within 4; docs/method.md §3).
ROTARY_OFFSETS = 64
# Export traces and checks (see hf_bert): neither 0 nor 1, and different from each other.
TRACE_SEQ = 16
CHECK_SEQ = 21
# Logits of this many positions x vocabulary entries are scored at a time (float64).


def context_length(config: Any) -> int:
    """The longest window the model takes (a transformers config, or config.json as a dict)."""
    value = config.get("max_position_embeddings") if isinstance(config, dict) else getattr(config, "max_position_embeddings", None)
    return int(value or MAX_DEFAULT_SEQ_LEN)


def default_seq_len(config: Any) -> int:
    return min(context_length(config), MAX_DEFAULT_SEQ_LEN)


def _head_dim(cfg: dict[str, Any]) -> int:
    """The per-head width a recorded config builds (an explicit head_dim, else hidden_size / heads)."""
    return int(cfg.get("head_dim") or int(cfg["hidden_size"]) // int(cfg["num_attention_heads"]))


def check_seq_len(seq_len: int, context: int, where: str) -> None:
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or not 2 <= seq_len <= context:
        raise InputError(f"--seq-len {seq_len}: {where} takes windows of 2..{context} tokens (its context length)")


class HFLlamaFamily(HFFamily):
    name = "hf-llama"
    modality = "text"
    text_unit = "document"
    options = frozenset({"seq_len"})
    model_types = ("llama", "qwen2", "mistral")
    classes = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
    base_class = "AutoModelForCausalLM"
    caches_keys_values = True
    examples = ("a local Llama / Qwen2 / Mistral folder", "hf-model:Qwen/Qwen2-0.5B")
    summary = ("Hugging Face decoder LMs (Llama, Qwen2, Mistral layouts); MLP, value dims, kv / query heads, "
               "rotary Q/K pairs")

    # ---- specs and loading

    def check(self, spec: str, options: ModelOptions) -> None:
        super().check(spec, options)
        if options.seq_len is not None:
            check_seq_len(options.seq_len, context_length(config_dict(spec) or {}), spec)

    def check_config(self, cfg: dict[str, Any], where: str) -> None:
        act = cfg.get("hidden_act", "silu")
        if not isinstance(act, str) or act not in ELEMENTWISE_ACTS:
            raise UnsupportedModelError(f"{where}: hidden_act {act!r} is not a supported elementwise activation "
                                        f"(one of {', '.join(sorted(ELEMENTWISE_ACTS))})")
        named = list(cfg.get("architectures") or [])
        if named and not set(named) & set(self.classes):
            raise UnsupportedModelError(f"{where}: {named[0]} is not a causal language model corp prunes "
                                        f"({', '.join(self.classes)})")

    def load(self, spec: str, options: ModelOptions, device: torch.device) -> Loaded:
        loaded = super().load(spec, options, device)
        return loaded if options.seq_len is None else self.with_seq_len(loaded, options.seq_len)

    def validate(self, model: nn.Module) -> None:
        if not isinstance(getattr(model, "lm_head", None), nn.Linear):
            raise UnsupportedModelError(f"{type(model).__name__} has no language-model head; corp prunes causal language "
                                        f"models ({', '.join(self.classes)})")
        try:
            layer = self.layers(model)[0]
            parts = (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj, layer.self_attn.q_proj,
                     layer.self_attn.k_proj, model.lm_head)
        except (AttributeError, IndexError, TypeError):
            parts = ()
        if not parts or not all(isinstance(p, nn.Linear) for p in parts):
            import transformers

            raise UnsupportedModelError(
                f"{type(model).__name__}: its layers do not have the layout corp expects (transformers "
                f"{transformers.__version__} is installed; corp supports the transformers 5.x layout)"
            )

    def model_class(self, transformers: Any, config: Any) -> Any:
        # the causal-LM class of the model type: it can also be built on the meta device for a plan
        name = dict(zip(self.model_types, self.classes)).get(getattr(config, "model_type", None))
        return getattr(transformers, name) if name else super().model_class(transformers, config)

    def item_bytes(self, model: nn.Module) -> int:
        return 2 * 8 * default_seq_len(model.config)  # ids and attention mask (int64) of one window

    def preprocessing(self, folder: Path | None, config: Any) -> LmTextPreprocessing:
        return LmTextPreprocessing(tokenizer=str(folder), max_length=default_seq_len(config), tokenizer_dir=folder)

    def has_classifier(self, model: nn.Module) -> bool:
        return False

    def with_seq_len(self, loaded: Loaded, seq_len: int) -> Loaded:
        check_seq_len(seq_len, context_length(loaded.model.config), loaded.identity.name)
        return replace(loaded, preprocessing=replace(loaded.preprocessing, max_length=seq_len))

    # ---- layer layout

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def attn_module(self, model: nn.Module, i: int) -> nn.Module:
        return self.layers(model)[i].self_attn

    def qk_pair(self, model: nn.Module, i: int) -> tuple[nn.Linear, nn.Linear]:
        a = self.attn_module(model, i)
        return a.q_proj, a.k_proj

    def sublayer_modules(self, model: nn.Module, i: int, part: str) -> tuple[nn.Module, nn.Module, bool]:
        # pre-norm: o_proj's output + input enters post_attention_layernorm; down_proj's + that is the layer output
        layer = self.layers(model)[i]
        return (layer.mlp.down_proj, layer, False) if part == "mlp" else (layer.self_attn.o_proj,
                                                                           layer.post_attention_layernorm, True)

    def shape(self, model: nn.Module, i: int) -> BlockShape:
        cfg = model.config
        attn = self.attn_module(model, i)
        mlp_hidden = int(self.layers(model)[i].mlp.down_proj.in_features)
        if isinstance(attn, DecoderAttention):
            return BlockShape(dim=int(cfg.hidden_size), mlp_hidden=mlp_hidden, num_heads=attn.num_heads,
                              head_dim=attn.head_dim, qk_dim=attn.qk_dim, v_dim=attn.v_dim, kv_heads=attn.kv_heads)
        heads = int(cfg.num_attention_heads)
        head_dim = int(attn.head_dim)
        return BlockShape(dim=int(cfg.hidden_size), mlp_hidden=mlp_hidden, num_heads=heads, head_dim=head_dim,
                          qk_dim=head_dim, kv_heads=int(getattr(cfg, "num_key_value_heads", None) or heads))

    # ---- blocks

    def forward(self, model: nn.Module, batch: Batch) -> Any:
        return model(**batch, use_cache=False)

    def forward_trunk(self, model: nn.Module, batch: Batch) -> Any:
        return model.model(**batch, use_cache=False)  # the LM head is not pruned: run the decoder only

    def mlp_hook(self, model: nn.Module, i: int, emit: Callable[[Tensor], Tensor | None]) -> list[Hook]:
        # down_proj's input is h = act(gate_proj(x)) * up_proj(x)
        down = self.layers(model)[i].mlp.down_proj
        return [down.register_forward_pre_hook(lambda _m, args: emit(args[0]))]

    def mlp_weights(self, model: nn.Module, i: int) -> MlpWeights:
        mlp = self.layers(model)[i].mlp
        down = mlp.down_proj
        return MlpWeights([mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach()], down.weight.detach(),
                          down.bias.detach() if down.bias is not None else None)

    def narrow_mlp(self, model: nn.Module, i: int, keep: Tensor, out_weight: Tensor, out_bias: Tensor | None) -> None:
        mlp = self.layers(model)[i].mlp
        old = mlp.down_proj
        down = nn.Linear(int(keep.numel()), old.out_features, bias=old.bias is not None, device=old.weight.device,
                         dtype=old.weight.dtype)
        with torch.no_grad():
            down.weight.copy_(out_weight)
            if out_bias is not None:
                down.bias.copy_(out_bias)
        mlp.gate_proj = linear_rows(mlp.gate_proj, keep)  # a unit's gate and up rows go together
        mlp.up_proj = linear_rows(mlp.up_proj, keep)
        mlp.down_proj = down
        mlp.intermediate_size = int(keep.numel())

    def set_mlp_width(self, model: nn.Module, i: int, width: int) -> None:
        mlp = self.layers(model)[i].mlp
        g, u, d = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        mlp.gate_proj = nn.Linear(g.in_features, width, bias=g.bias is not None)
        mlp.up_proj = nn.Linear(u.in_features, width, bias=u.bias is not None)
        mlp.down_proj = nn.Linear(width, d.out_features, bias=d.bias is not None)
        mlp.intermediate_size = width

    # Q/K: whole rotary frequency pairs. transformers' rotate_half pairs dim j with j + d/2 (half-split);
    # the same pairs go in a kv head and every query head of its group; every dim of each query head is
    # mixed into its kept dims before the rotation, folded into W_Q (docs/method.md, section 3).

    def qk_refusal(self, model: nn.Module, i: int) -> str | None:
        if isinstance(self.attn_module(model, i), DecoderAttention):
            return f"block {i}: attention is already pruned; prune the dense model instead"
        freqs = getattr(getattr(model.model, "rotary_emb", None), "inv_freq", None)  # shapes only (may be on meta)
        d = self.shape(model, i).head_dim
        if freqs is None or freqs.numel() != d // 2 or d % 2:
            return (f"{type(model).__name__}: its rotary embedding does not rotate every pair of the {d} head dims "
                    "(partial rotary), which corp's Q/K pair pruning does not cover: prune --target mlp,vo,heads")
        return None

    def rotary_pairs(self, model: nn.Module, i: int) -> Tensor | None:
        half = self.shape(model, i).head_dim // 2
        return torch.stack([torch.arange(half), torch.arange(half) + half], 1)

    def rotary_offsets(self, model: nn.Module, i: int) -> tuple[Tensor, Tensor] | None:
        """The causal offsets 0..min(T, ROTARY_OFFSETS)-1 of a window of the default length T (the key l tokens
        back), each weighted by its (query, key) pairs in a window.

        Not every offset of the window: with every (query, key) pair weighing alike, the long offsets, where
        the attention puts little mass, outnumber the short ones and the fit spends itself there (stories260K,
        512-token windows: the correction then ties with none, 45.557 both; fit and ranked on the first 64
        offsets, 34.206 vs 35.491)."""
        freqs = model.model.rotary_emb.inv_freq.detach().to(torch.float64).cpu()  # on the decoder, shared by layers
        window = self.tokens_per_item(model)
        off = torch.arange(min(window, ROTARY_OFFSETS), dtype=torch.float64)
        return -off[:, None] * freqs[None, :], window - off

    def narrow_qk(self, model: nn.Module, i: int, keep: Tensor, m: Tensor, *, balanced: bool) -> None:
        """Q/K pairs alone: the attention cut with every head, the value and output projections as they were."""
        shape = self.shape(model, i)
        attn = self.attn_module(model, i)
        gqa = shape.num_heads > (shape.kv_heads or shape.num_heads)
        self.install_attention(model, i, AttentionCut(
            heads=torch.arange(shape.num_heads, device=keep.device), qk_keep=keep, qk_m=m, v_keep=None,
            out_weight=attn.o_proj.weight.detach(), out_bias=attn.o_proj.bias.detach() if attn.o_proj.bias is not None
            else None, balanced=False, kv_heads=torch.arange(shape.kv_heads, device=keep.device) if gqa else None))

    # qk_hook (HFFamily's: q_proj / k_proj outputs split into heads of head_dim, i.e. q and k BEFORE the
    # rotation, (B, Hq, N, d) and (B, Hkv, N, d)), qk_weights and softmax_scale are HFFamily's

    # V/O dims and whole (key/value) heads. Values are not rotated, so a value dim commutes with the
    # rotary embedding; under GQA a value dim of kv head g is a dim of every query head of g's group
    # (pruning.o_kept_dims), and o_proj's correction is fitted over all of o (the ridge without
    # intercept: o_proj has no bias).

    def vo_refusal(self, model: nn.Module, i: int) -> str | None:
        if isinstance(self.attn_module(model, i), DecoderAttention):
            return f"block {i}: attention is already pruned; prune the dense model instead"
        return None

    def vo_hook(self, model: nn.Module, i: int, emit: Callable[[Tensor], Tensor | None]) -> list[Hook]:
        o = self.attn_module(model, i).o_proj  # its input is o, the query heads' outputs concatenated
        return [o.register_forward_pre_hook(lambda _m, args: emit(args[0]))]

    def vo_weights(self, model: nn.Module, i: int) -> MlpWeights:
        a = self.attn_module(model, i)
        return MlpWeights([a.v_proj.weight.detach()], a.o_proj.weight.detach(),
                          a.o_proj.bias.detach() if a.o_proj.bias is not None else None)

    def install_attention(self, model: nn.Module, i: int, cut: AttentionCut) -> None:
        old = self.attn_module(model, i)
        shape = self.shape(model, i)
        d, g = shape.head_dim, shape.num_heads // (shape.kv_heads or shape.num_heads)
        dev = old.q_proj.weight.device
        heads = cut.heads.to(dev)
        kv = (cut.kv_heads if cut.kv_heads is not None else heads).to(dev)  # without GQA: one kv head per head
        kv_index = torch.searchsorted(kv, torch.div(heads, g, rounding_mode="floor"))
        qk_dims = (torch.arange(d, device=dev).expand(len(kv), d) if cut.qk_keep is None else cut.qk_keep.to(dev))
        v_dims = torch.arange(d, device=dev).expand(len(kv), d) if cut.v_keep is None else cut.v_keep.to(dev)
        q_rows = (heads[:, None] * d + qk_dims[kv_index]).reshape(-1)
        wq, bq = old.q_proj.weight.detach(), old.q_proj.bias.detach() if old.q_proj.bias is not None else None
        if cut.qk_m is not None:  # the rotary correction mixes each query head's dims into its kept rows
            wq, bq = engine.fold_rotary_mix(wq, bq, heads, qk_dims[kv_index], cut.qk_m)
            q_rows = torch.arange(len(q_rows), device=dev)
        k_rows = (kv[:, None] * d + qk_dims).reshape(-1)
        v_rows = (kv[:, None] * d + v_dims).reshape(-1)
        new = DecoderAttention(
            model.config, int(old.layer_idx), hidden_size=shape.dim, num_heads=int(heads.numel()),
            kv_heads=int(kv.numel()), head_dim=d, qk_dim=int(qk_dims.shape[1]), v_dim=int(v_dims.shape[1]),
            kv_index=kv_index.cpu(), rope_dims=None if cut.qk_keep is None else qk_dims.cpu(),
            qkv_bias=old.q_proj.bias is not None, o_bias=old.o_proj.bias is not None, scaling=float(old.scaling),
        ).to(device=dev, dtype=old.q_proj.weight.dtype)
        with torch.no_grad():
            new.q_proj.weight.copy_(wq[q_rows])
            if bq is not None:
                new.q_proj.bias.copy_(bq[q_rows])
            for lin, src, rows in ((new.k_proj, old.k_proj, k_rows), (new.v_proj, old.v_proj, v_rows)):
                lin.weight.copy_(src.weight[rows])
                if src.bias is not None:
                    lin.bias.copy_(src.bias[rows])
            new.o_proj.weight.copy_(cut.out_weight)
            if cut.out_bias is not None:
                new.o_proj.bias.copy_(cut.out_bias)
        self.layers(model)[i].self_attn = new

    # ---- the checkpoint

    def architecture(self, loaded: Loaded) -> dict[str, Any]:
        arch = super().architecture(loaded)
        widths = [int(b["mlp_hidden"]) for b in arch["blocks"]]
        cfg = arch["hf_config"]
        # uniform: the pruned width itself (a stock config); else the widest, narrower layers rebuilt per block
        cfg["intermediate_size"] = max(widths)
        # the same heads and head width in every layer, in the stock grouping: a stock config too
        attn = {(b.get("num_heads"), b.get("kv_heads"), b["qk_dim"], b.get("v_dim"), "kv_index" in b, "rope_pairs" in b)
                for b in arch["blocks"]}
        if len(attn) == 1:
            (nh, kv, qk, v, irregular, rope), = attn
            d = _head_dim(cfg)
            if nh is not None and qk == d and v is None and not irregular and not rope:
                cfg.update(num_attention_heads=nh, num_key_value_heads=kv, head_dim=d)
        files = [n for n in TOKENIZER_FILES if loaded.source_dir is not None and (loaded.source_dir / n).is_file()]
        arch["tokenizer"] = "." if "tokenizer_config.json" in files or "tokenizer.json" in files else None
        return arch

    def _block_spec(self, model: nn.Module, i: int) -> dict[str, Any]:
        s = self.shape(model, i)
        spec: dict[str, Any] = {"mlp_hidden": s.mlp_hidden, "qk_dim": s.qk_dim}
        attn = self.attn_module(model, i)
        if isinstance(attn, DecoderAttention):  # only pruned attention adds keys: other records stay as they were
            spec.update(num_heads=attn.num_heads, kv_heads=attn.kv_heads)
            if attn.v_dim != attn.head_dim:
                spec["v_dim"] = attn.v_dim
            if not attn.regular:
                spec["kv_index"] = [int(x) for x in attn.kv_index]
            if attn.rope_dims is not None:
                spec["rope_pairs"] = [[int(x) for x in row[: attn.qk_dim // 2]] for row in attn.rope_dims]
        return spec

    def _stock_attention(self, spec: dict[str, Any], cfg: dict[str, Any]) -> bool:
        """Whether block `spec`'s attention is the one the recorded config builds (no corp module needed)."""
        d = _head_dim(cfg)
        heads = int(cfg["num_attention_heads"])
        kv = int(cfg.get("num_key_value_heads") or heads)
        return (int(spec.get("num_heads", heads)) == heads and int(spec.get("kv_heads", kv)) == kv
                and int(spec["qk_dim"]) == d and int(spec.get("v_dim", d)) == d
                and "kv_index" not in spec and "rope_pairs" not in spec)

    def _uniform(self, arch: dict[str, Any]) -> bool:
        """Loadable by transformers alone: one MLP width, and every layer's attention the config's."""
        return (len({int(b["mlp_hidden"]) for b in arch["blocks"]}) == 1
                and all(self._stock_attention(b, arch["hf_config"]) for b in arch["blocks"]))

    def reload_case(self, arch: dict[str, Any]) -> str:
        """Which loader a pruned checkpoint needs, in one line (the prune command prints it)."""
        if self._uniform(arch):
            return ("the same widths in every layer: a plain transformers folder "
                    "(AutoModelForCausalLM.from_pretrained(DIR) loads it; corp is not needed)")
        return ("widths differ per layer (or Q/K pairs / uneven query-head groups were pruned), which no stock config "
                "describes: reload it with corp_cli.load_pruned(DIR)")

    def checkpoint_meta(self, arch: dict[str, Any]) -> dict[str, Any]:
        if not self._uniform(arch):
            return {}
        return {"stock_transformers": {"class": arch["hf_class"],
                                       "load": "transformers.AutoModelForCausalLM.from_pretrained(DIR)"}}

    def write_extras(self, loaded: Loaded, arch: dict[str, Any], folder: Path) -> None:
        if arch.get("tokenizer") and loaded.source_dir is not None:
            for n in TOKENIZER_FILES:
                if (loaded.source_dir / n).is_file():
                    shutil.copyfile(loaded.source_dir / n, folder / n)
        if not self._uniform(arch):
            return
        config = self._config(arch)
        config.architectures = [arch["hf_class"]]
        config.save_pretrained(folder)
        generation = getattr(loaded.model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(folder)

    def _config(self, arch: dict[str, Any]) -> Any:
        transformers = transformers_module()
        cfg = dict(arch["hf_config"])
        try:
            return transformers.AutoConfig.for_model(cfg.pop("model_type", None), **cfg)
        except (ValueError, KeyError, TypeError) as e:
            raise ArtifactError(f"recorded Hugging Face config could not be rebuilt ({str(e).splitlines()[0][:160]})") from None

    def build(self, arch: dict[str, Any]) -> nn.Module:
        cfg = arch.get("hf_config")
        if not isinstance(cfg, dict) or not isinstance(arch.get("blocks"), list):
            raise ArtifactError("pruned checkpoint architecture lacks its hf_config or blocks")
        try:
            d = _head_dim(cfg)
            plain = [{"mlp_hidden": int(b["mlp_hidden"]), "qk_dim": d} for b in arch["blocks"]]
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"pruned checkpoint block records are malformed ({e})") from None
        model = super().build({**arch, "blocks": plain})  # the MLP widths; attention below
        for i, spec in enumerate(arch["blocks"]):
            if not self._stock_attention(spec, cfg):
                self.layers(model)[i].self_attn = self._empty_attention(model, i, spec)
        model.tie_weights()  # built without initialisation, which also skips tying a tied LM head
        return model

    def _empty_attention(self, model: nn.Module, i: int, spec: dict[str, Any]) -> DecoderAttention:
        """Block i's DecoderAttention at the recorded widths (weights follow), refusing records that cannot fit."""
        old = self.attn_module(model, i)
        shape = self.shape(model, i)
        d, dense_kv = shape.head_dim, shape.kv_heads or shape.num_heads
        try:
            nh, kv = int(spec.get("num_heads", shape.num_heads)), int(spec.get("kv_heads", dense_kv))
            qk, v = int(spec["qk_dim"]), int(spec.get("v_dim", d))
            if not (0 < kv <= dense_kv and kv <= nh <= shape.num_heads and 0 < qk <= d and 0 < v <= d):
                raise ValueError(f"widths (heads {nh}, kv heads {kv}, qk {qk}, v {v}) outside the recorded config's")
            if "kv_index" in spec:
                kv_index = torch.tensor(spec["kv_index"], dtype=torch.int64)
                if kv_index.shape != (nh,) or int(kv_index.min()) < 0 or int(kv_index.max()) >= kv:
                    raise ValueError("kv_index does not map its query heads to its kv heads")
            elif nh % kv:
                raise ValueError(f"{nh} query heads do not split into {kv} equal groups")
            else:
                kv_index = torch.arange(kv).repeat_interleave(nh // kv)
            rope = None
            if "rope_pairs" in spec:
                pairs = torch.tensor(spec["rope_pairs"], dtype=torch.int64)
                if pairs.shape != (kv, qk // 2) or qk % 2 or int(pairs.min()) < 0 or int(pairs.max()) >= d // 2:
                    raise ValueError("rope_pairs do not fit the kv heads and the Q/K width")
                rope = rope_dims_of_pairs(pairs, d)
            elif qk != d:
                raise ValueError("a narrower Q/K width needs its rope_pairs")
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise ArtifactError(f"block {i}: {e}") from None
        return DecoderAttention(
            model.config, int(old.layer_idx), hidden_size=shape.dim, num_heads=nh, kv_heads=kv, head_dim=d, qk_dim=qk,
            v_dim=v, kv_index=kv_index, rope_dims=rope, qkv_bias=old.q_proj.bias is not None,
            o_bias=old.o_proj.bias is not None, scaling=float(old.scaling),
        ).to(device=old.q_proj.weight.device, dtype=old.q_proj.weight.dtype)

    def stock_loader(self, arch: dict[str, Any]) -> Callable[[], nn.Module] | None:
        if not self._uniform(arch):
            return None

        def build() -> nn.Module:
            from transformers.initialization import no_init_weights

            with no_init_weights():
                model = transformers_module().AutoModelForCausalLM.from_config(self._config(arch))
            model.tie_weights()
            return model

        return build

    def _tied(self, model: nn.Module) -> list[str]:
        """State keys that are the same tensor as the input embedding (a tied LM head), stored once."""
        emb = model.get_input_embeddings().weight
        return [k for k, v in model.state_dict().items()
                if v.data_ptr() == emb.data_ptr() and k != "model.embed_tokens.weight"]

    def checkpoint_state(self, model: nn.Module) -> dict[str, Tensor]:
        state = super().checkpoint_state(model)
        for k in self._tied(model):
            del state[k]
        return state

    def load_state(self, model: nn.Module, state: dict[str, Tensor]) -> None:
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = sorted(set(missing) - set(self._tied(model)))
        if missing or unexpected:
            raise RuntimeError(f"missing keys {missing[:5]}, unexpected keys {sorted(unexpected)[:5]}")

    # ---- counting, evaluation, export, benchmark

    def tokens_per_item(self, model: nn.Module) -> int:
        return default_seq_len(model.config)  # FLOPs are counted per window of the default --seq-len

    def outer_flops(self, model: nn.Module, tokens: int) -> int:
        head = model.lm_head
        return 2 * tokens * head.in_features * head.out_features  # the LM head at every position; embeddings are lookups

    def evaluation(self, model: nn.Module) -> str:
        return "lm"

    def outputs(self, loaded: Loaded, batch: Batch) -> Outputs:
        """Next-token logits at every position (B, N, V), and the final states averaged over real tokens."""
        model = loaded.model
        hidden = model.model(**batch, use_cache=False).last_hidden_state
        mask = batch.get("attention_mask")
        m = torch.ones(hidden.shape[:2], dtype=hidden.dtype, device=hidden.device) if mask is None else mask.to(hidden.dtype)
        pooled = (hidden * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True).clamp_min(1)
        return Outputs(logits=model.lm_head(hidden), features=pooled)

    def example_batch(self, loaded: Loaded, batch_size: int, *, dtype: torch.dtype, device: torch.device) -> Batch:
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, int(loaded.model.config.vocab_size), (batch_size, loaded.preprocessing.max_length),
                            generator=gen)
        return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}

    def generate(self, loaded: Loaded, batch: Batch, new_tokens: int) -> Tensor:
        model = loaded.model
        cfg = model.config
        pad = next((t for t in (cfg.pad_token_id, cfg.eos_token_id, 0) if t is not None))
        pad = pad[0] if isinstance(pad, list) else pad
        return model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              use_cache=True, pad_token_id=int(pad))

    def export_spec(self, loaded: Loaded, meta: dict[str, Any], folder: Path) -> Any:
        from corp_cli.export_spec import BATCH, MAX_DYNAMIC_BATCH, SEQUENCE, ExportSpec

        cfg = loaded.model.config
        vocab, context = int(cfg.vocab_size), context_length(cfg)

        def make(batch: int, seq: int | None, gen: torch.Generator) -> tuple[Tensor, ...]:
            assert seq is not None
            return (torch.randint(0, vocab, (batch, seq), generator=gen),)

        tok = meta["architecture"].get("tokenizer")
        return ExportSpec(
            module=CausalLMExport(loaded.model).eval(),
            input_names=["input_ids"],
            output_names=["logits"],
            input_dims=[{0: BATCH, 1: SEQUENCE}],
            output_dims=[{0: BATCH, 1: SEQUENCE}],
            dim_bounds={BATCH: (1, MAX_DYNAMIC_BATCH), SEQUENCE: (1, context)},
            make_inputs=make,
            load_hint="torch.export.load(path).module()(input_ids) -> logits",
            static_seq=loaded.preprocessing.max_length,
            trace_seq=min(TRACE_SEQ, context),
            check_seq=CHECK_SEQ if CHECK_SEQ <= context else max(2, min(TRACE_SEQ, context) - 1),
            input_info=[{"description": "token ids (one unpadded sequence per row, positions 0..N-1) from the "
                                        f"tokenizer saved beside the checkpoint ({tok or 'none saved'})"}],
            output_info=[{"description": "next-token logits at every position (B, N, vocabulary); no KV cache"}],
            extra_meta={"tokenizer": {"dir": tok, "relative_to": "the directory of source.checkpoint"} if tok else None},
        )


class CausalLMExport(nn.Module):
    """input_ids -> next-token logits at every position, without a cache (a plain function of the tokens)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits

