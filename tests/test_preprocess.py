from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from safetensors import safe_open
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from corp_cli.errors import InputError
from corp_cli.preprocess import Preprocessing, resolve_preprocessing

SHARED = Path(__file__).parents[1] / ".." / "shared" / "data"
CIFAR_CKPT = SHARED / "deit_tiny_patch16_224.cifar10.safetensors"
needs_cifar = pytest.mark.skipif(not CIFAR_CKPT.is_file(), reason=f"real test data absent: {CIFAR_CKPT}")


@pytest.fixture(scope="module")
def deit() -> torch.nn.Module:
    return timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=10)


def _meta(**pre: object) -> dict[str, str]:
    return {"preprocessing": json.dumps(pre)}


@needs_cifar
def test_cifar_checkpoint_metadata_gives_squash_resize_and_cifar_normalisation(deit: torch.nn.Module) -> None:
    with safe_open(str(CIFAR_CKPT), framework="pt") as f:
        meta = f.metadata()
    raw = json.loads(meta["preprocessing"])
    pre = resolve_preprocessing(deit, checkpoint_meta=meta)
    assert pre.source == "checkpoint-metadata"
    assert (pre.input_size, pre.crop_pct, pre.crop_mode, pre.interpolation) == ((3, 224, 224), 1.0, "squash", "bilinear")
    assert pre.mean == tuple(raw["mean"]) and pre.std == tuple(raw["std"])

    gen = torch.Generator().manual_seed(0)
    img = Image.fromarray(torch.randint(0, 256, (32, 32, 3), generator=gen, dtype=torch.uint8).numpy())
    got = pre.transform()(img)
    resized = TF.resize(img, [224, 224], interpolation=InterpolationMode.BILINEAR, antialias=True)
    mean = torch.tensor(raw["mean"]).view(3, 1, 1)
    std = torch.tensor(raw["std"]).view(3, 1, 1)
    want = (TF.to_tensor(resized) - mean) / std
    assert got.shape == (3, 224, 224)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_timm_default_for_deit(deit: torch.nn.Module) -> None:
    pre = resolve_preprocessing(deit)
    assert pre.source == "timm-default"
    assert (pre.interpolation, pre.crop_pct, pre.crop_mode, pre.input_size) == ("bicubic", 0.9, "center", (3, 224, 224))
    assert pre.mean == tuple(IMAGENET_DEFAULT_MEAN) and pre.std == tuple(IMAGENET_DEFAULT_STD)
    out = pre.transform()(Image.new("RGB", (300, 200), (10, 200, 30)))
    assert out.shape == (3, 224, 224)


def test_precedence_pretrained_cfg_over_checkpoint_and_overrides_over_all(deit: torch.nn.Module, tmp_path: Path) -> None:
    meta = _meta(resize=[64, 64], crop=None, interpolation="bilinear", mean=[0.1, 0.2, 0.3], std=[0.4, 0.5, 0.6])
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"interpolation": "nearest", "num_classes": 10, "url": "", "hf_hub_id": "x/y", "license": "mit"}))

    pre = resolve_preprocessing(deit, checkpoint_meta=meta, pretrained_cfg_path=cfg)
    assert pre.interpolation == "nearest"  # cfg file beats checkpoint
    assert pre.mean == (0.1, 0.2, 0.3) and pre.input_size == (3, 64, 64)  # checkpoint beats timm
    assert pre.source == f"checkpoint-metadata+pretrained-cfg:{cfg}"

    pre = resolve_preprocessing(
        deit,
        checkpoint_meta=meta,
        pretrained_cfg_path=cfg,
        overrides={"interpolation": "bicubic", "crop_pct": 0.5, "crop_mode": "center", "mean": None},
    )
    assert (pre.interpolation, pre.crop_pct, pre.crop_mode) == ("bicubic", 0.5, "center")
    assert pre.mean == (0.1, 0.2, 0.3)  # None means "not given"
    assert pre.source.endswith("+cli-override")


def test_pretrained_cfg_nested_in_hub_config(deit: torch.nn.Module, tmp_path: Path) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"architecture": "deit", "model_args": {}, "pretrained_cfg": {"crop_pct": 0.8, "tag": "t"}}))
    assert resolve_preprocessing(deit, pretrained_cfg_path=cfg).crop_pct == 0.8


def test_int_resize_with_crop_is_center_crop_pct(deit: torch.nn.Module) -> None:
    pre = resolve_preprocessing(deit, checkpoint_meta=_meta(resize=256, crop=224))
    assert (pre.input_size, pre.crop_pct, pre.crop_mode) == ((3, 224, 224), 224 / 256, "center")
    first = pre.transform().transforms[0]
    assert first.size == 256  # shorter side, as the metadata says
    assert pre.transform()(Image.new("RGB", (400, 300))).shape == (3, 224, 224)

    # A crop/resize ratio that does not round-trip in floats must still recover resize exactly.
    pre = resolve_preprocessing(deit, checkpoint_meta=_meta(resize=[249, 249], crop=[224, 224]))
    assert pre.crop_mode == "squash"
    assert pre.transform().transforms[0].size == (249, 249)


@pytest.mark.parametrize(
    "kwargs_factory, needle",
    [
        (lambda p: {"overrides": {"crop_pcnt": 0.9}}, "crop_pcnt"),
        (lambda p: {"checkpoint_meta": _meta(resize=[224, 224], flip=True)}, "flip"),
        (lambda p: {"checkpoint_meta": _meta(resize="big")}, "resize"),
        (lambda p: {"checkpoint_meta": _meta(resize=[224, 224], crop=[300, 300])}, "crop"),
        (lambda p: {"checkpoint_meta": _meta(resize=[224, 224], mean=[0.5, 0.5])}, "mean"),
        (lambda p: {"checkpoint_meta": {"preprocessing": "{not json"}}, "JSON"),
        (lambda p: {"overrides": {"interpolation": "random"}}, "interpolation"),
        (lambda p: {"overrides": {"crop_mode": "zoom"}}, "crop_mode"),
        (lambda p: {"pretrained_cfg_path": p / "bad_cfg.json"}, "mystery_key"),
        (lambda p: {"pretrained_cfg_path": p / "missing.json"}, "no such file"),
    ],
)
def test_bad_inputs_raise_input_error_naming_the_key(deit: torch.nn.Module, tmp_path: Path, kwargs_factory, needle: str) -> None:
    (tmp_path / "bad_cfg.json").write_text(json.dumps({"crop_pct": 0.9, "mystery_key": 1}))
    with pytest.raises(InputError, match=needle):
        resolve_preprocessing(deit, **kwargs_factory(tmp_path))


def test_dict_round_trip_and_unknown_keys(deit: torch.nn.Module) -> None:
    pre = resolve_preprocessing(deit, overrides={"input_size": 160})
    data = json.loads(json.dumps(pre.to_dict()))
    assert data["input_size"] == [3, 160, 160]
    assert Preprocessing.from_dict(data) == pre
    with pytest.raises(InputError, match="extra"):
        Preprocessing.from_dict({**data, "extra": 1})
    with pytest.raises(InputError, match="missing"):
        Preprocessing.from_dict({k: v for k, v in data.items() if k != "std"})
    # A checkpoint written by corp stores to_dict(); it resolves back to the same values.
    again = resolve_preprocessing(deit, checkpoint_meta={"preprocessing": json.dumps(data)})
    assert again.to_dict() | {"source": "x"} == data | {"source": "x"}
