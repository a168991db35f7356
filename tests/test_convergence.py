"""Convergence is part of every result: a learned editor's fit says why it stopped, runs carry it, and the
summary and the report mark budget-limited cells (dagger + footnote with the step and the last improvement)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.config import Sweep, plan, trials
from bench.tracking import FIT_STOP_TAG, prepare_experiment, runs_frame
from bench.trial import run_trial
from methods import Budget
from methods.mend import MEND
from tests.conftest import tiny


@pytest.mark.parametrize("budget,reason", [
    (Budget(max_steps=40, val_every=1, val_edits=2, patience=1), "converged"),
    (Budget(max_steps=2, val_every=1, val_edits=2, patience=50), "max_steps"),
    (Budget(max_steps=1000, val_every=1, val_edits=2, patience=50, max_seconds=1e-6), "max_seconds"),
], ids=["patience", "steps", "seconds"])
def test_fit_says_why_it_stopped(budget: Budget, reason: str, zsre) -> None:
    import torch

    torch.manual_seed(0)
    ed = MEND(tiny("tiny-gpt2"), {"lr": 1e-3, "rank": 8})
    fit = ed.fit(zsre["train"], zsre["val"], budget)
    assert fit.stop_reason == reason
    assert fit.budget_limited == (reason != "converged")
    assert 0 <= fit.best_step <= fit.steps <= budget.max_steps
    if reason == "converged":  # patience 1: the first validation without improvement ends it
        assert fit.steps < budget.max_steps


def test_budget_limited_cells_are_marked_in_summary_and_report(tmp_path: Path) -> None:
    from bench import report
    from bench.summary import summary as run_summary

    uri = f"sqlite:///{tmp_path / 'runs.db'}"
    prepare_experiment(uri, "conv")
    sweep = Sweep(name="conv", n_edits=2, models=["tiny-gpt2"], datasets=[{"name": "zsre", "n_train": 16,
                                                                           "n_val": 4}],
                  methods=[{"name": "mend", "hparams": {"lr": 1e-3, "rank": 8},
                            "budget": {"max_steps": 2, "val_every": 1, "val_edits": 2, "patience": 50}},
                           {"name": "ft", "hparams": {"lr": 1e-2, "max_steps": 2}}])
    todo = trials(sweep, plan(sweep))
    for t in todo:
        run_trial(t, uri, "conv")
    df = runs_frame(uri, "conv")
    tags = dict(zip(df["p.method"], df[f"t.{FIT_STOP_TAG}"]))
    assert tags == {"mend": "max_steps", "ft": "untrained"}
    summary = run_summary(uri, "conv", {t["config_digest"] for t in todo})
    fit = dict(zip(summary["method"], summary["fit"]))
    assert fit["mend"].startswith(f"budget{report.BUDGET_MARK} (step 2, best ") and fit["ft"] == "-"
    rep = report.build(uri, "conv", tmp_path / "rep", ["md", "html"])
    md = (tmp_path / "rep" / "report.md").read_text()
    for title in (report.TITLES["results"], report.TITLES["batch"]):  # Table 3/4 and Table 5
        section = md.split(f"## {title}")[1].split("\n## ")[0]
        mend_row = next(line for line in section.splitlines() if "| mend |" in line or line.startswith("| mend"))
        ft_row = next(line for line in section.splitlines() if "| ft |" in line or line.startswith("| ft "))
        assert report.BUDGET_MARK in mend_row and report.BUDGET_MARK not in ft_row, section
    assert "stopped by max_steps at step 2, last validation improvement at step" in md
    assert report.BUDGET_MARK in (tmp_path / "rep" / "report.html").read_text()
    header, rows = rep.tables["training"]  # one row per training: ft does not train
    assert [r[0] for r in rows] == ["mend"] and rows[0][2] == f"budget-limited (max_steps) {report.BUDGET_MARK}"
    assert rows[0][3] == "2" and rows[0][-1] == "-"
    assert (tmp_path / "rep" / "training_curves.png").stat().st_size > 0


HP = {"mend": {"lr": 1e-3, "rank": 8}, "enn": {"lr": 1e-3}, "ke": {"lr": 1e-3, "hidden_dim": 16,
                                                                     "condition_dim": 16}}


@pytest.mark.parametrize("method", sorted(HP))
def test_a_trained_editor_is_reused_by_the_same_training_and_edits_the_same(method: str, tmp_path: Path) -> None:
    """Train once, evaluate many: a trial whose training key matches a FINISHED run (any experiment) loads its
    checkpoint (tagged with the source, train time 0, the source's time beside it) and scores exactly what
    training again would; another hyper-parameter is another key."""
    import math

    from bench.tracking import TRAIN_KEY_TAG, TRAINED_FROM_TAG

    uri = f"sqlite:///{tmp_path / 'runs.db'}"

    def trial(n_edits: int, **hp: float) -> dict:
        s = Sweep(name="x", n_edits=n_edits, models=["tiny-gpt2"],
                  datasets=[{"name": "zsre", "n_train": 16, "n_val": 4}],
                  methods=[{"name": method, "hparams": {**HP[method], **hp},
                            "budget": {"max_steps": 4, "val_every": 2, "val_edits": 2}}])
        (t,) = trials(s, plan(s))
        return t

    for e in ("a", "b"):
        prepare_experiment(uri, e)
    first = run_trial(trial(3), uri, "a")
    reused = run_trial(trial(4), uri, "b")           # more test edits, another experiment: same training
    again = run_trial({**trial(4), "retrain": True}, uri, "b")
    other = run_trial(trial(4, lr=2e-3), uri, "b")   # another learning rate: another training key
    a, b = runs_frame(uri, "a"), runs_frame(uri, "b").sort("start_time")
    src = a["run_id"][0]
    assert list(b[f"t.{TRAINED_FROM_TAG}"]) == [src, None, None]
    assert b[f"t.{TRAIN_KEY_TAG}"][0] == b[f"t.{TRAIN_KEY_TAG}"][1] == a[f"t.{TRAIN_KEY_TAG}"][0]
    assert b[f"t.{TRAIN_KEY_TAG}"][2] != a[f"t.{TRAIN_KEY_TAG}"][0]
    assert reused["train_time_s"] == 0 and reused["source_train_time_s"] == pytest.approx(first["train_time_s"])
    assert reused["train_steps"] == first["train_steps"] and other["train_time_s"] > 0
    keys = [k for k in again if not any(n in k for n in ("time", "mem", "_s"))]
    for k in keys:  # the loaded editor edits exactly as the one trained again
        assert (math.isnan(reused[k]) and math.isnan(again[k])) or reused[k] == pytest.approx(again[k], abs=1e-6), k


class _Interrupt(Exception):
    """Stands for Ctrl-C or a killed process in the middle of a fit."""


@pytest.mark.parametrize("method", sorted(HP))
def test_an_interrupted_fit_resumes_from_its_saved_state_and_ends_as_an_uninterrupted_one(
        method: str, tmp_path: Path, zsre) -> None:
    """A fit killed after its step-4 validation continues, when called again with the same state folder, from the
    state saved at step 2 and ends with exactly the parameters, steps and validation of a fit never interrupted;
    called once more after it finished it only loads the result; another budget does not take the state."""
    import torch

    from bench.models import load_model
    from methods import get_editor

    budget = Budget(max_steps=6, val_every=2, val_edits=2, patience=50)

    def editor():
        torch.manual_seed(0)
        ed = get_editor(method)(load_model("tiny-gpt2"), HP[method])
        ed.state_every_s = 0.0  # save at every validation
        return ed

    straight = editor()
    want = straight.fit(zsre["train"], zsre["val"], budget)

    def kill_at_step_4(step: int, metrics) -> None:
        if step == 4 and "val_loss" in metrics:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        editor().fit(zsre["train"], zsre["val"], budget, kill_at_step_4, state_dir=tmp_path)
    assert (tmp_path / "fit_state.pt").exists()
    resumed = editor()
    got = resumed.fit(zsre["train"], zsre["val"], budget, state_dir=tmp_path)
    assert got.resumed_step == 2 and want.resumed_step == 0
    assert (got.steps, got.best_step, got.stop_reason) == (want.steps, want.best_step, want.stop_reason)
    assert got.best == pytest.approx(want.best, rel=1e-5)
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)

    done = editor()  # the fit had finished: its state folder holds the result and the best state
    assert done.fit(zsre["train"], zsre["val"], budget, state_dir=tmp_path) == got
    for k, v in done.state_dict().items():
        torch.testing.assert_close(v, a[k], rtol=1e-5, atol=1e-6, msg=k)

    other = editor().fit(zsre["train"], zsre["val"], Budget(max_steps=4, val_every=2, val_edits=2, patience=50),
                         state_dir=tmp_path)
    assert other.resumed_step == 0 and other.steps == 4


def test_reuse_converged_loads_the_same_editor_trained_to_convergence_under_any_cap(tmp_path: Path) -> None:
    """``reuse_converged``: a trial with a small step cap loads the editor of a FINISHED run trained the same way
    whose fit converged under a larger cap (tags: source, reuse "converged"; the source's steps; the summary says
    converged and loaded); without the option, or with another edit batch size in training, or when the only
    same-editor run ended on its budget, the trial trains under its own budget."""
    from bench.summary import summary as run_summary
    from bench.tracking import CONVERGENCE_KEY_TAG, REUSE_TAG, TRAINED_FROM_TAG

    uri = f"sqlite:///{tmp_path / 'runs.db'}"
    for e in ("long", "default"):
        prepare_experiment(uri, e)

    def trial(budget: dict, reuse: bool, lr: float = 1e-3) -> dict:
        s = Sweep(name="x", n_edits=2, models=["tiny-gpt2"], reuse_converged=reuse,
                  datasets=[{"name": "zsre", "n_train": 16, "n_val": 4}],
                  methods=[{"name": "mend", "hparams": {"lr": lr, "rank": 8}, "budget": budget}])
        (t,) = trials(s, plan(s))
        return t

    long = {"max_steps": 40, "val_every": 1, "val_edits": 2, "patience": 3}  # stops at step 3 or later
    short = {"max_steps": 2, "val_every": 1, "val_edits": 2, "patience": 50}
    run_trial(trial(long, False), uri, "long")                        # converges
    run_trial(trial(long, False, lr=2e-3), uri, "long")
    run_trial(trial({**short, "max_steps": 3}, False, lr=3e-3), uri, "long")  # budget-limited at lr 3e-3
    src = runs_frame(uri, "long").sort("start_time")
    assert list(src[f"t.{FIT_STOP_TAG}"]) == ["converged", "converged", "max_steps"]
    todo = [trial(short, True), trial(short, False), trial({**short, "batch_size": 2}, True),
            trial(short, True, lr=3e-3)]
    for t in todo:
        run_trial(t, uri, "default")
    df = runs_frame(uri, "default").sort("start_time")
    assert list(df[f"t.{TRAINED_FROM_TAG}"]) == [src["run_id"][0], None, None, None]
    assert list(df[f"t.{REUSE_TAG}"]) == ["converged", None, None, None]
    assert list(df[f"t.{FIT_STOP_TAG}"]) == ["converged", "max_steps", "max_steps", "max_steps"]
    assert df["train_steps"][0] == src["train_steps"][0] > 2 and df["train_time_s"][0] == 0
    assert df[f"t.{CONVERGENCE_KEY_TAG}"][0] == df[f"t.{CONVERGENCE_KEY_TAG}"][1] == src[f"t.{CONVERGENCE_KEY_TAG}"][0]
    summary = run_summary(uri, "default", {t["config_digest"] for t in todo[:1]})
    assert list(summary["fit"]) == [f"converged (step {int(src['train_steps'][0])}, loaded)"]
    from bench import report

    rep = report.build(uri, "default", tmp_path / "rep", ["md"])
    _, rows = rep.tables["training"]
    loaded = [r for r in rows if r[-1] != "-"]
    assert len(loaded) == 1 and "reuse_converged=True" in loaded[0][0]  # told apart from the run that trained
    assert len(loaded) == 1 and loaded[0][-1] == f"{src['run_id'][0][:12]} (converged)"
    assert loaded[0][2] == "converged" and loaded[0][3] == str(int(src["train_steps"][0]))
    curves = report.validation_curves(uri, report.trained_runs(report.load_runs(uri, "default")))
    assert len(next(iter(c for c in curves.values() if len(c) == int(src["train_steps"][0]) + 1))) > 3


def test_a_fit_that_never_beats_step_0_diverged_and_kept_its_untrained_state(zsre) -> None:
    """Patience that runs out with step 0 still the best is not convergence: the stop reason says diverged, the
    result says it kept its untrained state, and the text names step 0's loss and ES and every validation's ES."""
    import torch

    torch.manual_seed(0)
    ed = MEND(tiny("tiny-gpt2"), {"lr": 10.0, "rank": 8, "edit_lr": 1.0})  # an lr that wrecks the editor
    init = {k: v.clone() for k, v in ed.state_dict().items()}
    fit = ed.fit(zsre["train"], zsre["val"], Budget(max_steps=40, val_every=1, val_edits=2, patience=2))
    assert fit.stop_reason == "diverged" and fit.best_step == 0 and fit.steps == 2 and fit.kept_initial
    assert not fit.budget_limited
    assert [h["step"] for h in fit.history] == [0.0, 1.0, 2.0]
    assert all(not h["val_loss"] < fit.history[0]["val_loss"] for h in fit.history[1:])
    text = fit.kept_initial_text()
    assert text.startswith("kept its untrained state after 2 steps (chosen by val_loss): step 0 val_loss")
    assert f"step 0 val_loss {fit.history[0]['val_loss']:.4g}" in text
    assert "val_es per validation: 0:" in text and " 2:" in text
    state = ed.state_dict()  # the editor it keeps is the untrained one, exactly
    assert all(torch.equal(state[k], init[k]) for k in init)


def test_selecting_by_validation_es_above_a_locality_floor(zsre) -> None:
    """select: val_es keeps the validation with the highest ES (ties: lower loss) among those whose locality
    agreement reaches loc_floor: checked against the fit's own validation history."""
    import torch

    torch.manual_seed(0)
    ed = MEND(tiny("tiny-gpt2"), {"lr": 1e-3, "rank": 8})
    budget = Budget(max_steps=6, val_every=1, val_edits=4, patience=50, select="val_es", loc_floor=0.5)
    fit = ed.fit(zsre["train"], zsre["val"], budget)
    ok = [h for h in fit.history if h["val_loc_agree"] >= 0.5]
    want = max(ok, key=lambda h: (h["val_es"], -h["val_loss"], -h["step"]))  # the first of equals is kept
    assert fit.best_step == int(want["step"])
    assert fit.select == "val_es (highest, loc_agree >= 0.5; ties: lower val_loss)"
    assert all(0.0 <= h["val_loc_agree"] <= 1.0 for h in fit.history)
    assert fit.history[0]["val_loc_agree"] > 0.99  # MEND at init barely moves the locality argmax


def test_loc_floor_without_select_val_es_is_refused() -> None:
    with pytest.raises(ValueError, match="loc_floor applies to select: val_es only"):
        Budget(loc_floor=0.9)
    with pytest.raises(ValueError, match="select"):
        Budget(select="val_acc")  # type: ignore[arg-type]


def test_a_kept_untrained_editor_is_marked_in_tags_summary_and_report_with_its_gain(tmp_path: Path) -> None:
    """A trial whose MEND kept its untrained state: the run's tags say so (and which key chose it), the summary's
    fit column and every report table with its result carry the mark, and ES is shown beside its gain over the
    unedited model (the per-edit es minus es_pre, recomputed here from the run's table)."""
    import mlflow
    import polars as pl

    from bench import report
    from bench.summary import summary as run_summary
    from bench.tracking import FIT_KEPT_INITIAL_TAG, FIT_SELECT_TAG

    uri = f"sqlite:///{tmp_path / 'runs.db'}"
    prepare_experiment(uri, "kept")
    sweep = Sweep(name="kept", n_edits=4, models=["tiny-gpt2"], datasets=[{"name": "zsre", "n_train": 16,
                                                                           "n_val": 4}],
                  methods=[{"name": "mend", "hparams": {"lr": 10.0, "rank": 8, "edit_lr": 1.0},
                            "budget": {"max_steps": 40, "val_every": 1, "val_edits": 2, "patience": 2}}])
    todo = trials(sweep, plan(sweep))
    metrics = run_trial(todo[0], uri, "kept")
    df = runs_frame(uri, "kept")
    row = df.to_dicts()[0]
    assert row[f"t.{FIT_STOP_TAG}"] == "diverged"
    assert row[f"t.{FIT_KEPT_INITIAL_TAG}"].startswith("kept its untrained state after 2 steps")
    assert row[f"t.{FIT_SELECT_TAG}"] == "val_loss (lowest; the authors' key)"
    c = mlflow.MlflowClient(uri)
    table = pl.read_parquet(c.download_artifacts(row["run_id"], "per_edit.parquet", str(tmp_path)))
    assert metrics["es_gain"] == pytest.approx(float((table["es"] - table["es_pre"]).mean()))
    assert metrics["init_val_es"] == metrics["best_val_es"]  # the chosen checkpoint is step 0's
    summary = run_summary(uri, "kept", {t["config_digest"] for t in todo})
    assert list(summary["fit"]) == [f"diverged{report.UNTRAINED_MARK} (step 2, kept 0)"]
    assert "es_gain" in summary.columns
    rep = report.build(uri, "kept", tmp_path / "rep", ["md"])
    md = (tmp_path / "rep" / "report.md").read_text()
    section = md.split(f"## {report.TITLES['results']}")[1].split("\n## ")[0]
    mend_row = next(line for line in section.splitlines() if line.startswith("| mend"))
    assert report.UNTRAINED_MARK in mend_row and "gain " in mend_row and report.BUDGET_MARK not in mend_row
    assert "kept its untrained state: no validation after step 0 beat step 0's" in section
    header, rows = rep.tables["training"]
    assert rows[0][2] == f"diverged {report.UNTRAINED_MARK}" and rows[0][header.index("chosen by")] == "val_loss"
    assert rows[0][header.index("val ES (step 0)")] == rows[0][header.index("val ES")]
