"""FEVER and Wikitext tasks: readers, seeded labels, rephrase matching, cached base-model preparation, cached
generation targets, perplexity drawdown; every paper sweep passes --dry-run offline."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from tests.conftest import private_cache
import torch

from bench.data import load_task, resolve_file
from bench.losses import perplexity
from bench.models import load_model
from bench.prepare import generation_targets, prepare_base, prepare_key
from bench.run import main as run_main
from tests.conftest import REPO


def test_fever_reader_labels_and_locality() -> None:
    t = load_task("fever")
    recs = [r for s in ("train", "val", "test") for r in t[s]]
    rows = [json.loads(line) for line in resolve_file("fever/paper_dev.jsonl").read_text().splitlines()]
    assert len(recs) == sum(r["label"] != "NOT ENOUGH INFO" for r in rows)  # NEI dropped
    assert all(r.kind == "classification" and r.label in (0, 1) and r.target == ["REFUTES", "SUPPORTS"][r.label]
               for r in recs)
    share = sum(r.label for r in recs) / len(recs)
    assert 0.45 < share < 0.55  # Bernoulli(0.5)
    again = load_task("fever", seed=3)  # a different split seed: same claim, same edit label
    by_id = {r.case_id: r.label for s in ("train", "val", "test") for r in again[s]}
    assert all(by_id[r.case_id] == r.label for r in recs)
    assert all(r.loc_label == ["REFUTES", "SUPPORTS"].index(r.loc_answer) for r in recs)
    # the shared FEVER 2.0 sample rewrites claims that are not in paper_dev: no edit has a real rephrase
    assert sum(r.has_rephrase for r in recs) == 0


def test_fever_rephrase_matching(tmp_path: Path) -> None:
    rows = [json.loads(line) for line in resolve_file("fever/paper_dev.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["label"] != "NOT ENOUGH INFO"][:6]
    (tmp_path / "fever").mkdir()
    (tmp_path / "fever" / "paper_dev.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    fixes = [{"id": 1, "claim": "Rewritten A.", "label": rows[0]["label"], "original_id": rows[0]["id"],
              "transformation": "label_preserving"},
             {"id": 2, "claim": "Negated B.", "label": "REFUTES", "original_id": rows[1]["id"],
              "transformation": "simple_negate"}]
    (tmp_path / "fever" / "fever2-fixers-dev.jsonl").write_text("\n".join(json.dumps(r) for r in fixes))
    t = load_task("fever", data_root=tmp_path, source="local", fractions={"train": 0.34, "val": 0.33, "test": 0.33})
    recs = {r.case_id: r for s in ("train", "val", "test") for r in t[s]}
    assert recs[str(rows[0]["id"])].rephrases == ("Rewritten A.",)
    assert recs[str(rows[1]["id"])].rephrases == ()  # not label preserving
    assert recs[str(rows[1]["id"])].equiv_prompt == rows[1]["claim"]


def test_base_model_preparation_is_cached_and_keyed(tmp_path, monkeypatch) -> None:
    private_cache(monkeypatch, tmp_path)
    t = load_task("fever", sizes={"train": 64, "val": 16, "test": 4})
    first = prepare_base("tiny-bert", t, seed=0, settings={"steps": 3, "batch_size": 8})
    assert first.trained and first.info["n_val"] == 16
    # The reported accuracy is the saved classifier's on the val claims, recomputed here from the folder with
    # transformers alone (one unpadded claim at a time, argmax against the card's label of the gold answer).
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    net = AutoModelForSequenceClassification.from_pretrained(first.path).eval()
    tok = AutoTokenizer.from_pretrained(first.path)
    labels = list(t.card.labels)
    with torch.no_grad():
        hits = [int(net(**tok(r.prompt, return_tensors="pt")).logits[0].argmax()) == labels.index(r.true_answer)
                for r in t["val"]]
    assert first.info["val_accuracy"] == pytest.approx(sum(hits) / len(hits))
    assert net.config.id2label == dict(enumerate(labels))
    second = prepare_base("tiny-bert", t, seed=0, settings={"steps": 3, "batch_size": 8})
    assert not second.trained and second.path == first.path and second.info == first.info
    base = {"steps": 3, "lr": 5e-5, "batch_size": 8}
    k = prepare_key("tiny-bert", t, 0, base)
    assert k != prepare_key("tiny-bert", t, 1, base)
    assert k != prepare_key("tiny-bert", t, 0, {**base, "steps": 4})
    assert k != prepare_key("minilm-l6", t, 0, base)
    assert k != prepare_key("tiny-bert", load_task("fever", sizes={"train": 32, "val": 16, "test": 4}), 0, base)
    m = load_model(str(first.path))
    assert m.kind == "classifier" and m.model.config.id2label == {0: "REFUTES", 1: "SUPPORTS"}


def test_wikitext_targets_are_generated_once_and_deterministic(tmp_path, monkeypatch) -> None:
    private_cache(monkeypatch, tmp_path)
    m = load_model("tiny-gpt2")
    recs = load_task("wikitext")["test"][:3]
    assert all(len(r.prompt.split()) >= 50 and r.prompt.isascii() for r in recs)
    a = generation_targets(m, recs, seed=0)
    for r, orig in zip(a, recs):
        n_target = len(m.tokenizer(r.target, add_special_tokens=False)["input_ids"])
        assert 8 <= n_target <= 12 and r.target  # 10 sampled tokens (retokenisation may merge or split)
        assert len(m.tokenizer(r.prompt, add_special_tokens=False)["input_ids"]) <= 201
        assert orig.prompt.startswith(r.prompt[:50]) and r.prompt.endswith(r.rephrases[0])
        assert len(r.rephrases[0]) < len(r.prompt)
    files = list((tmp_path / "generated").glob("*.json"))
    assert len(files) == 1
    monkeypatch.setattr(m.model, "generate", lambda *a, **k: (_ for _ in ()).throw(AssertionError("regenerated")))
    assert generation_targets(m, recs, seed=0) == a  # from the cache, no model call
    files[0].unlink()
    monkeypatch.undo()
    private_cache(monkeypatch, tmp_path)
    assert generation_targets(m, recs, seed=0) == a  # regenerated identically
    assert generation_targets(m, recs, seed=1) != a


def test_perplexity_drawdown_on_hand_made_logits() -> None:
    labels = torch.tensor([[1, 1, -100]])
    pre = torch.log(torch.tensor([[[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]]]))
    post = torch.log(torch.tensor([[[0.75, 0.25], [0.75, 0.25], [0.5, 0.5]]]))
    assert perplexity(pre, labels).item() == pytest.approx(2.0)
    assert perplexity(post, labels).item() == pytest.approx(4.0)
    assert (perplexity(post, labels) / perplexity(pre, labels) - 1).item() == pytest.approx(1.0)


def test_generation_edit_reports_perplexity_drawdown(tmp_path, monkeypatch) -> None:
    from bench.metrics import evaluate
    from methods.ft import FT

    private_cache(monkeypatch, tmp_path)
    m = load_model("tiny-gpt2")
    recs = generation_targets(m, load_task("wikitext")["test"][:2], seed=0)
    res = evaluate(FT(m, {"lr": 1e-2, "max_steps": 5}), m, recs)
    for row in res.rows:
        assert row["drawdown"] == pytest.approx(row["ppl_post"] / row["ppl_pre"] - 1)
        assert math.isfinite(row["ppl_pre"]) and row["ppl_pre"] > 1


@pytest.mark.parametrize("path", sorted((REPO / "sweeps" / "paper").glob("*.yaml")), ids=lambda p: p.name)
def test_paper_sweeps_dry_run_offline(path: Path, capsys, monkeypatch) -> None:
    """The paper's sweeps validate offline up to what needs the network: a sweep reading a Hub dataset that is
    not cached stops with one line naming its id and revision (exit 2); the others pass their dry run, and where
    their GPU is missing the plan ends with one line naming the key the machine cannot meet (exit 0: a GPU sweep is
    prepared on a laptop; its run is still refused there). The Hub
    is unreachable here by construction (``load_dataset`` of a Hub id raises as it does without a network)."""
    import datasets as hf_datasets
    import torch

    from bench.config import load_sweep, trials, validate
    from bench.data import load_card

    real = hf_datasets.load_dataset

    def no_network(path: str, *a, **kw):  # noqa: ANN202
        if "/" in path and not Path(path).exists():
            raise ConnectionError(f"Couldn't reach '{path}' on the Hub (LocalEntryNotFoundError)")
        return real(path, *a, **kw)

    monkeypatch.setattr(hf_datasets, "load_dataset", no_network)
    sweep = load_sweep(path)
    hub = [load_card(d.name).hub for d in sweep.datasets if d.source == "hub"]
    code = run_main([str(path), "--dry-run"])
    err = capsys.readouterr()
    if hub:
        assert code == 2 and len(err.err.strip().splitlines()) == 1, err.err
        assert f"{hub[0].dataset_path}@{hub[0].revision}" in err.err or "device: cuda" in err.err, err.err
        return
    assert any(t["method"] == "mend" for t in trials(sweep, validate(sweep, str(path))))
    if torch.cuda.is_available() or (sweep.device != "cuda" and sweep.resources.gpu == 0):
        assert code == 0 and "mend" in err.out
    else:  # validated all the same; the plan is printed with what the run needs and this machine lacks
        assert code == 0 and "mend" in err.out, err.err
        (line,) = [x for x in err.out.splitlines() if x.startswith("valid, but not runnable here: ")]
        assert "device: cuda" in line or "resources.gpu" in line, line


def test_a_continuation_without_leading_space_is_scored_on_the_tokens_it_was_edited_to() -> None:
    """Generated targets that continue a word ("ing ...") carry no leading space; evaluation must score the same
    tokens the editor was given (a space added there would make every such edit fail)."""
    from bench.data import EditRecord, edit_batch, equiv_batch
    from bench.losses import argmax_scores
    from bench.metrics import evaluate
    from methods.ft import FT

    m = load_model("tiny-gpt2")
    rec = EditRecord(case_id="0", task="wikitext", kind="generation", prompt="The old bridge was still stand",
                     target="ing in the rain", rephrases=("bridge was still stand",), loc_prompt="Rivers",
                     loc_answer="flow into the sea and the lakes")
    eb = edit_batch(m, [rec])
    spaced_ids = m.tokenizer(" ing in the rain", add_special_tokens=False)["input_ids"]
    assert eb.labels[eb.labels != -100].tolist() != spaced_ids  # the tokens really differ with a space
    ed = FT(m, {"lr": 5e-2, "max_steps": 60})
    e = ed.edit(eb)
    assert bool(argmax_scores(m.logits(eb.inputs, e.deltas), eb.labels)[0].all()), "FT did not reach the target"
    qb = equiv_batch(m, [rec])
    q_exact = bool(argmax_scores(m.logits(qb.inputs, e.deltas), qb.labels)[0].all())
    (row,) = evaluate(FT(m, {"lr": 5e-2, "max_steps": 60}), m, [rec]).rows
    assert row["edit_acc"] == 1.0
    assert row["es"] == float(q_exact)
