"""bench.perf produces every promised key (values are measured, never asserted against targets here)."""

from __future__ import annotations

import json
import math

from bench.perf import main


def test_perf_writes_every_key_on_a_tiny_model(tmp_path, capsys) -> None:
    out = tmp_path / "perf.json"
    assert main(["--model", "tiny-gpt2", "--batch-size", "2", "--repeats", "2", "--warmup", "1",
                 "--ft-steps", "2", "--device", "cpu", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    for key in ("ratio.mend_edit", "ratio.mend_train_step", "ratio.ft_edit", "mem.mend_train_mb", "mem.mend_edit_mb",
                "abs.full_fwd_bwd_s", "abs.mend_edit_s", "abs.mend_train_step_s", "abs.ft_edit_s", "device", "model"):
        assert key in res, key
    assert all(res[k] > 0 and math.isfinite(res[k]) for k in res if k.startswith(("ratio.", "abs.")))
    assert res["mem.mend_train_mb"] >= 0 and "ratio.mend_edit" in capsys.readouterr().out


def test_perf_rejects_bad_arguments(capsys) -> None:
    assert main(["--model", "tiny-gpt2", "--repeats", "0"]) == 2
    assert "--repeats must be >= 1" in capsys.readouterr().err
