"""Load whatever a user names as a model: a dense model of any family, or a `corp prune` output.

Commands resolve the model once, here, and never branch on its family afterwards: a
pruned directory and a dense model are interchangeable everywhere downstream.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch

from corp_cli.artifacts import META_KEY
from corp_cli.devices import resolve_device
from corp_cli.errors import InputError
from corp_cli.family import Loaded, ModelFamily, ModelOptions
from corp_cli.registry import check_options, resolve

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"


def _corp_model_meta(path: Path) -> dict[str, Any] | None:
    """The corp metadata of a model checkpoint, read from the header only; None if it is not one."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as h:
            meta = json.loads((h.metadata() or {}).get(META_KEY, "null"))
    except Exception:  # noqa: BLE001 - unreadable files are reported by whoever reads them for real
        return None
    return meta if isinstance(meta, dict) and meta.get("kind") == "model" else None


def is_pruned_path(spec: str | Path) -> bool:
    """A corp output dir or checkpoint (as opposed to a model name or a dense model folder)."""
    p = Path(spec).expanduser()
    ckpt = p / MODEL_FILE if p.is_dir() else p
    if ckpt.is_file() and ckpt.suffix == ".safetensors" and _corp_model_meta(ckpt) is not None:
        return True
    if p.is_dir() and (p / "config.json").is_file():
        return False  # a dense Hugging Face folder
    # anything else on disk is read as a corp output, so its own errors are the ones reported
    return p.is_dir() or (p.is_file() and p.suffix == ".safetensors")


def findable(spec: str) -> bool:
    """Whether a recorded model spec can be loaded here (a folder that still exists, a name some family claims)."""
    from corp_cli.errors import CorpError

    try:
        resolve(spec)
    except CorpError:
        return False
    return True


def readable(path: Path, what: str) -> Path:
    """The file exists and can be read (os.access says yes to root for anything; opening is the real test)."""
    if not path.is_file():
        raise InputError(f"{what} {path} does not exist or is not a file")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise InputError(f"{what} {path} cannot be read ({e.strerror or e})") from None
    return path


def resolve_model(spec: str, options: ModelOptions) -> tuple[ModelFamily, str]:
    """The family and full name of a dense model spec, with every cheap check done: fail in seconds, not minutes."""
    fam, name = resolve(spec)
    check_options(fam, options)
    if options.checkpoint is not None:
        readable(Path(options.checkpoint), "checkpoint")
    if options.pretrained_cfg is not None:
        readable(Path(options.pretrained_cfg), "--pretrained-cfg")
    fam.check(name, options)
    return fam, name


def family_of_spec(spec: str | Path) -> ModelFamily:
    """The family of a model spec or a pruned output, from names and headers only (no weights read)."""
    if is_pruned_path(spec):
        p = Path(spec).expanduser()
        arch = (_corp_model_meta(p / MODEL_FILE if p.is_dir() else p) or {}).get("architecture") or {}
        if isinstance(arch, dict) and isinstance(arch.get("family"), str):
            from corp_cli.registry import by_name

            return by_name(arch["family"])
        from corp_cli.compact import load_pruned_loaded

        return load_pruned_loaded(p).family  # not a readable corp checkpoint: its own error says why
    return resolve(str(spec))[0]


def load_dense(spec: str | Path, options: ModelOptions | None = None, device: str | torch.device = "cpu") -> Loaded:
    options = options or ModelOptions()
    fam, name = resolve_model(str(spec), options)
    return fam.load(name, options, resolve_device(device))


def load_any(spec: str | Path, options: ModelOptions | None = None, device: str | torch.device = "cpu") -> Loaded:
    """A dense model (name, folder, hub id) or a pruned corp output, in eval mode on `device`.

    A pruned model brings its own architecture, preprocessing and class names; of the model
    options only preprocessing overrides apply to it (explicit flags win over the record).
    """
    options = options or ModelOptions()
    dev = resolve_device(device)
    if not is_pruned_path(spec):
        return load_dense(str(spec), options, dev)
    for name, why in (("checkpoint", "--checkpoint applies only to a dense model name"),
                      ("num_classes", "its classifier size is fixed, drop --num-classes"),
                      ("model_args", "its architecture is fixed by the checkpoint, drop --model-arg")):
        if name in options.given():
            raise InputError(f"{spec} is a pruned model; {why}")
    from corp_cli.compact import load_pruned_loaded

    loaded = load_pruned_loaded(Path(spec).expanduser(), device=dev)
    check_options(loaded.family, dataclasses.replace(options, checkpoint=None, num_classes=None))
    if options.pretrained_cfg is not None or any(v is not None for v in options.preprocessing.values()):
        from corp_cli.preprocess import override_preprocessing

        loaded.preprocessing = override_preprocessing(loaded.model, loaded.preprocessing, options)
    if options.seq_len is not None:
        loaded = loaded.family.with_seq_len(loaded, options.seq_len)
    log.info("loaded pruned %s from %s", loaded.identity.name, spec)
    return loaded


def describe(loaded: Loaded, spec: str | Path, *, pruned: bool) -> dict[str, Any]:
    """The JSON-able description of a loaded model that reports carry."""
    desc: dict[str, Any] = {
        "kind": "pruned" if pruned else "dense",
        "name": loaded.identity.name,
        "spec": str(spec),
        "family": loaded.family.name,
        "identity": None if pruned else loaded.identity.to_dict(),
        "base": loaded.identity.to_dict(),
        "num_classes": loaded.identity.num_classes,
        "classes": loaded.classes,
        "preprocessing": loaded.preprocessing.to_dict(),
    }
    if pruned:
        p = Path(spec).expanduser()
        meta = _corp_model_meta(p / MODEL_FILE if p.is_dir() else p) or {}
        arch = meta.get("architecture") or {}
        desc.update({"path": str(Path(spec).expanduser()), "options": meta.get("options"), "stats": meta.get("stats"),
                     "architecture": arch, "source": arch.get("source")})
    return desc
