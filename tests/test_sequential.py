"""Sequential (lifelong) editing: edits computed on the model as already edited, composed without touching a
weight, scored at checkpoints on every edit made so far; the independent mode is unchanged; a sequential sweep
leaves the retention history in MLflow and the report's retention table."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny

from bench.config import Sweep, plan, trials
from bench.data import edit_batch
from bench.metrics import checkpoint_schedule, evaluate, retention
from bench.tracking import client, prepare_experiment, runs_frame
from bench.trial import run_trial
from methods.base import Edit, weights_digest
from methods.ft import FT

FT_HP = {"lr": 1e-2, "max_steps": 4}


def _by_hand(m, ed, recs, bs):
    """Compose the edits by hand: each computed with the previous ones applied; the partial sums after each."""
    total, partial = Edit({}), []
    for i in range(0, len(recs), bs):
        with m.applying(total.deltas):
            step = ed.edit(edit_batch(m, recs[i : i + bs])).detach()
        total = total + step
        partial.append(total)
    return partial


@pytest.mark.parametrize("alias,bs", [("tiny-gpt2", 1), ("tiny-llama", 2)])
def test_sequential_mode_equals_composing_the_edits_by_hand(alias, bs, zsre) -> None:
    m = tiny(alias)
    recs = list(zsre["test"][:6])
    before = weights_digest(m)
    res = evaluate(FT(m, FT_HP), m, recs, bs, mode="sequential", checkpoints=[2, 4])
    assert weights_digest(m) == before and not m.applied  # nothing applied or written after the evaluation
    partial = _by_hand(m, FT(m, FT_HP), recs, bs)
    # Each row scores the model with every edit up to its own batch.
    for b, total in enumerate(partial):
        rows = [r for r in res.rows if r["step"] == b + 1]
        assert len(rows) == min(bs, len(recs) - b * bs)
        scores, es = retention(m, recs[b * bs : (b + 1) * bs], total.deltas)
        assert [r["es"] for r in rows] == es
    final, _ = retention(m, recs, partial[-1].deltas)
    assert res.metrics["retention_es"] == pytest.approx(final["retention_es"])
    assert res.metrics["retention_loc_kl"] == pytest.approx(final["retention_loc_kl"], rel=1e-5, abs=1e-7)


def test_retention_at_a_checkpoint_covers_edits_one_to_k_only(zsre) -> None:
    m = tiny("tiny-gpt2")
    recs = list(zsre["test"][:6])
    res = evaluate(FT(m, FT_HP), m, recs, 1, mode="sequential", checkpoints=[1, 3])
    assert [c["n_edits"] for c in res.checkpoints] == [1.0, 3.0, 6.0]
    partial = _by_hand(m, FT(m, FT_HP), recs, 1)
    for c in res.checkpoints:
        k = int(c["n_edits"])
        scores, es = retention(m, recs[:k], partial[k - 1].deltas)
        assert c["retention_es"] == pytest.approx(scores["retention_es"])
        assert c["retention_loc_agree"] == pytest.approx(scores["retention_loc_agree"])
        assert [r.get(f"es_after_{k}") for r in res.rows[:k]] == es
        assert all(f"es_after_{k}" not in r for r in res.rows[k:])  # later edits did not exist yet


def test_independent_mode_is_unchanged(zsre) -> None:
    m = tiny("tiny-llama")
    recs = list(zsre["test"][:4])
    default = evaluate(FT(m, FT_HP), m, recs, 2)
    ind = evaluate(FT(m, FT_HP), m, recs, 2, mode="independent")
    drop = ("edit_time_s", "edit_peak_mem_mb")
    assert [{k: v for k, v in r.items() if k not in drop} for r in default.rows] == \
           [{k: v for k, v in r.items() if k not in drop} for r in ind.rows]
    assert "step" not in ind.rows[0] and not ind.checkpoints and "retention_es" not in ind.metrics
    with pytest.raises(ValueError, match="mode must be one of independent, sequential"):
        evaluate(FT(m, FT_HP), m, recs, 1, mode="lifelong")


def test_applying_adds_deltas_without_touching_weights() -> None:
    m = tiny("tiny-llama")
    name = m.edit_params[0]
    w = m.weights()[name].detach().clone()
    inputs = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    d = {name: torch.full_like(w, 0.01)}
    with m.applying(d):
        inside = m.logits(inputs)
        assert torch.equal(m.weights()[name], w)
    assert torch.allclose(inside, m.logits(inputs, d)) and not m.applied
    assert not torch.allclose(inside, m.logits(inputs))


def test_checkpoint_schedule() -> None:
    assert checkpoint_schedule(100) == [1, 10, 50, 100]
    assert checkpoint_schedule(7) == [1, 7]
    assert checkpoint_schedule(30, [5, 40]) == [5, 30]


def test_sequential_trial_logs_retention_history_and_report_table(tmp_path) -> None:
    from bench.report import build

    uri = f"sqlite:///{tmp_path / 'runs.db'}"
    sweep = Sweep(name="s", n_edits=4, edit_mode=["independent", "sequential"], checkpoints=[1, 2],
                  models=["tiny-gpt2"], datasets=[{"name": "zsre", "n_train": 16, "n_val": 4}],
                  methods=[{"name": "ft", "hparams": FT_HP}])
    todo = trials(sweep, plan(sweep))
    assert [t["edit_mode"] for t in todo] == ["independent", "sequential"]
    assert "/seq/" in todo[1]["run_name"] and "/seq/" not in todo[0]["run_name"]
    assert todo[0]["config_digest"] != todo[1]["config_digest"]
    prepare_experiment(uri, "s")
    for t in todo:
        run_trial(t, uri, "s")
    df = runs_frame(uri, "s")
    seq = df.filter(df["p.edit_mode"] == "sequential")
    hist = client(uri).get_metric_history(seq["run_id"][0], "retention_es")
    assert sorted(h.step for h in hist if h.step > 0) == [1, 2, 4]
    rep = build(uri, "s", tmp_path / "rep", ["md"])
    header, rows = rep.tables["retention"]
    assert header[2:5] == ["k=1", "k=2", "k=4"] and rows[0][1] == "ft"
    assert rep.tables["results"][1][0][1].strip("*").endswith("(n=4)")  # Table 3: the independent run only
    assert "Sequential edits?" in rep.tables["table1"][0]
    assert (tmp_path / "rep" / "retention.png").exists()
