"""What every subcommand shares: error handling, consoles, progress bars, model/data options."""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from corp_cli.errors import EXIT_INTERRUPTED, EXIT_RUNTIME, CorpError, existing_file  # noqa: F401 (commands use C.existing_file)

# Results go to stdout (tables, --json); progress, logs and errors to stderr.
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False)

_state: dict[str, bool] = {"debug": False}

F = TypeVar("F", bound=Callable[..., Any])


def set_debug(flag: bool) -> None:
    _state["debug"] = flag or os.environ.get("CORP_DEBUG", "") not in ("", "0")


def debug_enabled() -> bool:
    return _state["debug"]


def setup_logging(verbose: bool) -> None:
    root = logging.getLogger("corp_cli")
    root.handlers.clear()
    handler = RichHandler(console=err, show_time=False, show_path=False, markup=False)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO if verbose or debug_enabled() else logging.WARNING)
    root.propagate = False


def fail(message: str, code: int) -> typer.Exit:
    # One line, no markup interpretation: messages can contain [brackets] from paths.
    err.print(Text(f"error: {message}", style="bold red"), soft_wrap=True)
    return typer.Exit(code)


class _Terminated(KeyboardInterrupt):
    """SIGTERM (what batch schedulers send) turned into an interrupt, so cleanup runs."""


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    # Python's default for SIGTERM is to die at once, skipping every `finally` that removes
    # temp files. Signal handlers can only be installed from the main thread.
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum: int, _frame: Any) -> None:
        raise _Terminated(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def handle_errors(fn: F) -> F:
    """Map failures to one line and an exit code: 2 bad input, 1 runtime, 130 interrupted (SIGINT/SIGTERM)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with _sigterm_as_interrupt():
                return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, BrokenPipeError):
            raise
        except CorpError as e:
            if debug_enabled():
                raise
            raise fail(str(e), e.exit_code) from None
        except KeyboardInterrupt as e:
            if debug_enabled():
                raise
            what = "terminated (SIGTERM)" if isinstance(e, _Terminated) else "interrupted"
            raise fail(f"{what}; no artifact was written and --out was left as it was", EXIT_INTERRUPTED) from None
        except MemoryError:
            if debug_enabled():
                raise
            raise fail("out of memory; lower --batch-size or use a machine with more memory", EXIT_RUNTIME) from None
        except Exception as e:  # anything unexpected: still one line unless --debug
            if debug_enabled():
                raise
            text = str(e).strip().splitlines()
            detail = text[0] if text else ""
            hint = "out of memory; lower --batch-size" if "out of memory" in detail.lower() else "rerun with --debug for a traceback"
            raise fail(f"{type(e).__name__}: {detail} ({hint})", EXIT_RUNTIME) from None

    return wrapper  # type: ignore[return-value]


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def sample_unit(preprocessing: dict[str, Any]) -> str:
    """What a run's samples were, for people: counts in files and JSON are modality-neutral."""
    return "texts" if preprocessing.get("kind") == "text" else "images"


class RateColumn(ProgressColumn):
    """Items per second, with the item's name (images/s)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "it")
        return Text(f"{speed:,.1f} {unit}/s" if speed else f"- {unit}/s", style="cyan")


@contextmanager
def progress_bar(description: str, total: int | None, unit: str = "images") -> Iterator[Callable[[int], None]]:
    """Progress on stderr; yields an `advance(n)` callback.

    On a terminal, a rich progress bar. Otherwise (a batch job's log file, a pipe), plain
    lines at a bounded rate (see PlainProgress), so a long run is visibly alive in the log.
    """
    if not err.is_terminal:
        plain = PlainProgress(description, total, unit)
        try:
            yield plain.advance
        finally:
            plain.close()
        return
    progress = Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=False,
    )
    with progress:
        task = progress.add_task(description, total=total, unit=unit)
        yield lambda n: progress.advance(task, n)


# A run shorter than this prints no progress lines at all; longer runs print one line this
# often, and one at every further 10% of a known total.
PLAIN_PROGRESS_EVERY_S = 30.0


class PlainProgress:
    """Progress as plain log lines: items done, rate, time left; at most one line per 10% or per interval."""

    def __init__(self, description: str, total: int | None, unit: str, *, every: float | None = None,
                 clock: Callable[[], float] = time.monotonic, write: Callable[[str], None] | None = None) -> None:
        self.description, self.total, self.unit = description, total, unit
        self.every = PLAIN_PROGRESS_EVERY_S if every is None else every
        self.clock = clock
        self.write = write or _write_err
        self.start = self.last = clock()
        self.done = 0
        self.tenths = 0
        self.printed = False

    def advance(self, n: int) -> None:
        self.done += n
        now = self.clock()
        if now - self.start < self.every:
            return
        tenths = int(10 * self.done / self.total) if self.total else 0
        if now - self.last >= self.every or tenths > self.tenths:
            self._line(now)
            self.tenths = tenths

    def close(self) -> None:
        if self.printed:
            self._line(self.clock(), final=True)

    def _line(self, now: float, final: bool = False) -> None:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        if self.total:
            part = f"{self.done}/{self.total} {self.unit} ({100 * self.done / self.total:.0f}%)"
            left = (self.total - self.done) / rate if rate > 0 and not final else 0.0
            tail = "done" if final else f"{_duration(left)} left"
        else:
            part, tail = f"{self.done} {self.unit}", "done" if final else "running"
        self.write(f"{self.description}: {part}, {rate:,.1f} {self.unit}/s, {_duration(elapsed)} elapsed, {tail}")
        self.last = now
        self.printed = True


def _write_err(line: str) -> None:
    err.file.write(line + "\n")
    err.file.flush()


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


# ---- option types shared by subcommands (one definition each)

ModelArg = Annotated[str, typer.Argument(
    help="A timm name (deit_small_patch16_224, or short: deit_small), a Hugging Face folder or hf-model:ID.",
    show_default=False)]
CheckpointOpt = Annotated[
    Path | None,
    typer.Option("--checkpoint", help="Local weights (.safetensors, or .pth loaded with weights_only=True). Default: timm pretrained weights (hub or HF cache)."),
]
NumClassesOpt = Annotated[
    int | None, typer.Option("--num-classes", help="Classifier size, when the checkpoint differs from timm's default (else read from the checkpoint).")
]
PretrainedCfgOpt = Annotated[
    Path | None, typer.Option("--pretrained-cfg", help="timm pretrained_cfg JSON with the model's preprocessing (input_size, mean, std, crop_pct, ...).")
]
MeanOpt = Annotated[str | None, typer.Option("--mean", help="Normalisation mean override, e.g. 0.5,0.5,0.5")]
StdOpt = Annotated[str | None, typer.Option("--std", help="Normalisation std override, e.g. 0.5,0.5,0.5")]
InputSizeOpt = Annotated[int | None, typer.Option("--input-size", help="Square input resolution override.")]
InterpOpt = Annotated[str | None, typer.Option("--interpolation", help="Resize interpolation override (bilinear, bicubic, ...).")]
CropPctOpt = Annotated[float | None, typer.Option("--crop-pct", help="Center-crop fraction override (1.0 = no crop).")]
CropModeOpt = Annotated[str | None, typer.Option("--crop-mode", help="center, squash (resize to the exact size, no crop) or border.")]
ModelArgOpt = Annotated[
    list[str] | None,
    typer.Option("--model-arg", metavar="KEY=VALUE", help="A timm.create_model option, e.g. img_size=224 (repeatable; checked against the model's constructor). timm models only: Hugging Face folders take their options from config.json."),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu or cuda[:N].")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Images or texts per forward pass.")]
WorkersOpt = Annotated[int | None, typer.Option("--workers", min=0, help="Image decoding worker processes (default: up to 4; images only).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for choosing the calibration subset.")]
SeqLenOpt = Annotated[int | None, typer.Option(
    "--seq-len", help="Causal language models: token windows each text (document) is cut into (default: the model's "
                      "context length or 512, whichever is smaller).")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")]
# `--json PATH` writes the summary to a file (atomically) and keeps the table on stdout;
# `--json -` prints only the JSON on stdout, for pipes and CI.
JsonOpt = Annotated[
    str | None,
    typer.Option("--json", metavar="PATH", help="Write a machine-readable JSON summary to PATH ('-' for stdout, instead of the table)."),
]



def parse_floats(text: str | None, name: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        vals = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise CorpError(f"{name} must be comma-separated numbers, got {text!r}") from None
    return vals


def preprocessing_overrides(
    mean: str | None = None, std: str | None = None, input_size: int | None = None, interpolation: str | None = None,
    crop_pct: float | None = None, crop_mode: str | None = None,
) -> dict[str, Any]:
    return {
        "mean": parse_floats(mean, "--mean"),
        "std": parse_floats(std, "--std"),
        "input_size": (3, input_size, input_size) if input_size else None,
        "interpolation": interpolation,
        "crop_pct": crop_pct,
        "crop_mode": crop_mode,
    }


def model_options(
    checkpoint: Path | None = None, num_classes: int | None = None, pretrained_cfg: Path | None = None,
    model_args: list[str] | None = None, preset_args: dict[str, Any] | None = None, seq_len: int | None = None,
    **preprocessing: Any,
) -> Any:
    """The model options a command was given (corp_cli.family.ModelOptions); the family says which apply.

    `preset_args` are a --config preset's model_kwargs; --model-arg flags win over them.
    """
    from corp_cli.family import ModelOptions

    args = {**(preset_args or {}), **parse_model_args(model_args)}
    return ModelOptions(checkpoint=checkpoint, num_classes=num_classes, pretrained_cfg=pretrained_cfg,
                        preprocessing=preprocessing_overrides(**preprocessing), model_args=args, seq_len=seq_len)


def parse_model_args(items: list[str] | None) -> dict[str, Any]:
    """KEY=VALUE pairs; values are YAML scalars or lists (224, true, avg, [224, 224])."""
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise CorpError(f"--model-arg must look like KEY=VALUE (e.g. img_size=224), got {item!r}")
        try:
            out[key] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            raise CorpError(f"--model-arg {key}: cannot read the value {value!r}") from None
    return out


def set_quiet(flag: bool) -> None:
    """Silence this process's output (ranks other than 0 of a distributed run: rank 0 speaks for all)."""
    out.quiet = err.quiet = flag


def quiet_unless_main_rank() -> None:
    """Under torchrun every process runs the command; only rank 0 prints (progress, tables, the error line)."""
    rank = os.environ.get("RANK", "0")
    set_quiet(rank.isdigit() and int(rank) != 0 and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1)


def workers_for(modality: str, workers: int | None) -> int:
    """--workers decodes images; on text models it is refused rather than ignored."""
    from corp_cli import defaults

    if modality == "text":
        if workers is not None:
            raise CorpError("--workers does not apply to text models: text is tokenised in the main process")
        return 0
    return defaults.workers() if workers is None else workers


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise CorpError(f"--shard must look like I/N (e.g. 0/4), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise CorpError(f"--shard {text}: need 0 <= I < N")
    return i, n


def write_json(spec: str | None, obj: Any) -> bool:
    """Honour --json: '-' prints to stdout (True: skip the table), a path is written atomically."""
    if spec is None:
        return False
    if spec == "-":
        emit_json(obj)
        return True
    from corp_cli.artifacts import write_json_atomic
    from corp_cli.errors import InputError

    path = Path(spec)
    if path.is_dir():
        raise InputError(f"--json {path} is a directory; give a file name")
    write_json_atomic(path, obj)
    err.print(f"wrote {path}", markup=False)
    return False
