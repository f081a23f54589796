"""README.md and docs/: the command reference matches the app, links resolve, runnable examples run."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"


def _gen_cli_docs():
    spec = importlib.util.spec_from_file_location("gen_cli_docs", REPO / "scripts" / "gen_cli_docs.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gen_cli_docs", mod)
    spec.loader.exec_module(mod)
    return mod


def test_the_command_reference_is_what_the_app_says() -> None:
    expected = _gen_cli_docs().render()
    assert (DOCS / "cli.md").read_text() == expected, "docs/cli.md is stale: run python scripts/gen_cli_docs.py"


def test_the_command_reference_names_every_option_of_every_command() -> None:
    # independent of the generator's formatting: walk the click tree and look for each option in its section
    import typer

    from corp_cli.cli import app

    text = (DOCS / "cli.md").read_text()

    def walk(cmd, path):
        yield path, cmd
        if hasattr(cmd, "list_commands"):
            ctx = cmd.context_class(cmd, info_name=path)
            for name in cmd.list_commands(ctx):
                yield from walk(cmd.get_command(ctx, name), f"{path} {name}")

    for path, cmd in walk(typer.main.get_command(app), "corp"):
        start = text.index(f"# `{path}`\n")
        nxt = text.find("\n#", start + 1)
        section = text[start: nxt if nxt > 0 else None]
        if cmd.help:
            assert cmd.help.strip().splitlines()[0] in section, path
        for p in cmd.params:
            for opt in p.opts if p.param_type_name == "option" else [(p.metavar or p.name).upper()]:
                assert f"`{opt}`" in section, f"{path}: {opt} missing from docs/cli.md"
