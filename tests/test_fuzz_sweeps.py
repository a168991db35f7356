"""Sweep files are untrusted input: a property-based test (Hypothesis) writes sweep files whose fields hold hostile
values (path separators, ``..``, control and non-UTF-8 characters, huge and negative numbers, deep nesting, wrong
types, unknown keys) and checks, for each, that ``bench.run --dry-run`` accepts it or exits 2 with one line and no
traceback, and writes nothing outside its scratch folder.

In the suite it runs a bounded number of examples with a fixed seed (``derandomize``); by hand, longer::

    EDITBENCH_FUZZ_EXAMPLES=2000 python -m pytest tests/test_fuzz_sweeps.py -q
    EDITBENCH_FUZZ_EXAMPLES=5000 EDITBENCH_FUZZ_RANDOM=1 python -m pytest tests/test_fuzz_sweeps.py -q  # new draws
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.run import main as run_main
from tests.conftest import REPO

EXAMPLES = int(os.environ.get("EDITBENCH_FUZZ_EXAMPLES", "60"))
FIXED_SEED = os.environ.get("EDITBENCH_FUZZ_RANDOM") != "1"  # CI: the same examples every run

BASE: dict[str, Any] = {
    "name": "fuzz",
    "n_edits": 2,
    "models": ["tiny-gpt2"],
    "datasets": [{"name": "zsre", "n_train": 8, "n_val": 4}],
    "methods": [{"name": "ft", "hparams": {"lr": 1.0e-2, "max_steps": 2}}],
}

#: Where a hostile value may go: a path of keys (ints index lists) into the base sweep.
FIELDS: list[tuple[Any, ...]] = [
    ("name",), ("description",), ("tracking_uri",), ("data_root",), ("seeds",), ("n_edits",), ("edit_batch_size",),
    ("edit_mode",), ("checkpoints",), ("num_samples",), ("max_concurrent",), ("resources",), ("resources", "cpu"),
    ("resources", "gpu"), ("scheduler",), ("device",), ("retrain",), ("reuse_converged",), ("models",),
    ("models", 0), ("models", 0, "name"), ("models", 0, "edit_params"), ("datasets", 0), ("datasets", 0, "name"),
    ("datasets", 0, "paths"), ("datasets", 0, "paths", "test"), ("datasets", 0, "locality"),
    ("datasets", 0, "n_train"), ("datasets", 0, "source"), ("datasets", 0, "generate"), ("methods", 0, "name"),
    ("methods", 0, "label"), ("methods", 0, "hparams"), ("methods", 0, "hparams", "lr"),
    ("methods", 0, "hparams", "max_steps"), ("methods", 0, "budget"), ("methods", 0, "budget", "max_steps"),
    ("unknown_key",), ("methods", 0, "hparams", "unknown_hparam"),
]

NASTY_TEXT = st.one_of(
    st.sampled_from(["../../escaped", "..", ".", "/", "/etc/passwd", "a/b/../../c", "~", "~/x", "\x00", "a\x00b",
                     "line\nbreak", "tab\there", "\x1b[31mred", "", " ", "-rf", "名前", "C:\\Windows", "%s%n",
                     "${HOME}", "$(touch pwned)", "sqlite:///../../x.db", "sqlite:////", "file:///tmp/x",
                     "http://127.0.0.1:1", "a" * 5000, "zsre", "tiny-gpt2", "org/..", "./", "\u202e"]),
    st.text(max_size=40),
)
NUMBERS = st.one_of(st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0, -1, 2**63, 1e308, -0.0]))
WRONG_TYPES = st.one_of(st.none(), st.booleans(), st.lists(st.integers(), max_size=3),
                        st.dictionaries(st.text(max_size=4), st.integers(), max_size=3))
NESTED = st.recursive(st.integers() | st.text(max_size=4), lambda c: st.lists(c, max_size=3)
                      | st.dictionaries(st.text(max_size=3), c, max_size=3), max_leaves=40)
DEEP = st.integers(min_value=50, max_value=400).map(lambda n: _deep(n))
VALUES = st.one_of(NASTY_TEXT, NUMBERS, WRONG_TYPES, NESTED, DEEP)


def _deep(n: int) -> Any:
    v: Any = 1
    for i in range(n):
        v = [v] if i % 2 else {"k": v}
    return v


def _put(doc: dict[str, Any], path: tuple[Any, ...], value: Any) -> None:
    """Set ``doc[path] = value``, making the containers on the way where the base lacks them."""
    cur: Any = doc
    for key in path[:-1]:
        if isinstance(key, int):
            if not isinstance(cur, list) or len(cur) <= key:
                return
            cur = cur[key]
        else:
            if not isinstance(cur, dict):
                return
            cur = cur.setdefault(key, {})
    if isinstance(cur, list) and isinstance(path[-1], int) and len(cur) > path[-1]:
        cur[path[-1]] = value
    elif isinstance(cur, dict):
        cur[path[-1]] = value


def _listing(*folders: Path) -> set[str]:
    return {str(p) for f in folders if f.is_dir() for p in f.iterdir()}


@st.composite
def hostile_sweeps(draw: st.DrawFn) -> bytes:
    """A sweep file's bytes: the base sweep with one to three fields replaced by hostile values, sometimes with
    a byte that is not UTF-8 in a string."""
    doc = yaml.safe_load(yaml.safe_dump(BASE))
    for path in draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=3, unique=True)):
        _put(doc, path, draw(VALUES))
    try:
        text = yaml.safe_dump(doc, allow_unicode=True)
    except (yaml.YAMLError, RecursionError, UnicodeEncodeError):
        text = yaml.safe_dump(BASE)
    data = text.encode("utf-8", "surrogatepass")
    if draw(st.booleans()) and b"name: fuzz" in data:
        data = data.replace(b"name: fuzz", b"name: caf\xe9", 1)
    return data


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@settings(max_examples=EXAMPLES, derandomize=FIXED_SEED, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large])
@given(data=hostile_sweeps())
def test_any_sweep_file_is_accepted_or_refused_in_one_line(data: bytes, scratch: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    work = scratch / "work"
    work.mkdir(exist_ok=True)
    monkeypatch.chdir(work)
    monkeypatch.delenv("EDITBENCH_DATA", raising=False)
    before = _listing(REPO, REPO / "reports", scratch.parent, work.parent)
    f = work / "sweep.yaml"
    f.write_bytes(data)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_main([str(f), "--dry-run"])
    text = err.getvalue()
    assert code in (0, 2), (code, data[:500], text[-2000:])
    assert "Traceback" not in text, text[-2000:]
    if code == 2:
        lines = text.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), text[-2000:]
    assert _listing(REPO, REPO / "reports", scratch.parent, work.parent) == before
