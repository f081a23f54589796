"""Text calibration / evaluation sources, the text preprocessing record, and tokenised batches.

Spec forms for `open_text_source`:
  text:pydoc[@PART]           Python's own documentation (pydoc_data.topics), on every install
  text:FILE[@PART]            a UTF-8 plain text file
  hf:NAME[:CONFIG][@SPLIT]    a Hugging Face dataset with a text column, streamed; one row = one text

What one text is depends on the model (its family's `text_unit`):
- "sentence" (encoders): sentences of 5-60 words of the prose (code blocks skipped);
- "document" (causal language models): whole documents, which LmTextPreprocessing cuts into
  windows of --seq-len tokens. A file's documents are its blank-line separated blocks, or its
  lines when it has no blank line (one story per line); pydoc's are its topics.

PART is `calib` or `eval`: two fixed, disjoint halves of the texts (by a hash of each text),
so calibration and evaluation never share a sentence or a document; without it, all of them.
Selection is a seeded subset in stable order, like the image sources, and every source
describes itself (spec, counts, seed, shard, fingerprint) for the artifacts' provenance.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from corp_cli.artifacts import canonical_json
from corp_cli.errors import InputError
from corp_cli.hub import offline_from_env

log = logging.getLogger(__name__)

PARTS = ("calib", "eval")
UNITS = ("sentence", "document")
MIN_WORDS = 5
MAX_WORDS = 60
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[A-Z0-9])")
_TEXT_COLUMNS = ("text", "sentence", "content", "document", "question")


def _sha256(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def split_sentences(text: str) -> list[str]:
    """Deterministic sentences of prose: paragraphs (blank-line separated), code blocks skipped.

    An indented paragraph or one with grammar/markup noise is treated as code, not prose.
    Sentences of MIN_WORDS..MAX_WORDS words are kept, duplicates dropped, order stable.
    """
    out: list[str] = []
    seen: set[str] = set()
    for para in re.split(r"\n\s*\n", text):
        lines = [ln for ln in para.splitlines() if ln.strip()]
        if not lines or lines[0].startswith((" ", "\t")):
            continue
        if len(lines) >= 2 and set(lines[1].strip()) <= set("*=-~^#"):  # a heading and its underline
            lines = lines[2:]
        flat = " ".join(ln.strip() for ln in lines)
        for sent in _SENTENCE_END.split(flat):
            sent = sent.strip()
            words = len(sent.split())
            if MIN_WORDS <= words <= MAX_WORDS and sent not in seen:
                seen.add(sent)
                out.append(sent)
    return out


def pydoc_sentences() -> list[str]:
    from pydoc_data.topics import topics

    # sorted keys: the dict's order is an implementation detail of its generator
    return split_sentences("\n\n".join(topics[k] for k in sorted(topics)))


def split_documents(text: str) -> list[str]:
    """Documents of a plain text: its blank-line separated blocks, or its lines when there is no blank line.

    Ends are stripped, line breaks inside a block kept, empty ones and duplicates dropped, order stable.
    """
    text = text.replace("\r\n", "\n")
    blank = re.compile(r"\n[ \t]*\n")
    blocks = blank.split(text) if blank.search(text.strip()) else text.split("\n")
    return list(dict.fromkeys(b.strip() for b in blocks if b.strip()))


def pydoc_documents() -> list[str]:
    from pydoc_data.topics import topics

    return list(dict.fromkeys(topics[k].strip() for k in sorted(topics) if topics[k].strip()))


def _in_part(sentence: str, part: str | None) -> bool:
    if part is None:
        return True
    bit = hashlib.sha256(sentence.encode()).digest()[0] & 1
    return bit == (0 if part == "calib" else 1)


def _select(total: int, samples: int | None, seed: int) -> list[int]:
    if samples is None or samples >= total:
        return list(range(total))
    gen = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(total, generator=gen)[:samples].tolist())


class TextSource:
    """A deterministic, possibly sharded, list of texts (sentences or dataset rows)."""

    kind = "text"
    synthetic = False
    labels = False

    def __init__(self, spec: str, texts: Sequence[str], *, origin: Any, samples: int | None, seed: int,
                 shard: tuple[int, int] | None, selected_from: int) -> None:
        self.spec = spec
        self.samples = samples
        self.seed = seed
        self.shard = shard
        self.selected = len(texts)
        self.available = selected_from
        self.base_fingerprint = _sha256(["text", origin, _sha256(list(texts)), seed])
        self.fingerprint = self.base_fingerprint if shard is None else _sha256(["shard", self.base_fingerprint, list(shard)])
        self.texts = [t for pos, t in enumerate(texts) if shard is None or pos % shard[1] == shard[0]]
        self.num_items = len(self.texts)
        self.skipped = 0
        self.warnings: list[str] = []

    def __len__(self) -> int:
        return self.num_items

    def describe(self) -> dict[str, Any]:
        return {
            "spec": self.spec, "kind": self.kind, "synthetic": False, "labels": False,
            "samples": self.samples, "selected": self.selected, "available": self.available,
            "count": self.num_items, "seed": self.seed,
            "shard": None if self.shard is None else list(self.shard),
            "fingerprint": self.fingerprint, "base_fingerprint": self.base_fingerprint,
            "skipped": 0, "warnings": list(self.warnings),
        }


def is_text_spec(spec: str) -> bool:
    return spec.startswith("text:")


def open_text_source(
    spec: str, *, samples: int | None, seed: int = 0, shard: tuple[int, int] | None = None, unit: str = "sentence",
) -> TextSource:
    """The texts `spec` names, as sentences or documents (`unit`), seeded subset of `samples` of them."""
    if unit not in UNITS:
        raise ValueError(f"text unit must be one of {UNITS}, not {unit!r}")
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
        raise InputError(f"samples must be a positive integer, got {samples!r}")
    if spec.startswith("hf:"):
        return _hf_text_source(spec, samples=samples, seed=seed, shard=shard)
    if not spec.startswith("text:"):
        raise InputError(f"{spec}: text models take --data text:pydoc, text:FILE or hf:NAME (a dataset with a text column)")
    body = spec[len("text:"):]
    part = None
    for p in PARTS:
        if body.endswith("@" + p):
            body, part = body[: -len(p) - 1], p
    if not body:
        raise InputError(f"{spec}: expected text:pydoc or text:FILE[@calib|@eval]")
    documents = unit == "document"
    if body == "pydoc":
        sentences, origin = (pydoc_documents() if documents else pydoc_sentences()), ["pydoc"]
    else:
        path = Path(body).expanduser()
        if not path.is_file():
            raise InputError(f"{spec}: {path} is not a file (text:pydoc is the built-in source)")
        try:
            raw = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError) as e:
            raise InputError(f"{spec}: cannot read {path} as UTF-8 text ({type(e).__name__})") from None
        sentences, origin = (split_documents(raw) if documents else split_sentences(raw)), ["file", path.name]
    sentences = [s for s in sentences if _in_part(s, part)]
    if not sentences:
        found = "documents (non-empty lines or blank-line separated blocks)" if documents else \
            f"sentences of {MIN_WORDS}-{MAX_WORDS} words"
        raise InputError(f"{spec}: no {found} found")
    chosen = [sentences[i] for i in _select(len(sentences), samples, seed)]
    # documents are a different selection of the same text: their own fingerprint (sentences keep theirs)
    origin = [*origin, part] + (["document"] if documents else [])
    src = TextSource(spec, chosen, origin=origin, samples=samples, seed=seed, shard=shard,
                     selected_from=len(sentences))
    if samples is not None and samples > len(sentences):
        src.warnings.append(f"{spec}: asked for {samples} samples but only {len(sentences)} exist; using all")
        log.warning("%s", src.warnings[-1])
    return src


def _hf_text_source(spec: str, *, samples: int | None, seed: int, shard: tuple[int, int] | None) -> TextSource:
    """The first `samples` non-empty texts of a streamed split (a stream has no cheap random subset)."""
    body = spec[len("hf:"):]
    name_config, _, split = body.rpartition("@") if "@" in body else (body, "", "train")
    name, _, config = name_config.partition(":")
    if not name or not split:
        raise InputError(f"{spec}: expected hf:NAME[:CONFIG][@SPLIT]")
    import datasets

    try:
        with offline_from_env():
            ds = datasets.load_dataset(name, config or None, split=split, streaming=True)
            features = ds.features or {}
            col = next((c for c, f in features.items() if getattr(f, "dtype", None) == "string" and c in _TEXT_COLUMNS), None)
            col = col or next((c for c, f in features.items() if getattr(f, "dtype", None) == "string"), None)
            if col is None:
                raise InputError(f"{spec}: no text column among {list(features)}")
            rows = (r[col] for r in ds)
            texts = [t.strip() for t in itertools.islice((t for t in rows if isinstance(t, str) and t.strip()), samples)]
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - hub, cache and builder failures mean the same to the user
        raise InputError(f"hf dataset {name!r} (split {split!r}) could not be read (offline?): {type(e).__name__}; "
                         "use --data text:FILE or text:pydoc") from None
    if not texts:
        raise InputError(f"{spec}: no non-empty texts in column {col!r}")
    return TextSource(spec, texts, origin=["hf", name, config or None, split, col], samples=samples, seed=seed,
                      shard=shard, selected_from=len(texts))


def length_order(texts: Sequence[str], tokenizer: Any, max_length: int) -> list[int]:
    """Indices of `texts` by token count (stable): batches of similar lengths waste little on padding."""
    lengths = [len(ids) for ids in tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]]
    return sorted(range(len(texts)), key=lambda i: lengths[i])


def text_batches(
    texts: Sequence[str], tokenizer: Any, batch_size: int, max_length: int, order: Sequence[int] | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Tokenised batches (input_ids, attention_mask, token_type_ids if the model takes them), padded per batch.

    `order` (e.g. length_order) sets which texts share a batch; without it, the given order.
    Padding never counts (the attention mask says which tokens are real), so the order
    changes only the speed, not the statistics.
    """
    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")
    idx = list(order) if order is not None else list(range(len(texts)))
    for start in range(0, len(idx), batch_size):
        chunk = [texts[i] for i in idx[start:start + batch_size]]
        enc = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        yield {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


@dataclass(frozen=True)
class TextPreprocessing:
    """How text becomes model inputs and how token states become one embedding.

    `tokenizer` is provenance (where the tokenizer was read from when the record was made);
    `tokenizer_dir` is where this process loads it from (a pruned model's own copy), and is
    not part of the record.
    """

    tokenizer: str
    max_length: int
    pooling: str  # "mean" over real tokens, or "cls"
    normalize: bool
    tokenizer_dir: Path | None = field(default=None, compare=False)

    kind: ClassVar[str] = "text"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "text", "tokenizer": self.tokenizer, "max_length": self.max_length,
                "pooling": self.pooling, "normalize": self.normalize}

    @staticmethod
    def from_dict(d: dict[str, Any], tokenizer_dir: Path | None = None) -> TextPreprocessing:
        try:
            return TextPreprocessing(str(d["tokenizer"]), int(d["max_length"]), str(d["pooling"]), bool(d["normalize"]),
                                     tokenizer_dir=tokenizer_dir)
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"text preprocessing record is malformed ({e})") from None

    def load_tokenizer(self) -> Any:
        folder = self.tokenizer_dir or Path(self.tokenizer)
        return load_tokenizer(folder)

    def count(self, source: TextSource) -> int:
        """How many sequences batches() yields for `source`: one per text."""
        return source.num_items

    def batches(self, source: TextSource, batch_size: int, workers: int = 0) -> Iterator[tuple[dict[str, torch.Tensor], None]]:
        """Tokenised batches of similar lengths (little padding), in a fixed order; no labels."""
        tok = self.load_tokenizer()
        order = length_order(source.texts, tok, self.max_length)
        for batch in text_batches(source.texts, tok, batch_size, self.max_length, order):
            yield batch, None

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, N, D) token states -> (B, D) sentence embeddings, padding excluded."""
        if self.pooling == "cls":
            emb = hidden[:, 0]
        else:
            m = mask.to(hidden.dtype).unsqueeze(-1)
            emb = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
        return F.normalize(emb, dim=-1) if self.normalize else emb


@dataclass(frozen=True)
class LmTextPreprocessing:
    """How a causal language model reads text: documents cut into windows of at most `max_length` tokens.

    Each document is tokenised as the tokenizer does it alone (its BOS, where it adds one) and
    cut into consecutive windows of `max_length` tokens (the last one shorter); a window never
    spans two documents, so no token attends to an unrelated text. Windows are batched by
    length and padded on the right; the attention mask keeps padding out of the causal
    attention, the statistics and the scores. `tokenizer_dir` is where this process loads the
    tokenizer from, not part of the record.
    """

    tokenizer: str
    max_length: int
    tokenizer_dir: Path | None = field(default=None, compare=False)

    kind: ClassVar[str] = "text"
    unit: ClassVar[str] = "document"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "text", "unit": self.unit, "tokenizer": self.tokenizer, "max_length": self.max_length}

    @staticmethod
    def from_dict(d: dict[str, Any], tokenizer_dir: Path | None = None) -> LmTextPreprocessing:
        try:
            return LmTextPreprocessing(str(d["tokenizer"]), int(d["max_length"]), tokenizer_dir=tokenizer_dir)
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"language-model text preprocessing record is malformed ({e})") from None

    def load_tokenizer(self) -> Any:
        return load_tokenizer(self.tokenizer_dir or Path(self.tokenizer))

    def windows(self, texts: Sequence[str], tokenizer: Any) -> list[list[int]]:
        """Every document's token ids, cut into consecutive windows of at most max_length tokens."""
        ids = tokenizer(list(texts), add_special_tokens=True, verbose=False)["input_ids"]
        n = self.max_length
        return [doc[i:i + n] for doc in ids for i in range(0, len(doc), n) if doc[i:i + n]]

    def count(self, source: TextSource) -> int:
        """How many windows (sequences) batches() yields for `source`."""
        return len(self.windows(source.texts, self.load_tokenizer()))

    def batches(self, source: TextSource, batch_size: int, workers: int = 0) -> Iterator[tuple[dict[str, torch.Tensor], None]]:
        """Right-padded batches of windows of similar lengths, in a fixed order; no labels."""
        if batch_size < 1:
            raise InputError(f"batch size must be >= 1, got {batch_size}")
        tok = self.load_tokenizer()
        wins = self.windows(source.texts, tok)
        order = sorted(range(len(wins)), key=lambda i: len(wins[i]))
        pad = next((t for t in (tok.pad_token_id, tok.eos_token_id, 0) if t is not None))  # never attended to
        for start in range(0, len(order), batch_size):
            chunk = [wins[i] for i in order[start:start + batch_size]]
            width = max(len(w) for w in chunk)
            ids = torch.full((len(chunk), width), int(pad), dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, w in enumerate(chunk):
                ids[r, :len(w)] = torch.tensor(w, dtype=torch.long)
                mask[r, :len(w)] = 1
            yield {"input_ids": ids, "attention_mask": mask}, None


def load_tokenizer(folder: str | Path) -> Any:
    from corp_cli.hub import transformers_module

    transformers = transformers_module()
    try:
        with offline_from_env():
            return transformers.AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # noqa: BLE001
        detail = str(e).splitlines()[0][:120] if str(e) else ""
        raise InputError(f"{folder}: no usable tokenizer ({type(e).__name__}: {detail})") from None
