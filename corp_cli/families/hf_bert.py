"""Hugging Face BERT encoders (and sentence-transformers folders of them, e.g. all-MiniLM-L6-v2).

Layer i: intermediate.dense -> act -> output.dense (then residual + LayerNorm, which does
not touch the hidden units); q/k/v = attention.self.query/key/value. Text goes through
the folder's own tokenizer; the sentence embedding is pooled as the folder declares it
(sentence-transformers: mean over real tokens, then L2-normalised).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from corp_cli.family import Batch, Loaded
from corp_cli.families.hf_common import DEFAULT_MAX_LENGTH, HFFamily, NarrowQKV, classifier_flops
from corp_cli.text import TextPreprocessing

# Sequence lengths of the dynamic export trace and of its check: neither 0 nor 1 (torch.export
# would specialise them), and different, so the check proves the dimension is symbolic.
TRACE_SEQ = 16
CHECK_SEQ = 21
# Random token ids for export checks are drawn from here up: clear of [PAD], [UNK], [CLS],
# [SEP], [MASK] and the unused slots at the start of BERT vocabularies.
FIRST_PLAIN_TOKEN = 1000


class NarrowBertSelfAttention(NarrowQKV):
    """Replaces BertSelfAttention (`layer.attention.self`); parameter names match it."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, qk_dim: int, scale: float, bias: bool = True,
                 v_dim: int | None = None) -> None:
        super().__init__(num_heads, head_dim, qk_dim, scale, v_dim)
        self.query = nn.Linear(dim, num_heads * qk_dim, bias=bias)
        self.key = nn.Linear(dim, num_heads * qk_dim, bias=bias)
        self.value = nn.Linear(dim, num_heads * self.v_dim, bias=bias)

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, **_: Any) -> tuple[Tensor, None]:
        x = hidden_states
        return self.mix(self.query(x), self.key(x), self.value(x), attention_mask), None


def text_preprocessing(folder: Path | None, max_length: int = DEFAULT_MAX_LENGTH) -> TextPreprocessing:
    """Pooling as the sentence-transformers folder declares it (mean + L2-normalise), else mean pooling."""
    pooling, normalize = "mean", False
    if folder is not None:
        pool_cfg = folder / "1_Pooling" / "config.json"
        if pool_cfg.is_file():
            cfg = json.loads(pool_cfg.read_text())
            pooling = "cls" if cfg.get("pooling_mode_cls_token") else "mean"
        modules = folder / "modules.json"
        if modules.is_file():
            normalize = any(str(m.get("type", "")).endswith("Normalize") for m in json.loads(modules.read_text()))
    return TextPreprocessing(tokenizer=str(folder), max_length=max_length, pooling=pooling, normalize=normalize,
                             tokenizer_dir=folder)


class HFBertFamily(HFFamily):
    name = "hf-bert"
    modality = "text"
    model_types = ("bert",)
    classes = ("BertModel", "BertForSequenceClassification")
    examples = ("hf-model:sentence-transformers/all-MiniLM-L6-v2", "a local BERT folder")
    summary = "Hugging Face BERT text encoders (sentence-transformers folders too)"

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.base_model.encoder.layer

    def attn_module(self, model: nn.Module, i: int) -> nn.Module:
        return self.layers(model)[i].attention.self

    def set_attn_module(self, model: nn.Module, i: int, new: nn.Module) -> None:
        self.layers(model)[i].attention.self = new

    def qk_pair(self, model: nn.Module, i: int) -> tuple[nn.Linear, nn.Linear]:
        a = self.attn_module(model, i)
        return a.query, a.key

    def mlp_pair(self, model: nn.Module, i: int) -> tuple[nn.Linear, nn.Linear]:
        layer = self.layers(model)[i]
        return layer.intermediate.dense, layer.output.dense

    def set_mlp_pair(self, model: nn.Module, i: int, fc1: nn.Linear, fc2: nn.Linear) -> None:
        layer = self.layers(model)[i]
        layer.intermediate.dense = fc1
        layer.output.dense = fc2

    def v_proj(self, model: nn.Module, i: int) -> nn.Linear:
        return self.attn_module(model, i).value

    def sublayer_modules(self, model: nn.Module, i: int, part: str) -> tuple[nn.Module, nn.Module, bool]:
        # post-norm: s = y + input enters the LayerNorm after each sublayer
        layer = self.layers(model)[i]
        out = layer.output if part == "mlp" else layer.attention.output
        return out.dense, out.LayerNorm, True

    def out_proj(self, model: nn.Module, i: int) -> nn.Linear:
        return self.layers(model)[i].attention.output.dense  # BertSelfOutput: dense, then residual + LayerNorm

    def narrow_attention(self, model: nn.Module, i: int, qk_dim: int, *, v_dim: int | None = None,
                         num_heads: int | None = None) -> nn.Module:
        a = self.attn_module(model, i)
        s = self.shape(model, i)
        heads, v = num_heads or s.num_heads, v_dim or s.head_dim
        kw = {"device": a.query.weight.device, "dtype": a.query.weight.dtype}
        new = NarrowBertSelfAttention(s.dim, heads, s.head_dim, qk_dim, self.softmax_scale(model, i),
                                      bias=a.query.bias is not None, v_dim=v)
        new.to(**kw)
        self.set_attn_module(model, i, new)
        out = self.out_proj(model, i)
        if out.in_features != heads * v:
            self.layers(model)[i].attention.output.dense = nn.Linear(heads * v, out.out_features,
                                                                     bias=out.bias is not None, **kw)
        return new

    def copy_untouched(self, old: nn.Module, new: nn.Module) -> None:
        new.value.load_state_dict(old.value.state_dict())

    def preprocessing(self, folder: Path | None, config: Any) -> TextPreprocessing:
        return text_preprocessing(folder)

    def pool(self, loaded: Loaded, hidden: Tensor, batch: Batch) -> Tensor:
        return loaded.preprocessing.pool(hidden, batch["attention_mask"])

    def tokens_per_item(self, model: nn.Module) -> int:
        return DEFAULT_MAX_LENGTH  # FLOPs are counted per sequence of the calibration max_length

    def item_bytes(self, model: nn.Module) -> int:
        return 3 * 8 * DEFAULT_MAX_LENGTH  # ids, mask and segment ids (int64)

    def outer_flops(self, model: nn.Module, tokens: int) -> int:
        return classifier_flops(model)  # embeddings are lookups: no matmul work

    def example_batch(self, loaded: Loaded, batch_size: int, *, dtype: torch.dtype, device: torch.device) -> Batch:
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, int(loaded.model.config.vocab_size), (batch_size, loaded.preprocessing.max_length), generator=gen)
        return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}

    def export_spec(self, loaded: Loaded, meta: dict[str, Any], folder: Path) -> Any:
        return _text_spec(self, loaded, meta)


class TextEncoderExport(nn.Module):
    """(input_ids, attention_mask) -> (last_hidden_state, sentence_embedding[, logits]).

    token_type_ids are left to the model's default (all zeros: one segment), as
    sentence-transformers encoders are used.
    """

    def __init__(self, model: nn.Module, prep: TextPreprocessing, classifier: bool) -> None:
        super().__init__()
        self.model = model
        self.prep = prep
        self.classifier = classifier

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, ...]:
        if self.classifier:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
            hidden = out.hidden_states[-1]
            return hidden, self.prep.pool(hidden, attention_mask), out.logits
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return hidden, self.prep.pool(hidden, attention_mask)


def _text_spec(fam: HFBertFamily, loaded: Loaded, meta: dict[str, Any]) -> Any:
    from corp_cli.export_spec import BATCH, MAX_DYNAMIC_BATCH, SEQUENCE, ExportSpec

    model = loaded.model
    cfg = model.config
    prep: TextPreprocessing = loaded.preprocessing
    vocab = int(cfg.vocab_size)
    pad = int(getattr(cfg, "pad_token_id", None) or 0)
    max_pos = int(cfg.max_position_embeddings)
    low = FIRST_PLAIN_TOKEN if vocab > 2 * FIRST_PLAIN_TOKEN else 0

    def make(batch: int, seq: int | None, gen: torch.Generator) -> tuple[Tensor, ...]:
        assert seq is not None
        ids = torch.randint(low, vocab, (batch, seq), generator=gen)
        mask = torch.ones(batch, seq, dtype=torch.long)
        # the last row is padded to half its length: padding must not change the real tokens' outputs
        real = max(1, (seq + 1) // 2)
        mask[-1, real:] = 0
        ids[-1, real:] = pad
        return ids, mask

    classifier = fam.has_classifier(model)
    wrapper = TextEncoderExport(model, prep, classifier).eval()
    outputs = ["last_hidden_state", "sentence_embedding"] + (["logits"] if classifier else [])
    output_dims = [{0: BATCH, 1: SEQUENCE}, {0: BATCH}] + ([{0: BATCH}] if classifier else [])
    pooling = "the first ([CLS]) token's state" if prep.pooling == "cls" else "the mean over real tokens (attention_mask == 1)"
    tok = meta["architecture"].get("tokenizer")
    tokenizer = (
        {"dir": tok, "relative_to": "the directory of source.checkpoint",
         "note": "the export takes token ids: tokenize with this folder (e.g. transformers.AutoTokenizer), "
                 f"padding to the longest text and truncating to max_length {prep.max_length}"}
        if tok else None
    )
    output_info: list[dict[str, Any]] = [
        {"description": "final token states; rows of padding tokens are not meaningful"},
        {"description": f"{pooling}{', L2-normalised' if prep.normalize else ''}",
         "pooling": prep.pooling, "normalize": prep.normalize},
    ]
    if classifier:
        output_info.append({"description": "classifier logits"})
    return ExportSpec(
        module=wrapper,
        input_names=["input_ids", "attention_mask"],
        output_names=outputs,
        input_dims=[{0: BATCH, 1: SEQUENCE}, {0: BATCH, 1: SEQUENCE}],
        output_dims=output_dims,
        dim_bounds={BATCH: (1, MAX_DYNAMIC_BATCH), SEQUENCE: (1, max_pos)},
        make_inputs=make,
        load_hint=f"torch.export.load(path).module()(input_ids, attention_mask) -> ({', '.join(outputs)})",
        static_seq=min(prep.max_length, max_pos),
        trace_seq=min(TRACE_SEQ, max_pos),
        check_seq=CHECK_SEQ if CHECK_SEQ <= max_pos else max(2, min(TRACE_SEQ, max_pos) - 1),
        input_info=[
            {"description": f"token ids from the tokenizer saved beside the checkpoint ({tok or 'none saved'}); "
                            "token_type_ids are all zeros (one segment)"},
            {"description": "1 for real tokens, 0 for padding"},
        ],
        output_info=output_info,
        extra_meta={"tokenizer": tokenizer},
    )
