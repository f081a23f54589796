"""Open the calibration or evaluation data a model's modality takes: images or text."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from corp_cli.errors import InputError

IMAGE_SPECS = "an image folder, hf:NAME[:CONFIG][@SPLIT] or synthetic"
TEXT_SPECS = "text:pydoc[@calib|@eval], text:FILE[@calib|@eval] or hf:NAME[:CONFIG][@SPLIT]"


def open_data(
    spec: str, modality: str, *, samples: int | None, seed: int = 0, shard: tuple[int, int] | None = None,
    labels: bool = False, class_names: Sequence[str] | None = None, flag: str = "--data", text_unit: str = "sentence",
) -> Any:
    """An ImageSource or a TextSource; `flag` names the option in errors (prune says --calib-data).

    `text_unit`: what one text is for this model (its family's text_unit: sentences or documents).
    """
    try:
        if modality == "text":
            from corp_cli.text import open_text_source

            if labels:
                raise InputError("text data carries no labels here; text models are scored on fidelity to a reference")
            return open_text_source(spec, samples=samples, seed=seed, shard=shard, unit=text_unit)
        if spec.startswith("text:"):
            raise InputError(f"{flag} {spec} is text, but this is an image model: give {IMAGE_SPECS}")
        from corp_cli.data import open_source

        return open_source(spec, samples=samples, seed=seed, shard=shard, labels=labels, class_names=class_names)
    except InputError as e:
        raise InputError(_with_flag(str(e), flag)) from None


def _with_flag(message: str, flag: str) -> str:
    """Errors from the data layer say --data; a command whose option is called otherwise says its own name."""
    message = message if flag == "--data" else message.replace("--data", flag)
    return message if flag in message else f"{flag} {message}"
