"""The `corp` command line: one Typer app, one module per subcommand under commands/."""

from __future__ import annotations

from typing import Annotated

import typer

from corp_cli import __version__
from corp_cli.commands import common as C
from corp_cli.commands.benchmark import benchmark_cmd
from corp_cli.commands.calibrate import app as calibrate_app
from corp_cli.commands.evaluate import evaluate_cmd
from corp_cli.commands.export import export_cmd
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
