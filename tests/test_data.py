from __future__ import annotations

import io
import logging
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from corp_cli.data import ImageSource, make_batches, open_source
from corp_cli.errors import InputError

SHARED = Path(__file__).parents[1] / ".." / "shared" / "data"
IMAGENET_SAMPLE = SHARED / "imagenet-sample"

TINY = transforms.Compose([transforms.Resize((8, 8)), transforms.ToTensor()])


def _png(color: tuple[int, int, int], size: tuple[int, int] = (6, 5)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def _jpeg_bytes(seed: int = 0, size: int = 64) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _flat_folder(root: Path, n: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"img{i:03d}.png").write_bytes(_png((i * 7 % 256, 0, 0)))
    return root


def _ids(source: ImageSource) -> list[str]:
    return [i for _, _, i in source.iter_images()]


# --------------------------------------------------------------------------- folders


def test_folder_discovery_is_recursive_sorted_and_filters_suffixes(tmp_path: Path) -> None:
    for rel in ["b/x.JPG", "a/deep/y.png", "a/z.Jpeg", "c.webp", "d.BMP", "notes.txt", "anim.gif", "noext"]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        fmt = {".txt": None, "": None}.get(p.suffix.lower(), "PNG")
        p.write_bytes(_png((1, 2, 3)) if fmt else b"not an image")
    src = open_source(str(tmp_path), samples=None)
    assert src.kind == "folder" and not src.synthetic and len(src) == 5
    assert _ids(src) == ["a/deep/y.png", "a/z.Jpeg", "b/x.JPG", "c.webp", "d.BMP"]


def test_missing_and_empty_folders_are_input_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such directory"):
        open_source(str(tmp_path / "nope"), samples=None)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("hi")
    with pytest.raises(InputError, match=r"contains no images \(jpg/jpeg/png/webp/bmp\)"):
        open_source(str(tmp_path / "empty"), samples=None)


def test_seeded_subset_is_deterministic_sorted_and_seed_dependent(tmp_path: Path) -> None:
    root = str(_flat_folder(tmp_path / "imgs", 30))
    a = _ids(open_source(root, samples=10, seed=0))
    assert a == _ids(open_source(root, samples=10, seed=0))
    assert len(a) == 10 and a == sorted(a)
    assert a != _ids(open_source(root, samples=10, seed=1))


def test_more_samples_than_exist_uses_all_with_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = str(_flat_folder(tmp_path / "imgs", 5))
    with caplog.at_level(logging.WARNING):
        src = open_source(root, samples=50)
    assert len(src) == 5 and src.selected == 5
    assert src.warnings and "only 5" in src.warnings[0]
    assert any("only 5" in r.getMessage() for r in caplog.records)
    assert not open_source(root, samples=5).warnings


def test_shards_are_disjoint_cover_and_fingerprints_track_them(tmp_path: Path) -> None:
    root = str(_flat_folder(tmp_path / "imgs", 20))
    whole = open_source(root, samples=13, seed=3)
    shards = [open_source(root, samples=13, seed=3, shard=(i, 3)) for i in range(3)]
    parts = [_ids(s) for s in shards]
    assert sorted(sum(parts, [])) == _ids(whole)
    assert sum(len(p) for p in parts) == len(set(sum(parts, []))) == 13
    assert [len(s) for s in shards] == [len(p) for p in parts]

    assert {s.base_fingerprint for s in shards} == {whole.base_fingerprint}
    assert len({s.fingerprint for s in shards} | {whole.fingerprint}) == 4
    assert open_source(root, samples=13, seed=3, shard=(1, 3)).describe() == shards[1].describe()
    assert open_source(root, samples=13, seed=4).base_fingerprint != whole.base_fingerprint
    desc = shards[2].describe()
    assert desc["shard"] == [2, 3] and desc["selected"] == 13 and desc["kind"] == "folder"

    # The fingerprint follows file content sizes of the selection.
    before = open_source(root, samples=None).base_fingerprint
    (Path(root) / "img000.png").write_bytes(_png((0, 0, 0), size=(19, 9)))
    assert open_source(root, samples=None).base_fingerprint != before


@pytest.mark.parametrize("shard", [(2, 2), (-1, 2), (0, 0), (0.5, 2), (0, 1, 2)])
def test_bad_shard_is_input_error(tmp_path: Path, shard) -> None:
    with pytest.raises(InputError, match="shard"):
        open_source(str(_flat_folder(tmp_path / "i", 2)), samples=None, shard=shard)


def _folder_with_bad_files(root: Path) -> Path:
    _flat_folder(root, 4)
    good = _jpeg_bytes()
    (root / "img002.png").write_bytes(np.random.default_rng(1).bytes(500))  # random bytes
    (root / "img004.jpg").write_bytes(good[: len(good) // 2])  # truncated JPEG
    (root / "img005.jpg").write_bytes(good)
    (root / "img006.png").write_bytes(b"")  # empty file
    return root


def test_corrupt_and_truncated_images_are_skipped_and_counted(tmp_path: Path) -> None:
    src = open_source(str(_folder_with_bad_files(tmp_path / "imgs")), samples=None)
    got = list(src.iter_images())
    assert src.skipped == 3
    assert [i for _, _, i in got] == ["img000.png", "img001.png", "img003.png", "img005.jpg"]
    assert all(img.mode == "RGB" for img, _, _ in got)
    # The counter describes the latest pass, not an accumulation.
    list(src.iter_images())
    assert src.skipped == 3 and src.describe()["skipped"] == 3


def test_image_modes_come_out_rgb(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    pal = Image.new("RGB", (4, 4), (0, 0, 255)).convert("P")
    modes = {
        "gray.png": Image.new("L", (4, 4), 77),
        "rgba.png": rgba,
        "la.png": Image.new("LA", (4, 4), (10, 255)),
        "pal.png": pal,
        "cmyk.jpg": Image.new("CMYK", (4, 4), (0, 0, 0, 0)),
        "i16.png": Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)),
    }
    for name, img in modes.items():
        img.save(tmp_path / name)
    out = {i: img for img, _, i in open_source(str(tmp_path), samples=None).iter_images()}
    assert set(out) == set(modes)
    assert all(img.mode == "RGB" for img in out.values())
    assert out["gray.png"].getpixel((0, 0)) == (77, 77, 77)
    assert out["rgba.png"].getpixel((0, 0)) == (255, 255, 255)  # composited on white
    assert out["la.png"].getpixel((0, 0)) == (10, 10, 10)
    assert out["pal.png"].getpixel((0, 0)) == (0, 0, 255)
    assert all(abs(a - 255) <= 2 for a in out["cmyk.jpg"].getpixel((0, 0)))  # CMYK 0 ink is white
    assert out["i16.png"].getpixel((0, 0)) == (255, 255, 255)  # 16-bit rescaled, not clipped garbage


def test_folder_labels_from_names_and_class_names(tmp_path: Path) -> None:
    for cls in ("dog", "cat"):
        _flat_folder(tmp_path / "train" / cls, 2)
    labels = [(i, y) for _, y, i in open_source(str(tmp_path), samples=None, labels=True).iter_images()]
    assert labels == [("train/cat/img000.png", 0), ("train/cat/img001.png", 0), ("train/dog/img000.png", 1), ("train/dog/img001.png", 1)]
    names = ["airplane", "cat", "bird", "dog"]
    got = [y for _, y, _ in open_source(str(tmp_path), samples=None, labels=True, class_names=names).iter_images()]
    assert got == [1, 1, 3, 3]
    # Labels are stable under subsetting: a class keeps its index even when another is not selected.
    sub = open_source(str(tmp_path), samples=1, seed=0, labels=True)
    ((_, y, i),) = list(sub.iter_images())
    assert y == (0 if "/cat/" in i else 1)
    assert [y for _, y, _ in open_source(str(tmp_path), samples=None).iter_images()] == [None] * 4


def test_labels_need_class_folders(tmp_path: Path) -> None:
    _flat_folder(tmp_path, 2)
    with pytest.raises(InputError, match="class folders"):
        open_source(str(tmp_path), samples=None, labels=True)


def test_synset_folders_use_imagenet_indices(tmp_path: Path) -> None:
    for syn in ("n01443537", "n01440764"):
        _flat_folder(tmp_path / syn, 1)
    assert [y for _, y, _ in open_source(str(tmp_path), samples=None, labels=True).iter_images()] == [0, 1]


@pytest.mark.skipif(not IMAGENET_SAMPLE.is_dir(), reason=f"real test data absent: {IMAGENET_SAMPLE}")
def test_real_imagenet_sample_has_500_distinct_even_labels() -> None:
    src = open_source(str(IMAGENET_SAMPLE), samples=None, labels=True)
    assert len(src) == 500
    labels = [y for _, y, _ in src.iter_images()]
    assert src.skipped == 0 and len(labels) == 500
    assert len(set(labels)) == 500 and all(y % 2 == 0 for y in labels)


# --------------------------------------------------------------------------- synthetic


def test_synthetic_is_seeded_and_sharded() -> None:
    src = open_source("synthetic", samples=None)
    assert src.synthetic and src.kind == "synthetic" and len(src) == 64 and src.describe()["synthetic"] is True
    a = [np.asarray(img) for img, _, _ in open_source("synthetic", samples=3, seed=5).iter_images()]
    b = [np.asarray(img) for img, _, _ in open_source("synthetic", samples=3, seed=5).iter_images()]
    c = [np.asarray(img) for img, _, _ in open_source("synthetic", samples=3, seed=6).iter_images()]
    assert all((x == y).all() for x, y in zip(a, b)) and not (a[0] == c[0]).all()
    assert not (a[0] == a[1]).all() and a[0].shape[2] == 3
    shard = [np.asarray(img) for img, _, _ in open_source("synthetic", samples=3, seed=5, shard=(1, 2)).iter_images()]
    assert len(shard) == 1 and (shard[0] == a[1]).all()


# --------------------------------------------------------------------------- Hugging Face (offline)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local parquet dataset with an Image column, a ClassLabel column, and one corrupt image."""
    import datasets

    root = tmp_path_factory.mktemp("hfds")
    feats = datasets.Features(
        {"caption": datasets.Value("string"), "picture": datasets.Image(), "target": datasets.ClassLabel(names=["a", "b", "c"])}
    )
    images = [{"bytes": _png((i * 30, 5, 5)), "path": None} for i in range(6)]
    images[3] = {"bytes": b"definitely not an image", "path": None}
    ds = datasets.Dataset.from_dict(
        {"caption": [f"c{i}" for i in range(6)], "picture": images, "target": [0, 1, 2, 0, 1, 2]}, features=feats
    )
    ds.to_parquet(str(root / "train.parquet"))
    return root


def test_hf_local_dataset_streams_through_the_hf_path(hf_dir: Path) -> None:
    src = open_source(f"hf:{hf_dir}@train", samples=None, labels=True)
    assert src.kind == "hf" and src.num_items is None and not src.synthetic
    with pytest.raises(TypeError):
        len(src)
    got = list(src.iter_images())
    assert [(i, y) for _, y, i in got] == [("train/0", 0), ("train/1", 1), ("train/2", 2), ("train/4", 1), ("train/5", 2)]
    assert src.skipped == 1
    assert got[1][0].getpixel((0, 0)) == (30, 5, 5) and got[1][0].mode == "RGB"

    first4 = open_source(f"hf:{hf_dir}", samples=4, shard=(1, 2))
    assert [(i, y) for _, y, i in first4.iter_images()] == [("train/1", None)]
    assert first4.skipped == 1  # train/3 is in this shard and corrupt
    desc = first4.describe()
    assert desc["kind"] == "hf" and desc["shard"] == [1, 2]
    assert desc["base_fingerprint"] == open_source(f"hf:{hf_dir}", samples=4, shard=(0, 2)).base_fingerprint
    assert desc["fingerprint"] != open_source(f"hf:{hf_dir}", samples=4, shard=(0, 2)).fingerprint

    many = open_source(f"hf:{hf_dir}", samples=50)
    assert len(list(many.iter_images())) == 5 and "only 6" in many.warnings[0]


def test_hf_missing_columns_and_bad_split(hf_dir: Path) -> None:
    with pytest.raises(InputError, match="could not be loaded"):
        open_source(f"hf:{hf_dir}@nosuchsplit", samples=None)


def test_hf_unreachable_dataset_fails_fast_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import datasets  # noqa: F401 - imported before the env is set, as in a long-lived process

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    start = time.monotonic()
    with pytest.raises(InputError) as err:
        open_source("hf:corp-test-nonexistent/never-published:cfg@validation", samples=8)
    # Without honouring the env at call time, datasets retries the network for ~25 s.
    assert time.monotonic() - start < 10
    msg = str(err.value)
    assert "\n" not in msg and "offline" in msg and "--data PATH" in msg and "--data synthetic" in msg


# --------------------------------------------------------------------------- batching


def _batches(src: ImageSource, workers: int) -> tuple[list[torch.Tensor], list[torch.Tensor | None], int]:
    xs, ys = [], []
    for x, y in make_batches(src, TINY, batch_size=2, num_workers=workers):
        xs.append(x)
        ys.append(y)
    return xs, ys, src.skipped


def test_make_batches_same_for_any_worker_count(tmp_path: Path) -> None:
    root = _folder_with_bad_files(tmp_path / "cls_a")
    _flat_folder(tmp_path / "cls_b", 3)
    src = open_source(str(tmp_path), samples=None, labels=True)
    x0, y0, s0 = _batches(src, 0)
    x2, y2, s2 = _batches(src, 2)
    assert s0 == s2 == 3
    assert [x.shape for x in x0] == [(2, 3, 8, 8)] * 3 + [(1, 3, 8, 8)]
    assert all(x.dtype == torch.float32 for x in x0)
    assert torch.equal(torch.cat(x0), torch.cat(x2))
    assert torch.equal(torch.cat(y0), torch.cat(y2))
    assert torch.cat(y0).tolist() == [0, 0, 0, 0, 1, 1, 1] and y0[0].dtype == torch.int64
    # Same images as the plain iterator, in the same order.
    plain = torch.stack([TINY(img) for img, _, _ in src.iter_images()])
    assert torch.equal(plain, torch.cat(x0)) and root.exists()


def test_make_batches_hf_with_workers_and_no_labels(hf_dir: Path) -> None:
    src = open_source(f"hf:{hf_dir}", samples=None)
    x0, y0, s0 = _batches(src, 0)
    x2, y2, s2 = _batches(src, 2)
    assert s0 == s2 == 1 and y0 == y2 == [None] * 3
    assert torch.equal(torch.cat(x0), torch.cat(x2)) and torch.cat(x0).shape[0] == 5
