"""Task kinds: a new kind is one class and one registration, made here in the test file; cards, batches,
evaluation and sweep validation then treat it like the shipped ones, and nothing else had to change."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import yaml
from torch import Tensor

from bench.data import KINDS, DataError, EditRecord, edit_batch, load_card, register_kind, task_kind
from bench.data.kinds import QA, Classification, Generation
from bench.metrics import evaluate
from conftest import REPO, tiny
from methods.ft import FT


class Shouted(QA):
    """A made-up kind: answers are written in capitals, and locality also reports how far the answer's
    log-likelihood moved (a column of its own)."""

    name = "shouted"

    def target(self, record: EditRecord) -> str:
        return record.target.upper()

    def locality_scores(self, pre_logits: Tensor, post_logits: Tensor, labels: Tensor) -> dict[str, list[float]]:
        out = super().locality_scores(pre_logits, post_logits, labels)
        moved = (post_logits - pre_logits).abs().amax(-1).amax(-1)
        return {**out, "loc_max_logit_shift": moved.tolist()}


@pytest.fixture
def shouted():
    kind = register_kind(Shouted())
    yield kind
    KINDS.pop(kind.name)


def _records(kind: str) -> list[EditRecord]:
    return [EditRecord(case_id=str(i), task="t", kind=kind, prompt=p, target=t, loc_prompt="Water is",
                       loc_answer="wet") for i, (p, t) in enumerate([("The capital of France is", "paris"),
                                                                      ("The sky is", "green")])]


def test_a_kind_registered_here_drives_batches_and_evaluation(shouted) -> None:
    m = tiny("tiny-gpt2")
    recs = _records("shouted")
    batch = edit_batch(m, recs)
    want = m.tokenizer(" PARIS", add_special_tokens=False)["input_ids"]
    assert batch.labels[0][batch.labels[0] != -100].tolist() == want  # its target, as the kind gives it
    rows = evaluate(FT(m, {"lr": 1e-2, "max_steps": 2}), m, recs).rows
    assert [r["case_id"] for r in rows] == ["0", "1"]
    assert all(math.isfinite(r["loc_max_logit_shift"]) and r["loc_max_logit_shift"] > 0 for r in rows)
    assert all(r["drawdown"] in (-1.0, 0.0, 1.0) for r in rows)  # the exact-match drawdown it inherits


def test_cards_accept_registered_kinds_only(shouted, tmp_path: Path, monkeypatch) -> None:
    import bench.data.cards as cards

    for card in ("zsre",):
        shutil.copy(REPO / "datasets" / f"{card}.yaml", tmp_path / f"{card}.yaml")
    doc = yaml.safe_load((tmp_path / "zsre.yaml").read_text())
    (tmp_path / "shout.yaml").write_text(yaml.safe_dump({**doc, "kind": "shouted"}))
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**doc, "kind": "multiple_choice"}))
    monkeypatch.setattr(cards, "CARDS_DIR", tmp_path)
    assert load_card("shout").kind == "shouted"
    with pytest.raises(DataError, match=r"bad.yaml: kind: unknown task kind 'multiple_choice'; valid: "
                                        r"classification, completion, generation, qa, shouted"):
        load_card("bad")


def test_the_shipped_kinds_and_what_they_decide() -> None:
    assert {(k, type(v)) for k, v in KINDS.items()} >= {("qa", QA), ("classification", Classification),
                                                        ("generation", Generation)}
    assert {load_card(n).kind for n in ("zsre", "counterfact", "fever", "wikitext")} == {
        "qa", "completion", "classification", "generation"}
    gen, cls = task_kind("generation"), task_kind("classification")
    assert not gen.spaced and gen.targets_generated and not gen.needs_target and gen.model_kinds == ("causal",)
    assert cls.model_kinds == ("classifier",) and not cls.compares_true_answer
    with pytest.raises(DataError, match=r"unknown task kind 'essay'; valid: classification, completion"):
        task_kind("essay")
    with pytest.raises(ValueError, match=r"task kind 'qa' is already QA; choose another name"):
        register_kind(type("Other", (QA,), {})())
    m = tiny("tiny-bert")
    with pytest.raises(ValueError, match=r"give a label id 0..1"):
        cls.parse_target("7", m)
    assert cls.parse_target("1", m) == 1
    # A classifier's teacher-forced label is its free answer; other protocols stay as they are.
    assert (cls.protocol("teacher-forced"), cls.protocol("probability"), gen.protocol("teacher-forced")) == (
        "classifier", "probability", "teacher-forced")


def test_a_batch_of_mixed_kinds_is_refused() -> None:
    recs = _records("qa")[:1] + _records("completion")[1:]
    with pytest.raises(DataError, match=r"several task kinds \(completion, qa\)"):
        edit_batch(tiny("tiny-gpt2"), recs)
