"""PerPointASHA: samples of one grid point are stopped only by samples of the same point."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("ray.tune")

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from bench.scheduling import PerPointASHA

ASHA = {"metric": "val_es", "mode": "max", "time_attr": "training_iteration", "grace_period": 1, "max_t": 8,
        "reduction_factor": 2}


def _trial(i: int, group: str) -> SimpleNamespace:
    return SimpleNamespace(trial_id=f"t{i}", config={"trial": i}, group=group)


def _report(sched: TrialScheduler, trial: SimpleNamespace, it: int, es: float) -> str:
    return sched.on_trial_result(None, trial, {"training_iteration": it, "val_es": es})


def test_a_sample_is_not_stopped_by_another_points_samples() -> None:
    sched = PerPointASHA(lambda t: t.group, **ASHA)
    strong = [_trial(i, "mend") for i in range(3)]
    weak = _trial(3, "ke")
    for t in (*strong, weak):
        sched.on_trial_add(None, t)
    for t in strong:  # MEND's samples set a high bar at the first rung
        assert _report(sched, t, 1, 0.9) == TrialScheduler.CONTINUE
    # One global ASHA would stop KE here (0.1 is below the rung's cutoff); per point it is KE's first sample.
    assert _report(sched, weak, 1, 0.1) == TrialScheduler.CONTINUE
    glob = ASHAScheduler(**ASHA)
    for t in (*strong, weak):
        glob.on_trial_add(None, t)
    for t in strong:
        _report(glob, t, 1, 0.9)
    assert _report(glob, weak, 1, 0.1) == TrialScheduler.STOP


def test_within_a_point_it_decides_as_asha_alone() -> None:
    sched = PerPointASHA(lambda t: t.group, **ASHA)
    alone = ASHAScheduler(**ASHA)
    ts = [_trial(i, "ke") for i in range(4)]
    other = _trial(9, "mend")
    for t in ts:
        sched.on_trial_add(None, t)
        alone.on_trial_add(None, t)
    sched.on_trial_add(None, other)
    rewards = [0.5, 0.7, 0.2, 0.6]
    for it in (1, 2, 4):
        _report(sched, other, it, 1.0)  # results of another point change nothing for this one
        for t, r in zip(ts, rewards):
            assert _report(sched, t, it, r) == _report(alone, t, it, r)
    assert _report(sched, ts[2], 8, 0.2) == _report(alone, ts[2], 8, 0.2)
    assert "2 point(s)" in sched.debug_string()


def test_metric_missing_continues_and_tunes_own_metric_is_refused() -> None:
    sched = PerPointASHA(lambda t: t.group, **ASHA)
    ft = _trial(0, "ft")
    sched.on_trial_add(None, ft)
    assert sched.on_trial_result(None, ft, {"training_iteration": 1, "es": 0.3}) == TrialScheduler.CONTINUE
    assert sched.set_search_properties(None, None)
    assert not sched.set_search_properties("val_loss", "min")



def test_the_report_chooses_on_validation_and_shows_every_sample() -> None:
    from bench.report import chosen_sample, table_tuning
    from bench.tracking import END_REASON_TAG, FIT_STOP_TAG, POINT_DIGEST_TAG, SAMPLED_TAG

    def run(name: str, point: str, method: str, lr: float, status: str, **m: object) -> dict:
        return {"run_name": name, "status": status, "p.method": method, "p.model": "m", "p.dataset": "d",
                f"t.{POINT_DIGEST_TAG}": point, f"t.{SAMPLED_TAG}": f'{{"lr": {lr}}}', **m}

    mend = [run("a", "p1", "mend", 1e-4, "FINISHED", best_val_es=0.5, best_val_loss=0.4, es=0.9, es_ci95=0.1,
                train_steps=200),
            run("b", "p1", "mend", 1e-3, "FINISHED", best_val_es=0.7, best_val_loss=0.6, es=0.6, es_ci95=0.1,
                train_steps=100, **{f"t.{FIT_STOP_TAG}": "max_steps"}),
            run("c", "p1", "mend", 1e-5, "KILLED", val_es=0.9, val_loss=0.1,
                **{f"t.{END_REASON_TAG}": "stopped early by the asha scheduler (val_es) before its evaluation"}),
            run("f", "p1", "mend", 2e-5, "KILLED", **{f"t.{END_REASON_TAG}": "stopped by SIGINT"})]
    ft = [run("d", "p2", "ft", 1e-4, "FINISHED", es=0.3, es_ci95=0.1, train_steps=0,
              **{f"t.{FIT_STOP_TAG}": "untrained"}),
          run("e", "p2", "ft", 1e-3, "FINISHED", es=0.5, es_ci95=0.1)]
    # Validation decides, not test ES (a: better test ES) and not a stopped trial's last validation (c).
    assert chosen_sample(mend)[0]["run_name"] == "b"
    assert chosen_sample(ft) == (ft[1], "test ES (no validation)")
    assert chosen_sample([mend[2]]) == (None, "no sample finished")
    header, rows, note = table_tuning(mend + ft)
    assert len(rows) == 6 and header[1] == "sample"
    bold = [r for r in rows if r[0].startswith("**")]
    assert [r[1] for r in bold] == ["**lr=0.001**", "**lr=0.001**"]
    assert [r[5] for r in bold] == ["**-**", "**100**"]  # ft first; steps only for an editor that trains
    stopped = next(r for r in rows if "stopped by the scheduler" in r[2])
    assert stopped[3] == "0.900" and stopped[-1] == "-"
    assert any(r[2] == "killed (stopped by SIGINT)" and r[3] == "-" for r in rows)  # not blamed on the scheduler
    assert "mend: validation ES" in note and "ft: test ES" in note
