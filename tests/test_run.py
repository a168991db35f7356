"""bench.run: bad sweeps fail before Ray with one line and exit 2; the CI sweep leaves the MLflow runs it promises."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bench.config import load_sweep, plan, trials, validate
from bench.run import main
from bench.trial import REQUIRED_METRICS
from methods import REGISTRY
from tests.conftest import REPO

BASE = {
    "name": "t",
    "n_edits": 2,
    "models": ["tiny-gpt2"],
    "datasets": [{"name": "zsre", "n_train": 8, "n_val": 4}],
    "methods": [{"name": "ft", "hparams": {"lr": 1.0e-2, "max_steps": 2}}],
}


def _write(tmp_path: Path, doc: object, raw: str | None = None) -> str:
    p = tmp_path / "sweep.yaml"
    p.write_text(raw if raw is not None else yaml.safe_dump(doc))
    return str(p)


def _patch(**kw: object) -> dict:
    d = json.loads(json.dumps(BASE))
    d.update(kw)
    return d


def test_plan_is_the_grid(tmp_path: Path) -> None:
    doc = _patch(models=["tiny-gpt2", "tiny-llama"], seeds=[0, 1], edit_batch_size=[1, 2],
                 methods=[{"name": "ft", "hparams": {"lr": [1e-2, 1e-3], "max_steps": 2}},
                          {"name": "ft_kl", "hparams": {"lr": {"tune": "loguniform", "lower": 1e-4, "upper": 1e-2}}}])
    sweep = load_sweep(_write(tmp_path, doc))
    points = validate(sweep)
    assert len(points) == 2 * 2 * 2 * (2 + 1)
    assert len({p["run_name"] for p in points}) == len(points)
    assert all(p["tuned"] == {} for p in points if p["method"] == "ft")
    assert all("lr" in p["tuned"] for p in points if p["method"] == "ft_kl")
    assert plan(sweep) == points


def test_shipped_sweeps_validate() -> None:
    """Every shipped sweep validates into its whole grid: one point per method configuration (list-valued
    hyper-parameters expanded), model, dataset, seed, batch size and edit mode, each named by its run."""
    import itertools

    for f in sorted((REPO / "sweeps").glob("*.yaml")):  # (the paper sweeps read the Hub: tested in test_data)
        doc = yaml.safe_load(f.read_text())
        sweep = load_sweep(f)
        points = validate(sweep, str(f))
        configs = sum(math.prod(len(v) for v in (m.get("hparams") or {}).values() if isinstance(v, list))
                      for m in doc["methods"])
        grid = configs * len(doc["models"]) * len(doc["datasets"]) * len(doc.get("seeds", [0])) * len(
            sweep.edit_batch_size) * len(sweep.edit_mode)
        assert len(points) == grid, f
        want = set(itertools.product([m.name for m in sweep.methods], [m.name for m in sweep.models],
                                     [d.name for d in sweep.datasets]))
        assert {(p["method"], p["model"]["name"], p["dataset"]["name"]) for p in points} == want, f
        assert len({p["run_name"] for p in points}) == len(points), f


def test_shipped_mend_sweeps_train_with_an_init_that_trains() -> None:
    """The authors' standard-normal V trains at their editor lr (1e-6); at lr 1e-4 it diverges and the fit keeps
    its untrained state (issue 36), so every shipped MEND above 1e-5 starts V from Xavier."""
    for f in sorted((REPO / "sweeps").glob("*.yaml")) + sorted((REPO / "sweeps" / "paper").glob("*.yaml")):
        for m in load_sweep(f).methods:
            if m.name != "mend":
                continue
            lr = m.hparams.get("lr", REGISTRY["mend"].Hparams().lr)
            lrs = [lr["lower"], lr["upper"]] if isinstance(lr, dict) else lr if isinstance(lr, list) else [lr]
            if max(lrs) > 1e-5:
                assert m.hparams.get("v_init") == "xavier", f.name
            else:
                assert m.hparams.get("v_init", "randn") == "randn", f.name


def test_samples_of_one_grid_point_share_its_point_digest(tmp_path: Path) -> None:
    """What PerPointASHA groups by: every sample of a point carries the point's digest; a point without search
    spaces is its own group."""
    doc = _patch(methods=[{"name": "ft", "hparams": {"lr": {"tune": "loguniform", "lower": 1e-5, "upper": 1e-3}}},
                          {"name": "ft", "label": "ft_fixed", "hparams": {"lr": 1e-4}}], num_samples=3)
    sweep = load_sweep(_write(tmp_path, doc))
    got = trials(sweep, plan(sweep))
    tuned = [t for t in got if t["sampled"]]
    fixed = [t for t in got if not t["sampled"]]
    assert len(tuned) == 3 and len({t["point_digest"] for t in tuned}) == 1
    assert len({t["config_digest"] for t in tuned}) == 3
    assert fixed[0]["point_digest"] == fixed[0]["config_digest"] != tuned[0]["point_digest"]


def _training_inputs(name: str, budget_keys: tuple[str, ...] | None = None) -> dict[str, tuple]:
    """Per learned editor of a shipped sweep, what its training key takes from the sweep file: hparams with
    defaults, the budget (only ``budget_keys`` when given), model, dataset options, seed, data files."""
    out = {}
    for p in plan(load_sweep(REPO / "sweeps" / name)):
        cls = REGISTRY[p["method"]]
        if cls.learned:
            budget = p["budget"] if budget_keys is None else {k: p["budget"][k] for k in budget_keys}
            out[p["method"]] = (cls.Hparams(**p["hparams"]).model_dump(), budget, p["model"], p["dataset"],
                                p["seed"], p["data_files"])
    return out


def test_sequential_sweep_trains_its_learned_editors_as_the_default_does() -> None:
    """sequential.yaml promises to reuse zsre.yaml's trained MEND/ENN/KE: everything of the training key that
    the sweep files decide (hparams with defaults, budget, model, dataset options, seed) must match."""
    default, seq = _training_inputs("zsre.yaml"), _training_inputs("sequential.yaml")
    assert set(default) == {"mend", "enn", "ke"}
    for method, key in default.items():
        assert seq[method] == key, method


def test_the_default_sweep_can_reuse_the_converged_sweeps_editors() -> None:
    """zsre.yaml loads zsre_converged.yaml's editors when the store has them: everything of the convergence key
    the sweep files decide (hparams with defaults, edits per step, model, dataset options, seed) must match, and
    the default must ask for it (reuse_converged) while the converged sweep trains until patience."""
    per_step = ("batch_size", "grad_accum")
    default, converged = _training_inputs("zsre.yaml", per_step), _training_inputs("zsre_converged.yaml", per_step)
    assert set(default) == set(converged) == {"mend", "enn", "ke"}
    for method, key in default.items():
        assert converged[method] == key, method
    assert load_sweep(REPO / "sweeps" / "zsre.yaml").reuse_converged
    assert load_sweep(REPO / "sweeps" / "sequential.yaml").reuse_converged
    assert all(m.budget.max_steps >= 5000 for m in load_sweep(REPO / "sweeps" / "zsre_converged.yaml").methods
               if REGISTRY[m.name].learned)


def test_tune_lr_tunes_around_the_default_configuration() -> None:
    """tune_lr.yaml says it tunes each editor around zsre.yaml's configuration, so its picks transfer: every
    hyper-parameter it does not search, the model, the dataset options (locality source) and the per-step edits
    must be zsre.yaml's."""
    default = {m.name: m for m in load_sweep(REPO / "sweeps" / "zsre.yaml").methods}
    tune = load_sweep(REPO / "sweeps" / "tune_lr.yaml")
    base = load_sweep(REPO / "sweeps" / "zsre.yaml")
    assert tune.models == base.models and tune.datasets == base.datasets
    assert {m.name for m in tune.methods} == set(default)
    for m in tune.methods:
        searched = {k for k, v in m.hparams.items() if isinstance(v, dict) and "tune" in v}
        assert searched, m.name
        fixed = {k: v for k, v in m.hparams.items() if k not in searched}
        assert fixed == {k: v for k, v in default[m.name].hparams.items() if k not in searched}, m.name
        for k in ("batch_size", "grad_accum"):
            assert getattr(m.budget, k) == getattr(default[m.name].budget, k), (m.name, k)


def test_trial_labels_name_each_trial_and_what_tells_it_apart(tmp_path: Path) -> None:
    """Tune's status table names a trial by its method, model and dataset and by what differs from the other trials
    of its method (a grid axis, a drawn value, a seed), never by a value every trial shares; labels are unique."""
    from bench.tuner import trial_labels

    doc = _patch(models=["tiny-gpt2"], seeds=[0, 1],
                 methods=[{"name": "ft", "hparams": {"lr": [1e-2, 1e-3], "max_steps": 2}},
                          {"name": "ft_kl", "hparams": {"lr": 1e-2, "max_steps": 2}}])
    sweep = load_sweep(_write(tmp_path, doc))
    todo = trials(sweep, plan(sweep))
    labels = trial_labels(todo)
    assert len(set(labels)) == len(labels) == 6
    by = {(t["method"], t["hparams"]["lr"], t["seed"]): label for t, label in zip(todo, labels)}
    assert by[("ft", 1e-3, 1)].split(" ", 1)[1] == "ft tiny-gpt2 zsre lr=0.001 seed=1"
    assert by[("ft_kl", 1e-2, 0)].split(" ", 1)[1] == "ft_kl tiny-gpt2 zsre seed=0"  # lr is not an axis of ft_kl
    assert all(label.startswith(f"#{i} ") for i, label in enumerate(labels))


def test_dry_run_prints_the_plan(capsys, tmp_path: Path, monkeypatch) -> None:
    """The dry run prints one row per trial (method, model, dataset, batch size, seed and the config digest
    that --resume keys on) and creates no store."""
    monkeypatch.chdir(tmp_path)
    sweep = load_sweep(REPO / "sweeps" / "zsre.yaml")
    assert main([str(REPO / "sweeps" / "zsre.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    todo = trials(sweep, plan(sweep))
    assert len(todo) == len(sweep.methods) * len(sweep.models) * len(sweep.seeds) * len(sweep.edit_batch_size)
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in out.splitlines() if line.startswith("│")]
    rows = [r for r in rows if r[0]]  # a wrapped hparams cell continues on a row without a number
    assert sorted((r[1], r[2], r[3], int(r[4]), int(r[5]), r[-1]) for r in rows) == sorted(
        (t["method"], t["model"]["name"], t["dataset"]["name"], t["edit_batch_size"], t["seed"], t["config_digest"])
        for t in todo)
    assert not (tmp_path / "mlruns.db").exists()


@pytest.mark.slow
def test_ci_sweep_end_to_end_leaves_one_finished_run_per_grid_point(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'runs.db'}"
    env = {**os.environ, "EDITBENCH_RAY_TMP": f"/tmp/ebt{os.getpid()}"}
    # two trials at a time (one thread each): the sweep as shipped, on both cores
    out = subprocess.run([sys.executable, "-m", "bench.run", str(REPO / "sweeps" / "ci.yaml"), "--tracking-uri", uri,
                          "--max-concurrent", "2"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # the driver's data step says what it does before the trials start; Tune's table names trials readably
    assert "data step 1/2 before the trials: tiny-gpt2 / zsre (seed 0, 4 test edits) ..." in out.stdout
    assert re.search(r"data step 2/2 before the trials: tiny-llama / zsre .*: done in [\d.]+ s", out.stdout)
    assert re.search(r"│ #\d ft_kl tiny-llama zsre +(RUNNING|TERMINATED)", out.stdout), out.stdout[-3000:]
    lines = out.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("┃ method"))  # the summary (rich), not Tune's
    cols = [c.strip() for c in lines[start].split("┃")[1:-1]]
    body = lines[start + 2 : next(i for i in range(start, len(lines)) if lines[i].startswith("└"))]
    printed = [[c.strip() for c in line.split("│")[1:-1]] for line in body if line.split("│")[1].strip()]
    from bench.tracking import runs_frame

    import polars as pl

    everything = runs_frame(uri, "ci")
    reports = everything.filter(pl.col("t.editbench.kind") == "report")
    assert reports.height == 1  # bench.run writes and logs the report at the end of the sweep
    assert (tmp_path / "reports" / "ci" / "report.html").exists()
    df = everything.filter(pl.col("t.editbench.kind").is_null())
    sweep = load_sweep(REPO / "sweeps" / "ci.yaml")
    assert df.height == len(plan(sweep)) == 4
    assert set(df["status"]) == {"FINISHED"}
    for key in REQUIRED_METRICS:
        assert key in df.columns and df[key].null_count() == 0, key
    for p in ("method", "model", "dataset", "n_edits", "edit_batch_size", "seed"):
        assert f"p.{p}" in df.columns
    assert set(df["p.method"]) == {"ft", "ft_kl"} and set(df["p.model"]) == {"tiny-gpt2", "tiny-llama"}
    assert (df["n_edits"] == 4).all()
    head_commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert {c.removesuffix("-dirty") for c in df["t.git.commit"]} == {head_commit or "unknown"}
    assert set(df["t.version.torch"]) == {__import__("torch").__version__}
    # The printed summary holds each finished run once, with the method, model and ES its MLflow run has.
    assert len(printed) == df.height
    got = {(r[cols.index("method")], r[cols.index("model")], float(r[cols.index("es")])) for r in printed}
    assert got == {(m, mo, round(es, 3)) for m, mo, es in zip(df["p.method"], df["p.model"], df["es"])}
    from bench.tracking import client

    c = client(uri)
    for rid in df["run_id"]:
        assert [a.path for a in c.list_artifacts(rid)] == ["per_edit.parquet"]


@pytest.mark.slow
def test_a_failing_trial_exits_1_with_its_reason_and_a_failed_run(tmp_path: Path) -> None:
    """... and a sweep whose name walks up the tree ("../../escaped") writes Ray's results inside ray_results/ under
    a slug of the name, nothing above its folder, while MLflow keeps the name as written (with no finished trial
    there is no report; where a report goes is :func:`bench.report.default_out`, tested apart)."""
    from bench.cli import slug

    name = "../../escaped"
    doc = _patch(name=name, models=[{"name": "tiny-gpt2", "edit_params": ["no.such.weight*"]}])
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    path = _write(work, doc)
    uri = f"sqlite:///{tmp_path / 'runs.db'}"
    env = {**os.environ, "EDITBENCH_RAY_TMP": f"/tmp/ebf{os.getpid()}"}
    out = subprocess.run([sys.executable, "-m", "bench.run", path, "--tracking-uri", uri], cwd=work,
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    assert "trial failed" in out.stderr and "matches no parameter" in out.stderr
    from bench.tracking import runs_frame

    df = runs_frame(uri, name)
    assert df.height == 1 and df["status"][0] == "FAILED" and "matches no parameter" in df["t.error"][0]
    assert slug(name) == "escaped-" + slug(name).rsplit("-", 1)[1] and "/" not in slug(name)
    assert [p.name.startswith(slug(name) + "-") for p in (work / "ray_results").iterdir()] == [True]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "runs.db"]  # nothing two levels up


def test_a_new_sqlite_store_is_the_cached_schema_made_as_mlflow_makes_it(tmp_path: Path, monkeypatch) -> None:
    """A new local store is a copy of the empty schema MLflow made once (kept in the cache), with the Default
    experiment MLflow would have written here; the copy takes runs and metrics like any store."""
    import sqlite3

    import bench.store as store
    import bench.tracking as tracking

    monkeypatch.setenv("EDITBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    first = tracking.client(f"sqlite:///{tmp_path / 'a.db'}")
    assert len(list((tmp_path / "cache" / "mlflow-schema").glob("*.db"))) == 1
    monkeypatch.setattr(store, "_empty_schema", lambda: (_ for _ in ()).throw(AssertionError("migrated again")))
    uri = f"sqlite:///{tmp_path / 'b.db'}"
    exp_id = tracking.prepare_experiment(uri, "x")
    c = tracking.client(uri)
    default = c.get_experiment("0")
    assert default.name == "Default" and default.artifact_location == str(tmp_path.resolve() / "mlruns" / "0")
    run = c.create_run(exp_id)
    c.log_metric(run.info.run_id, "es", 0.5)
    assert c.get_run(run.info.run_id).data.metrics == {"es": 0.5}
    assert first.search_experiments()[0].name == "Default"

    def tables(db: Path) -> dict[str, object]:  # names, columns and schema version (the migrations order CHECK
        with sqlite3.connect(db) as con:  # constraints differently from one run to the next: not compared)
            names = [n for (n,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
            out: dict[str, object] = {n: con.execute(f'PRAGMA table_info("{n}")').fetchall() for n in names}
            out["version"] = con.execute("SELECT version_num FROM alembic_version").fetchall()
        return out

    monkeypatch.undo()
    own = tmp_path / "own.db"
    own.write_bytes(store._empty_schema())  # what MLflow's migrations make
    assert tables(tmp_path / "b.db") == tables(own)


@pytest.mark.parametrize("name", ["../../escaped", "a/b", "..", "/etc/x", "café ☕", "x" * 300])
def test_a_report_folder_is_one_readable_name_inside_reports(name: str, tmp_path: Path, monkeypatch) -> None:
    """bench.run and bench.report put an experiment's report in reports/<slug>: one path component made of safe
    characters, inside reports/ whatever the name holds; distinct names keep distinct folders."""
    from bench.report import default_out

    monkeypatch.chdir(tmp_path)
    out = default_out(name)
    assert out.parent == Path("reports") and (tmp_path / "reports").resolve() in (tmp_path / out).resolve().parents
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,79}", out.name), out.name
    assert default_out("ci").name == "ci"  # a name that is already safe is kept as it is
    assert default_out(name + "!") != out
