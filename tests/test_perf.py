"""bench.perf produces every promised key, each ratio the quotient of its own run's absolute times (values are
measured, never asserted against targets here)."""

from __future__ import annotations

import json
import math

from bench.perf import main


def test_perf_writes_every_key_on_a_tiny_model(tmp_path, capsys) -> None:
    out = tmp_path / "perf.json"
    assert main(["--model", "tiny-gpt2", "--batch-size", "2", "--repeats", "1", "--warmup", "0",
                 "--ft-steps", "2", "--device", "cpu", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    for key in ("ratio.mend_edit", "ratio.mend_train_step", "ratio.ft_edit", "mem.mend_train_mb", "mem.mend_edit_mb",
                "abs.full_fwd_bwd_s", "abs.mend_edit_s", "abs.mend_train_step_s", "abs.ft_edit_s", "device", "model"):
        assert key in res, key
    assert all(res[k] > 0 and math.isfinite(res[k]) for k in res if k.startswith(("ratio.", "abs.")))
    assert res["mem.mend_train_mb"] >= 0 and "ratio.mend_edit" in capsys.readouterr().out
    # Each ratio is the quotient of the absolute times measured in the same run, as the module promises.
    assert res["ratio.mend_edit"] == res["abs.mend_edit_s"] / res["abs.full_fwd_bwd_s"]
    assert res["ratio.mend_train_step"] == res["abs.mend_train_step_s"] / res["abs.mend_components_s"]
    assert res["ratio.ft_edit"] == res["abs.ft_edit_s"] / (2 * res["abs.edit_params_fwd_bwd_s"])
    parts = [v for k, v in res.items() if k.startswith("abs.component.")]
    assert len(parts) == 4 and res["abs.mend_components_s"] == sum(parts)
    for name in ("enn", "ke"):  # every other learned editor's training memory, against MEND's
        assert res[f"ratio.mend_over_{name}_train_mem"] == res["mem.mend_train_mb"] / max(res[f"mem.{name}_train_mb"],
                                                                                           1e-9)


def test_perf_values_compares_the_batched_value_optimisation_with_the_loop(tmp_path, capsys) -> None:
    out = tmp_path / "values.json"
    assert main(["--model", "tiny-llama", "--values", "3", "--repeats", "1", "--warmup", "0", "--device", "cpu",
                 "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["ratio.values_batched_speedup"] == res["abs.values_loop_per_fact_s"] / res["abs.values_batched_per_fact_s"]
    assert res["values_same_steps"] is True and res["values_max_rel_diff"] < 1e-3  # the same vectors
    assert res["batch_size"] == 3 and res["values_templates"] >= 1
    assert "ratio.values_batched_speedup" in capsys.readouterr().out


def test_perf_rejects_bad_arguments(capsys) -> None:
    assert main(["--model", "tiny-gpt2", "--repeats", "0"]) == 2
    assert "--repeats must be >= 1" in capsys.readouterr().err
    assert main(["--model", "tiny-gpt2", "--values", "-1"]) == 2
    assert "--values must be >= 0" in capsys.readouterr().err
