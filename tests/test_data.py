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
    assert str(tmp_path / "env" / "zsre" / "none.json") in msg and "datasets/data/zsre/none.json" in msg
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


# ------------------------------------------------------------------------- sources: embedded, local, Hub


def test_embedded_data_ships_with_the_code_and_no_code_reads_a_sibling_folder(monkeypatch) -> None:
    """Every file a card, a locality source or an editor's default corpus names lies in datasets/data/ (found with
    no $EDITBENCH_DATA and no data_root), every folder there says its source and licence, and no tracked file
    outside the notes points at a folder beside the clone."""
    from bench.data import EMBEDDED_ROOT, available_cards
    from methods.locate import LocateHparams

    monkeypatch.delenv("EDITBENCH_DATA", raising=False)
    names = {LocateHparams().mom2_corpus}
    for name in available_cards():
        card = load_card(name)
        names |= set(card.files.values()) | ({card.rephrase_file} if card.rephrase_file else set())
        names |= {src.file for src in card.locality.values() if src.file}
    for rel in names:
        assert resolve_file(rel) == (EMBEDDED_ROOT / rel).resolve(), rel
    folders = {Path(rel).parts[0] for rel in names}
    assert folders == {p.name for p in EMBEDDED_ROOT.iterdir() if p.is_dir()}  # nothing shipped that no one reads
    for folder in folders:
        readme = (EMBEDDED_ROOT / folder / "README.md").read_text()
        assert "Licence" in readme and "Source" in readme, folder
    sibling = ("..", "shared")  # the folder beside the clone where the data used to be looked for
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    for rel in tracked:
        if rel.endswith((".py", ".yaml", ".toml", "Makefile")) or rel.startswith(".ci/"):
            text = (REPO / rel).read_text()
            assert "/".join(sibling) not in text and f'/ "{sibling[1]}" /' not in text, rel


def _hub_fake(monkeypatch, rows_by_call):  # noqa: ANN001, ANN202
    """Replace ``datasets.load_dataset`` for Hub ids by a recorder serving in-memory rows (no network)."""
    import datasets as hf_datasets

    real, calls = hf_datasets.load_dataset, []

    def fake(path: str, *a, **kw):  # noqa: ANN202
        if path in ("json", "text"):
            return real(path, *a, **kw)
        calls.append({"path": path, **kw})
        return hf_datasets.Dataset.from_list(rows_by_call(path, kw))

    monkeypatch.setattr(hf_datasets, "load_dataset", fake)
    return calls


def test_hub_source_makes_the_cards_exact_load_dataset_call_and_reads_the_same_records(monkeypatch) -> None:
    """``source: hub`` asks ``datasets`` for the card's id, revision, file and split, and the MEND-format rows it
    gets become the same records as the embedded file's; its digest is the id, revision and fingerprint."""
    from bench.data import EMBEDDED_ROOT, hub_file

    rows = json.loads((EMBEDDED_ROOT / "zsre" / "zsre_mend_800.json").read_text())
    calls = _hub_fake(monkeypatch, lambda path, kw: rows[:600] if kw["data_files"].endswith("_train.json") else rows[600:])
    t = load_task("zsre", source="hub", seed=0)
    assert calls == [
        {"path": "wangzn2001/Model_Editing_Hurt", "name": None, "revision": "00f0042", "split": "train",
         "data_files": f"training-data/zsre_mend_{f}.json"} for f in ("train", "eval")]
    assert [r.prompt for r in t["test"]] == [r["src"] for r in rows[600:] if r["alt"].strip()]
    from dataclasses import replace

    # The same row gives the same record, but for case_id (zsRE has no id field: its index in the file read).
    embedded = {r.prompt: r for s in ("train", "val", "test") for r in load_task("zsre", source="embedded")[s]}
    assert all(r == replace(embedded[r.prompt], case_id=r.case_id) for r in t["test"])
    assert t.files["test"].startswith("hub:wangzn2001/Model_Editing_Hurt@00f0042")
    d = hub_file(load_card("zsre"), "test").digest()
    assert d.startswith("hf:wangzn2001/Model_Editing_Hurt@00f0042") and d.endswith(
        hub_file(load_card("zsre"), "test").dataset()._fingerprint)


def test_hub_fever_rows_repeat_a_claim_per_evidence_and_each_claim_is_edited_once(monkeypatch) -> None:
    """The Hub's FEVER (Parquet export) has one row per evidence sentence: the reader keeps each claim once, so
    the records equal those of the embedded one-row-per-claim file."""
    from bench.data import EMBEDDED_ROOT

    dev = [json.loads(line) for line in (EMBEDDED_ROOT / "fever" / "paper_dev.jsonl").read_text().splitlines()]
    flat = [{"id": r["id"], "label": r["label"], "claim": r["claim"], "evidence_wiki_url": f"page{k}"}
            for r in dev[:300] for k in range(2)]
    calls = _hub_fake(monkeypatch, lambda path, kw: flat if kw["name"] == "v1.0" else [
        {"id": 1, "claim": "x", "label": "SUPPORTS", "original_id": -1, "transformation": "label_preserving"}])
    hub = load_task("fever", source="hub")
    assert {(c["name"], c["split"], c["revision"]) for c in calls} == {
        ("v1.0", "paper_dev", "refs/convert/parquet"), ("v2.0", "validation", "refs/convert/parquet")}
    ids = [r.case_id for s in ("train", "val", "test") for r in hub[s]]
    assert len(ids) == len(set(ids)) == len([r for r in dev[:300] if r["label"] != "NOT ENOUGH INFO"])


def test_hub_dataset_not_cached_offline_fails_at_validation_in_one_line(tmp_path) -> None:
    """Offline with an empty ``datasets`` cache, a sweep with ``source: hub`` stops before Ray with one line naming
    the Hub id, the revision and how to bring the files over, and leaves no MLflow run."""
    import yaml

    sweep = {"name": "hub", "n_edits": 2, "models": ["tiny-gpt2"], "datasets": [{"name": "zsre", "source": "hub"}],
             "methods": [{"name": "ft", "hparams": {"max_steps": 1}}]}
    f = tmp_path / "hub.yaml"
    f.write_text(yaml.safe_dump(sweep))
    env = {**__import__("os").environ, "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "bench.run", str(f), "--tracking-uri",
                          f"sqlite:///{tmp_path / 'runs.db'}"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert "datasets.0 (zsre): Hub dataset wangzn2001/Model_Editing_Hurt@00f0042" in line
    assert "offline mode" in line and "load_dataset(" in line and "source: local" in line
    assert not (tmp_path / "runs.db").exists() and not (tmp_path / "ray_results").exists()


def test_where_a_file_lies_is_not_part_of_a_trials_digest_but_its_content_is(tmp_path) -> None:
    """The same bytes embedded or under a data root give the same configuration digest (results, --resume and
    trained editors carry over); ``source: local`` without a root is a one-line error naming both settings."""
    import shutil

    from bench.config import Sweep, SweepError, plan, trials, validate
    from bench.data import EMBEDDED_ROOT

    def digest(**ds):  # noqa: ANN003, ANN202
        s = Sweep(name="d", n_edits=2, data_root=ds.pop("data_root", None), models=["tiny-gpt2"],
                  datasets=[{"name": "zsre", **ds}], methods=[{"name": "ft"}])
        return trials(s, plan(s))[0]["config_digest"]

    shutil.copytree(EMBEDDED_ROOT / "zsre", tmp_path / "zsre")
    same = digest(source="embedded")
    assert digest() == same == digest(source="local", data_root=str(tmp_path)) == digest(data_root=str(tmp_path))
    rows = json.loads((tmp_path / "zsre" / "zsre_mend_800.json").read_text())
    (tmp_path / "zsre" / "zsre_mend_800.json").write_text(json.dumps(rows[:-1]))
    assert digest(source="local", data_root=str(tmp_path)) != same
    s = Sweep(name="d", n_edits=2, models=["tiny-gpt2"], datasets=[{"name": "zsre", "source": "local"}],
              methods=[{"name": "ft"}])
    import os
    env = os.environ.pop("EDITBENCH_DATA", None)
    try:
        with pytest.raises(SweepError, match=r"datasets.0 \(zsre\): source: local reads a data root, and none is "
                                             r"set: set data_root in the sweep or \$EDITBENCH_DATA"):
            validate(s, "s.yaml")
    finally:
        if env is not None:
            os.environ["EDITBENCH_DATA"] = env
