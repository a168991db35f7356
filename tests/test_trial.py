"""run_trial end to end (no Ray) and the editor contract: every registered editor (``methods.REGISTRY``, so a new
one is covered without editing this file) on GPT-2 and those that edit seq2seq models on T5 and BART, each leaving
one FINISHED MLflow run with its metrics, per-edit table and (learned editors) checkpoint; each editor's edits
are deltas of the weights it chose, compose by addition and survive save/load."""

from __future__ import annotations

import hashlib
import json

import pytest
from tests.conftest import private_cache

from bench.config import Sweep, plan
from bench.data import EMBEDDED_ROOT
from bench.tracking import client, prepare_experiment, runs_frame
from bench.trial import REQUIRED_METRICS, run_trial
from methods import REGISTRY

HP = {
    "ft": {"lr": 1e-2, "max_steps": 3},
    "ft_kl": {"lr": 1e-2, "max_steps": 3, "loc_batch_size": 2},
    "mend": {"lr": 1e-3, "rank": 8},
    "enn": {"lr": 1e-3},
    "ke": {"lr": 1e-3, "hidden_dim": 16, "condition_dim": 16},
    "ft_l": {"lr": 1e-2, "max_steps": 3},
    "rome": {"mom2_n_tokens": 2000, "v_num_grad_steps": 4, "context_lengths": [[6, 2]]},
    "memit": {"mom2_n_tokens": 2000, "v_num_grad_steps": 4, "context_lengths": [[6, 2]], "layers": [0, 1]},
    "alphaedit": {"mom2_n_tokens": 2000, "v_num_grad_steps": 4, "context_lengths": [[6, 2]], "layers": [0, 1]},
    "grace": {"n_iter": 5},
    "wise": {"n_iter": 5, "template_lengths": [3]},
}
CASES = [(m, model) for model in ("tiny-t5", "tiny-bart") for m in sorted(REGISTRY)
         if "seq2seq" in REGISTRY[m].supported_kinds] + [(m, "tiny-gpt2") for m in sorted(REGISTRY)]


def _one_point(hp: dict) -> dict:
    """Hyper-parameters as a sweep writes one grid point of them (a list value would be a grid axis)."""
    return {k: [v] if isinstance(v, list) else v for k, v in hp.items()}


@pytest.mark.parametrize("method,model", CASES)
def test_trial_end_to_end(method: str, model: str, tmp_path) -> None:
    uri = f"sqlite:///{tmp_path / 'runs.db'}"
    sweep = Sweep(name="t", n_edits=2, models=[{"name": model}], datasets=[{"name": "zsre", "n_train": 16,
                  "n_val": 4}], methods=[{"name": method, "hparams": _one_point(HP.get(method, {})),
                                          "budget": {"max_steps": 4, "val_every": 2, "val_edits": 2}}])
    (point,) = plan(sweep)
    prepare_experiment(uri, "t")
    metrics = run_trial(point, uri, "t")
    df = runs_frame(uri, "t")
    assert df.height == 1 and df["status"][0] == "FINISHED"
    for key in REQUIRED_METRICS:
        assert key in df.columns, key
        assert df[key][0] == pytest.approx(metrics[key])
    # MLflow knows the data: one dataset input per split, named and digested by the file's own sha256.
    inputs = client(uri).get_run(df["run_id"][0]).inputs.dataset_inputs
    got = {(i.dataset.name, {t.key: t.value for t in i.tags}["mlflow.data.context"], i.dataset.digest)
           for i in inputs}
    sha = hashlib.sha256((EMBEDDED_ROOT / "zsre" / "zsre_mend_800.json").read_bytes()).hexdigest()[:36]
    assert got == {(f"zsre/{s}", s, sha) for s in ("train", "val", "test")}
    assert all(json.loads(i.dataset.source)["path"] == "json" for i in inputs)
    arts = {a.path for a in client(uri).list_artifacts(df["run_id"][0])}
    learned = REGISTRY[method].learned
    assert arts == ({"per_edit.parquet", "editor"} if learned else {"per_edit.parquet"})
    assert df["t.base_model_changed"][0] == str(REGISTRY[method].modifies_base_model)
    # Every metric says how it was obtained on this task: teacher-forced (zsRE's ES), probability (ROME's scores).
    assert (df["t.protocol.es"][0], df["t.protocol.efficacy"][0], df["t.protocol.edit_time_s"][0]) == (
        "teacher-forced", "probability", "cost")
    # Where the time went: its parts fit inside the trial; only a trained editor spends time validating.
    parts = df["prepare_time_s"][0] + df["train_time_s"][0] + df["eval_time_s"][0]
    assert 0 < parts <= df["trial_time_s"][0] and min(df["prepare_time_s"][0], df["eval_time_s"][0]) > 0
    assert 0 <= df["train_val_time_s"][0] <= df["train_time_s"][0]
    assert (df["train_val_time_s"][0] > 0) == learned
    if learned:
        hist = client(uri).get_metric_history(df["run_id"][0], "val_es")
        assert [m.step for m in hist][:2] == [0, 2]  # validation before training and every val_every steps


def test_generation_settings_from_the_sweep_reach_target_generation(tmp_path, monkeypatch) -> None:
    """A sweep's ``generate`` block overrides the card's: x_e is cut to max_prompt_tokens, y_e has n_tokens."""
    import json

    from bench.models import load_model

    private_cache(monkeypatch, tmp_path / "cache")
    uri = f"sqlite:///{tmp_path / 'runs.db'}"
    sweep = Sweep(name="t", n_edits=2, models=[{"name": "tiny-gpt2"}],
                  datasets=[{"name": "wikitext", "n_train": 3, "n_val": 2,
                             "generate": {"max_prompt_tokens": 24, "n_tokens": 4}}],
                  methods=[{"name": "ft", "hparams": HP["ft"]}])
    (point,) = plan(sweep)
    prepare_experiment(uri, "t")
    run_trial(point, uri, "t")
    df = runs_frame(uri, "t")
    assert df["status"][0] == "FINISHED"
    assert df["p.generate.max_prompt_tokens"][0] == "24" and df["p.generate.n_tokens"][0] == "4"
    tok = load_model("tiny-gpt2").tokenizer
    rows = [r for f in (tmp_path / "cache" / "generated").glob("*.json") for r in json.loads(f.read_text())]
    assert len(rows) == 3 + 2 + 2
    for r in rows:
        assert len(tok(r["prompt"], add_special_tokens=False)["input_ids"]) <= 25  # decode/re-encode may split one
        assert 2 <= len(tok(r["target"], add_special_tokens=False)["input_ids"]) <= 6


def test_cached_products_leave_the_random_state_as_the_seed_made_it(tmp_path, monkeypatch) -> None:
    """Sampling targets, building a tiny model and training a base model all draw random numbers; a trial that
    computes them must continue from the same random state as one that reads them from the cache."""
    import torch

    from bench.data import load_task
    from bench.models import load_model
    from bench.prepare import generation_targets, prepare_base

    private_cache(monkeypatch, tmp_path / "cache")
    torch.manual_seed(5)
    expected = torch.rand(4)
    recs = load_task("wikitext", seed=0, sizes={"train": 2, "val": 1, "test": 1})["train"]
    fever = load_task("fever", seed=0, sizes={"train": 8, "val": 4, "test": 1})
    for _ in range(2):  # computed, then served from the cache
        torch.manual_seed(5)
        model = load_model("tiny-gpt2")
        generation_targets(model, recs, seed=0, n_tokens=3, max_prompt_tokens=16)
        prepare_base("tiny-bert", fever, 0, {"steps": 2, "batch_size": 4})
        assert torch.initial_seed() == 5
        assert torch.equal(torch.rand(4), expected)


def test_a_trial_gives_the_same_result_whether_its_data_step_ran_in_it_or_before_it(tmp_path, monkeypatch) -> None:
    """The same Wikitext trial (MEND: random init, sampled training edits) three ways, each in its own store (so
    none reuses another's editor): sampling its targets itself, finding them cached, and after the driver's shared
    preparation (bench.trial.prepare_shared). Every metric but time and memory is the same (sampling the targets
    used to reseed the trial's random state: a different editor when they were not cached yet)."""
    from bench.trial import prepare_shared

    sweep = Sweep(name="t", n_edits=2, seeds=[3], models=[{"name": "tiny-gpt2"}],
                  datasets=[{"name": "wikitext", "n_train": 4, "n_val": 2,
                             "generate": {"max_prompt_tokens": 16, "n_tokens": 3}}],
                  methods=[{"name": "mend", "hparams": {"lr": 3e-3, "rank": 8},
                            "budget": {"max_steps": 4, "val_every": 2, "val_edits": 2}}])
    (point,) = plan(sweep)
    results = []
    for i, how in enumerate(("in the trial", "cached", "by the driver")):
        uri = f"sqlite:///{tmp_path / f'runs{i}.db'}"
        prepare_experiment(uri, "t")
        if how != "cached":
            cache = private_cache(monkeypatch, tmp_path / f"cache{i}")
        if how == "by the driver":
            (line,) = prepare_shared([point, point], uri, "t")  # the same data step twice: prepared once
            assert line.startswith("tiny-gpt2 / wikitext") and len(list((cache / "generated").glob("*.json"))) == 3
        results.append(run_trial(point, uri, "t"))
    same = sorted(k for k in results[0] if not k.endswith("_time_s") and "mem" not in k)
    assert results[0]["train_best_step"] > 0  # the training (its random draws) decides the editor
    for r in results[1:]:
        assert {k: r[k] for k in same} == {k: results[0][k] for k in same}


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_every_registered_editor_keeps_the_contract(method: str, zsre, tmp_path) -> None:
    """The contract of ``methods.base``: after its fit step, ``edit`` returns finite deltas of exactly the weights
    the editor chose, shaped like them (or, for edits that are not weight deltas, adaptors of exactly the modules
    that own them), and leaves the model's weights as they were; edits compose by addition (``Edit.__add__``, what
    sequential mode sums; adaptors as their method defines, here: one more entry); a learned editor's checkpoint,
    saved and loaded into a fresh editor on a fresh model, edits the same."""
    import torch

    from bench.data import edit_batch
    from bench.models import load_model
    from methods import Budget
    from methods.base import weights_digest

    cls = REGISTRY[method]
    m = load_model("tiny-gpt2")
    torch.manual_seed(0)
    ed = cls(m, HP.get(method, {}))
    ed.fit(list(zsre["train"][:8]), list(zsre["val"][:2]), Budget(max_steps=2, val_every=2, val_edits=2))
    before = weights_digest(m)
    a, b = edit_batch(m, zsre["test"][:1]), edit_batch(m, zsre["test"][1:3])
    ea = ed.edit(a)
    weights = dict(m.model.named_parameters())
    chosen = set(ed.model.edit_params)
    assert chosen and (set(ea.deltas) == chosen or not ea.deltas and set(ea.adaptors) == {n.rsplit(".", 1)[0]
                                                                                         for n in chosen})
    for n, d in ea.deltas.items():
        assert d.shape == weights[n].shape and torch.isfinite(d).all(), n
    assert weights_digest(m) == before and not m.applied  # an edit never writes a weight
    eb = ed.edit(b)
    both = ea + eb
    assert all(torch.equal(both.deltas[n], ea.deltas[n] + eb.deltas[n]) for n in ea.deltas)
    assert both.steps == ea.steps + eb.steps
    for k, adaptor in both.adaptors.items():  # GRACE: b's entries join a's codebook; WISE: one more edit counted
        assert adaptor.describe()["entries"] >= ea.adaptors[k].describe()["entries"] and k in eb.adaptors
    if ed.modules():
        path = ed.save(tmp_path / method)
        fresh = load_model("tiny-gpt2")
        other = cls(fresh, HP.get(method, {}))
        other.load(path)
        again = other.edit(edit_batch(fresh, zsre["test"][:1]))
        assert all(torch.allclose(again.deltas[n], ea.deltas[n], rtol=1e-5, atol=1e-7) for n in ea.deltas), method
