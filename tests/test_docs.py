"""The reference in docs/ and the README stay true: every key, metric, tag, param, editor, task kind and file they
name is one the code knows (and the code knows none they leave out), every command line they show parses, every
link resolves, and the code keeps the size limits docs/layout.md states."""

from __future__ import annotations

import ast
import contextlib
import importlib
import io
import re
import subprocess
from pathlib import Path

import pytest

from conftest import REPO

DOCS = REPO / "docs"


def _table(page: str, header: str) -> list[list[str]]:
    """The rows of the Markdown table in ``docs/<page>`` whose header row starts with ``| header |``."""
    lines = (DOCS / page).read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {header} |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])])  # not at escaped \|
    return rows


def _names(cells: list[str]) -> set[str]:
    """The backticked names of a table's first column (``a``, ``b`` in one cell count as two)."""
    return {n for c in cells for n in re.findall(r"`([^`]+)`", c)}


def test_every_sweep_key_in_the_docs_is_in_the_schema_and_back() -> None:
    from bench.config import DatasetEntry, Sweep
    from methods.budget import Budget

    documented = _names([r[0] for r in _table("sweeps.md", "key")])
    assert documented == set(Sweep.model_fields)
    text = (DOCS / "sweeps.md").read_text(encoding="utf-8")
    budget = re.search(r"`budget` \(learned editors\): (.*?)\.\n\n", text, re.S)
    assert budget, "the budget keys sentence"
    assert {k for k in re.findall(r"`(\w+)`", budget.group(1)) if not k.startswith("val_loss")} - {"val_es"} == \
        set(Budget.model_fields)
    dataset_row = next(r for r in _table("sweeps.md", "key") if r[0] == "`datasets`")[1]
    entry = re.search(r"`\{(name, .*?)\}`", dataset_row).group(1)
    assert {k.split(":")[0].strip() for k in re.split(r",\s*(?![^{]*\})", entry)} == set(DatasetEntry.model_fields)


def test_the_metrics_page_shows_the_schema() -> None:
    from bench.schema import metrics_table

    assert metrics_table() in (DOCS / "metrics.md").read_text(encoding="utf-8"), \
        "docs/metrics.md: paste the output of `python -m bench.schema`"


def test_the_tracking_page_names_every_tag_and_param_and_nothing_else() -> None:
    import bench.store
    import bench.tracking
    from bench.schema import Param

    tags = {v for mod in (bench.tracking, bench.store) for k, v in vars(mod).items()
            if k.endswith("_TAG") and isinstance(v, str)}
    assert _names([r[0] for r in _table("tracking.md", "tag")]) == tags
    params = {v for k, v in vars(Param).items() if k.isupper()}
    assert _names([r[0] for r in _table("tracking.md", "param")]) == params


def test_the_data_page_lists_every_card_key() -> None:
    from bench.data.cards import DatasetCard

    assert _names([r[0] for r in _table("data.md", "key")]) == set(DatasetCard.model_fields)


def test_the_editor_and_task_kind_pages_match_the_registries() -> None:
    from bench.data.kinds import KINDS, TaskKind
    from methods import REGISTRY

    assert _names([r[0] for r in _table("editors.md", "name")]) == set(REGISTRY)
    assert _names([r[0] for r in _table("task-kinds.md", "kind")]) == set(KINDS)
    members = {n.split("(")[0] for n in _names([r[0] for r in _table("task-kinds.md", "member")])}
    assert members and all(hasattr(TaskKind, m) for m in members), members


def _sources() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "bench", "methods"], cwd=REPO, capture_output=True, text=True).stdout
    files = {REPO / f for f in out.split() if f.endswith(".py")}
    files |= set((REPO / "bench").rglob("*.py")) | set((REPO / "methods").rglob("*.py"))  # new, not yet added
    return sorted(f for f in files if f.exists() and "__pycache__" not in f.parts)


def test_the_layout_page_lists_every_source_file() -> None:
    listed = _names([r[0] for r in _table("layout.md", "file")])
    assert listed == {str(f.relative_to(REPO)) for f in _sources()}


def test_no_source_file_over_400_lines_and_no_function_over_60() -> None:
    too_long = []
    for f in _sources():
        text = f.read_text(encoding="utf-8")
        if len(text.splitlines()) > 400:
            too_long.append(f"{f.relative_to(REPO)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                too_long.append(f"{f.relative_to(REPO)}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1}")
    assert not too_long, too_long


def _command_lines() -> list[tuple[str, str]]:
    """(page, line) for every ``python -m bench.X`` line inside a code block of the README or docs/."""
    out = []
    for page in [REPO / "README.md", *sorted(DOCS.glob("*.md"))]:
        for block in re.findall(r"```\n(.*?)```", page.read_text(encoding="utf-8"), re.S):
            for line in block.splitlines():
                m = re.search(r"python -m (bench\.\w+)(.*)", line)
                if m:
                    out.append((page.name, m.group(1) + m.group(2).split("#")[0]))
    return out


@pytest.mark.parametrize("page,line", _command_lines(), ids=lambda x: x[:60])
def test_every_command_in_the_docs_names_options_the_command_has(page: str, line: str) -> None:
    module, _, rest = line.partition(" ")
    main = importlib.import_module(module).main
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
        main(["--help"])
    known = set(re.findall(r"(--[\w-]+)", buf.getvalue()))
    used = set(re.findall(r"(?<![\w-])(--[\w-]+)", rest))
    assert used <= known, f"{page}: {line}: {sorted(used - known)} not in {module} --help"


def test_links_resolve_and_the_readme_is_short_with_its_quickstart_and_a_regenerated_table() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 80
    assert "make run" in readme and "make test" in readme
    table = re.search(r"<!-- results:zsre -->\n(.*?)<!-- /results:zsre -->", readme, re.S)
    assert table and "| mend |" in table.group(1) and re.search(r"at commit [0-9a-f]{7}", table.group(1))
    for page in [REPO / "README.md", *DOCS.glob("*.md")]:
        for target in re.findall(r"\]\(([^)#]+)\)", page.read_text(encoding="utf-8")):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page.name}: link to {target}"
