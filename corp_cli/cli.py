"""The `corp` command line: one Typer app, one module per subcommand under commands/."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from corp_cli import __version__
from corp_cli.commands import common as C
from corp_cli.errors import EXIT_BROKEN_PIPE, EXIT_INTERRUPTED, EXIT_USAGE
from corp_cli.commands.benchmark import benchmark_cmd
from corp_cli.commands.calibrate import app as calibrate_app
from corp_cli.commands.evaluate import evaluate_cmd
from corp_cli.commands.export import export_cmd
from corp_cli.commands.inspect import inspect_cmd
from corp_cli.commands.prune import prune_cmd
from corp_cli.commands.sweep import sweep_cmd

app = typer.Typer(
    name="corp",
    help="CORP: one-shot structured pruning of trained transformers with closed-form compensation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(flag: bool) -> None:
    if flag:
        C.out.print(f"corp {__version__}")
        raise typer.Exit(0)


@app.callback()
def root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
) -> None:
    C.set_debug(debug)
    C.setup_logging(verbose)


app.add_typer(calibrate_app, name="calibrate")
app.command("prune")(prune_cmd)
app.command("evaluate")(evaluate_cmd)
app.command("benchmark")(benchmark_cmd)
app.command("sweep")(sweep_cmd)
app.command("export")(export_cmd)
app.command("inspect")(inspect_cmd)


def main() -> None:
    """Console entry point: usage errors become one `error:` line with exit code 2.

    Click would otherwise draw a multi-line usage panel; batch logs want one line. Typer
    may vendor its own copy of click, so its errors are recognised by their interface
    (format_message + exit_code) rather than by click's classes.
    """
    # rich (which also draws Typer's help) answers a closed stdout with exit 1; its documented
    # hook hands it back to us instead, so the exit status can depend on what was printed
    Console.on_broken_pipe = _broken_pipe  # type: ignore[method-assign]
    try:
        code = app(standalone_mode=False)
    except typer.Abort:
        sys.exit(EXIT_INTERRUPTED)
    except BrokenPipeError:
        # the reader of stdout went away (`corp --help | head -1`): end quietly; results are
        # written as files before anything is printed, so nothing is left half-written
        _silence_stdout()
        sys.exit(0 if _is_help(sys.argv[1:]) else EXIT_BROKEN_PIPE)
    except Exception as e:
        if not (hasattr(e, "format_message") and hasattr(e, "exit_code")):
            raise
        ctx = getattr(e, "ctx", None)
        if type(e).__name__ == "NoArgsIsHelpError" and ctx is not None:
            C.out.print(ctx.get_help(), markup=False, highlight=False)
            sys.exit(EXIT_USAGE)
        hint = f"; see `{ctx.command_path} --help`" if ctx is not None else ""
        C.err.print(Text(f"error: {e.format_message()}{hint}", style="bold red"), soft_wrap=True)
        sys.exit(int(e.exit_code))
    sys.exit(code if isinstance(code, int) else 0)


def _broken_pipe(_console: Console) -> None:
    raise BrokenPipeError


def _is_help(args: list[str]) -> bool:
    return not args or any(a in ("--help", "-h", "--version") for a in args)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail again."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    main()
