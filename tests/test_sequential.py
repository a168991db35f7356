"""Sequential (lifelong) editing: edits computed on the model as already edited, composed without touching a
weight, scored at checkpoints on every edit made so far; the independent mode is unchanged; a sequential sweep
leaves the retention history in MLflow and the report's retention table."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import greedy_es, target_logprob, tiny

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
    # Each row scores the model with every edit up to its own batch (ES by greedy decoding, apart from the
    # suite's scoring code); the values vary (FT's edits hold on some rephrases and not on others).
    for b, total in enumerate(partial):
        rows = [r for r in res.rows if r["step"] == b + 1]
        assert len(rows) == min(bs, len(recs) - b * bs)
        assert [r["es"] for r in rows] == [greedy_es(m, x.equiv_prompt, x.target, total.deltas)
                                           for x in recs[b * bs : (b + 1) * bs]]
    assert {r["es"] for r in res.rows} == {0.0, 1.0}
    final = [greedy_es(m, x.equiv_prompt, x.target, partial[-1].deltas) for x in recs]
    assert res.metrics["retention_es"] == pytest.approx(sum(final) / len(final))


LOCATE_SMALL = {"mom2_n_tokens": 4000, "v_num_grad_steps": 6, "context_lengths": [[6, 2]]}
EDITORS = {  # each editor as sequential.yaml runs it, small enough for a tiny model; MEND untrained at a high lr
    "ft": lambda m: FT(m, FT_HP),
    "mend": lambda m: __import__("methods.mend", fromlist=["MEND"]).MEND(m, {"rank": 8, "edit_lr": 1.0}),
    "rome": lambda m: __import__("methods.rome", fromlist=["ROME"]).ROME(m, LOCATE_SMALL),
    "memit": lambda m: __import__("methods.memit", fromlist=["MEMIT"]).MEMIT(m, {**LOCATE_SMALL, "layers": [0, 1]}),
}


@pytest.mark.parametrize("method", sorted(EDITORS))
def test_sequential_rows_score_the_edits_composed_by_hand(method: str) -> None:
    """Sequential mode against edits composed by hand (each computed with the earlier ones applied), scored apart
    from the suite's metric code: every row's p(new) is the probability of its target under all edits up to its
    batch (one forward pass here), its ES is greedy decoding's, and the final retention ES is the mean greedy ES
    of all edits under their sum. p(new) varies continuously, so a row scored on the wrong deltas shows."""
    from bench.data import load_task

    m = tiny("tiny-gpt2")
    recs = list(load_task("counterfact", sizes={"train": 8, "val": 4, "test": 6})["test"])
    torch.manual_seed(0)
    res = evaluate(EDITORS[method](m), m, recs, 2, mode="sequential", checkpoints=[2])
    torch.manual_seed(0)
    partial = _by_hand(m, EDITORS[method](m), recs, 2)
    own_only = []
    for b, total in enumerate(partial):
        rows = [r for r in res.rows if r["step"] == b + 1]
        for r, rec in zip(rows, recs[2 * b : 2 * b + 2]):
            want = math.exp(target_logprob(m, rec.prompt, rec.target, total.deltas))
            assert r["p_new"] == pytest.approx(want, rel=1e-4), (b, rec.case_id)
            assert r["es"] == greedy_es(m, rec.equiv_prompt, rec.target, total.deltas)
            own = partial[0].deltas if b == 0 else _minus(total, partial[b - 1])
            own_only.append(math.exp(target_logprob(m, rec.prompt, rec.target, own)))
    p_new = [r["p_new"] for r in res.rows]
    assert len({f"{p:.3e}" for p in p_new}) == len(p_new)  # values that vary: a mix-up cannot hide
    assert any(abs(a - b) > 1e-4 * b for a, b in zip(p_new[2:], own_only[2:]))  # composing matters here
    final = [greedy_es(m, r.equiv_prompt, r.target, partial[-1].deltas) for r in recs]
    assert res.metrics["retention_es"] == pytest.approx(sum(final) / len(final))


def _minus(total: Edit, before: Edit) -> dict:
    """The deltas of the last batch alone (``total`` minus the sum before it)."""
    return {n: d - before.deltas[n] if n in before.deltas else d for n, d in total.deltas.items()}


def test_retention_at_a_checkpoint_covers_edits_one_to_k_only(zsre) -> None:
    m = tiny("tiny-gpt2")
    recs = list(zsre["test"][:6])
    res = evaluate(FT(m, FT_HP), m, recs, 1, mode="sequential", checkpoints=[1, 3])
    assert [c["n_edits"] for c in res.checkpoints] == [1.0, 3.0, 6.0]
    partial = _by_hand(m, FT(m, FT_HP), recs, 1)
    for c in res.checkpoints:
        k = int(c["n_edits"])
        es = [greedy_es(m, x.equiv_prompt, x.target, partial[k - 1].deltas) for x in recs[:k]]
        assert c["retention_es"] == pytest.approx(sum(es) / k)
        scores, _ = retention(m, recs[:k], partial[k - 1].deltas)  # locality over edits 1..k only
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
    from bench.report.build import results_block

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
    assert header[2:6] == ["unedited ES", "k=1", "k=2", "k=4"] and rows[0][1] == "ft"
    assert rows[0][2] == f"{seq['es_pre'][0]:.3f}"  # the level at which no edit is left
    assert rep.tables["results"][1][0][1].strip("*").endswith("(n=4)")  # Table 3: the independent run only
    assert "Sequential edits?" in rep.tables["table1"][0]
    assert (tmp_path / "rep" / "retention.png").exists()
    header, rows = rep.tables["lifelong"]  # every checkpoint, with the size of the accumulated change
    assert [(r[1], r[2]) for r in rows] == [("ft", "1"), ("ft", "2"), ("ft", "4")]
    norms = {h.step: h.value for h in client(uri).get_metric_history(seq["run_id"][0], "retention_delta_norm")}
    assert 0 < norms[1] < norms[4]
    assert [r[header.index("||dW||")] for r in rows] == [format(norms[k], ".3g") for k in (1, 2, 4)]
    assert rows[-1][header.index("ES (x'_e)")] == f"{seq['retention_es'][0]:.3f}"
    prepare_experiment(uri, "streams")  # an experiment of streams only: its results block is the lifelong table
    run_trial(todo[1], uri, "streams")
    block = results_block(uri, "streams")
    assert block.startswith("| dataset / model | editor | edits | ES (x'_e)") and "| ft | 4 |" in block
