from __future__ import annotations

import pytest
from timm.data import ImageNetInfo

from corp_cli.errors import InputError
from corp_cli.labels import folder_label_map, synset_to_imagenet_index


def test_synsets_map_through_timm() -> None:
    assert synset_to_imagenet_index("n01440764") == 0
    assert synset_to_imagenet_index("n01443537") == 1
    info = ImageNetInfo()
    for idx in (2, 499, 998, 999):
        assert synset_to_imagenet_index(info.index_to_label_name(idx)) == idx


@pytest.mark.parametrize("name", ["cat", "n99999999", "N01440764", "n01440764x", ""])
def test_non_synsets_are_none(name: str) -> None:
    assert synset_to_imagenet_index(name) is None


def test_folder_label_map_rules() -> None:
    assert folder_label_map(["n01443537", "n01440764"]) == {"n01440764": 0, "n01443537": 1}
    cifar = ["airplane", "automobile", "bird", "cat"]
    assert folder_label_map(["cat", "bird"], class_names=cifar) == {"bird": 2, "cat": 3}
    assert folder_label_map(["zebra", "ant", "mole"]) == {"ant": 0, "mole": 1, "zebra": 2}
    # Synsets win over class_names: ImageNet heads are indexed by timm's order.
    assert folder_label_map(["n01443537"], class_names=["n01443537"]) == {"n01443537": 1}
    assert folder_label_map([]) == {}


def test_folder_not_in_class_names_is_an_error() -> None:
    with pytest.raises(InputError, match="dog"):
        folder_label_map(["cat", "dog"], class_names=["cat", "bird"])


def test_plain_folder_names_fall_back_to_sorted_order_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    from corp_cli.labels import folder_label_map

    with caplog.at_level("WARNING"):
        assert folder_label_map(["dog", "cat"]) == {"cat": 0, "dog": 1}
    assert "not ImageNet synsets" in caplog.text
