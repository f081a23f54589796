"""The package's structure, as the code review would check it: no import cycle, and the family seam holds.

- No import cycle anywhere in corp_cli/, counting every import statement (function-local and
  TYPE_CHECKING ones too: a local import hides a cycle, it does not remove it).
- Core modules and commands/ never import a family (corp_cli/families/); the registry names
  families by string and imports them on first use.
- Outside the families, no code asks which family it holds: no family-name strings, no
  is_hf-style checks.
- `transformers` (an optional dependency) is imported only inside functions, never when a
  module is imported.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "corp_cli"
FAMILIES = "corp_cli.families"


def _modules() -> dict[str, Path]:
    out = {}
    for f in sorted(PKG.rglob("*.py")):
        parts = f.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts).removesuffix(".__init__")
        out[name] = f
    return out


def _imports(path: Path, module: str) -> list[tuple[str, int, bool]]:
    """(imported corp_cli module, line, at module level) for every import statement in the file."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body} | {id(n) for s in tree.body if isinstance(s, (ast.If, ast.Try)) for n in ast.walk(s)}
    found = []
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom):
            base = n.module or ""
            if n.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - n.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in n.names]
        elif isinstance(n, ast.Import):
            names = [a.name for a in n.names]
        else:
            continue
        found += [(m, n.lineno, id(n) in top) for m in names]
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    edges: dict[str, set[str]] = {}
    for name, path in mods.items():
        deps = {m for m, _, _ in _imports(path, name) if m in mods and m != name}
        edges[name] = {d for d in deps if not name.startswith(d + ".")}  # a package's own __init__ is not a cycle
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return cycles


def test_no_import_cycle_in_the_package() -> None:
    assert _cycles(_graph()) == []


def test_the_cycle_check_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]


def test_core_and_commands_never_import_a_family() -> None:
    bad = []
    for name, path in _modules().items():
        if name.startswith(FAMILIES):
            continue
        bad += [f"{name}:{line} imports {m}" for m, line, _ in _imports(path, name) if m.startswith(FAMILIES)]
    assert bad == []


# what asking "which family is this?" looks like in code
_FAMILY_CHECK = re.compile(r"is_hf|[\"']hf-(?:bert|vit|llama)[\"']|[\"']timm-(?:vit|eva)[\"']|startswith\([\"']hf-|family\s*==")


def test_no_family_checks_outside_the_families() -> None:
    bad = []
    for name, path in _modules().items():
        if name.startswith(FAMILIES):
            continue
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if _FAMILY_CHECK.search(line):
                bad.append(f"{name}:{lineno}: {line.strip()}")
    assert bad == []


def test_the_family_check_pattern_catches_the_old_forms() -> None:
    for line in ('if is_hf_module(model):', 'if ad.family.startswith("hf-"):', 'if family == "timm-vit":',
                 'return "hf-bert"'):
        assert _FAMILY_CHECK.search(line), line


def test_transformers_is_never_imported_at_module_level() -> None:
    bad = []
    for name, path in _modules().items():
        bad += [f"{name}:{line}" for m, line, top in _imports_any(path) if top and m.split(".")[0] == "transformers"]
    assert bad == []


def _imports_any(path: Path) -> list[tuple[str, int, bool]]:
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    out = []
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom) and n.module:
            out.append((n.module, n.lineno, id(n) in top))
        elif isinstance(n, ast.Import):
            out += [(a.name, n.lineno, id(n) in top) for a in n.names]
    return out
