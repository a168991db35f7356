"""Dataset cards, readers, splits, locality sources and tokenised batches."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.data import (DataError, collate, edit_batch, load_card, load_task, resolve_file, with_locality)
from tests.conftest import REPO, tiny


def test_import_datasets_from_repo_root_is_hugging_face() -> None:
    out = subprocess.run([sys.executable, "-c", "import datasets; print(datasets.__file__, datasets.load_dataset)"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "site-packages" in out.stdout and str(REPO / "datasets") not in out.stdout.split()[0]
    assert not (REPO / "datasets" / "__init__.py").exists()


def test_zsre_reader_maps_the_mend_format() -> None:
    t = load_task("zsre")
    rec = t["test"][0]
    raw = {r["src"]: r for r in json.loads(Path(t.files["test"]).read_text())}[rec.prompt]
    assert (rec.target, rec.rephrases, rec.loc_prompt, rec.loc_answer, rec.true_answer) == (
        raw["alt"], (raw["rephrase"],), raw["loc"], raw["loc_ans"], raw["pred"])
    assert rec.kind == "qa" and rec.has_rephrase


def test_splits_are_seeded_disjoint_and_cover_the_file() -> None:
    a, b, c = load_task("zsre", seed=0), load_task("zsre", seed=0), load_task("zsre", seed=1)
    ids = {s: [r.case_id for r in a[s]] for s in ("train", "val", "test")}
    assert ids == {s: [r.case_id for r in b[s]] for s in ("train", "val", "test")}
    assert ids["test"] != [r.case_id for r in c["test"]]
    assert not set(ids["train"]) & set(ids["test"]) and not set(ids["val"]) & set(ids["test"])
    assert sum(len(v) for v in ids.values()) == 798  # 800 records, 2 with an empty target dropped


def test_counterfact_test_split_is_the_disjoint_edit_file() -> None:
    t = load_task("counterfact", sizes={"train": 50, "val": 10, "test": 20})
    assert t.files["test"].endswith("counterfact-edit-1k.json") and t.files["train"].endswith("counterfact-train.json")
    assert not {r.case_id for r in t["train"]} & {r.case_id for r in t["test"]}
    assert t.card.rome_neighbourhood and t["test"][0].true_answer


def test_path_override_and_missing_field(tmp_path: Path) -> None:
    rows = json.loads(resolve_file("zsre/zsre_mend_800.json").read_text())[:5]
    good = tmp_path / "mine.json"
    good.write_text(json.dumps(rows))
    t = load_task("zsre", paths={"test": str(good)})
    assert [r.prompt for r in t["test"]] == [r["src"] for r in rows]
    del rows[3]["rephrase"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"bad.json: record 3 is missing field 'rephrase'"):
        load_task("zsre", paths={"test": str(bad)})


def test_missing_file_names_every_place_tried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDITBENCH_DATA", str(tmp_path / "env"))
    with pytest.raises(DataError) as e:
        resolve_file("zsre/none.json")
    msg = str(e.value)
    assert str(tmp_path / "env" / "zsre" / "none.json") in msg and "shared/data/zsre/none.json" in msg
    with pytest.raises(DataError, match="tried: .*elsewhere"):
        load_task("zsre", data_root=tmp_path / "elsewhere")


def test_empty_split_and_unknown_dataset() -> None:
    with pytest.raises(DataError, match="unknown dataset 'nope'; valid: .*zsre"):
        load_card("nope")
    with pytest.raises(DataError, match="split 'val' is empty"):
        load_task("zsre", fractions={"train": 1.0, "val": 0.0, "test": 0.5})


def test_locality_assignment_is_seeded() -> None:
    recs = load_task("zsre")["test"][:5]
    pairs = [(f"p{i}", f"a{i}") for i in range(3)]
    a, b = with_locality(recs, pairs, 0), with_locality(recs, pairs, 0)
    assert [r.loc_prompt for r in a] == [r.loc_prompt for r in b]
    assert {r.loc_prompt for r in a} == {"p0", "p1", "p2"}
    with pytest.raises(DataError, match="locality pool is empty"):
        with_locality(recs, [], 0)


def test_causal_batch_masks_the_prompt_and_spaces_the_target() -> None:
    m = tiny("tiny-llama")
    tok = m.tokenizer
    b = collate(m, ["The capital of France is", "Hi"], ["Paris", " two words"])
    ids, lab = b.inputs["input_ids"], b.labels
    p0 = tok("The capital of France is", add_special_tokens=False)["input_ids"]
    t0 = tok(" Paris", add_special_tokens=False)["input_ids"]
    assert ids[0, : len(p0) + len(t0)].tolist() == p0 + t0
    # position j predicts token j+1: the target's labels start at the last prompt position
    assert lab[0, len(p0) - 1 : len(p0) - 1 + len(t0)].tolist() == t0
    assert (lab[0, : len(p0) - 1] == -100).all() and (lab[0, len(p0) - 1 + len(t0):] == -100).all()
    assert tok.decode(ids[1][b.inputs["attention_mask"][1].bool()]) == "Hi two words"
    assert b.inputs["attention_mask"][1].sum() < b.inputs["attention_mask"][0].sum()


def test_seq2seq_and_classifier_batches() -> None:
    t5 = tiny("tiny-t5")
    b = collate(t5, ["Who wrote Hamlet?"], ["Shakespeare"])
    assert set(b.inputs) == {"input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask"}
    assert b.labels.shape == b.inputs["decoder_input_ids"].shape
    assert b.inputs["decoder_input_ids"][0, 0].item() == t5.model.config.decoder_start_token_id
    bert = tiny("tiny-bert")
    c = collate(bert, ["a claim", "another claim"], [1, 0])
    assert c.labels.tolist() == [[1], [0]] and bert.logits(c.inputs).shape == (2, 1, 2)


def test_edit_batch_uses_records() -> None:
    recs = load_task("zsre")["test"][:2]
    b = edit_batch(tiny("tiny-gpt2"), recs)
    assert len(b) == 2 and b.records == recs
