"""Reports from a small real sweep, the MLflow UI command, and the interactive edit demo."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from bench.config import Sweep, plan, trials
from bench.edit import main as edit_main
from bench.report import build, load_runs, log_report
from bench.report import main as report_main
from bench.tracking import client, prepare_experiment, runs_frame
from bench.trial import run_trial
from tests.conftest import REPO


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """ft and mend on tiny-gpt2 at edit batch sizes 1 and 2, logged like a sweep would."""
    tmp = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{tmp / 'runs.db'}"
    sweep = Sweep(name="rep", n_edits=4, edit_batch_size=[1, 2], models=["tiny-gpt2"],
                  datasets=[{"name": "zsre", "n_train": 16, "n_val": 4}],
                  methods=[{"name": "ft", "hparams": {"lr": 1e-2, "max_steps": 3}},
                           {"name": "mend", "hparams": {"lr": 1e-3, "rank": 8, "edit_lr": 0.5},
                            "budget": {"max_steps": 2, "val_every": 2, "val_edits": 2}}])
    prepare_experiment(uri, "rep")
    for point in plan(sweep):
        run_trial(point, uri, "rep")
    return uri, tmp


def _from_per_edit_tables(uri: str, tmp) -> dict[tuple[str, int], dict[str, tuple[float, float]]]:
    """(method, edit batch size) -> metric -> (mean, 95% CI half-width 1.96 s / sqrt(n)) computed with numpy from
    each trial run's ``per_edit.parquet``, after checking that the run's logged metrics are those numbers."""
    import math

    import mlflow
    import numpy as np
    import polars as pl

    c = mlflow.MlflowClient(uri)
    exp = c.get_experiment_by_name("rep").experiment_id
    out = {}
    for run in c.search_runs([exp], "attributes.status = 'FINISHED'"):
        if run.data.tags.get("editbench.kind"):
            continue  # the report's own run
        key = (run.data.params["method"], int(run.data.params["edit_batch_size"]))
        dst = tmp / f"per_edit_{run.info.run_id}"
        dst.mkdir()
        table = pl.read_parquet(c.download_artifacts(run.info.run_id, "per_edit.parquet", str(dst)))
        assert table.height == 4
        out[key] = {}
        for name in ("es", "es_gain", "drawdown", "loc_agree", "loc_kl", "token_acc_rephrase", "gen_rephrase_em",
                     "gen_loc_agree"):
            v = table[name].to_numpy().astype(float)
            mean, ci = float(v.mean()), float(1.96 * v.std(ddof=1) / math.sqrt(len(v)))
            assert run.data.metrics[name] == pytest.approx(mean, abs=1e-12), (key, name)
            assert run.data.metrics[f"{name}_ci95"] == pytest.approx(ci, abs=1e-12), (key, name)
            out[key][name] = (mean, ci)
        es, pre = table["es"].to_numpy(), table["es_pre"].to_numpy()
        assert np.allclose(table["es_gain"].to_numpy(), es - pre)
    assert len({round(v["loc_kl"][0], 9) for v in out.values()}) == len(out)  # values that tell the runs apart
    return out


def test_report_tables_match_the_runs(store) -> None:
    uri, tmp = store
    out = tmp / "report"
    rep = build(uri, "rep", out, ["md", "csv", "tex", "html"])
    assert set(rep.tables) == {"table1", "results", "protocols", "batch", "cost", "training"}
    df = load_runs(uri, "rep")
    assert df.height == 4
    # Expected values from each run's per-edit table (MLflow artifact), aggregated here with numpy: the chain
    # per_edit.parquet -> logged metrics -> report cell is checked link by link.
    want = _from_per_edit_tables(uri, tmp)
    header, rows = rep.tables["results"]
    assert header == ["editor", "zsre / tiny-gpt2"]
    for row in rows:
        w = want[(row[0], 1)]
        free, free_agree = w["gen_rephrase_em"], w["gen_loc_agree"]
        assert f"ES {w['es'][0]:.3f} ± {w['es'][1]:.3f} (free {free[0]:.3f} ± {free[1]:.3f}); " \
               f"gain {w['es_gain'][0]:.3f} ± {w['es_gain'][1]:.3f}; DD {w['drawdown'][0]:.3f} ± {w['drawdown'][1]:.3f}; " \
               f"agree {w['loc_agree'][0]:.3f} (free {free_agree[0]:.3f} ± {free_agree[1]:.3f}) (n=4)" in row[1]
    # the protocols side by side: teacher-forced ES, the free answers' exact match, the gap between them
    header, rows = rep.tables["protocols"]
    assert header[2:5] == ["ES (x'_e)", "free EM (x'_e)", "gap"]
    for row in rows:
        w = want[(row[1].rstrip("†‡ "), 1)]
        assert row[2:5] == [f"{w['es'][0]:.3f} ± {w['es'][1]:.3f}",
                            f"{w['gen_rephrase_em'][0]:.3f} ± {w['gen_rephrase_em'][1]:.3f}",
                            f"{w['es'][0] - w['gen_rephrase_em'][0]:+.3f}"]
    _, batch_rows = rep.tables["batch"]
    for row in batch_rows:
        for bs, cell in zip((1, 2), row[2:]):
            w = want[(row[1], bs)]
            r = df.filter((df["method"] == row[1]) & (df["bs"] == bs)).to_dicts()[0]
            assert cell.rstrip("†‡ ") == (f"ES {w['es'][0]:.3f} (gain {w['es_gain'][0]:+.3f}) / "
                                          f"DD {w['drawdown'][0]:.3f} / free {w['gen_rephrase_em'][0]:.3f}")
            # the marks say how the editor's training ended: budget (†), kept its untrained state (‡)
            assert ("†" in cell) == (r["t.editbench.fit_stop"] in ("max_steps", "max_seconds"))
            assert ("‡" in cell) == bool(r.get("t.editbench.fit_kept_initial"))
    cost = {r[0]: r for r in rep.tables["cost"][1]}
    trained = df.filter((df["method"] == "mend") & df["t.editbench.trained_from"].is_null())
    assert trained.height == 1  # batch size 2 loaded the editor batch size 1 trained (same training key)
    # the training table: batch size 1 trained, batch size 2 loaded that training (one row each)
    training = rep.tables["training"][1]
    assert sorted(r[-1] == "-" for r in training) == [False, True] and {r[0] for r in training} == {"mend"}
    assert (out / "training_curves.png").exists()
    assert cost["mend"][2] == f"{trained['train_time_s'][0]:.1f}"  # its training counted once
    t1 = {r[0]: r[1:] for r in rep.tables["table1"][1]}
    assert t1["mend"][0].startswith("✓") and t1["ft"][0].startswith("✓")  # hashes unchanged
    assert t1["mend"][1].startswith("✓")
    assert t1["mend"][3].startswith("no evidence") and "1 model size" in t1["mend"][3]
    assert t1["mend"][4].startswith("✓ 0.00")
    ft_steps = df.filter(df["method"] == "ft")["edit_steps"].mean()
    assert t1["ft"][4].startswith("✓" if ft_steps <= 1 else "✗")
    for m in ("ft", "mend"):
        es1 = df.filter((df["method"] == m) & (df["bs"] == 1))["es"][0]
        es2 = df.filter((df["method"] == m) & (df["bs"] == 2))["es"][0]
        assert t1[m][2] == f"{'✓' if es1 > 0 and es2 >= 0.8 * es1 else '✗'} ES {es2:.3f} at B=2 vs {es1:.3f} at B=1"
    for f in ("report.md", "report.tex", "report.html", "results.csv", "table1.csv", "es_vs_drawdown.png",
              "es_vs_batch.png", "memory.png", "training_curves.png"):
        assert (out / f).stat().st_size > 0, f
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "Table 1" in page
    rid = log_report(uri, "rep", out)
    assert {a.path for a in client(uri).list_artifacts(rid)} == {"report"}
    assert load_runs(uri, "rep").height == 4  # the report run is not a trial


def test_report_cli_errors(store, capsys) -> None:
    uri, tmp = store
    assert report_main(["--experiment", "nope", "--tracking-uri", uri, "--out", str(tmp / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: unknown experiment 'nope' in {uri}"
    assert report_main(["--experiment", "rep", "--tracking-uri", uri, "--format", "pdf"]) == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ui_serves_the_store_on_loopback_and_stops(store) -> None:
    uri, _ = store
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench.ui", "--tracking-uri", uri, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    # One thread reads every line as it comes (select() on the pipe misses lines already in the reader's buffer,
    # and communicate() with a timeout reads past that buffer: both lost "runs of" lines here under load).
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(base + "/", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("bench.ui did not answer within 120 s")
        with urllib.request.urlopen(base + "/api/2.0/mlflow/experiments/search?max_results=50", timeout=10) as r:
            body = r.read().decode()
        assert '"rep"' in body and "custom_model_development" in body
        # bench.ui lists each experiment's runs view once the server is up
        deadline = time.time() + 60
        while not any("runs of rep" in line for line in list(lines)) and time.time() < deadline:
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        reader.join(timeout=10)
        out = "".join(lines)
    assert proc.returncode == 0
    assert f"http://127.0.0.1:{port}/" in out and "stopping" in out
    exp_id = client(uri).get_experiment_by_name("rep").experiment_id
    assert f"runs of rep: http://127.0.0.1:{port}/#/experiments/{exp_id}/runs" in out  # the runs table, not GenAI


def test_edit_cli_makes_the_model_say_the_new_answer(store, capsys) -> None:
    uri, _ = store
    df = runs_frame(uri, "rep")
    rid = df.filter((df["p.method"] == "mend") & (df["p.edit_batch_size"] == "1"))["run_id"][0]
    assert edit_main(["--run", rid, "--tracking-uri", uri, "--prompt", "The capital of France is",
                      "--target", "Rome", "--probe", "Hello", "--then", "Water is=dry",
                      "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    before = next(l for l in lines[lines.index("before the edit:"):] if "The capital of France is" in l)
    after_idx = next(i for i, l in enumerate(lines) if l.startswith("after edit 1"))
    after = next(l for l in lines[after_idx + 1 :] if "The capital of France is" in l)
    # the edited model now continues with the new answer (greedy), which the unedited one did not
    def first_word(line: str) -> str:
        return (line.split(" -> ", 1)[1].strip("'").split() or [""])[0]

    assert first_word(after) == "Rome" and first_word(before) != "Rome", (before, after)
    assert any(l.startswith("after edit 2 ('Water is' -> 'dry')") for l in lines)


def test_edit_cli_errors(store, capsys) -> None:
    uri, _ = store
    assert edit_main(["--run", "0" * 32, "--tracking-uri", uri, "--prompt", "a", "--target", "b"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown run id") and len(err.splitlines()) == 1
    df = runs_frame(uri, "rep")
    rid = df.filter(df["p.method"] == "ft")["run_id"][0]
    c = client(uri)
    exp = c.get_experiment_by_name("rep").experiment_id
    bare = c.create_run(exp, run_name="mend-without-checkpoint")
    c.log_param(bare.info.run_id, "method_class", "mend")
    c.log_param(bare.info.run_id, "model", "tiny-gpt2")
    c.set_terminated(bare.info.run_id, "FAILED")
    assert edit_main(["--run", bare.info.run_id, "--tracking-uri", uri, "--prompt", "a", "--target", "b"]) == 2
    assert "has no editor checkpoint artifact" in capsys.readouterr().err
    # ft needs no checkpoint: the demo runs
    assert edit_main(["--run", rid, "--tracking-uri", uri, "--prompt", "a", "--target", "b",
                      "--max-new-tokens", "2"]) == 0


def test_a_rerun_point_counts_once_and_configurations_are_not_pooled(tmp_path) -> None:
    """The same point run twice: only the newer run counts. Two learning rates of one method: two rows."""
    uri = f"sqlite:///{tmp_path / 'runs.db'}"
    sweep = Sweep(name="again", n_edits=2, models=["tiny-gpt2"], datasets=[{"name": "zsre", "n_train": 8, "n_val": 2}],
                  methods=[{"name": "ft", "hparams": {"lr": [1e-2, 1e-3], "max_steps": 2}}])
    first, second = plan(sweep)
    prepare_experiment(uri, "again")
    for point in (first, first, second):
        run_trial(point, uri, "again")
    every = runs_frame(uri, "again")
    assert every.height == 3 and set(every["status"]) == {"FINISHED"}
    df = load_runs(uri, "again")
    assert df.height == 2
    reran = every.filter(every["run_name"] == first["run_name"]).sort("start_time")["run_id"][-1]
    assert reran in df["run_id"].to_list()
    labels = {f"ft (hparams.lr={lr})" for lr in every["p.hparams.lr"].unique().to_list()}
    assert set(df["method"]) == labels and len(labels) == 2
    rows = build(uri, "again", tmp_path / "rep", ["md"]).tables["results"][1]
    assert {r[0] for r in rows} == labels
    assert all("(n=2)" in r[1] for r in rows)  # 2 edits each: neither the rerun nor the other lr pooled in


def test_runs_on_nested_test_sets_count_once_and_seeds_still_pool(tmp_path) -> None:
    """The same point evaluated on its first 2 and then its first 3 test edits: only the 3-edit run counts (the
    2-edit run's edits are its first ones). Another seed is another sample and is pooled with it."""
    uri = f"sqlite:///{tmp_path / 'runs.db'}"

    def points(n_edits: int, seeds: list[int]) -> list[dict]:  # as `bench.run` makes them: config digests tagged
        sweep = Sweep(name="nested", n_edits=n_edits, seeds=seeds, models=["tiny-gpt2"],
                      datasets=[{"name": "zsre", "n_train": 8, "n_val": 2}],
                      methods=[{"name": "ft", "hparams": {"lr": 1e-2, "max_steps": 2}}])
        return trials(sweep, plan(sweep))

    prepare_experiment(uri, "nested")
    small, = points(2, [0])
    large, other_seed = points(3, [0, 1])
    for point in (large, small, other_seed):  # the smaller run is the newer one: size decides, not age
        run_trial(point, uri, "nested")
    every = runs_frame(uri, "nested")
    assert every.height == 3
    df = load_runs(uri, "nested")
    assert sorted(zip(df["p.seed"].to_list(), df["p.n_edits"].cast(int).to_list())) == [("0", 3), ("1", 3)]
    rows = build(uri, "nested", tmp_path / "rep", ["md"]).tables["results"][1]
    assert len(rows) == 1 and "(n=6)" in rows[0][1]  # 3 + 3 edits; the 2-edit run's edits are not counted again
