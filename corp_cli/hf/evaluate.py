"""Fidelity of a (pruned) HF encoder's pooled embeddings to a reference (dense) model.

Text: the sentence embedding the model folder declares (sentence-transformers: mean over
real tokens, then L2-normalised), computed here with transformers alone. Images: the
final CLS state. Figures, over one evaluation set:
  - mean / min cosine between each item's model and reference embeddings;
  - nearest-neighbour agreement: for each item, whether its nearest other item (cosine)
    is the same under the model as under the reference, i.e. whether retrieval survives;
  - for classifiers, top-1 agreement of the logits.
All comparisons are in float64, so the result does not depend on batching.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from corp_cli.errors import InputError
from corp_cli.hf.models import TextPreprocessing

log = logging.getLogger(__name__)


def pool_tokens(hidden: Tensor, mask: Tensor, prep: TextPreprocessing) -> Tensor:
    """(B, N, D) token states -> (B, D) sentence embeddings, padding excluded."""
    if prep.pooling == "cls":
        emb = hidden[:, 0]
    else:
        m = mask.to(hidden.dtype).unsqueeze(-1)
        emb = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return F.normalize(emb, dim=-1) if prep.normalize else emb


@torch.inference_mode()
def embed_texts(
    model: nn.Module, tokenizer: Any, texts: Sequence[str], prep: TextPreprocessing, batch_size: int = 64
) -> Tensor:
    from corp_cli.hf.text import length_order, text_batches

    dev = next(model.parameters()).device
    order = length_order(texts, tokenizer, prep.max_length)
    out = []
    for batch in text_batches(texts, tokenizer, batch_size, prep.max_length, order):
        batch = {k: v.to(dev) for k, v in batch.items()}
        hidden = model.base_model(**batch).last_hidden_state
        out.append(pool_tokens(hidden, batch["attention_mask"], prep).double().cpu())
    emb = torch.cat(out)
    result = torch.empty_like(emb)
    result[torch.tensor(order)] = emb  # back to the texts' own order
    return result


@torch.inference_mode()
def embed_images(model: nn.Module, batches: Iterable[Tensor]) -> tuple[Tensor, Tensor | None]:
    """Final CLS states and, for classifiers, logits."""
    dev = next(model.parameters()).device
    feats, logits = [], []
    head = getattr(model, "classifier", None)
    for x in batches:
        x = x.to(dev)
        hidden = model.base_model(pixel_values=x).last_hidden_state
        feats.append(hidden[:, 0].double().cpu())
        if head is not None:
            logits.append(model(pixel_values=x).logits.double().cpu())
    return torch.cat(feats), (torch.cat(logits) if logits else None)


def nearest_neighbours(emb: Tensor) -> Tensor:
    """Index of each row's most cosine-similar other row."""
    e = F.normalize(emb.double(), dim=-1)
    sim = e @ e.T
    sim.fill_diagonal_(-float("inf"))
    return sim.argmax(1)


def embedding_fidelity(emb: Tensor, ref: Tensor) -> dict[str, Any]:
    if emb.shape != ref.shape:
        raise InputError(f"model and reference embeddings differ in shape ({tuple(emb.shape)} vs {tuple(ref.shape)})")
    cos = F.cosine_similarity(emb.double(), ref.double(), dim=-1, eps=1e-30)
    res: dict[str, Any] = {
        "compared": int(emb.shape[0]),
        "cosine_mean": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "embedding_error": float(1.0 - cos.mean()),
    }
    if emb.shape[0] >= 3:
        res["nn_agreement"] = float((nearest_neighbours(emb) == nearest_neighbours(ref)).double().mean())
    return res


def text_fidelity(
    model: nn.Module, reference: nn.Module, tokenizer: Any, texts: Sequence[str], prep: TextPreprocessing,
    batch_size: int = 64,
) -> dict[str, Any]:
    """The fidelity figures of `model` against `reference` on `texts` (both fed the same tokens)."""
    return embedding_fidelity(embed_texts(model, tokenizer, texts, prep, batch_size),
                              embed_texts(reference, tokenizer, texts, prep, batch_size))


# ---------------------------------------------------------------------------- the command


def is_hf_target(model: str) -> bool:
    """Whether `corp evaluate MODEL` names an HF model: a dense folder/hub id, or a pruned HF checkpoint."""
    from corp_cli.hf import is_hf_family, is_hf_model_spec

    if is_hf_model_spec(model):
        return True
    p = Path(model).expanduser()
    f = p / "model.safetensors" if p.is_dir() else p
    if not (f.is_file() and f.suffix == ".safetensors"):
        return False
    from corp_cli.artifacts import META_KEY
    from safetensors import safe_open

    try:
        with safe_open(str(f), framework="pt") as h:
            meta = json.loads((h.metadata() or {}).get(META_KEY, "{}"))
    except Exception:  # noqa: BLE001 - an unreadable file is reported by the normal path, not here
        return False
    return isinstance(meta, dict) and is_hf_family((meta.get("architecture") or {}).get("family"))


def load_for_eval(model: str, device: torch.device) -> tuple[nn.Module, dict[str, Any], Any, Path | None]:
    """(model, description, preprocessing, tokenizer folder or None) for a dense or pruned HF model."""
    from corp_cli.hf import is_hf_model_spec
    from corp_cli.hf.models import SOURCE_ATTR, load_hf_model_and_preprocessing

    if is_hf_model_spec(model):
        loaded, prep = load_hf_model_and_preprocessing(model, device)
        desc = {"kind": "dense", "name": loaded.identity.name, "identity": loaded.identity.to_dict(),
                "base": loaded.identity.to_dict()}
        src = getattr(loaded.model, SOURCE_ATTR, None)
        return loaded.model, desc, prep, Path(src) if src else None
    from corp_cli.compact import load_pruned, read_pruned

    _, meta = read_pruned(model)
    net = load_pruned(model, device=device)
    arch = meta["architecture"]
    prep_d = meta.get("preprocessing") or {}
    if prep_d.get("kind") == "text":
        prep: Any = TextPreprocessing.from_dict(prep_d)
    else:
        from corp_cli.preprocess import Preprocessing

        prep = Preprocessing.from_dict(prep_d)
    desc = {"kind": "pruned", "name": arch["base_model"], "identity": None, "base": meta.get("base"),
            "source": arch.get("source"), "options": meta.get("options"), "architecture": arch}
    src = getattr(net, SOURCE_ATTR, None)
    return net, desc, prep, Path(src) if src else None


def default_reference(desc: dict[str, Any]) -> str | None:
    """The dense model a pruned one came from, when it can be found again (hub id or the folder it was read from)."""
    if desc["kind"] != "pruned":
        return None
    src = desc.get("source")
    if src and (str(src).startswith("hf-model:") or Path(src).is_dir()):
        return str(src)
    return None


def hf_evaluate_cmd(
    model: str, *, data: str, reference: str | None, samples: int | None, seed: int, device: str,
    batch_size: int, json_out: str | None,
) -> None:
    from rich.table import Table

    from corp_cli.commands import common as C
    from corp_cli.commands.common import write_json
    from corp_cli.commands.evaluate import environment
    from corp_cli.models import resolve_device

    dev = resolve_device(device)
    net, desc, prep, tok_dir = load_for_eval(model, dev)
    ref_name = reference or default_reference(desc)
    if ref_name is None:
        raise InputError(f"{model}: no reference to compare with; pass --reference MODEL_DIR (the dense model)")
    ref, ref_desc, _, ref_tok = load_for_eval(ref_name, dev)
    if desc["kind"] == "pruned" and ref_desc.get("identity") is not None:
        ref_desc["matches_base"] = ref_desc["identity"] == desc.get("base")
        if not ref_desc["matches_base"]:
            log.warning("the reference %s is not the model %s was pruned from (%s)", ref_desc["identity"], model, desc.get("base"))
    t0 = time.perf_counter()
    if isinstance(prep, TextPreprocessing):
        from corp_cli.hf.models import load_tokenizer
        from corp_cli.hf.text import open_text_source

        folder = tok_dir or ref_tok
        if folder is None:
            raise InputError(f"{model}: no tokenizer saved with it or with the reference")
        source = open_text_source(data, samples=samples, seed=seed)
        res = text_fidelity(net, ref, load_tokenizer(folder), source.texts, prep, batch_size)
        items = len(source.texts)
    else:
        from corp_cli.data import make_batches, open_source

        source = open_source(data, samples=samples, seed=seed)
        feats, logits = embed_images(net, (x for x, _ in make_batches(source, prep.transform(), batch_size)))
        rfeats, rlogits = embed_images(ref, (x for x, _ in make_batches(source, prep.transform(), batch_size)))
        res = embedding_fidelity(feats, rfeats)
        if logits is not None and rlogits is not None:
            res["top1_agreement"] = float((logits.argmax(1) == rlogits.argmax(1)).double().mean())
        items = int(feats.shape[0])
    seconds = time.perf_counter() - t0
    report = {
        "command": "evaluate", "model": desc, "reference": {"spec": ref_name, **ref_desc}, "data": source.describe(),
        "synthetic": bool(getattr(source, "synthetic", False)), "preprocessing": prep.to_dict(),
        "batch_size": batch_size, "environment": environment(dev), "results": {"samples": items, "fidelity": res},
        "seconds": round(seconds, 3), "samples_per_second": round(items / max(seconds, 1e-9), 2),
    }
    if write_json(json_out, report):
        return
    table = Table(title=f"corp evaluate {desc['name']} ({desc['kind']}) vs {ref_name} on {source.spec}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("embedding cosine mean", f"{res['cosine_mean']:.5f}")
    table.add_row("embedding cosine min", f"{res['cosine_min']:.5f}")
    if "nn_agreement" in res:
        table.add_row("nearest-neighbour agreement", f"{100 * res['nn_agreement']:.2f}%")
    if "top1_agreement" in res:
        table.add_row("top-1 agreement", f"{100 * res['top1_agreement']:.2f}%")
    C.out.print(table)
    unit = C.sample_unit(report["preprocessing"])
    C.out.print(f"{items} {unit}, {seconds:.1f}s ({report['samples_per_second']:.1f} {unit}/s)")
