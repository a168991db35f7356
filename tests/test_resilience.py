"""Sweeps that survive interruption: kill -9 of the driver then ``--resume``, Ctrl-C and SIGTERM ending every open
run KILLED, an ASHA sweep (the shipped ``sweeps/tune_lr.yaml`` on tiny models) end to end, and trials that give the
same metrics twice."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from bench.config import Sweep, load_sweep, plan, trials, validate
from bench.tracking import CONFIG_DIGEST_TAG, END_REASON_TAG, prepare_experiment, runs_frame
from bench.trial import run_trial
from bench.data import EMBEDDED_ROOT
from tests.conftest import REPO, reap

# Four FT trials on tiny models: a few seconds each, long enough to be caught in the middle.
MULTI = {
    "name": "multi",
    "n_edits": 4,
    "seeds": [0, 1],
    "models": ["tiny-gpt2", "tiny-llama"],
    "datasets": [{"name": "zsre", "n_train": 16, "n_val": 4}],
    "methods": [{"name": "ft", "hparams": {"lr": 1.0e-2, "max_steps": 3}}],
    "generation": False,  # interruptions are under test, not the free answers (tests/test_answers.py)
}


def _statuses(uri: str, experiment: str) -> list[tuple[str, str]]:
    import polars as pl

    df = runs_frame(uri, experiment)
    if df.is_empty() or f"t.{CONFIG_DIGEST_TAG}" not in df.columns:
        return []
    df = df.filter(pl.col(f"t.{CONFIG_DIGEST_TAG}").is_not_null())
    return list(zip(df[f"t.{CONFIG_DIGEST_TAG}"], df["status"]))


def _start(sweep_file: Path, uri: str, cwd: Path, tag: str, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "EDITBENCH_RAY_TMP": f"/tmp/eb{tag}{os.getpid()}"}
    return subprocess.Popen([sys.executable, "-m", "bench.run", str(sweep_file), "--tracking-uri", uri, *extra],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _raw_statuses(db: Path) -> list[str]:
    """Trial-run statuses read with plain SQL (an MLflow client here would race the driver's schema creation)."""
    import sqlite3

    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            return [r[0] for r in con.execute(
                "select r.status from runs r join tags t on t.run_uuid = r.run_uuid where t.key = ?",
                (CONFIG_DIGEST_TAG,))]
    except sqlite3.Error:  # not created yet, or mid-migration
        return []


def _wait_mid_sweep(proc: subprocess.Popen, uri: str, finished: int, timeout: float = 300) -> None:
    """Until at least ``finished`` trials have FINISHED and another is RUNNING (the moment to interrupt)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-3000:] if proc.stdout else ""
        st = _raw_statuses(Path(uri[len("sqlite:///"):]))
        if st.count("FINISHED") >= finished and "RUNNING" in st:
            return
        time.sleep(0.3)
    raise AssertionError(f"the sweep never had {finished} finished trial(s) and a running one at once")


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One 4-trial sweep (MULTI, one trial at a time) interrupted three ways in turn, each time once one more
    trial has FINISHED and the next is RUNNING: SIGTERM to the driver, then Ctrl-C to the process group of a
    --resume, then kill -9 of the driver of another --resume; then --resume to the end, and once more with nothing
    left. Each stage's exit code, output, trial statuses and run ids are kept for the tests below (one sweep
    serves them all: each start of Ray costs ~10 s)."""
    import polars as pl

    tmp = tmp_path_factory.mktemp("multi")
    f = tmp / "multi.yaml"
    f.write_text(yaml.safe_dump(MULTI))
    uri = f"sqlite:///{tmp / 'runs.db'}"
    stages: dict[str, dict] = {"file": {"path": f, "uri": uri}}

    def record(name: str, code: int | None, out: str) -> None:
        df = runs_frame(uri, "multi")
        df = df.filter(pl.col(f"t.{CONFIG_DIGEST_TAG}").is_not_null())
        stages[name] = {"code": code, "out": out, "statuses": _statuses(uri, "multi"),
                        "running": set(df.filter(pl.col("status") == "RUNNING")["run_id"])}

    for name, how, extra in (("sigterm", signal.SIGTERM, ()), ("ctrl-c", signal.SIGINT, ("--resume",)),
                             ("kill -9", signal.SIGKILL, ("--resume",))):
        done = _raw_statuses(Path(uri[len("sqlite:///"):])).count("FINISHED")
        proc = _start(f, uri, tmp, name[:2].strip(), *extra)
        _wait_mid_sweep(proc, uri, done + 1)
        family = psutil.Process(proc.pid).children(recursive=True)
        if how == signal.SIGINT:
            os.killpg(proc.pid, how)  # what Ctrl-C in a terminal does
        else:
            os.kill(proc.pid, how)
        out, _ = proc.communicate(timeout=120)
        record(name, proc.returncode, out)
        reap([p for p in family if p.is_running()])
    for name in ("resume", "resume again"):
        proc = _start(f, uri, tmp, "r", "--resume")
        out, _ = proc.communicate(timeout=600)
        record(name, proc.returncode, out)
    return stages


@pytest.mark.slow
@pytest.mark.parametrize("stage,sig,code", [("ctrl-c", signal.SIGINT, 130), ("sigterm", signal.SIGTERM, 143)],
                         ids=["ctrl-c to the process group", "sigterm to the driver"])
def test_interruption_ends_every_open_run_killed(interrupted: dict, stage: str, sig: int, code: int) -> None:
    got = interrupted[stage]
    assert got["code"] == code, got["out"][-3000:]
    st = {s for _, s in got["statuses"]}
    assert "RUNNING" not in st and "FINISHED" in st and "KILLED" in st, got["statuses"]
    assert f"stopped by {signal.Signals(sig).name}" in got["out"] and "FINISHED" in got["out"]  # what finished


@pytest.mark.slow
def test_kill_9_of_the_driver_then_resume_runs_only_what_is_missing(interrupted: dict) -> None:
    killed = interrupted["kill -9"]
    assert killed["code"] == -signal.SIGKILL and killed["running"]  # a run left RUNNING by the dead driver
    finished_before = {d for d, s in killed["statuses"] if s == "FINISHED"}
    assert interrupted["ctrl-c"]["out"].count("resume: 1 of 4 trial(s) already FINISHED") == 1
    res = interrupted["resume"]
    assert res["code"] == 0, res["out"][-3000:]
    assert f"resume: {len(finished_before)} of 4 trial(s) already FINISHED" in res["out"]
    assert "1 stale RUNNING run(s) marked KILLED" in res["out"]
    f, uri = interrupted["file"]["path"], interrupted["file"]["uri"]
    expected = {t["config_digest"] for t in trials(load_sweep(f), validate(load_sweep(f)))}
    finished = [d for d, s in res["statuses"] if s == "FINISHED"]
    assert sorted(finished) == sorted(expected)  # every configuration once: no duplicate, none missing
    assert "RUNNING" not in {s for _, s in res["statuses"]}
    from mlflow import MlflowClient

    for rid in killed["running"]:  # the dead driver's run, closed by the resume with the reason
        run = MlflowClient(uri).get_run(rid)
        assert run.info.status == "KILLED" and "died" in run.data.tags[END_REASON_TAG]
    # A resume with nothing left starts no trial and still prints the summary.
    again = interrupted["resume again"]
    assert again["code"] == 0 and "resume: 4 of 4 trial(s) already FINISHED" in again["out"]
    assert "running 0" in again["out"]


@pytest.mark.slow
def test_shipped_asha_sweep_end_to_end_on_tiny_models(tmp_path: Path) -> None:
    """sweeps/tune_lr.yaml with its models and budgets shrunk: ASHA schedules the learned editors' samples on
    val_loss, FT's run unscheduled; every run ends FINISHED or (stopped by ASHA) KILLED with the reason."""
    doc = yaml.safe_load((REPO / "sweeps" / "tune_lr.yaml").read_text())
    doc.update(models=["tiny-gpt2"], n_edits=2, num_samples=2, max_concurrent=2, resources={"cpu": 1},
               datasets=[{"name": "zsre", "n_train": 16, "n_val": 4}], generation=False)
    doc["scheduler"].update(metric="val_loss", mode="min", grace_period=1, max_t=5)
    small = {"max_steps": 6, "val_every": 2, "val_edits": 2, "patience": 10}
    keep = []
    for m in doc["methods"]:
        if m["name"] in ("ft", "mend"):
            if m["name"] == "mend":
                m["hparams"]["rank"] = 8
                m["budget"] = small
            keep.append(m)
    doc["methods"] = keep
    f = tmp_path / "tune.yaml"
    f.write_text(yaml.safe_dump(doc))
    uri = f"sqlite:///{tmp_path / 'runs.db'}"
    out = subprocess.run([sys.executable, "-m", "bench.run", str(f), "--tracking-uri", uri], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "EDITBENCH_RAY_TMP": f"/tmp/eba{os.getpid()}"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "scheduler: ft never report val_loss" in out.stdout
    df = runs_frame(uri, "tune_lr")
    df = df.filter(df[f"t.{CONFIG_DIGEST_TAG}"].is_not_null())
    assert df.height == 4  # 2 FT samples + 2 MEND samples, each one run
    assert set(df["status"]) <= {"FINISHED", "KILLED"}
    assert set(df.filter(df["p.method"] == "ft")["status"]) == {"FINISHED"}
    for row in df.filter(df["status"] == "KILLED").iter_rows(named=True):
        assert row["p.method"] == "mend" and "stopped early by the asha scheduler" in row[f"t.{END_REASON_TAG}"]
    assert "FINISHED" in set(df.filter(df["p.method"] == "mend")["status"])
    assert df.filter(df["p.method"] == "mend")["val_loss"].null_count() == 0  # reported at each validation
    # The report's tuning table: every sample of both points, one chosen (bold) per point.
    report = (tmp_path / "reports" / "tune_lr" / "report.md").read_text()
    tuning = report.split("## Tuning")[1].split("\n## ")[0]
    rows = [line for line in tuning.splitlines() if line.startswith("| ") and "/ tiny-gpt2 /" in line]
    assert len(rows) == 4 and sum("**finished**" in line for line in rows) == 2, tuning


def test_the_same_trial_twice_gives_the_same_metrics(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'runs.db'}"
    prepare_experiment(uri, "det")
    sweep = Sweep(name="det", n_edits=3, models=[{"name": "tiny-gpt2"}],
                  datasets=[{"name": "zsre", "n_train": 16, "n_val": 4}],
                  methods=[{"name": "mend", "hparams": {"lr": 1e-3, "rank": 8},
                            "budget": {"max_steps": 4, "val_every": 2, "val_edits": 2}},
                           {"name": "ft_kl", "hparams": {"lr": 1e-2, "max_steps": 3, "loc_batch_size": 2}}])
    for point in trials(sweep, plan(sweep)):
        # retrain: the second run trains again rather than loading the first's editor (that is tested apart)
        a, b = run_trial(point, uri, "det"), run_trial({**point, "retrain": True}, uri, "det")
        noisy = ("time", "mem", "_s")
        keys = [k for k in a if not any(n in k for n in noisy)]
        assert len(keys) > 10
        for k in keys:
            assert (math.isnan(a[k]) and math.isnan(b[k])) or a[k] == b[k], (point["method"], k, a[k], b[k])


def test_config_digest_covers_what_decides_a_result(tmp_path: Path) -> None:
    import json

    base = {"name": "d", "n_edits": 2, "models": ["tiny-gpt2"], "datasets": [{"name": "zsre"}],
            "methods": [{"name": "ft", "hparams": {"lr": 1e-2}}]}

    def digest(**kw: object) -> str:
        doc = json.loads(json.dumps(base))
        doc.update(kw)
        s = Sweep(**doc)
        (t,) = trials(s, plan(s))
        return t["config_digest"]

    d0 = digest()
    assert digest(name="other", description="x", tracking_uri="sqlite:///x.db") == d0  # not part of a result
    rows = json.loads((EMBEDDED_ROOT / "zsre" / "zsre_mend_800.json").read_text())
    mine = tmp_path / "t.json"
    mine.write_text(json.dumps(rows[-50:]))
    changed = [digest(n_edits=3), digest(seeds=[1]), digest(edit_batch_size=[2]),
               digest(methods=[{"name": "ft", "hparams": {"lr": 1e-3}}]),
               digest(methods=[{"name": "ft", "hparams": {"lr": 1e-2}, "budget": {"max_steps": 7}}]),
               digest(models=[{"name": "tiny-gpt2", "edit_params": ["*mlp.c_fc*"]}]),
               digest(datasets=[{"name": "zsre", "locality": "known"}]),
               digest(datasets=[{"name": "zsre", "paths": {"test": str(mine)}}])]
    assert len({d0, *changed}) == len(changed) + 1
    mine.write_text(json.dumps(rows[-40:]))  # same path, other contents: another configuration
    assert digest(datasets=[{"name": "zsre", "paths": {"test": str(mine)}}]) != changed[-1]


def test_search_space_draws_are_reproducible_and_in_range() -> None:
    s = Sweep(name="s", n_edits=2, num_samples=5, models=["tiny-gpt2"], datasets=["zsre"],
              methods=[{"name": "mend", "hparams": {"lr": {"tune": "loguniform", "lower": 1e-5, "upper": 1e-3},
                                                    "rank": {"tune": "choice", "values": [4, 8]}}},
                       {"name": "ft", "hparams": {"lr": 1e-2}}])
    a, b = trials(s, plan(s)), trials(s, plan(s))
    assert [t["hparams"] for t in a] == [t["hparams"] for t in b]
    mend = [t for t in a if t["method"] == "mend"]
    assert len(mend) == 5 and len([t for t in a if t["method"] == "ft"]) == 1
    assert all(1e-5 <= t["hparams"]["lr"] <= 1e-3 and t["hparams"]["rank"] in (4, 8) for t in mend)
    assert len({t["config_digest"] for t in a}) == len(a)
    assert len({t["run_name"] for t in a}) == len(a)


def test_trials_that_log_the_same_dataset_at_once_all_keep_it(tmp_path: Path) -> None:
    """Concurrent trials register the same dataset input: the store's unique key refuses all but the first insert
    (a fresh-clone cluster run failed a trial on it); every run must still end with the input linked, once."""
    import threading

    import datasets
    import mlflow

    from bench.tracking import trial_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    prepare_experiment(uri, "race")
    errors: list[BaseException] = []
    run_ids: list[str] = []
    for rep in range(3):  # a new dataset per round: each round's first insert is contested again
        ds = datasets.Dataset.from_dict({"x": [rep, rep + 1]})
        barrier = threading.Barrier(4)

        def one(i: int) -> None:
            try:
                with trial_run(uri, "race", f"r{rep}.{i}", {}) as run:
                    run_ids.append(run.run_id)
                    barrier.wait()
                    run.log_dataset_inputs([(f"d{rep}/train", "train", ds, f"digest{rep}", {"path": "json"})])
            except BaseException as e:  # noqa: BLE001 - collected and asserted below
                errors.append(e)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    c = mlflow.MlflowClient(uri)
    assert len(run_ids) == 12
    for rid in run_ids:
        inputs = c.get_run(rid).inputs.dataset_inputs
        assert [d.dataset.name for d in inputs] == [f"d{c.get_run(rid).info.run_name[1]}/train"]


def test_resume_bookkeeping_on_a_hand_built_store(tmp_path: Path) -> None:
    """--resume's decisions, without Ray, on a store written by hand: a trial counts as done only with a FINISHED
    run of its digest in this experiment (not FAILED, KILLED, RUNNING, nor FINISHED in another experiment);
    every RUNNING run of the experiment is closed KILLED with its reason, the rest keep their status. Without
    --resume everything runs again and nothing is closed. close_open_runs' filters (sweep id, digest, also)
    touch only what they name."""
    import mlflow

    from bench.run import resume_plan
    from bench.tracking import SWEEP_ID_TAG, close_open_runs, finished_digests

    uri = f"sqlite:///{tmp_path / 'store.db'}"
    exp = prepare_experiment(uri, "exp")
    other = prepare_experiment(uri, "other")
    c = mlflow.MlflowClient(uri)

    def run(experiment_id: str, digest: str, status: str, sweep: str = "s1") -> str:
        r = c.create_run(experiment_id, tags={CONFIG_DIGEST_TAG: digest, SWEEP_ID_TAG: sweep})
        if status != "RUNNING":
            c.set_terminated(r.info.run_id, status)
        return r.info.run_id

    ids = {"a": run(exp, "A", "FINISHED"), "b": run(exp, "B", "FAILED"), "c": run(exp, "C", "KILLED"),
           "d": run(exp, "D", "RUNNING"), "d2": run(exp, "D", "RUNNING", sweep="s2"),
           "e": run(other, "E", "FINISHED"), "f_old": run(exp, "F", "FAILED"), "f": run(exp, "F", "FINISHED")}
    assert finished_digests(uri, "exp") == {"A", "F"} and finished_digests(uri, "none") == set()
    todo = [{"config_digest": d} for d in "ABCDEFG"]
    again, already, stale = resume_plan(uri, "exp", todo, resume=False)
    assert again == todo and [t["config_digest"] for t in already] == ["A", "F"] and stale == 0
    assert c.get_run(ids["d"]).info.status == "RUNNING"  # nothing closed without --resume
    left, already, stale = resume_plan(uri, "exp", todo, resume=True)
    assert [t["config_digest"] for t in left] == ["B", "C", "D", "E", "G"] and stale == 2
    status = {k: c.get_run(v).info.status for k, v in ids.items()}
    assert status == {"a": "FINISHED", "b": "FAILED", "c": "KILLED", "d": "KILLED", "d2": "KILLED",
                      "e": "FINISHED", "f_old": "FAILED", "f": "FINISHED"}
    assert c.get_run(ids["d"]).data.tags[END_REASON_TAG].startswith("left RUNNING by a sweep that died")
    # the filters: one sweep's RUNNING runs, one digest, and a scheduler's KILLED run re-stated
    r1, r2, r3 = run(exp, "X", "RUNNING", "s3"), run(exp, "Y", "RUNNING", "s3"), run(exp, "X", "RUNNING", "s4")
    assert close_open_runs(uri, "exp", "FAILED", "why", sweep_id="s3", digest="X") == 1
    assert [c.get_run(r).info.status for r in (r1, r2, r3)] == ["FAILED", "RUNNING", "RUNNING"]
    assert close_open_runs(uri, "exp", "KILLED", "stopped by the scheduler", digest="C", also=("KILLED",)) == 1
    assert c.get_run(ids["c"]).data.tags[END_REASON_TAG] == "stopped by the scheduler"
    assert close_open_runs(uri, "exp", "KILLED", "end", sweep_id="s4") == 1 and close_open_runs(uri, "none", "KILLED",
                                                                                               "x") == 0
