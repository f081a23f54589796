"""Accuracy and fidelity of a (pruned) model of any family: top-k against labels, agreement with a reference.

Fidelity compares two models on the *same inputs*. On the pooled feature every family
defines (a timm ViT's pre-logits feature, a sentence embedding, a CLS state): mean and
min cosine, and nearest-neighbour agreement (is each item's nearest other item the same
under both models, i.e. does retrieval survive). With classifier logits on both sides:
top-1 agreement and mean KL(reference || model). Sums are accumulated in float64 so the
result does not depend on batching.

A causal language model (family evaluation() == "lm") is scored per predicted token
instead: perplexity of the batch's own next tokens, and against a reference the mean
KL(reference || model) of the next-token distributions and top-1 next-token agreement.
Position t predicts token t+1 where both are real (attention_mask 1), so padding never counts.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from corp_cli.errors import InputError
from corp_cli.family import Batch, Loaded, Outputs
from corp_cli.labels import synset_to_imagenet_index

log = logging.getLogger(__name__)

TOPK = (1, 5)
IMAGENET_CLASSES = 1000


@dataclass
class Accumulator:
    """Running sums for top-k accuracy and fidelity; `result()` turns them into means.

    Features of both models are kept (float32, on the CPU) for nearest-neighbour agreement,
    which needs the whole evaluation set.
    """

    num_classes: int
    topk: tuple[int, ...] = TOPK
    samples: int = 0
    labelled: int = 0
    correct: dict[int, int] = field(default_factory=dict)
    ref_correct: dict[int, int] = field(default_factory=dict)
    compared: int = 0
    logits_compared: int = 0
    agree: int = 0
    kl_sum: float = 0.0
    kl_max: float = 0.0
    cos_sum: float = 0.0
    cos_min: float = 1.0
    feats: list[Tensor] = field(default_factory=list)
    ref_feats: list[Tensor] = field(default_factory=list)

    def update(self, out: Outputs, labels: Tensor | None, ref: Outputs | None = None) -> None:
        self.samples += out.features.shape[0]
        if labels is not None and out.logits is not None:
            self._update_topk(self.correct, out.logits, labels)
            if ref is not None and ref.logits is not None:
                self._update_topk(self.ref_correct, ref.logits, labels)
        if ref is not None:
            self._update_fidelity(out, ref)

    def _update_topk(self, into: dict[int, int], logits: Tensor, labels: Tensor) -> None:
        labels = labels.to(logits.device)
        have = labels >= 0  # -1 marks an item without a label
        if not bool(have.any()):
            return
        if int(labels.max()) >= self.num_classes:
            raise InputError(
                f"label {int(labels.max())} is outside the model's {self.num_classes} classes; "
                "are the data's classes the model's?"
            )
        logits, labels = logits[have], labels[have]
        k_max = min(max(self.topk), logits.shape[1])
        top = logits.topk(k_max, dim=1).indices
        hits = top == labels[:, None]
        for k in self.topk:
            into[k] = into.get(k, 0) + int(hits[:, : min(k, k_max)].any(dim=1).sum())
        if into is self.correct:
            self.labelled += int(have.sum())

    def _update_fidelity(self, out: Outputs, ref: Outputs) -> None:
        n = out.features.shape[0]
        self.compared += n
        if out.logits is not None and ref.logits is not None:
            a, b = ref.logits.double(), out.logits.double()
            if a.shape != b.shape:
                raise InputError(f"model and reference disagree on the number of classes ({b.shape[1]} vs {a.shape[1]})")
            self.logits_compared += n
            self.agree += int((a.argmax(1) == b.argmax(1)).sum())
            la, lb = F.log_softmax(a, dim=1), F.log_softmax(b, dim=1)
            kl = (la.exp() * (la - lb)).sum(1)
            self.kl_sum += float(kl.sum())
            self.kl_max = max(self.kl_max, float(kl.max()))
        fa, fb = ref.features.double(), out.features.double()
        if fa.shape != fb.shape:
            raise InputError(f"model and reference features differ in shape ({tuple(fb.shape)} vs {tuple(fa.shape)})")
        cos = F.cosine_similarity(fa, fb, dim=1, eps=1e-30)
        self.cos_sum += float(cos.sum())
        self.cos_min = min(self.cos_min, float(cos.min()))
        self.feats.append(out.features.float().cpu())
        self.ref_feats.append(ref.features.float().cpu())

    def result(self) -> dict[str, Any]:
        res: dict[str, Any] = {"samples": self.samples}
        if self.labelled:
            res["accuracy"] = {
                "labelled": self.labelled,
                **{f"top{k}": self.correct.get(k, 0) / self.labelled for k in self.topk},
            }
            if self.ref_correct:
                res["reference_accuracy"] = {f"top{k}": self.ref_correct.get(k, 0) / self.labelled for k in self.topk}
        if self.compared:
            n = self.compared
            fid: dict[str, Any] = {"compared": n}
            if self.logits_compared:
                m = self.logits_compared
                fid.update({"top1_agreement": self.agree / m, "kl_mean": self.kl_sum / m, "kl_max": self.kl_max})
            fid.update({"feature_cosine_mean": self.cos_sum / n, "feature_cosine_min": self.cos_min})
            if n >= 3:
                fid["nn_agreement"] = nn_agreement(torch.cat(self.feats), torch.cat(self.ref_feats))
            res["fidelity"] = fid
        return res


# Logits of at most this many (positions x vocabulary) entries are scored at once, in float64.
LM_SCORE_CHUNK = 1 << 22


@dataclass
class LmAccumulator:
    """Running float64 sums over predicted tokens: negative log-likelihood, and fidelity to a reference."""

    samples: int = 0
    tokens: int = 0
    nll: float = 0.0
    ref_nll: float = 0.0
    compared: int = 0
    agree: int = 0
    kl_sum: float = 0.0
    kl_max: float = 0.0

    def update(self, out: Outputs, batch: Batch, ref: Outputs | None = None) -> None:
        logits = out.logits
        assert logits is not None and logits.ndim == 3, "a language model's outputs are (B, N, V) next-token logits"
        ids = batch["input_ids"].to(logits.device)
        mask = batch.get("attention_mask")
        real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.to(logits.device).bool()
        self.samples += int(ids.shape[0])
        valid = real[:, 1:] & real[:, :-1]  # position t predicts token t+1
        target = ids[:, 1:][valid]
        lp_all = logits[:, :-1][valid]
        lq_all = None
        if ref is not None:
            assert ref.logits is not None
            if ref.logits.shape != logits.shape:
                raise InputError(f"model and reference disagree on the vocabulary ({logits.shape[-1]} vs "
                                 f"{ref.logits.shape[-1]} next-token logits)")
            lq_all = ref.logits.to(logits.device)[:, :-1][valid]
        rows = max(1, LM_SCORE_CHUNK // max(1, logits.shape[-1]))
        for start in range(0, target.numel(), rows):
            t = target[start:start + rows]
            lp = F.log_softmax(lp_all[start:start + rows].double(), dim=-1)
            self.nll -= float(lp.gather(1, t[:, None]).sum())
            if lq_all is not None:
                lq = F.log_softmax(lq_all[start:start + rows].double(), dim=-1)
                self.ref_nll -= float(lq.gather(1, t[:, None]).sum())
                kl = (lq.exp() * (lq - lp)).sum(1)
                self.kl_sum += float(kl.sum())
                self.kl_max = max(self.kl_max, float(kl.max()))
                self.agree += int((lq.argmax(1) == lp.argmax(1)).sum())
                self.compared += int(t.numel())
        self.tokens += int(target.numel())

    def result(self) -> dict[str, Any]:
        res: dict[str, Any] = {"samples": self.samples, "tokens": self.tokens}
        if self.tokens:
            res.update({"nll_mean": self.nll / self.tokens, "perplexity": math.exp(self.nll / self.tokens)})
        if self.compared:
            n = self.compared
            res["reference_perplexity"] = math.exp(self.ref_nll / n)
            res["fidelity"] = {"compared": n, "top1_agreement": self.agree / n, "kl_mean": self.kl_sum / n,
                               "kl_max": self.kl_max}
        return res


def nearest_neighbours(emb: Tensor, chunk: int = 4096) -> Tensor:
    """Index of each row's most cosine-similar other row (in row chunks: memory stays O(chunk * N))."""
    e = F.normalize(emb.double(), dim=-1)
    out = torch.empty(e.shape[0], dtype=torch.int64)
    for start in range(0, e.shape[0], chunk):
        sim = e[start:start + chunk] @ e.T
        rows = torch.arange(sim.shape[0])
        sim[rows, rows + start] = -float("inf")
        out[start:start + chunk] = sim.argmax(1)
    return out


def nn_agreement(feats: Tensor, ref: Tensor) -> float:
    """How often an item's nearest other item is the same under the model as under the reference."""
    return float((nearest_neighbours(feats) == nearest_neighbours(ref)).double().mean())


def label_remap(source: Any, num_classes: int, class_names: Sequence[str] | None) -> Tensor | None:
    """A dataset-label -> model-class lookup table, or None when the labels are already model indices.

    Folder sources are mapped by data.py already (synsets via timm's ImageNet list). A
    Hugging Face ClassLabel numbers only the dataset's own classes (mini-imagenet: 0..99),
    so its names are translated: ImageNet synsets through timm's ImageNetInfo, other names
    through the model's class names.
    """
    names = hf_label_names(source)
    if names is None:
        return None
    synsets = [synset_to_imagenet_index(n) for n in names]
    if num_classes == IMAGENET_CLASSES and all(i is not None for i in synsets):
        log.info("mapping %d dataset synset labels to ImageNet-1k indices", len(names))
        return torch.tensor(synsets, dtype=torch.int64)
    if class_names is not None:
        index = {c: i for i, c in enumerate(class_names)}
        missing = [n for n in names if n not in index]
        if missing:
            raise InputError(f"dataset classes {missing[:5]} are not among the model's class names {list(class_names)[:10]}")
        return torch.tensor([index[n] for n in names], dtype=torch.int64)
    if len(names) != num_classes:
        log.warning(
            "the dataset has %d named classes and the model %d outputs with no names to match them; "
            "scoring dataset label i as model class i", len(names), num_classes,
        )
    return None


def hf_label_names(source: Any) -> list[str] | None:
    # data.py keeps the streamed dataset private; its ClassLabel names are what we need.
    ds = getattr(source, "_ds", None)
    col = getattr(source, "_label_col", None)
    if ds is None or col is None or getattr(ds, "features", None) is None:
        return None
    feat = ds.features.get(col)
    names = getattr(feat, "names", None)
    return list(names) if names else None


@dataclass
class EvalRun:
    result: dict[str, Any]
    seconds: float
    model_seconds: float


def evaluate(
    loaded: Loaded,
    batches: Iterable[tuple[Batch, Tensor | None]],
    *,
    reference: Loaded | None = None,
    reference_outputs: Sequence[Outputs] | None = None,
    remap: Tensor | None = None,
    device: torch.device | str = "cpu",
    on_batch: Callable[[int], None] | None = None,
    keep_outputs: list[Outputs] | None = None,
) -> EvalRun:
    """Score `loaded` on `batches` (labels, fidelity to `reference`, or to precomputed reference outputs).

    `keep_outputs`, when given, receives the model's CPU outputs per batch: a sweep
    computes the dense reference once and replays it with `reference_outputs`.
    """
    if reference is not None and reference_outputs is not None:
        raise ValueError("give reference or reference_outputs, not both")
    if loaded.family.evaluation(loaded.model) == "lm":
        return _evaluate_lm(loaded, batches, reference=reference, reference_outputs=reference_outputs, device=device,
                            on_batch=on_batch, keep_outputs=keep_outputs)
    acc = Accumulator(num_classes=loaded.identity.num_classes if loaded.family.has_classifier(loaded.model) else 0)
    t0 = time.perf_counter()
    model_s = 0.0
    with torch.inference_mode():
        for i, (batch, labels) in enumerate(batches):
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            if labels is not None and remap is not None:
                known = labels >= 0
                labels = torch.where(known, remap[labels.clamp(min=0)], labels)
            t = time.perf_counter()
            out = _cpu(loaded.family.outputs(loaded, batch))
            ref = _cpu(reference.family.outputs(reference, batch)) if reference is not None else None
            model_s += time.perf_counter() - t
            if reference_outputs is not None:
                if i >= len(reference_outputs):
                    raise ValueError("more batches than cached reference outputs")
                ref = reference_outputs[i]
            acc.update(out, labels, ref)
            if keep_outputs is not None:
                keep_outputs.append(out)
            if on_batch is not None:
                on_batch(int(out.features.shape[0]))
    seconds = time.perf_counter() - t0
    return EvalRun(acc.result(), seconds, model_s)


def _cpu(o: Outputs) -> Outputs:
    return Outputs(o.logits.float().cpu() if o.logits is not None else None, o.features.float().cpu())


def _evaluate_lm(
    loaded: Loaded,
    batches: Iterable[tuple[Batch, Tensor | None]],
    *,
    reference: Loaded | None,
    reference_outputs: Sequence[Outputs] | None,
    device: torch.device | str,
    on_batch: Callable[[int], None] | None,
    keep_outputs: list[Outputs] | None,
) -> EvalRun:
    """Perplexity and next-token fidelity, scored on the device (logits are (B, N, V): not copied unless kept)."""
    acc = LmAccumulator()
    t0 = time.perf_counter()
    model_s = 0.0
    with torch.inference_mode():
        for i, (batch, _labels) in enumerate(batches):
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            t = time.perf_counter()
            out = loaded.family.outputs(loaded, batch)
            ref = reference.family.outputs(reference, batch) if reference is not None else None
            model_s += time.perf_counter() - t
            if reference_outputs is not None:
                if i >= len(reference_outputs):
                    raise ValueError("more batches than cached reference outputs")
                ref = reference_outputs[i]
            acc.update(out, batch, ref)
            if keep_outputs is not None:
                keep_outputs.append(_cpu(out))
            if on_batch is not None:
                on_batch(int(batch["input_ids"].shape[0]))
    return EvalRun(acc.result(), time.perf_counter() - t0, model_s)
