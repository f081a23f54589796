"""Calibration / evaluation image sources: a local folder, a Hugging Face dataset, or noise.

Every source yields the same deterministic sequence for a given (spec, samples, seed,
shard), so statistics gathered in shards on different machines can be recognised as parts
of one calibration set (`base_fingerprint`) and merged.

Spec forms for `open_source`:
  PATH                        recursive image folder (jpg/jpeg/png/webp/bmp)
  hf:NAME[:CONFIG][@SPLIT]    datasets.load_dataset(NAME, CONFIG, split=SPLIT, streaming=True);
                              SPLIT defaults to 'train'; NAME may be a local dataset directory
  synthetic                   seeded smooth noise images (use ./synthetic for a folder of that name)

Images that fail to decode are skipped with a warning and counted in `ImageSource.skipped`.
"""

from __future__ import annotations

import io
import hashlib
import itertools
import os
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from corp_cli.artifacts import canonical_json
from corp_cli.errors import InputError
from corp_cli.hub import offline_from_env, offline_requested
from corp_cli.labels import folder_label_map

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
DEFAULT_SYNTHETIC_SAMPLES = 64
SYNTHETIC_SIZE = 224
_ALTERNATIVES = "use --data PATH for a local image folder, or --data synthetic"


@dataclass(frozen=True)
class _Record:
    """One selected item before decoding; small and picklable so DataLoader workers can use it."""

    id: str
    label: int | None
    payload: Any  # folder: absolute path str; hf: {'bytes', 'path'} dict; synthetic: index


class ImageSource:
    """A deterministic, possibly sharded, sequence of RGB images with optional labels.

    Subclasses supply `_records()` (selected, sharded items in order) and `_open()`.
    """

    kind: str = ""

    def __init__(
        self,
        *,
        spec: str,
        samples: int | None,
        seed: int,
        shard: tuple[int, int] | None,
        labels: bool,
        base_fingerprint: str,
        selected: int | None,
        num_items: int | None,
    ) -> None:
        self.spec = spec
        self.samples = samples
        self.seed = seed
        self.shard = shard
        self.labels = labels
        self.selected = selected  # items in the whole selection, before sharding
        self.num_items = num_items  # items in this shard; None when streaming
        self.base_fingerprint = base_fingerprint
        self.fingerprint = (
            base_fingerprint if shard is None else _sha256(["shard", base_fingerprint, list(shard)])
        )
        self.skipped = 0
        self.warnings: list[str] = []

    @property
    def synthetic(self) -> bool:
        return self.kind == "synthetic"

    def __len__(self) -> int:
        if self.num_items is None:
            raise TypeError(f"{self.kind} source {self.spec!r} has no known length (streaming)")
        return self.num_items

    def describe(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "kind": self.kind,
            "synthetic": self.synthetic,
            "labels": self.labels,
            "samples": self.samples,
            "selected": self.selected,
            "count": self.num_items,
            "seed": self.seed,
            "shard": None if self.shard is None else list(self.shard),
            "fingerprint": self.fingerprint,
            "base_fingerprint": self.base_fingerprint,
            "skipped": self.skipped,
            "warnings": list(self.warnings),
        }

    def iter_images(self) -> Iterator[tuple[Image.Image, int | None, str]]:
        """Yield (RGB image, label or None, id); undecodable items are skipped and counted."""
        self.skipped = 0
        for rec in self._records():
            img = self._decode(rec)
            if img is None:
                self.skipped += 1
                continue
            yield img, rec.label, rec.id

    def _warn(self, message: str) -> None:
        log.warning("%s", message)
        self.warnings.append(message)

    def _decode(self, rec: _Record) -> Image.Image | None:
        try:
            with self._open(rec) as img:
                img.load()
                return to_rgb(img)
        # PIL reports bad data as OSError, SyntaxError, ValueError, DecompressionBombError...;
        # one bad file must never abort a calibration run, so all of them mean "skip".
        except Exception as e:  # noqa: BLE001
            log.warning("skipping %s: cannot decode image (%s: %s)", rec.id, type(e).__name__, e)
            return None

    def _records(self) -> Iterator[_Record]:
        raise NotImplementedError

    def _open(self, rec: _Record) -> Image.Image:
        raise NotImplementedError


def open_source(
    spec: str,
    *,
    samples: int | None,
    seed: int = 0,
    shard: tuple[int, int] | None = None,
    labels: bool = False,
    class_names: Sequence[str] | None = None,
) -> ImageSource:
    """Open an image source; `class_names` maps non-synset folder names to model indices."""
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
        raise InputError(f"samples must be a positive integer, got {samples!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(f"seed must be an integer, got {seed!r}")
    _check_shard(shard)
    if spec == "synthetic":
        return _SyntheticSource(spec, samples=samples, seed=seed, shard=shard, labels=labels)
    if spec.startswith("hf:"):
        return _HFSource(spec, samples=samples, seed=seed, shard=shard, labels=labels)
    return _FolderSource(spec, samples=samples, seed=seed, shard=shard, labels=labels, class_names=class_names)


def _check_shard(shard: tuple[int, int] | None) -> None:
    if shard is None:
        return
    ok = (
        isinstance(shard, (tuple, list))
        and len(shard) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in shard)
        and shard[1] >= 1
        and 0 <= shard[0] < shard[1]
    )
    if not ok:
        raise InputError(f"shard must be (i, n) with 0 <= i < n, got {shard!r}")


def _in_shard(pos: int, shard: tuple[int, int] | None) -> bool:
    return shard is None or pos % shard[1] == shard[0]


def _select(total: int, samples: int | None, seed: int) -> tuple[list[int], str | None]:
    """Indices of a seeded random subset of range(total), sorted so the order stays stable."""
    if samples is None or samples >= total:
        warning = None
        if samples is not None and samples > total:
            warning = f"asked for {samples} samples but only {total} exist; using all {total}"
        return list(range(total)), warning
    gen = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(total, generator=gen)[:samples].tolist()), None


def _sha256(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


# --------------------------------------------------------------------------- folder


class _FolderSource(ImageSource):
    kind = "folder"

    def __init__(
        self,
        spec: str,
        *,
        samples: int | None,
        seed: int,
        shard: tuple[int, int] | None,
        labels: bool,
        class_names: Sequence[str] | None,
    ) -> None:
        root = Path(spec).expanduser()
        if not root.exists():
            raise InputError(f"{spec}: no such directory")
        if not root.is_dir():
            raise InputError(f"{spec}: not a directory (expected an image folder, hf:NAME or synthetic)")
        files = _find_images(root)
        if not files:
            raise InputError(f"{spec} contains no images (jpg/jpeg/png/webp/bmp)")

        label_of: dict[str, int] = {}
        if labels:
            if any("/" not in f for f in files):
                raise InputError(f"{spec}: labels need images inside class folders, but some are at the top level")
            # Map over all files, not the selection, so a subset or shard labels classes the same way.
            label_of = folder_label_map({f.rsplit("/", 2)[-2] for f in files}, class_names)

        chosen, warning = _select(len(files), samples, seed)
        chosen_files = [files[i] for i in chosen]
        listing = [[f, (root / f).stat().st_size] for f in chosen_files]
        super().__init__(
            spec=spec,
            samples=samples,
            seed=seed,
            shard=shard,
            labels=labels,
            base_fingerprint=_sha256([self.kind, listing]),
            selected=len(chosen_files),
            num_items=sum(_in_shard(p, shard) for p in range(len(chosen_files))),
        )
        if warning:
            self._warn(f"{spec}: {warning}")
        self._root = root.resolve()
        self._items = [
            _Record(f, label_of[f.rsplit("/", 2)[-2]] if labels else None, str(self._root / f))
            for pos, f in enumerate(chosen_files)
            if _in_shard(pos, shard)
        ]

    def _records(self) -> Iterator[_Record]:
        return iter(self._items)

    def _open(self, rec: _Record) -> Image.Image:
        return Image.open(rec.payload)


# --------------------------------------------------------------------------- Hugging Face


def _find_images(root: Path) -> list[str]:
    """Sorted relative paths of the images under root, following symlinked folders.

    Datasets are often assembled from symlinks; os.walk with followlinks plus a set of
    visited real paths follows them without looping forever on a cycle.
    """
    found: list[str] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames.sort()
        rel = Path(dirpath).relative_to(root)
        for name in filenames:
            if Path(name).suffix.lower() in IMAGE_SUFFIXES and os.path.isfile(os.path.join(dirpath, name)):
                found.append((rel / name).as_posix())
    return sorted(found)


class _HFSource(ImageSource):
    """A streamed `datasets` split; `samples` takes the first N rows (a stream has no cheap random subset)."""

    kind = "hf"

    def __init__(
        self, spec: str, *, samples: int | None, seed: int, shard: tuple[int, int] | None, labels: bool
    ) -> None:
        body = spec[len("hf:") :]
        name_config, _, split = body.rpartition("@") if "@" in body else (body, "", "train")
        name, _, config = name_config.partition(":")
        if not name or not split:
            raise InputError(f"{spec}: expected hf:NAME[:CONFIG][@SPLIT]")
        super().__init__(
            spec=spec,
            samples=samples,
            seed=seed,
            shard=shard,
            labels=labels,
            base_fingerprint=_sha256(["hf", spec, name, config or None, split, samples, seed]),
            selected=None,
            num_items=None,
        )
        self._name, self._split = name, split
        self._ds = self._load(name, config or None, split)

    def _load(self, name: str, config: str | None, split: str) -> Any:
        import datasets

        try:
            with offline_from_env():
                ds = datasets.load_dataset(name, config, split=split, streaming=True)
        except Exception as e:  # noqa: BLE001 - hub, cache, and builder failures all mean the same to the user
            why = "offline: HF_HUB_OFFLINE is set and it is not in the local cache" if offline_requested() else "offline?"
            raise InputError(
                f"hf dataset {name!r} (split {split!r}) could not be loaded ({why}): {_first_line(e)}; {_ALTERNATIVES}"
            ) from None
        features = ds.features
        if features is None:
            raise InputError(f"{self.spec}: the dataset does not declare its features; cannot find an image column")
        image_col = _pick_column(features, datasets.Image, ("image", "img"))
        if image_col is None:
            raise InputError(f"{self.spec}: no image column among {list(features)}")
        self._image_col = image_col
        self._label_col = _pick_column(features, datasets.ClassLabel, ("label", "labels")) if self.labels else None
        if self.labels and self._label_col is None:
            raise InputError(f"{self.spec}: labels requested but no ClassLabel or 'label'/'labels' column in {list(features)}")
        cols = [c for c in (image_col, self._label_col) if c is not None]
        # Decode ourselves so a corrupt image is skipped rather than ending the stream.
        return ds.select_columns(cols).cast_column(image_col, datasets.Image(decode=False))

    def _rows(self) -> Iterator[dict[str, Any]]:
        # Not iter(ds): inside a DataLoader worker that hands each worker only some of the
        # dataset's file shards (nothing at all to workers beyond num_shards), which would
        # break our positional sharding. ds.iter() reads the whole stream in any process.
        for batch in self._ds.iter(batch_size=64):
            columns = list(batch)
            for values in zip(*(batch[c] for c in columns)):
                yield dict(zip(columns, values))

    def _records(self) -> Iterator[_Record]:
        rows = self._rows() if self.samples is None else itertools.islice(self._rows(), self.samples)
        seen = 0
        with offline_from_env():
            while True:
                try:
                    row = next(rows)
                except StopIteration:
                    break
                except Exception as e:  # noqa: BLE001 - streaming reaches files lazily; fail the same way as loading
                    raise InputError(
                        f"hf dataset {self._name!r} could not be read (offline?): {_first_line(e)}; {_ALTERNATIVES}"
                    ) from None
                pos, seen = seen, seen + 1
                if _in_shard(pos, self.shard):
                    label = row[self._label_col] if self._label_col else None
                    yield _Record(f"{self._split}/{pos}", None if label is None else int(label), row[self._image_col])
        if self.samples is not None and seen < self.samples:
            self._warn(f"{self.spec}: asked for {self.samples} samples but only {seen} exist; using all {seen}")

    def _open(self, rec: _Record) -> Image.Image:
        payload = rec.payload
        if isinstance(payload, dict) and payload.get("bytes") is not None:
            return Image.open(io.BytesIO(payload["bytes"]))
        if isinstance(payload, dict) and payload.get("path"):
            return Image.open(payload["path"])
        raise ValueError("row has neither image bytes nor a path")


def _pick_column(features: Any, feature_type: type, names: tuple[str, ...]) -> str | None:
    for col, feat in features.items():
        if isinstance(feat, feature_type):
            return col
    return next((n for n in names if n in features), None)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


# --------------------------------------------------------------------------- synthetic


class _SyntheticSource(ImageSource):
    """Seeded smooth noise: exercises the pipeline without data, but its statistics mean nothing."""

    kind = "synthetic"

    def __init__(
        self, spec: str, *, samples: int | None, seed: int, shard: tuple[int, int] | None, labels: bool
    ) -> None:
        count = DEFAULT_SYNTHETIC_SAMPLES if samples is None else samples
        super().__init__(
            spec=spec,
            samples=samples,
            seed=seed,
            shard=shard,
            labels=labels,
            base_fingerprint=_sha256(["synthetic", spec, None, count, seed]),
            selected=count,
            num_items=sum(_in_shard(p, shard) for p in range(count)),
        )
        if labels:
            self._warn("synthetic images have no labels; labels will be None")
        self._items = [_Record(f"synthetic/{i}", None, i) for i in range(count) if _in_shard(i, shard)]

    def _records(self) -> Iterator[_Record]:
        return iter(self._items)

    def _open(self, rec: _Record) -> Image.Image:
        # One generator per image, so an image does not depend on which others were selected.
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + rec.payload)
        coarse = torch.rand(1, 3, SYNTHETIC_SIZE // 8, SYNTHETIC_SIZE // 8, generator=gen) * 255
        smooth = torch.nn.functional.interpolate(coarse, size=(SYNTHETIC_SIZE, SYNTHETIC_SIZE), mode="bilinear")
        fine = torch.randn(1, 3, SYNTHETIC_SIZE, SYNTHETIC_SIZE, generator=gen) * 8
        pixels = (smooth + fine).clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy()
        return Image.fromarray(pixels, "RGB")


# --------------------------------------------------------------------------- decoding


def to_rgb(img: Image.Image) -> Image.Image:
    """A new 8-bit RGB image; transparency is composited onto white (what viewers show)."""
    if img.mode == "RGB":
        return img.copy()
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        # PIL's own convert clips >255 to white; rescale 16-bit data to 8 bits instead.
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or (img.mode == "I" and arr.max(initial=0) > 255):
            arr = arr / 257.0
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


# --------------------------------------------------------------------------- batching


_SKIP = "skip"


class _TransformedStream(IterableDataset):
    """Decode + transform in workers; worker w takes positions w, w+W, ... in order.

    DataLoader with batch_size=None polls workers round-robin, so the items come back in
    source order for any worker count. A failed decode yields a marker instead of nothing,
    which keeps that round-robin aligned and lets the main process count skips.
    """

    def __init__(self, source: ImageSource, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.source = source
        self.transform = transform

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        for pos, rec in enumerate(self.source._records()):
            if pos % workers != worker:
                continue
            img = self.source._decode(rec)
            if img is None:
                yield (_SKIP, rec.id)
            else:
                yield ("ok", self.transform(img), rec.label)


def _no_collate(item: Any) -> Any:
    return item


def make_batches(
    source: ImageSource,
    transform: Callable[[Image.Image], torch.Tensor],
    batch_size: int,
    num_workers: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Yield (float32 BCHW images, int64 labels or None) in source order.

    Missing labels in a labelled source become -1. `source.skipped` counts undecodable images.
    """
    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise InputError(f"num_workers must be >= 0, got {num_workers}")
    loader = DataLoader(
        _TransformedStream(source, transform),
        batch_size=None,
        num_workers=num_workers,
        collate_fn=_no_collate,
    )
    source.skipped = 0
    images: list[torch.Tensor] = []
    labels: list[int] = []
    for item in loader:
        if item[0] == _SKIP:
            source.skipped += 1
            continue
        images.append(item[1])
        labels.append(-1 if item[2] is None else item[2])
        if len(images) == batch_size:
            yield _stack(images, labels, source.labels)
            images, labels = [], []
    if images:
        yield _stack(images, labels, source.labels)


def _stack(images: list[torch.Tensor], labels: list[int], with_labels: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    batch = torch.stack(images).to(torch.float32)
    return batch, torch.tensor(labels, dtype=torch.int64) if with_labels else None
