"""Atomic, self-describing artifact I/O: safetensors with one JSON metadata entry, and JSON files.

Every artifact is written to a temporary file in the target directory and renamed into
place, so an interrupted run never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from corp_cli.errors import ArtifactError

log = logging.getLogger(__name__)

# Test hook, not a feature: "SECONDS" or "SECONDS:NAME" makes every atomic write (or only
# those whose final path is named NAME) sleep just before its rename, after announcing it
# on stderr, so the fault-injection tests can kill a run in the middle of writing.
TEST_PAUSE_ENV = "CORP_TEST_PAUSE_BEFORE_RENAME"

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
    made = _make_parents(final.parent)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; artifacts get the usual mode
        _test_pause(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()
            _remove_if_empty(made)  # the write failed: take back the folders made for it


def _make_parents(folder: Path) -> list[Path]:
    """mkdir -p, returning the folders it created (innermost first) so a failed write can take them back."""
    missing: list[Path] = []
    p = folder
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def _remove_if_empty(folders: list[Path]) -> None:
    for p in folders:  # innermost first; stop at one something else has written into meanwhile
        try:
            p.rmdir()
        except OSError:
            return


def _test_pause(final: Path) -> None:
    spec = os.environ.get(TEST_PAUSE_ENV)
    if not spec:
        return
    seconds, _, name = spec.partition(":")
    if name and name != final.name:
        return
    sys.stderr.write(f"corp test hook: pausing before renaming into {final}\n")
    sys.stderr.flush()
    time.sleep(float(seconds))


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
    # clone(): safetensors refuses tensors that share storage (e.g. one mask reused for two blocks).
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in sorted(tensors.items())}
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
            # Header first: a foreign file is refused before its tensors are read.
            meta = parse_meta(f.metadata() or {}, path)
            if meta.get("kind") != kind:
                raise ArtifactError(f"{path}: expected a corp {kind} file, found kind {meta.get('kind')!r}")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except ArtifactError:
        raise
    # The reader parses an untrusted header: whatever it raises means "not a valid file".
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ValueError, ...
        raise ArtifactError(
            f"{path}: not a readable safetensors file ({_first_line(e)}); is it truncated, or not a corp artifact?"
        ) from None
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
    if isinstance(version, bool) or version != FORMAT_VERSION:  # True == 1 in Python
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
    _check_creatable(final)


def check_out_file(final: Path, *, overwrite: bool) -> None:
    final = Path(final)
    if final.is_dir():
        raise ArtifactError(f"--out {final} is a directory; give a file name")
    if final.exists() and not overwrite:
        raise ArtifactError(f"--out {final} already exists; pass --overwrite to replace it")
    _check_creatable(final)


def _check_creatable(final: Path) -> None:
    """Fail now, before any work, if the temp file/dir beside `final` could not be created.

    Permission bits say little when running as root or on special file systems (/proc,
    read-only mounts), so this creates and removes a real probe file in the nearest
    existing ancestor. A regular file on the way (`--out some.file/sub`) is named.
    """
    parent = final.absolute().parent
    probe = parent
    while not probe.exists() and not probe.is_symlink():
        probe = probe.parent
    if not probe.is_dir():
        raise ArtifactError(f"--out {final}: {probe} is not a directory, so nothing can be created under it")
    try:
        fd, name = tempfile.mkstemp(prefix=".corp-write-probe.", dir=probe)
    except OSError as e:
        raise ArtifactError(f"--out {final}: directory {probe} is not writable ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(name)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Build a directory's contents in a temp sibling, then swap it into place.

    An interrupted or failed run leaves the previous `final` exactly as it was and no
    temporary directory behind (short of SIGKILL, after which only a hidden
    `.name.*.tmp` sibling can remain, never a half-written `final`).
    """
    final = Path(final)
    made = _make_parents(final.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    old: Path | None = None
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        _test_pause(final)
        if final.exists() and _exchange(tmp, final):
            pass  # tmp now holds the previous contents; the finally removes them
        else:
            if final.exists():
                # No atomic exchange here: a SIGKILL between these two renames would leave
                # only the hidden .old sibling, which holds the previous contents intact.
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
        if not final.exists():
            _remove_if_empty(made)  # the build failed: take back the folders made for it


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported.

    With it, replacing an existing --out directory has no moment at which --out is missing.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False  # file system or kernel without it: fall back to two renames
    raise OSError(code, os.strerror(code), str(b))
