"""Hugging Face decoder language models of the Llama layout: Llama, Qwen2, Mistral (`...ForCausalLM`).

Layer i: `model.layers[i].mlp` is a gated MLP, down_proj(act(gate_proj(x)) * up_proj(x)), and
`self_attn.{q,k,v,o}_proj` attend with rotary position embeddings, often with fewer key/value
heads than query heads (grouped-query attention); RMSNorm around both. The hidden units h are
down_proj's input: CORP's MLP compensation is unchanged for a gated MLP (h_P is predicted from
h_S by the same ridge and the correction folds into down_proj); a unit's gate and up rows are
removed together.

Refused, in one line: Q/K pruning. Rotary embeddings rotate each pair of query/key dims at
its own frequency, so a logit correction mixing kept dims cannot be held by a static weight
(docs/method.md, section 3), and under grouped-query attention a key dim is shared by every
query head of its group, so no per-head choice of dims exists either.

Text is read as documents cut into windows of --seq-len tokens (text.LmTextPreprocessing)
under the causal mask; only real tokens enter the statistics and the scores. `corp evaluate`
scores perplexity and the next-token fidelity to the dense model (evaluation() == "lm").

The pruned folder is a plain transformers folder when every layer keeps the same number of
units: config.json with the narrower intermediate_size, model.safetensors (corp's metadata
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

from corp_cli.errors import ArtifactError, InputError, UnsupportedModelError
from corp_cli.family import Batch, BlockShape, Hook, Loaded, MlpWeights, ModelOptions, Outputs
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
    examples = ("a local Llama / Qwen2 / Mistral folder", "hf-model:Qwen/Qwen2-0.5B")
    summary = "Hugging Face decoder LMs (Llama, Qwen2, Mistral layouts); MLP pruning"

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
        heads = int(cfg.num_attention_heads)
        head_dim = int(attn.head_dim)
        return BlockShape(dim=int(cfg.hidden_size), mlp_hidden=int(self.layers(model)[i].mlp.down_proj.in_features),
                          num_heads=heads, head_dim=head_dim, qk_dim=head_dim,
                          kv_heads=int(getattr(cfg, "num_key_value_heads", None) or heads))

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

    def qk_refusal(self, model: nn.Module, i: int) -> str | None:
        cfg = model.config
        heads, kv = int(cfg.num_attention_heads), int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
        gqa = f" and shares each key across {heads // kv} query heads (grouped-query attention)" if kv < heads else ""
        return (f"{type(model).__name__} applies rotary position embeddings to its queries and keys{gqa}, so a Q/K "
                "logit correction would mix dims that rotate at different frequencies, which no static weight can "
                "hold; corp refuses Q/K pruning here: MLP pruning is available (--target mlp)")

    def vo_refusal(self, model: nn.Module, i: int) -> str | None:
        # value dims would commute with the rotation, but under GQA a value dim is shared by a group
        # of query heads, and corp has no narrow decoder attention yet
        return (f"{type(model).__name__}: value/output dims and heads are not pruned for decoder language models "
                "yet (their value heads are shared across query heads); MLP pruning is available (--target mlp)")

    # ---- the checkpoint

    def architecture(self, loaded: Loaded) -> dict[str, Any]:
        arch = super().architecture(loaded)
        widths = [int(b["mlp_hidden"]) for b in arch["blocks"]]
        # uniform: the pruned width itself (a stock config); else the widest, narrower layers rebuilt per block
        arch["hf_config"]["intermediate_size"] = max(widths)
        files = [n for n in TOKENIZER_FILES if loaded.source_dir is not None and (loaded.source_dir / n).is_file()]
        arch["tokenizer"] = "." if "tokenizer_config.json" in files or "tokenizer.json" in files else None
        return arch

    def _uniform(self, arch: dict[str, Any]) -> bool:
        return len({int(b["mlp_hidden"]) for b in arch["blocks"]}) == 1

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
        model = super().build(arch)
        model.tie_weights()  # built without initialisation, which also skips tying a tied LM head
        return model

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

