"""Table 1 measured: each of the paper's editor properties decided from evidence in the runs, with the evidence
beside it, or "no evidence" when the runs hold none; the thresholds behind the ticks."""

from __future__ import annotations

import math
from typing import Any

from bench.report.runs import cell_runs, num, pooled


# Thresholds behind Table 1's ticks (stated in the report next to each cell).
BATCH_KEEP_FRACTION = 0.8   # batched ES must stay within this fraction of single-edit ES


SEQ_KEEP_FRACTION = 0.8     # ES on all N edits after N sequential edits, as a fraction of ES right after each edit


SEQ_MIN_EDITS = 10          # fewer sequential edits are no evidence


SCALE_LIMIT_GB = 80.0       # extrapolated peak memory at 10B parameters must fit one 80 GB accelerator


FEW_STEPS = 1.0             # at most this many optimiser steps per edit


def table_properties(df: Any) -> tuple[list[str], list[list[str]], str]:
    """Table 1, measured: every cell from evidence in the runs."""
    header = ["editor", "Preserves model?", "Only (x_e, y_e)?", "Batched edits?", "Scales to 10B?", "Few steps?",
              "Sequential edits?"]
    rows = []
    for m in sorted(df["method"].unique().to_list()):
        runs = cell_runs(df, method=m)
        ind = [r for r in runs if r["mode"] == "independent"]
        seq = [r for r in runs if r["mode"] == "sequential"]
        rows.append([m, _preserves(runs), _only_xy(runs), _batched(ind) if ind else "no evidence (no independent "
                     "run)", _scales(runs), _few_steps(runs), _sequential(seq)])
    note = (f"Batched: ES at the largest batch size stays >= {BATCH_KEEP_FRACTION:.0%} of single-edit ES. "
            f"Sequential: after N >= {SEQ_MIN_EDITS} edits applied one after another, ES on all N stays >= "
            f"{SEQ_KEEP_FRACTION:.0%} of the ES each edit had right after it was made. Scales: "
            f"peak memory (training, else edit) fitted linearly against parameter count on >= 2 model sizes and "
            f"extrapolated to 10B parameters, tick when <= {SCALE_LIMIT_GB:.0f} GB. Few steps: <= {FEW_STEPS:g} "
            "optimiser step per edit.")
    return header, rows, note


def _tag(runs: list[dict], key: str) -> list[str]:
    return [r.get(f"t.{key}") for r in runs if r.get(f"t.{key}") is not None]


def _preserves(runs: list[dict]) -> str:
    vals = _tag(runs, "base_model_changed")
    if not vals:
        return "no evidence (no base-weight hashes logged)"
    changed = sum(v == "True" for v in vals)
    if changed:
        return f"✗ base-weight SHA-256 changed after fit in {changed}/{len(vals)} runs"
    return f"✓ base-weight SHA-256 unchanged after fit in {len(vals)}/{len(vals)} runs"


def _only_xy(runs: list[dict]) -> str:
    vals = _tag(runs, "uses_training_data_at_edit_time")
    if not vals:
        return "no evidence (property not logged)"
    used = sum(v == "True" for v in vals)
    return (f"✗ read training data at edit time ({used}/{len(vals)} runs)" if used
            else f"✓ no training data read at edit time ({len(vals)} runs)")


def _batched(runs: list[dict]) -> str:
    sizes = sorted({int(r["bs"]) for r in runs})
    if len(sizes) < 2 or sizes[0] != 1:
        return f"no evidence (only batch size {sizes[-1]} run)" if len(sizes) < 2 else "no evidence (no B=1 run)"
    single, _, _ = pooled([r for r in runs if int(r["bs"]) == 1], "es")
    big = sizes[-1]
    batched, _, _ = pooled([r for r in runs if int(r["bs"]) == big], "es")
    ok = single > 0 and batched >= BATCH_KEEP_FRACTION * single
    return f"{'✓' if ok else '✗'} ES {batched:.3f} at B={big} vs {single:.3f} at B=1"


def _sequential(runs: list[dict]) -> str:
    """Evidence of retention: ES on all N edits after the N-th (``retention_es``) against the ES each edit had
    right after it was made (``es`` of a sequential run), for the longest sequential run."""
    runs = [r for r in runs if not math.isnan(num(r, "retention_es")) and num(r, "n_edits") >= SEQ_MIN_EDITS]
    if not runs:
        return f"no evidence (no sequential run of >= {SEQ_MIN_EDITS} edits)"
    longest = max(num(r, "n_edits") for r in runs)
    top = [r for r in runs if num(r, "n_edits") == longest]
    kept, _, _ = pooled(top, "retention_es")
    fresh, _, _ = pooled(top, "es")
    ok = fresh > 0 and kept >= SEQ_KEEP_FRACTION * fresh
    return f"{'✓' if ok else '✗'} ES on all {longest:.0f} after {longest:.0f} edits {kept:.3f} vs {fresh:.3f} right after each"


def _scales(runs: list[dict]) -> str:
    pts: dict[float, float] = {}
    for r in runs:
        p = num(r, "model_params")
        mem = max(num(r, "train_peak_mem_mb") if not math.isnan(num(r, "train_peak_mem_mb")) else 0.0,
                  num(r, "edit_peak_mem_mb") if not math.isnan(num(r, "edit_peak_mem_mb")) else 0.0)
        if not math.isnan(p) and mem > 0:
            pts[p] = max(pts.get(p, 0.0), mem)
    if len(pts) < 2:
        return f"no evidence (peak memory on {len(pts)} model size(s); need >= 2)"
    xs, ys = list(pts), [pts[x] for x in pts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / max(sum((x - mx) ** 2 for x in xs), 1e-30)
    if slope <= 0:
        return f"no evidence (peak memory does not grow with size over the {len(pts)} sizes run; too small to fit)"
    at10b_gb = (my + slope * (1e10 - mx)) / 1024
    return f"{'✓' if at10b_gb <= SCALE_LIMIT_GB else '✗'} {at10b_gb:.1f} GB extrapolated from {len(pts)} sizes"


def _few_steps(runs: list[dict]) -> str:
    vals = [num(r, "edit_steps") for r in runs if not math.isnan(num(r, "edit_steps"))]
    if not vals:
        return "no evidence (edit_steps not logged)"
    mean = sum(vals) / len(vals)
    return f"{'✓' if mean <= FEW_STEPS else '✗'} {mean:.2f} optimiser steps per edit"
