"""What `corp export` traces for a pruned Hugging Face encoder: a wrapper returning plain tensors.

transformers models take keyword arguments and return ModelOutput objects; the exported
program should take positional tensors and return tensors, so that it loads with torch
(or an ONNX runtime) alone. The wrappers here compute exactly what corp's evaluation
computes: for text, the token states and the sentence embedding the folder declares
(hf.evaluate.pool_tokens); for images, the logits of a classifier, else the final CLS
state (as hf.evaluate.embed_images).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from corp_cli.export import BATCH, MAX_DYNAMIC_BATCH, SEQUENCE, ExportSpec
from corp_cli.hf.evaluate import pool_tokens
from corp_cli.hf.models import TextPreprocessing, is_text_model, text_preprocessing

# Sequence lengths of the dynamic trace and of the check: neither 0 nor 1 (torch.export
# would specialise them), and different, so the check proves the dimension is symbolic.
TRACE_SEQ = 16
CHECK_SEQ = 21
# Random token ids are drawn from here up: clear of [PAD], [UNK], [CLS], [SEP], [MASK]
# and the unused slots at the start of BERT vocabularies.
FIRST_PLAIN_TOKEN = 1000


def is_classifier(model: nn.Module) -> bool:
    return "For" in type(model).__name__ and hasattr(model, "classifier")


class TextEncoderExport(nn.Module):
    """(input_ids, attention_mask) -> (last_hidden_state, sentence_embedding[, logits]).

    token_type_ids are left to the model's default (all zeros: one segment), as
    sentence-transformers encoders are used.
    """

    def __init__(self, model: nn.Module, prep: TextPreprocessing) -> None:
        super().__init__()
        self.model = model
        self.prep = prep
        self.classifier = is_classifier(model)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, ...]:
        if self.classifier:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
            hidden = out.hidden_states[-1]
            return hidden, pool_tokens(hidden, attention_mask, self.prep), out.logits
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return hidden, pool_tokens(hidden, attention_mask, self.prep)


class ImageEncoderExport(nn.Module):
    """pixel_values -> logits for a classifier, else the final CLS state."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.classifier = is_classifier(model)

    def forward(self, pixel_values: Tensor) -> Tensor:
        if self.classifier:
            return self.model(pixel_values=pixel_values).logits
        return self.model.base_model(pixel_values=pixel_values).last_hidden_state[:, 0]


def hf_export_spec(model: nn.Module, meta: dict[str, Any], folder: Path) -> ExportSpec:
    """The spec for a pruned HF model loaded from `folder` with checkpoint metadata `meta`."""
    if is_text_model(model):
        return _text_spec(model, meta, folder)
    return _image_spec(model)


def _text_prep(meta: dict[str, Any], folder: Path) -> TextPreprocessing:
    recorded = meta.get("preprocessing") or {}
    if recorded.get("kind") == "text":
        return TextPreprocessing.from_dict(recorded)
    # no record (a checkpoint saved outside `corp prune`): what its tokenizer folder declares
    tok = meta["architecture"].get("tokenizer")
    return text_preprocessing(folder / tok if tok else folder)


def _text_spec(model: nn.Module, meta: dict[str, Any], folder: Path) -> ExportSpec:
    cfg = model.config
    prep = _text_prep(meta, folder)
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

    wrapper = TextEncoderExport(model, prep).eval()
    outputs = ["last_hidden_state", "sentence_embedding"] + (["logits"] if wrapper.classifier else [])
    output_dims = [{0: BATCH, 1: SEQUENCE}, {0: BATCH}] + ([{0: BATCH}] if wrapper.classifier else [])
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
    if wrapper.classifier:
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


def _image_spec(model: nn.Module) -> ExportSpec:
    cfg = model.config
    c = int(getattr(cfg, "num_channels", 3))
    size = getattr(cfg, "image_size", 224)
    h, w = (int(s) for s in size) if isinstance(size, (list, tuple)) else (int(size), int(size))

    def make(batch: int, _seq: int | None, gen: torch.Generator) -> tuple[Tensor, ...]:
        return (torch.randn(batch, c, h, w, generator=gen),)

    wrapper = ImageEncoderExport(model).eval()
    output = "logits" if wrapper.classifier else "embedding"
    return ExportSpec(
        module=wrapper,
        input_names=["pixel_values"],
        output_names=[output],
        input_dims=[{0: BATCH}],
        output_dims=[{0: BATCH}],
        dim_bounds={BATCH: (1, MAX_DYNAMIC_BATCH)},
        make_inputs=make,
        load_hint=f"torch.export.load(path).module()(pixel_values) -> {output}",
        input_info=[{"description": "normalised images; see preprocessing"}],
        output_info=[{"description": "classifier logits" if wrapper.classifier else "final [CLS] token state"}],
    )
