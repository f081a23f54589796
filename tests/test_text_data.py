"""Text sources: sentence splitting, the built-in pydoc source, disjoint calib/eval halves, provenance."""

from __future__ import annotations

from pathlib import Path

import pytest

from corp_cli.errors import InputError
from corp_cli.text import (
    MAX_WORDS, MIN_WORDS, open_text_source, pydoc_documents, pydoc_sentences, split_documents, split_sentences,
)

PROSE = """Title of the page
*****************

This is the first sentence of a paragraph. This is the second sentence, which is longer!
Too short. Is this the third sentence of the paragraph?

   code_block = "indented lines are code, not prose, and are skipped entirely"

This is the first sentence of a paragraph. A repeated sentence above is dropped as a duplicate.
"""


def test_split_sentences_is_deterministic_and_filters() -> None:
    got = split_sentences(PROSE)
    assert got == [
        "This is the first sentence of a paragraph.",
        "This is the second sentence, which is longer!",
        "Is this the third sentence of the paragraph?",
        "A repeated sentence above is dropped as a duplicate.",
    ]
    assert split_sentences(PROSE) == got


def test_pydoc_source_halves_are_disjoint_and_seeded() -> None:
    sents = pydoc_sentences()
    assert len(sents) > 1000 and len(set(sents)) == len(sents)
    assert all(MIN_WORDS <= len(s.split()) <= MAX_WORDS for s in sents)
    calib = open_text_source("text:pydoc@calib", samples=256, seed=0)
    evals = open_text_source("text:pydoc@eval", samples=256, seed=0)
    assert len(calib) == len(evals) == 256
    assert not set(calib.texts) & set(evals.texts)
    again = open_text_source("text:pydoc@calib", samples=256, seed=0)
    other = open_text_source("text:pydoc@calib", samples=256, seed=1)
    assert again.texts == calib.texts and again.fingerprint == calib.fingerprint
    assert other.texts != calib.texts and other.fingerprint != calib.fingerprint
    d = calib.describe()
    assert d["kind"] == "text" and d["spec"] == "text:pydoc@calib" and d["count"] == 256 and not d["synthetic"]


def test_shards_partition_the_selection() -> None:
    full = open_text_source("text:pydoc", samples=100, seed=3)
    shards = [open_text_source("text:pydoc", samples=100, seed=3, shard=(i, 3)) for i in range(3)]
    assert sorted(t for s in shards for t in s.texts) == sorted(full.texts)
    assert len({s.base_fingerprint for s in shards}) == 1 and len({s.fingerprint for s in shards}) == 3


def test_text_file_source(tmp_path: Path) -> None:
    f = tmp_path / "notes.txt"
    f.write_text(PROSE, encoding="utf-8")
    src = open_text_source(f"text:{f}", samples=None)
    assert src.texts == split_sentences(PROSE)
    with pytest.raises(InputError, match="not a file"):
        open_text_source(f"text:{tmp_path / 'missing.txt'}", samples=10)
    empty = tmp_path / "empty.txt"
    empty.write_text("Too short.\n", encoding="utf-8")
    with pytest.raises(InputError, match="no sentences"):
        open_text_source(f"text:{empty}", samples=10)
    with pytest.raises(InputError):
        open_text_source("text:", samples=10)


def test_documents_are_lines_or_blank_line_separated_blocks() -> None:
    assert split_documents("one story.\ntwo story.\r\n\n") == ["one story.", "two story."]  # no blank line inside
    assert split_documents("a para\nwrapped here.\n\n  \nnext one.\n\na para\nwrapped here.") == [
        "a para\nwrapped here.", "next one."]  # blank-line blocks, line breaks kept, duplicates dropped
    assert split_documents("\n \n") == []


def test_document_sources_halve_documents_and_keep_sentence_fingerprints_apart(tmp_path: Path) -> None:
    f = tmp_path / "stories.txt"
    f.write_text("\n".join(f"Story number {i} is about a cat and a dog." for i in range(40)), encoding="utf-8")
    calib = open_text_source(f"text:{f}@calib", samples=None, unit="document")
    evals = open_text_source(f"text:{f}@eval", samples=None, unit="document")
    assert len(calib) + len(evals) == 40 and not set(calib.texts) & set(evals.texts)
    assert sorted(calib.texts + evals.texts) == sorted(split_documents(f.read_text()))
    sentences = open_text_source(f"text:{f}@calib", samples=None)  # an encoder's view: sentences
    assert sentences.fingerprint != calib.fingerprint
    docs = pydoc_documents()
    assert len(docs) > 50 and len(set(docs)) == len(docs)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n", encoding="utf-8")
    with pytest.raises(InputError, match="no documents"):
        open_text_source(f"text:{empty}", samples=None, unit="document")
