"""Every shipped MEND configuration trains an editor that edits (issue 36): the authors' V init diverges at the
lr the CPU sweeps use, and a fit that never beats step 0 keeps an editor that changes nothing, which a table
would then show as MEND's result. For each distinct MEND configuration of ``sweeps/*.yaml`` (model and validated
hyper-parameters), on its cheapest shipped dataset, a few training steps through ``run_trial`` on the sweep's real
model and data must lift validation ES above the untrained editor's (step 0: about the unedited model's).

The step counts are the least that did it on this machine with margin; they are not the sweeps' budgets. FEVER's
base classifier is prepared with 40 of the card's 300 steps (the MEND configuration is the sweep's as shipped):
the full preparation alone took 130 s of a 170 s case on a fresh CI machine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from bench.config import load_sweep, plan, trials
from bench.tracking import prepare_experiment, runs_frame
from bench.trial import run_trial
from methods import REGISTRY
from tests.conftest import REPO

#: Datasets by the cost of a short trial on them (FEVER first prepares its base classifier, ~2 min on 2 cores).
COST = {"zsre": 0, "counterfact": 1, "fever": 2, "wikitext": 3}
#: Training steps and validation edits per model: enough for the trained editor to show, small enough for CI.
STEPS = {"smollm2-135m": (25, 20), "minilm-l6": (30, 40)}


def shipped_mend_configs() -> dict[str, tuple[Path, dict, dict]]:
    """id -> (the sweep file, its dataset entry, its MEND method entry) for each distinct (model, validated
    hyper-parameters) among the shipped sweeps' fixed-value MEND entries, on the cheapest dataset it runs on."""
    groups: dict[tuple[str, str], tuple[int, Path, dict, dict]] = {}
    for f in sorted((REPO / "sweeps").glob("*.yaml")):
        doc = yaml.safe_load(f.read_text())
        for m in doc["methods"]:
            hp = m.get("hparams") or {}
            if m["name"] != "mend" or any(isinstance(v, (dict, list)) for v in hp.values()):
                continue  # searched or gridded values: their sweeps pick one, the tuned ones are not shipped
            valid = json.dumps(REGISTRY["mend"].Hparams(**hp).model_dump(mode="json"), sort_keys=True)
            for model in doc["models"]:
                name = model if isinstance(model, str) else model["name"]
                for ds in doc["datasets"]:
                    entry = {"name": ds} if isinstance(ds, str) else ds
                    key = (name, valid)
                    cand = (COST[entry["name"]], f, entry, m)
                    if key not in groups or cand[0] < groups[key][0]:
                        groups[key] = cand
    return {f"{name}-{c[2]['name']}-{c[1].stem}": c[1:] for (name, _), c in sorted(groups.items())}


CONFIGS = shipped_mend_configs()


def test_every_shipped_mend_configuration_is_covered() -> None:
    """The grouping sees the MEND of every shipped sweep: SmolLM2's (zsre, counterfact, wikitext, batched, ...)
    share one configuration, FEVER's MiniLM is the other."""
    assert {k.split("-")[0] for k in CONFIGS} >= {"smollm2"} and any(k.startswith("minilm") for k in CONFIGS)
    assert all(m.get("hparams", {}).get("v_init") == "xavier" for _, _, m in CONFIGS.values())


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_a_shipped_mend_configuration_lifts_validation_es_above_the_untrained_editor(key: str, tmp_path: Path
                                                                                     ) -> None:
    f, entry, method = CONFIGS[key]
    doc = yaml.safe_load(f.read_text())
    sweep_model = next(m for m in doc["models"] if (m if isinstance(m, str) else m["name"]) in key)
    name = sweep_model if isinstance(sweep_model, str) else sweep_model["name"]
    steps, val_edits = STEPS[name]
    ds = {**entry, "n_val": max(entry.get("n_val", 0), val_edits)}
    if entry["name"] == "fever":  # the base classifier with 40 of the card's 300 preparation steps: 2 min less
        ds["prepare"] = {**(entry.get("prepare") or {}), "steps": 40}
    doc.update(name="shipped", n_edits=2, seeds=[0], edit_batch_size=[1], models=[sweep_model], datasets=[ds],
               edit_mode=["independent"], generation=False)  # the training is under test, not the free answers
    doc.pop("checkpoints", None)
    budget = {**(method.get("budget") or {}), "max_steps": steps, "val_every": steps, "val_edits": val_edits,
              "patience": 10}
    doc["methods"] = [{**method, "budget": budget}]
    sweep_file = tmp_path / "one.yaml"
    sweep_file.write_text(yaml.safe_dump(doc))
    sweep = load_sweep(sweep_file)
    (point,) = trials(sweep, plan(sweep))
    uri = f"sqlite:///{tmp_path / 'runs.db'}"
    prepare_experiment(uri, "shipped")
    metrics = run_trial(point, uri, "shipped")
    run = runs_frame(uri, "shipped").to_dicts()[0]
    print(f"{key}: validation ES {metrics['init_val_es']:.3f} at step 0 -> {metrics['best_val_es']:.3f} at step "
          f"{metrics['train_best_step']:.0f} (loss {metrics['init_val_loss']:.3f} -> {metrics['best_val_loss']:.3f})")
    assert metrics["best_val_es"] > metrics["init_val_es"], (key, metrics["init_val_es"], metrics["best_val_es"])
    assert metrics["train_best_step"] == steps and not run.get("t.editbench.fit_kept_initial"), key
