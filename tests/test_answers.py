"""The generation protocol inside an evaluation (bench.answers): a no-op edit answers as the unedited model bit
for bit, a damaging one is seen, scores on hand-made answers, the unedited answers cached, per-row caps and stop
strings, continuations (Wikitext) tied to the teacher-forced scores, sequential retention, models and sweeps
without it."""

from __future__ import annotations

import pytest

from bench import answers
from bench.data import EditRecord
from bench.generation import greedy_ids
from bench.metrics import evaluate
from conftest import NoiseEditor, NoOpEditor, private_cache, tiny

TEMPLATE = "Please answer the question:\n\nQ: {prompt}\nA:"




def _rec(i: int, **kw) -> EditRecord:
    base = dict(case_id=str(i), task="zsre", prompt=f"Who founded company {i}?", target="Ada Lovelace",
                rephrases=(f"Company {i} was founded by whom?",), loc_prompt="What is the capital of France?",
                loc_answer="Paris", kind="qa")
    return EditRecord(**{**base, **kw})


def test_a_noop_edit_answers_as_the_unedited_model_bit_for_bit(tmp_path, monkeypatch, zsre) -> None:
    private_cache(monkeypatch, tmp_path / "cache")
    m = tiny("tiny-llama")
    res = evaluate(NoOpEditor(), m, zsre["test"][:4], edit_batch_size=2, question_template=TEMPLATE)
    for r in res.rows:
        assert r["gen_edit_text"] == r["gen_edit_text_pre"] and r["gen_loc_text"] == r["gen_loc_text_pre"]
        assert r["gen_rephrase_text"] == r["gen_rephrase_text_pre"]
        assert r["gen_edit_plain_text"] == r["gen_edit_plain_text_pre"]
        assert r["gen_loc_agree"] == 1.0 and r["gen_edit_em"] == r["gen_edit_em_pre"]
        assert r["gen_loc_em_post"] == r["gen_loc_em_pre"]
    assert res.metrics["gen_loc_agree"] == 1.0 and res.metrics["gen_time_s"] > 0
    for key in ("gen_edit_em", "gen_edit_contains", "gen_edit_plain_em", "gen_rephrase_em", "gen_loc_agree_ci95"):
        assert key in res.metrics, key


def test_a_damaging_edit_changes_what_the_model_says(tmp_path, monkeypatch, zsre) -> None:
    private_cache(monkeypatch, tmp_path / "cache")
    m = tiny("tiny-gpt2")
    res = evaluate(NoiseEditor(m), m, zsre["test"][:4], question_template=TEMPLATE)
    assert res.metrics["gen_loc_agree"] < 1.0
    assert any(r["gen_edit_text"] != r["gen_edit_text_pre"] for r in res.rows)


def test_scores_on_hand_made_answers() -> None:
    """Normalised exact match and containment against y_e, agreement of the locality answers, gold locality."""
    m = tiny("tiny-llama")
    recs = [_rec(0), _rec(1)]
    pre = {"edit": [("Charles Babbage", []), ("I do not know", [])], "equiv": [("x", []), ("y", [])],
           "edit_plain": [("was", []), ("is", [])], "loc": [("Paris.", []), ("Lyon", [])]}
    post = {"edit": [("ada lovelace.", []), ("It was Ada Lovelace", [])],
            "equiv": [("The Ada Lovelace", []), ("Babbage", [])],
            "edit_plain": [("Ada Lovelace", []), ("Ada", [])], "loc": [("paris", []), ("Marseille", [])]}
    rows = answers.scores(m, recs, pre, post)
    assert [r["gen_edit_em"] for r in rows] == [1.0, 0.0]
    assert [r["gen_edit_contains"] for r in rows] == [1.0, 1.0]
    assert [r["gen_rephrase_em"] for r in rows] == [1.0, 0.0]
    assert [r["gen_edit_plain_em"] for r in rows] == [1.0, 0.0]
    assert [r["gen_loc_agree"] for r in rows] == [1.0, 0.0]  # "Paris." and "paris" say the same
    assert [r["gen_loc_em_pre"] for r in rows] == [1.0, 0.0] and [r["gen_loc_em_post"] for r in rows] == [1.0, 0.0]
    assert rows[1]["gen_edit_text"] == "It was Ada Lovelace" and rows[0]["gen_loc_text_pre"] == "Paris."


def test_what_a_record_is_asked_and_its_caps() -> None:
    m = tiny("tiny-llama")
    ask = answers.asked(m, [_rec(0)], TEMPLATE)
    assert list(ask) == ["edit", "edit_plain", "equiv", "loc"]
    assert "Q: Who founded company 0?\nA:" in ask["edit"][0][0] and "assistant" in ask["edit"][0][0]  # chat turns
    assert ask["edit_plain"][0] == ["Who founded company 0?"]
    n = len(m.tokenizer(" Ada Lovelace", add_special_tokens=False)["input_ids"])
    assert ask["edit"][1] == [n + 5] and ask["loc"][1][0] <= answers.LOC_CAP


def test_the_unedited_answers_are_cached_per_model_and_template(tmp_path, monkeypatch, zsre) -> None:
    private_cache(monkeypatch, tmp_path / "cache")
    m = tiny("tiny-gpt2")
    recs = zsre["test"][:3]
    first = evaluate(NoiseEditor(m), m, recs, question_template=TEMPLATE)
    calls = []
    real = answers.answer
    monkeypatch.setattr(answers, "answer", lambda mm, rr, a, d: calls.append(d is None) or real(mm, rr, a, d))
    again = evaluate(NoiseEditor(m), m, recs, question_template=TEMPLATE)
    assert calls and not any(calls)  # only the edited model answered: the unedited answers came from the cache
    assert [r["gen_edit_text_pre"] for r in again.rows] == [r["gen_edit_text_pre"] for r in first.rows]
    assert [r["gen_loc_agree"] for r in again.rows] == [r["gen_loc_agree"] for r in first.rows]
    calls.clear()
    evaluate(NoiseEditor(m), m, recs, question_template="Question: {prompt}\nAnswer:")
    assert any(calls)  # another template asks other questions: a new entry
    assert len(list((tmp_path / "cache").glob("preanswers/*.json"))) == 2


def test_each_row_keeps_its_own_cap_and_stops_at_its_stop_string() -> None:
    m = tiny("tiny-gpt2")
    tok = m.tokenizer
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in ("The capital of France is", "Water")]
    both = greedy_ids(m, ids, [2, 6])
    assert both == [greedy_ids(m, [ids[0]], 2)[0], greedy_ids(m, [ids[1]], 6)[0]]
    assert [len(r) for r in both] == [2, 6]
    full = greedy_ids(m, [ids[1]], 12)[0]
    text = tok.decode(full)
    stop = text[len(tok.decode(full[:3])):].strip()[:1]  # a character of the 4th token: the row ends by then
    assert stop, text
    cut = greedy_ids(m, [ids[1]], 12, stop_strings=[stop])[0]
    assert cut == full[: len(cut)] and len(cut) <= 4 and stop in tok.decode(cut)


def test_a_continuation_is_scored_token_by_token_and_agrees_with_teacher_forcing(tmp_path, monkeypatch) -> None:
    """Wikitext continues passages: when y_e is the model's own greedy continuation, the free continuation
    reproduces it whole (gen_edit_em 1, gen_prefix 1) exactly where the teacher-forced edit accuracy is 1."""
    private_cache(monkeypatch, tmp_path / "cache")
    m = tiny("tiny-gpt2")
    tok = m.tokenizer
    prompts = ["Passage one begins with a sentence about", "Passage two is about"]
    own = [tok.decode(greedy_ids(m, [tok(p, add_special_tokens=False)["input_ids"]], 4)[0]) for p in prompts]
    recs = [EditRecord(case_id=str(i), task="wikitext", prompt=p, target=t, rephrases=(), loc_prompt="The",
                       loc_answer=" weather today was cold", kind="generation")
            for i, (p, t) in enumerate(zip(prompts, own))]
    res = evaluate(NoOpEditor(), m, recs)
    for r in res.rows:
        assert r["edit_acc"] == 1.0 and r["gen_edit_em"] == 1.0 and r["gen_prefix"] == 1.0, r
        assert "gen_edit_plain_em" not in r and "gen_loc_em_post" not in r  # no question form, no gold answer
    wrong = [EditRecord(**{**r.__dict__, "target": " zebra" + r.target}) for r in recs]
    res = evaluate(NoOpEditor(), m, wrong)
    assert all(r["gen_prefix"] < 1.0 and r["gen_edit_em"] == 0.0 for r in res.rows)


def test_sequential_retention_under_both_protocols(tmp_path, monkeypatch, zsre) -> None:
    private_cache(monkeypatch, tmp_path / "cache")
    m = tiny("tiny-gpt2")
    res = evaluate(NoOpEditor(), m, zsre["test"][:3], mode="sequential", checkpoints=[1, 3], question_template=TEMPLATE)
    assert [c["n_edits"] for c in res.checkpoints] == [1.0, 3.0]
    for c in res.checkpoints:
        assert c["retention_gen_loc_agree"] == 1.0 and 0.0 <= c["retention_gen_rephrase_em"] <= 1.0
        assert "gen_time_s" not in c
    assert res.metrics["retention_gen_loc_agree"] == 1.0


def test_models_and_sweeps_without_the_protocol(zsre) -> None:
    """Seq2seq models are not asked; ``generation=False`` asks nothing."""
    for alias, on in (("tiny-t5", True), ("tiny-gpt2", False)):
        res = evaluate(NoOpEditor(), tiny(alias), zsre["test"][:2], generation=on)
        assert not any(k.startswith("gen_") for r in res.rows for k in r)
        assert "gen_time_s" not in res.metrics and res.metrics["es"] == res.metrics["es_pre"]


def test_a_card_question_template_must_hold_the_prompt() -> None:
    from pydantic import ValidationError

    from bench.data.cards import DatasetCard

    base = {"name": "x", "reader": "mapped_json", "kind": "qa", "files": {"all": "a.json"}}
    assert DatasetCard.model_validate({**base, "question_template": "Q: {prompt}\nA:"}).question_template
    for bad, says in (("Q: {question}", "one {prompt} field"), ("{prompt}", "some words around it"),
                      ("Q: {prompt} {", "no other braces")):
        with pytest.raises(ValidationError, match="question_template") as e:
            DatasetCard.model_validate({**base, "question_template": bad})
        assert says in str(e.value)


def test_turning_the_protocol_off_is_a_new_trial_and_on_keeps_the_digest() -> None:
    from bench.config import config_digest, plan
    from bench.config.schema import load_sweep

    sweep = load_sweep("sweeps/ci.yaml")
    point = plan(sweep)[0]
    assert point["generation"] is True
    on = config_digest(point, point["hparams"])
    assert config_digest({k: v for k, v in point.items() if k != "generation"}, point["hparams"]) == on
    assert config_digest({**point, "generation": False}, point["hparams"]) != on
    off = plan(sweep.model_copy(update={"generation": False}))[0]
    assert off["generation"] is False
