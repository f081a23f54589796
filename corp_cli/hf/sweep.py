"""`corp sweep` for Hugging Face encoders: what one sweep point measures.

Text encoders: the fidelity of the pooled sentence embeddings to the dense model's on the
evaluation sentences (mean cosine, nearest-neighbour agreement); the dense embeddings are
computed once. Image models: the final CLS state's cosine and, for classifiers, top-1
agreement of the logits with the dense model. Labels are not scored for HF models.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from torch import Tensor, nn

from corp_cli.errors import InputError
from corp_cli.hf.evaluate import embed_images, embed_texts, embedding_fidelity
from corp_cli.hf.models import TextPreprocessing
from corp_cli.sweep import Measured

_DENSE_FIDELITY = {"cosine_mean": 1.0, "nn_agreement": 1.0}


class TextMeasure:
    metric = "cosine_mean"
    progress: Callable[[int], None] | None

    def __init__(
        self, tokenizer: Any, texts: Sequence[str], prep: TextPreprocessing, batch_size: int,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        if len(texts) < 1:
            raise InputError("the evaluation data yielded no texts")
        self.tokenizer, self.texts, self.prep, self.batch_size, self.progress = tokenizer, texts, prep, batch_size, progress
        self._ref: Tensor | None = None

    def __call__(self, model: nn.Module, *, dense: bool) -> Measured:
        t0 = time.perf_counter()
        emb = embed_texts(model, self.tokenizer, self.texts, self.prep, self.batch_size)
        if dense:
            self._ref = emb
            fields: dict[str, Any] = dict(_DENSE_FIDELITY)
        else:
            assert self._ref is not None, "the dense model is measured first"
            fid = embedding_fidelity(emb, self._ref)
            fields = {"cosine_mean": fid["cosine_mean"], "nn_agreement": fid.get("nn_agreement")}
        if self.progress is not None:
            self.progress(len(self.texts))
        return fields, time.perf_counter() - t0


class ImageEmbeddingMeasure:
    """HF ViT/DeiT: CLS-state cosine; classifiers are scored on top-1 agreement with the dense logits."""

    def __init__(self, batches: Callable[[], Iterable[Tensor]], *, classifier: bool,
                 progress: Callable[[int], None] | None = None) -> None:
        self.batches, self.progress = batches, progress
        self.metric = "top1_agreement" if classifier else "cosine_mean"
        self._ref: tuple[Tensor, Tensor | None] | None = None

    def __call__(self, model: nn.Module, *, dense: bool) -> Measured:
        t0 = time.perf_counter()
        feats, logits = embed_images(model, self.batches())
        if feats.shape[0] == 0:
            raise InputError("the evaluation data yielded no images")
        if dense:
            self._ref = (feats, logits)
            fields: dict[str, Any] = dict(_DENSE_FIDELITY)
            if logits is not None:
                fields["top1_agreement"] = 1.0
        else:
            assert self._ref is not None, "the dense model is measured first"
            fid = embedding_fidelity(feats, self._ref[0])
            fields = {"cosine_mean": fid["cosine_mean"], "nn_agreement": fid.get("nn_agreement")}
            ref_logits = self._ref[1]
            if logits is not None and ref_logits is not None:
                fields["top1_agreement"] = float((logits.argmax(1) == ref_logits.argmax(1)).double().mean())
        if self.progress is not None:
            self.progress(int(feats.shape[0]))
        return fields, time.perf_counter() - t0
