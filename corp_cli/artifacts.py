"""Atomic, self-describing artifact I/O: safetensors with one JSON metadata entry, and JSON files.

Every artifact is written to a temporary file in the target directory and renamed into
place, so an interrupted run never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

from corp_cli.errors import ArtifactError

# All corp metadata travels as one canonical JSON string under this key, so that the file
# bytes do not depend on how the safetensors writer orders its metadata map.
META_KEY = "corp"
FORMAT_VERSION = 1


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temp path beside `final`; rename it onto `final` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; artifacts get the usual mode
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(final: Path, data: bytes) -> None:
    with atomic_path(final) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_json_atomic(final: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=True) + "\n"
    write_bytes_atomic(final, text.encode())


def safetensors_bytes(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> bytes:
    """Serialise tensors with corp metadata; contiguous CPU copies so the bytes are reproducible."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in sorted(tensors.items())}
    return st_save(flat, metadata={META_KEY: canonical_json(dict(meta))})


def save_safetensors_atomic(final: Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    write_bytes_atomic(final, safetensors_bytes(tensors, meta))


def read_safetensors(path: Path, *, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a corp artifact of the given kind ('stats', 'masks', 'model'); validate its header."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw_meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ArtifactError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None
    meta = parse_meta(raw_meta, path)
    if meta.get("kind") != kind:
        raise ArtifactError(f"{path}: expected a corp {kind} file, found kind {meta.get('kind')!r}")
    return tensors, meta


def parse_meta(raw_meta: Mapping[str, str], path: Path) -> dict[str, Any]:
    text = raw_meta.get(META_KEY)
    if text is None:
        raise ArtifactError(f"{path}: not a corp artifact (no '{META_KEY}' metadata); was it written by corp?")
    try:
        meta = json.loads(text)
    except json.JSONDecodeError:
        raise ArtifactError(f"{path}: corrupt corp metadata (not JSON)") from None
    if not isinstance(meta, dict):
        raise ArtifactError(f"{path}: corrupt corp metadata (not a JSON object)")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: corp format version {version!r} is not supported by this corp (expects {FORMAT_VERSION})"
        )
    return meta


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def check_out_dir(final: Path, *, overwrite: bool) -> None:
    """Refuse a non-empty output directory unless overwriting; refuse a file in its place."""
    final = Path(final)
    if final.exists() and not final.is_dir():
        raise ArtifactError(f"--out {final} exists and is not a directory")
    if final.is_dir() and any(final.iterdir()) and not overwrite:
        raise ArtifactError(f"--out {final} is not empty; pass --overwrite to replace its contents")
    parent = final.parent if final.parent != Path("") else Path(".")
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        raise ArtifactError(f"--out {final}: directory {probe} is not writable")


def check_out_file(final: Path, *, overwrite: bool) -> None:
    final = Path(final)
    if final.is_dir():
        raise ArtifactError(f"--out {final} is a directory; give a file name")
    if final.exists() and not overwrite:
        raise ArtifactError(f"--out {final} already exists; pass --overwrite to replace it")
    probe = final.parent
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        raise ArtifactError(f"--out {final}: directory {probe} is not writable")


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Build a directory's contents in a temp sibling, then swap it into place.

    An interrupted or failed run leaves the previous `final` exactly as it was and no
    temporary directory behind (short of SIGKILL, after which only a hidden
    `.name.*.tmp` sibling can remain, never a half-written `final`).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    old: Path | None = None
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
            os.rmdir(old)
            os.replace(final, old)
        os.replace(tmp, final)
    except BaseException:
        if old is not None and old.exists() and not final.exists():
            os.replace(old, final)
        raise
    finally:
        for p in (tmp, old):
            if p is not None and p.exists():
                shutil.rmtree(p, ignore_errors=True)
