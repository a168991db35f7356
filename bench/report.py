"""``python -m bench.report``: the paper's tables and plots regenerated from the MLflow runs of an experiment.

```
python -m bench.report --experiment NAME [--tracking-uri URI] [--out reports/NAME] [--format md,csv,tex,html]
```

Writes, from the FINISHED trial runs of the experiment (read with MLflow's search API into polars):
1. Table 1 measured: Preserves model? / Only (x_e, y_e)? / Batched edits? / Scales to 10B? / Few steps?, each cell
   decided from evidence in the runs, with the evidence beside it, or "no evidence" when the runs hold none.
2. Table 3/4 style: editors x (dataset / model), ES and drawdown as mean +- 95% CI with the number of edits;
   the best ES per column is marked.
3. ROME style, on tasks with ROME's neighbourhood score (CounterFact): efficacy, paraphrase, neighbourhood beside ES.
   Table 5 style: ES and drawdown against edit batch size per editor.
4. Cost table: training wall time and peak memory, edit latency and peak memory, optimiser steps per edit.
5. Retention (sequential runs): ES on ALL edits made so far after k sequential edits, per editor, at every
   checkpoint, with locality agreement against the original model at the last one.
6. Plots: ES vs drawdown per task, ES vs batch size, memory per editor, retention vs number of edits (PNG;
   embedded in the HTML).
Tables 3-5 and the cost table use the independent-mode runs; Table 1 uses both (its "Sequential edits?").
The report is also logged to MLflow as a run of its own (tag ``editbench.kind = report``).
"""

from __future__ import annotations

import base64
import html
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from bench.schema import BY_NAME
from bench.tracking import (CONFIG_DIGEST_TAG, END_REASON_TAG, FIT_KEPT_INITIAL_TAG, FIT_SELECT_TAG, FIT_STOP_TAG,
                            POINT_DIGEST_TAG, REUSE_TAG, SAMPLED_TAG, TRAIN_KEY_TAG, TRAINED_FROM_TAG)
from methods.base import BUDGET_LIMITED
from bench.tracking import KIND_TAG as REPORT_TAG  # one place for tag names

#: Marks a cell whose editor's training was ended by its budget, not by convergence on validation.
BUDGET_MARK = "†"
#: Marks a cell whose learned editor kept its untrained state (its best validation was step 0's): the cell is
#: the untrained editor's result, for MEND / ENN / KE at init (nearly) the unedited model's.
UNTRAINED_MARK = "‡"

log = logging.getLogger("bench.report")

# Thresholds behind Table 1's ticks (stated in the report next to each cell).
BATCH_KEEP_FRACTION = 0.8   # batched ES must stay within this fraction of single-edit ES
SEQ_KEEP_FRACTION = 0.8     # ES on all N edits after N sequential edits, as a fraction of ES right after each edit
SEQ_MIN_EDITS = 10          # fewer sequential edits are no evidence
SCALE_LIMIT_GB = 80.0       # extrapolated peak memory at 10B parameters must fit one 80 GB accelerator
FEW_STEPS = 1.0             # at most this many optimiser steps per edit


class ReportError(ValueError):
    """An experiment that cannot be reported (unknown, or without finished trial runs)."""


@dataclass
class Report:
    """The tables (header + rows of strings) and plot files of one experiment."""

    experiment: str
    tables: dict[str, tuple[list[str], list[list[str]]]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    plots: dict[str, Path] = field(default_factory=dict)
    n_runs: int = 0


# --------------------------------------------------------------------------------------------------- data


def load_runs(uri: str, experiment: str) -> Any:
    """FINISHED trial runs of ``experiment`` as polars, with typed columns method/model/dataset/bs/model_params.

    A grid point run again (same config digest: everything that decides its result) counts once, by its newest
    FINISHED run, so a rerun sweep replaces its earlier results instead of being pooled with
    them; different seeds are different points and are pooled by the tables. Runs of one point that differ only in
    ``n_edits`` evaluated nested test sets (the first N edits of the same split): the run with the most edits stands
    for them, so no edit is counted twice. Runs of one method that differ in
    hyper-parameters or training budget (a grid or search space) are different configurations: their ``method``
    column names the differing values, e.g. ``ft (hparams.lr=0.001)``, so no table pools across them.
    """
    import polars as pl

    from bench.tracking import client, runs_frame

    if client(uri).get_experiment_by_name(experiment) is None:
        raise ReportError(f"unknown experiment {experiment!r} in {uri}")
    df = runs_frame(uri, experiment)
    if df.is_empty() or "p.method" not in df.columns:
        raise ReportError(f"experiment {experiment!r} has no trial runs")
    df = df.filter(pl.col("status") == "FINISHED")
    if f"t.{REPORT_TAG}" in df.columns:
        df = df.filter(pl.col(f"t.{REPORT_TAG}").is_null())
    if df.is_empty():
        raise ReportError(f"experiment {experiment!r} has no FINISHED trial runs")
    # A grid point's identity is its config digest (run names leave out the budget and sweep options); runs from
    # before the digest existed fall back to their name.
    ident = (pl.coalesce(pl.col(f"t.{CONFIG_DIGEST_TAG}"), pl.col("run_name"))
             if f"t.{CONFIG_DIGEST_TAG}" in df.columns else pl.col("run_name"))
    newest = (df.with_columns(ident.alias("_point")).sort("start_time", descending=True)
              .unique(subset=["_point"], keep="first", maintain_order=True).drop("_point"))
    if newest.height < df.height:
        log.info("%s: %d earlier run(s) of a rerun grid point left out (newest kept)", experiment,
                 df.height - newest.height)
    df = _largest_test_set(newest)
    casts = [pl.col("p.method").alias("method"), pl.col("p.model").alias("model"),
             pl.col("p.dataset").alias("dataset"), pl.col("p.edit_batch_size").cast(pl.Int64).alias("bs")]
    if "p.model_params" in df.columns:
        casts.append(pl.col("p.model_params").cast(pl.Float64).alias("model_params"))
    mode = pl.col("p.edit_mode") if "p.edit_mode" in df.columns else pl.lit(None, dtype=pl.Utf8)
    casts.append(mode.fill_null("independent").alias("mode"))
    df = df.with_columns(casts)
    return df.with_columns(pl.Series("method", _config_labels(df.to_dicts())))


#: Run params that only say how many of the test split's first edits a run evaluated (see ``_largest_test_set``).
TEST_SIZE_PARAMS = ("p.n_edits", "p.data.n_test")


def _largest_test_set(df: Any) -> Any:
    """Of runs whose params agree on everything but the test size, the one with the most edits (the newest of equal
    ones). Their test edits are the first ``n_edits`` of the same split (seed, files and options are params), so the
    smaller runs' edits are the larger one's first ones: pooling them would count those edits twice and narrow the
    CI as if they were new. Runs whose params differ anywhere else (seed, hyper-parameters, files) are untouched."""
    import polars as pl

    if "p.n_edits" not in df.columns:
        return df
    same = [c for c in sorted(df.columns) if c.startswith("p.") and c not in TEST_SIZE_PARAMS]
    cell = pl.concat_str([pl.col(c).cast(pl.Utf8).fill_null("\x00") for c in same], separator="\x1f")
    kept = (df.with_columns(cell.alias("_cell"), pl.col("p.n_edits").cast(pl.Int64).alias("_n"))
            .sort(["_n", "start_time"], descending=True)
            .unique(subset=["_cell"], keep="first", maintain_order=True).drop("_cell", "_n"))
    if kept.height < df.height:
        log.info("%d run(s) on the first edits of a larger run's test set left out (the larger run counts)",
                 df.height - kept.height)
    return kept


def _config_labels(rows: list[dict]) -> list[str]:
    """Each run's method name, followed by the hyper-parameter, budget (and ``reuse_converged``) values that tell its
    configuration apart from the method's other runs (none when the method ran in one configuration)."""
    keys = sorted({k for r in rows for k in r if k.startswith(("p.hparams.", "p.budget.", "p.reuse_converged"))})
    differing: dict[str, list[str]] = {}
    for m in {r["method"] for r in rows}:
        mine = [r for r in rows if r["method"] == m]
        differing[m] = [k for k in keys if len({r.get(k) for r in mine}) > 1]
    return [r["method"] if not differing[r["method"]] else
            f"{r['method']} ({', '.join(f'{k[2:]}={r.get(k)}' for k in differing[r['method']])})" for r in rows]


def _num(row: dict, key: str) -> float:
    v = row.get(key)
    return float("nan") if v is None else float(v)


def _pm(mean: float, ci: float, digits: int = 3) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f} ± {ci:.{digits}f}" if not math.isnan(ci) else f"{mean:.{digits}f}"


def _cell_runs(df: Any, **eq: Any) -> list[dict]:
    import polars as pl

    sub = df
    for k, v in eq.items():
        sub = sub.filter(pl.col(k) == v)
    return sub.to_dicts()


def _pooled(runs: list[dict], key: str) -> tuple[float, float, int]:
    """Edit-weighted mean of a metric over runs, its pooled CI half-width (NaN for a metric the schema declares
    without one), and the number of edits. ``key`` must be a metric of :data:`bench.schema.METRICS`."""
    if key not in BY_NAME:
        raise KeyError(f"report: {key!r} is not a metric of bench.schema.METRICS")
    ns = [_num(r, "n_edits") for r in runs]
    vals = [_num(r, key) for r in runs]
    cis = [_num(r, f"{key}_ci95") if BY_NAME[key].ci else float("nan") for r in runs]
    pairs = [(n, v, c) for n, v, c in zip(ns, vals, cis) if not math.isnan(v)]
    if not pairs:
        return float("nan"), float("nan"), 0
    total = sum(n for n, _, _ in pairs)
    mean = sum(n * v for n, v, _ in pairs) / total
    ci = math.sqrt(sum((n / total) ** 2 * c ** 2 for n, _, c in pairs if not math.isnan(c)))
    return mean, ci, int(total)


def _glossary(*names: str) -> str:
    """The schema's description of each metric, with its better direction: the footnote of a table."""
    arrow = {True: " (higher is better)", False: " (lower is better)", None: ""}
    return "; ".join(f"{n} = {BY_NAME[n].description}{arrow[BY_NAME[n].higher]}" for n in names)


def budget_limited(runs: list[dict]) -> list[str]:
    """One line per budget-limited run of a cell: why its training ended, at which step, and the step of its last
    validation improvement. Empty when every learned editor converged (or the editor does not train)."""
    out = []
    for r in runs:
        why = r.get(f"t.{FIT_STOP_TAG}")
        if why in BUDGET_LIMITED:
            out.append(f"{r['method']} ({r['dataset']} / {r['model']}, seed {r.get('p.seed', '?')}): stopped by "
                       f"{why} at step {_num(r, 'train_steps'):.0f}, last validation improvement at step "
                       f"{_num(r, 'train_best_step'):.0f}")
    return out


def kept_untrained(runs: list[dict]) -> list[str]:
    """One line per run of a cell whose learned editor kept its untrained state (tag
    ``editbench.fit_kept_initial``): its losses and validation ES at step 0 and later. Empty when none did."""
    return [f"{r['method']} ({r['dataset']} / {r['model']}, seed {r.get('p.seed', '?')}): {r[f't.{FIT_KEPT_INITIAL_TAG}']}"
            for r in runs if r.get(f"t.{FIT_KEPT_INITIAL_TAG}")]


class _Marks:
    """Collects the budget (†) and kept-untrained (‡) lines of a table's cells and writes their footnote."""

    def __init__(self) -> None:
        self.budget: list[str] = []
        self.untrained: list[str] = []

    def of(self, runs: list[dict]) -> str:
        """The marks of one cell (" †", " ‡", " †‡" or ""), remembering its lines for the footnote."""
        b, u = budget_limited(runs), kept_untrained(runs)
        self.budget += [x for x in b if x not in self.budget]
        self.untrained += [x for x in u if x not in self.untrained]
        marks = (BUDGET_MARK if b else "") + (UNTRAINED_MARK if u else "")
        return f" {marks}" if marks else ""

    def footnote(self) -> str:
        out = ""
        if self.budget:
            out += (f" {BUDGET_MARK} = budget-limited: the editor's training was ended by its step or time budget "
                    "while validation had not converged, so the cell is not a finished editor's result: "
                    + "; ".join(self.budget) + ".")
        if self.untrained:
            out += (f" {UNTRAINED_MARK} = kept its untrained state: no validation after step 0 beat step 0's under "
                    "the checkpoint selection, so the cell is the untrained editor's result (for MEND / ENN / KE at "
                    "init, about no edit; compare the gain over the unedited model): "
                    + "; ".join(self.untrained) + ".")
        return out


def _gain(runs: list[dict]) -> str:
    """ES minus the unedited model's ES on the same edits, with its CI ("-" for runs logged before it existed)."""
    return _pm(*_pooled(runs, "es_gain")[:2])


# --------------------------------------------------------------------------------------------------- tables


def table_results(df: Any) -> tuple[list[str], list[list[str]], str]:
    """Table 3/4 style at the smallest batch size of each column."""
    cols = sorted({(r["dataset"], r["model"]) for r in df.select("dataset", "model").to_dicts()})
    methods = sorted(df["method"].unique().to_list())
    best: dict[tuple, str] = {}
    cells: dict[tuple, tuple[float, str]] = {}
    marks = _Marks()
    for ds, model in cols:
        bs = int(df.filter((df["dataset"] == ds) & (df["model"] == model))["bs"].min())
        for m in methods:
            runs = _cell_runs(df, method=m, dataset=ds, model=model, bs=bs)
            if not runs:
                continue
            es, es_ci, n = _pooled(runs, "es")
            dd, dd_ci, _ = _pooled(runs, "drawdown")
            agree, _, _ = _pooled(runs, "loc_agree")
            text = f"ES {_pm(es, es_ci)}; gain {_gain(runs)}; DD {_pm(dd, dd_ci)}; agree {agree:.3f} (n={n})"
            cells[(m, ds, model)] = (es, text + marks.of(runs))
        col_cells = [(es, m) for (m, d, mo), (es, _) in cells.items() if (d, mo) == (ds, model) and not math.isnan(es)]
        if col_cells:
            best[(ds, model)] = max(col_cells)[1]
    header = ["editor"] + [f"{ds} / {model}" for ds, model in cols]
    rows = []
    for m in methods:
        row = [m]
        for ds, model in cols:
            c = cells.get((m, ds, model))
            text = "-" if c is None else c[1]
            row.append(f"**{text}**" if best.get((ds, model)) == m and c else text)
        rows.append(row)
    note = ("ES = edit success on the equivalence input (MEND style); gain = ES minus the unedited model's ES on the "
            "same edits (0 = the editor changed nothing; FEVER's labels already hold for about half the claims); "
            "DD = drawdown (QA and classification: locality "
            "accuracy before minus after; generation: relative perplexity increase on locality passages, "
            "ppl_after / ppl_before - 1); agree = share of locality answer tokens whose argmax is unchanged; "
            "mean ± 95% CI over n edits; bold = best ES in the column; smallest edit batch size of each column."
            + marks.footnote())
    return header, rows, note


def table_rome(df: Any) -> tuple[list[str], list[list[str]], str]:
    """ROME-style scores (efficacy, paraphrase, neighbourhood, mean p(new)) beside the MEND-style ES, per editor and
    dataset / model, at the smallest batch size, for the tasks that have ROME's neighbourhood score
    (CounterFact); empty when no run has it ("-" for p(new) in runs logged before it existed)."""
    keys = ("efficacy", "paraphrase", "neighbourhood", "p_new")
    header = ["dataset / model", "editor", "efficacy", "paraphrase", "neighbourhood", "p(new)", "ES (MEND)",
              "ES gain"]
    rows = []
    marks = _Marks()
    for ds, model, m in sorted({(r["dataset"], r["model"], r["method"])
                                for r in df.select("dataset", "model", "method").to_dicts()}):
        bs = int(df.filter((df["dataset"] == ds) & (df["model"] == model))["bs"].min())
        runs = _cell_runs(df, method=m, dataset=ds, model=model, bs=bs)
        if not any(r.get("neighbourhood") is not None for r in runs):
            continue
        cells = [_pm(*_pooled(runs, k)[:2]) for k in (*keys, "es")]
        rows.append([f"{ds} / {model}", m + marks.of(runs), *cells, _gain(runs)])
    return header, rows, ("ROME style (Meng et al. 2022), where the true answer is known (CounterFact): "
                          + _glossary(*keys) + "; ES (MEND) = " + _glossary("es").split(" = ", 1)[1]
                          + ", for comparison; ES gain = " + _glossary("es_gain").split(" = ", 1)[1]
                          + "; mean ± 95% CI." + marks.footnote())


def table_batch(df: Any) -> tuple[list[str], list[list[str]], str]:
    """Table 5 style: ES / drawdown per editor and edit batch size, per dataset / model."""
    sizes = sorted(df["bs"].unique().to_list())
    header = ["dataset / model", "editor"] + [f"B={b}" for b in sizes]
    rows = []
    marks = _Marks()
    for key in sorted({(r["dataset"], r["model"], r["method"]) for r in df.select("dataset", "model", "method").to_dicts()}):
        ds, model, m = key
        row = [f"{ds} / {model}", m]
        for b in sizes:
            runs = _cell_runs(df, method=m, dataset=ds, model=model, bs=b)
            if not runs:
                row.append("-")
                continue
            es, _, _ = _pooled(runs, "es")
            gain, _, _ = _pooled(runs, "es_gain")
            dd, _, _ = _pooled(runs, "drawdown")
            gain_text = f" (gain {gain:+.3f})" if not math.isnan(gain) else ""
            row.append(f"ES {es:.3f}{gain_text} / DD {dd:.3f}" + marks.of(runs))
        rows.append(row)
    return header, rows, ("Each batch is one edit call on B requests; ES and drawdown are over all B requests; gain "
                          "= ES minus the unedited model's ES on the same requests." + marks.footnote())


def table_cost(df: Any) -> tuple[list[str], list[list[str]], str]:
    header = ["editor", "model", "train time (s)", "train peak mem (MB)", "edit time (s)", "edit peak mem (MB)",
              "steps / edit"]
    rows = []
    for key in sorted({(r["method"], r["model"]) for r in df.select("method", "model").to_dicts()}):
        runs = _cell_runs(df, method=key[0], model=key[1])

        def mean(k: str, rs: list[dict] = runs) -> float:
            vals = [_num(r, k) for r in rs if not math.isnan(_num(r, k))]
            return sum(vals) / len(vals) if vals else float("nan")

        # A run that loaded an editor trained elsewhere did not train: its training is counted once, at its source.
        trained = [r for r in runs if not r.get(f"t.{TRAINED_FROM_TAG}")]
        rows.append([key[0], key[1], f"{mean('train_time_s', trained):.1f}", f"{mean('train_peak_mem_mb'):.0f}",
                     f"{mean('edit_time_s'):.3f}", f"{mean('edit_peak_mem_mb'):.0f}", f"{mean('edit_steps'):.2f}"])
    return header, rows, ("Means over runs (train time over the runs that trained: a run that loaded an editor "
                          "trained under the same training key is left out of it). Peak memory above the level at "
                          "the start of fit / edit (CUDA: max_memory_allocated; CPU: resident high-water mark).")


def table_properties(df: Any) -> tuple[list[str], list[list[str]], str]:
    """Table 1, measured: every cell from evidence in the runs."""
    header = ["editor", "Preserves model?", "Only (x_e, y_e)?", "Batched edits?", "Scales to 10B?", "Few steps?",
              "Sequential edits?"]
    rows = []
    for m in sorted(df["method"].unique().to_list()):
        runs = _cell_runs(df, method=m)
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
    single, _, _ = _pooled([r for r in runs if int(r["bs"]) == 1], "es")
    big = sizes[-1]
    batched, _, _ = _pooled([r for r in runs if int(r["bs"]) == big], "es")
    ok = single > 0 and batched >= BATCH_KEEP_FRACTION * single
    return f"{'✓' if ok else '✗'} ES {batched:.3f} at B={big} vs {single:.3f} at B=1"


def _sequential(runs: list[dict]) -> str:
    """Evidence of retention: ES on all N edits after the N-th (``retention_es``) against the ES each edit had
    right after it was made (``es`` of a sequential run), for the longest sequential run."""
    runs = [r for r in runs if not math.isnan(_num(r, "retention_es")) and _num(r, "n_edits") >= SEQ_MIN_EDITS]
    if not runs:
        return f"no evidence (no sequential run of >= {SEQ_MIN_EDITS} edits)"
    longest = max(_num(r, "n_edits") for r in runs)
    top = [r for r in runs if _num(r, "n_edits") == longest]
    kept, _, _ = _pooled(top, "retention_es")
    fresh, _, _ = _pooled(top, "es")
    ok = fresh > 0 and kept >= SEQ_KEEP_FRACTION * fresh
    return f"{'✓' if ok else '✗'} ES on all {longest:.0f} after {longest:.0f} edits {kept:.3f} vs {fresh:.3f} right after each"


def retention_curves(uri: str, df: Any) -> dict[tuple[str, str, str], list[tuple[int, float, float]]]:
    """(method, dataset, model) -> [(edits so far, retention ES, retention locality agreement)] from the metric
    history of the sequential runs (averaged over runs of one key at equal edit counts)."""
    from bench.tracking import client

    c = client(uri)
    acc: dict[tuple[str, str, str], dict[int, list[tuple[float, float]]]] = {}
    for r in df.to_dicts():
        if r["mode"] != "sequential":
            continue
        es = {h.step: h.value for h in c.get_metric_history(r["run_id"], "retention_es")}
        agree = {h.step: h.value for h in c.get_metric_history(r["run_id"], "retention_loc_agree")}
        for k, v in es.items():
            if k > 0:
                acc.setdefault((r["method"], r["dataset"], r["model"]), {}).setdefault(k, []).append(
                    (v, agree.get(k, float("nan"))))
    return {key: [(k, sum(a for a, _ in v) / len(v), sum(b for _, b in v) / len(v)) for k, v in sorted(pts.items())]
            for key, pts in acc.items()}


def table_retention(curves: dict[tuple[str, str, str], list[tuple[int, float, float]]],
                    unedited: Mapping[tuple[str, str, str], float] | None = None
                    ) -> tuple[list[str], list[list[str]], str]:
    """Sequential editing: ES on all edits so far after k edits, per editor, at every checkpoint, beside the
    unedited model's ES on the same test edits (``unedited``: (method, dataset, model) -> mean ``es_pre``)."""
    unedited = unedited or {}
    ks = sorted({k for pts in curves.values() for k, _, _ in pts})
    header = ["dataset / model", "editor", "unedited ES"] + [f"k={k}" for k in ks] + ["loc agree (last)"]
    rows = []
    for (m, ds, model), pts in sorted(curves.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        at = {k: es for k, es, _ in pts}
        pre = unedited.get((m, ds, model), float("nan"))
        rows.append([f"{ds} / {model}", m, "-" if math.isnan(pre) else f"{pre:.3f}"]
                    + [f"{at[k]:.3f}" if k in at else "-" for k in ks] + [f"{pts[-1][2]:.3f}"])
    return header, rows, ("Sequential editing: the test edits are applied one batch after another, each computed on "
                          "the model as already edited; k=N is ES (x'_e, MEND style) on ALL N edits made so far "
                          "(retention), after the N-th; unedited ES: the unedited model's ES on all the run's test "
                          "edits, the level that means no edit is left. loc agree: locality argmax agreement with the "
                          "ORIGINAL model after the last edit.")


def unedited_es(df: Any) -> dict[tuple[str, str, str], float]:
    """(method, dataset, model) -> the unedited model's ES (``es_pre``) pooled over the sequential runs."""
    keys: dict[tuple[str, str, str], list[dict]] = {}
    for r in df.to_dicts():
        if r["mode"] == "sequential":
            keys.setdefault((r["method"], r["dataset"], r["model"]), []).append(r)
    return {k: _pooled(runs, "es_pre")[0] for k, runs in keys.items()}


def trained_runs(df: Any) -> list[dict]:
    """The runs whose editor was trained (or loaded from a training), one per training: learned editors only,
    one run per (editor configuration, dataset, model, training key), batch sizes sharing a training counted once."""
    out: dict[tuple, dict] = {}
    for r in df.to_dicts():
        if r.get(f"t.{FIT_STOP_TAG}") in (None, "untrained"):
            continue
        key = (r["method"], r["dataset"], r["model"], r.get(f"t.{TRAIN_KEY_TAG}"), r.get(f"t.{TRAINED_FROM_TAG}"))
        out.setdefault(key, r)
    return [out[k] for k in sorted(out, key=lambda k: (k[1], k[2], k[0]))]


def validation_curves(uri: str, runs: list[dict]) -> dict[str, list[tuple[int, float, float]]]:
    """Row label -> [(step, val_es, val_loss)] of each trained run's fit, from its metric history (a run that
    loaded its editor: its source run's history, where the training happened)."""
    from bench.tracking import client

    c = client(uri)
    curves: dict[str, list[tuple[int, float, float]]] = {}
    for r in runs:
        rid = r.get(f"t.{TRAINED_FROM_TAG}") or r["run_id"]
        es = {h.step: h.value for h in c.get_metric_history(rid, "val_es")}
        loss = {h.step: h.value for h in c.get_metric_history(rid, "val_loss")}
        if es:
            curves[_training_label(r)] = [(k, es[k], loss.get(k, float("nan"))) for k in sorted(es)]
    return curves


def _training_label(r: dict) -> str:
    return f"{r['method']} ({r['dataset']} / {r['model']})"


def table_training(runs: list[dict]) -> tuple[list[str], list[list[str]], str]:
    """One row per training of a learned editor: why the fit stopped (‡ when it kept its untrained state), its
    steps, the step of its chosen checkpoint and the selection that chose it, that checkpoint's validation ES and
    loss beside the untrained editor's validation ES (step 0), the training's wall time, and the run it was
    loaded from when the trial did not train."""
    header = ["editor", "dataset / model", "fit", "steps", "chosen step", "chosen by", "val ES", "val ES (step 0)",
              "val loss", "train time (s)", "loaded from"]
    rows = []
    for r in runs:
        why = r.get(f"t.{FIT_STOP_TAG}")
        src = r.get(f"t.{TRAINED_FROM_TAG}")
        t = _num(r, "source_train_time_s") if src else _num(r, "train_time_s")
        fit = f"budget-limited ({why}) {BUDGET_MARK}" if why in BUDGET_LIMITED else str(why)
        if r.get(f"t.{FIT_KEPT_INITIAL_TAG}"):
            fit += f" {UNTRAINED_MARK}"
        init = _num(r, "init_val_es")
        rows.append([r["method"], f"{r['dataset']} / {r['model']}", fit,
                     f"{_num(r, 'train_steps'):.0f}", f"{_num(r, 'train_best_step'):.0f}",
                     (r.get(f"t.{FIT_SELECT_TAG}") or "val_loss (not recorded)").split(" (")[0],
                     f"{_num(r, 'best_val_es'):.3f}", "-" if math.isnan(init) else f"{init:.3f}",
                     f"{_num(r, 'best_val_loss'):.3f}", f"{t:.0f}",
                     f"{src[:12]} ({r.get(f't.{REUSE_TAG}') or 'training key'})" if src else "-"])
    return header, rows, (
        "Learned editors' trainings. fit: converged = the selection key did not improve for `patience` "
        "validations after improving on step 0; diverged = it never improved on step 0 (the editor kept its "
        f"untrained state {UNTRAINED_MARK}); budget-limited {BUDGET_MARK} = the step or time budget ended it first "
        f"(the editor is not finished; {UNTRAINED_MARK} when its best validation was still step 0's). chosen by: "
        "val_loss = the lowest c_edit * L_e + c_loc * L_loc (the authors' key), val_es = the highest validation ES "
        "above the budget's locality floor (budget `select` / `loc_floor`); chosen step: the checkpoint the editor "
        "keeps; val ES / loss: at that checkpoint; val ES (step 0): the untrained editor's. loaded from: the run "
        "whose training the trial reused (same training key, or the same editor trained to convergence), whose "
        "time is shown. Validation curves: training_curves.png.")


def plot_training(curves: dict[str, list[tuple[int, float, float]]], out: Path) -> Path:
    """Validation ES and loss against training step, one line per training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for label, pts in curves.items():
        steps = [k for k, _, _ in pts]
        a.plot(steps, [es for _, es, _ in pts], marker=".", label=label)
        b.plot(steps, [loss for _, _, loss in pts], marker=".", label=label)
    a.set(xlabel="training step", ylabel="validation ES", title="validation ES")
    b.set(xlabel="training step", ylabel="validation loss", title="validation loss (early-stop key)")
    b.set_yscale("log")
    a.legend(fontsize=7)
    return _save(fig, out / "training_curves.png")


def tuning_runs(uri: str, experiment: str) -> list[dict]:
    """The sampled trial runs of ``experiment`` (a search space's draws): FINISHED ones and those a scheduler
    stopped (KILLED), newest run per run name; empty when the experiment sampled nothing."""
    from bench.tracking import runs_frame

    df = runs_frame(uri, experiment)
    if df.is_empty() or f"t.{SAMPLED_TAG}" not in df.columns:
        return []
    df = df.filter(df[f"t.{SAMPLED_TAG}"].is_not_null() & df["status"].is_in(["FINISHED", "KILLED"]))
    return df.sort("start_time", descending=True).unique(subset=["run_name"], keep="first",
                                                         maintain_order=True).to_dicts()


def chosen_sample(runs: list[dict]) -> tuple[dict | None, str]:
    """The sample a grid point's tuning chooses, and by what: among its FINISHED runs, the best validation ES of
    the fit's chosen checkpoint (ties: lower validation loss) for editors that validate; the best test ES for
    editors that do not train (they report no validation metric)."""
    done = [r for r in runs if r["status"] == "FINISHED"]
    if not done:
        return None, "no sample finished"
    if any(not math.isnan(_num(r, "best_val_es")) for r in done):
        best = max(done, key=lambda r: (_num(r, "best_val_es"), -_num(r, "best_val_loss")))
        return best, "validation ES"
    return max(done, key=lambda r: _num(r, "es")), "test ES (no validation)"


def table_tuning(runs: list[dict]) -> tuple[list[str], list[list[str]], str]:
    """One row per sample of every tuned grid point: the values drawn, whether it finished or the scheduler
    stopped it, its validation ES / loss (the fit's chosen checkpoint; for a stopped trial, its last validation),
    training steps, test ES and its gain over the unedited model; the chosen sample of each point in bold."""
    import json

    points: dict[str, list[dict]] = {}
    for r in runs:
        points.setdefault(r.get(f"t.{POINT_DIGEST_TAG}") or r["run_name"], []).append(r)
    header = ["editor / model / dataset", "sample", "status", "val ES", "val loss", "steps", "test ES", "test ES gain"]
    rows, chosen_by = [], []
    for _, rs in sorted(points.items(), key=lambda kv: (kv[1][0]["p.method"], kv[1][0]["p.model"],
                                                        kv[1][0]["p.dataset"])):
        best, how = chosen_sample(rs)
        first = rs[0]
        where = f"{first['p.method']} / {first['p.model']} / {first['p.dataset']}"
        chosen_by.append(f"{first['p.method']}: {how}")
        for r in sorted(rs, key=lambda r: json.loads(r[f"t.{SAMPLED_TAG}"]).get("lr", 0.0)):
            drawn = json.loads(r[f"t.{SAMPLED_TAG}"])
            sample = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in drawn.items())
            done = r["status"] == "FINISHED"
            val_es = _num(r, "best_val_es" if done else "val_es")
            val_loss = _num(r, "best_val_loss" if done else "val_loss")
            why = r.get(f"t.{END_REASON_TAG}") or ""
            status = ("finished" if done else "stopped by the scheduler" if "scheduler" in why
                      else f"killed ({why})" if why else "killed")
            row = [where, sample, status,
                   "-" if math.isnan(val_es) else f"{val_es:.3f}", "-" if math.isnan(val_loss) else f"{val_loss:.3f}",
                   f"{_num(r, 'train_steps'):.0f}" if done and r.get(f"t.{FIT_STOP_TAG}") not in (None, "untrained")
                   else "-",
                   _pm(_num(r, "es"), _num(r, "es_ci95")) if done else "-",
                   _pm(_num(r, "es_gain"), _num(r, "es_gain_ci95")) if done else "-"]
            rows.append([f"**{c}**" for c in row] if r is best else row)
    note = ("Each tuned grid point's samples (values drawn from the sweep's search spaces); bold = the chosen "
            "sample of its point, by " + "; ".join(chosen_by) + ". val ES / loss: the fit's chosen checkpoint "
            "(a stopped trial: its last validation). Editors without validation are compared on the test edits "
            "of this sweep: use a test set the tuned values are not then reported on.")
    return header, rows, note


def _scales(runs: list[dict]) -> str:
    pts: dict[float, float] = {}
    for r in runs:
        p = _num(r, "model_params")
        mem = max(_num(r, "train_peak_mem_mb") if not math.isnan(_num(r, "train_peak_mem_mb")) else 0.0,
                  _num(r, "edit_peak_mem_mb") if not math.isnan(_num(r, "edit_peak_mem_mb")) else 0.0)
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
    vals = [_num(r, "edit_steps") for r in runs if not math.isnan(_num(r, "edit_steps"))]
    if not vals:
        return "no evidence (edit_steps not logged)"
    mean = sum(vals) / len(vals)
    return f"{'✓' if mean <= FEW_STEPS else '✗'} {mean:.2f} optimiser steps per edit"


# --------------------------------------------------------------------------------------------------- plots


def make_plots(df: Any, out: Path) -> dict[str, Path]:
    """ES vs drawdown per task, ES vs batch size, memory per editor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots: dict[str, Path] = {}
    rows = df.to_dicts()
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        if int(r["bs"]) != int(df["bs"].min()):
            continue
        ax.scatter(_num(r, "drawdown"), _num(r, "es"))
        ax.annotate(f"{r['method']} ({r['dataset']}/{r['model']})", (_num(r, "drawdown"), _num(r, "es")), fontsize=7)
    ax.set_xlabel("drawdown")
    ax.set_ylabel("edit success (ES)")
    ax.set_title("ES vs drawdown")
    plots["es_vs_drawdown"] = _save(fig, out / "es_vs_drawdown.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for key in sorted({(r["method"], r["dataset"], r["model"]) for r in rows}):
        pts = sorted((int(r["bs"]), _num(r, "es")) for r in rows if (r["method"], r["dataset"], r["model"]) == key)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{key[0]} / {key[1]}")
    ax.set_xscale("log")
    ax.set_xlabel("edit batch size")
    ax.set_ylabel("ES")
    ax.legend(fontsize=7)
    ax.set_title("ES vs batch size")
    plots["es_vs_batch"] = _save(fig, out / "es_vs_batch.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    methods = sorted({r["method"] for r in rows})
    train = [max([_num(r, "train_peak_mem_mb") for r in rows if r["method"] == m and
                  not math.isnan(_num(r, "train_peak_mem_mb"))] or [0.0]) for m in methods]
    edit = [max([_num(r, "edit_peak_mem_mb") for r in rows if r["method"] == m and
                 not math.isnan(_num(r, "edit_peak_mem_mb"))] or [0.0]) for m in methods]
    xs = range(len(methods))
    ax.bar([x - 0.2 for x in xs], train, width=0.4, label="training")
    ax.bar([x + 0.2 for x in xs], edit, width=0.4, label="edit")
    ax.set_xticks(list(xs), methods)
    ax.set_ylabel("peak memory (MB)")
    ax.legend()
    ax.set_title("Memory per editor")
    plots["memory"] = _save(fig, out / "memory.png")
    return plots


def plot_retention(curves: dict[tuple[str, str, str], list[tuple[int, float, float]]], out: Path) -> Path:
    """ES on all edits so far against the number of sequential edits, one line per editor (and task/model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    several = len({(d, mo) for _, d, mo in curves}) > 1
    for (m, ds, model), pts in sorted(curves.items()):
        ax.plot([k for k, _, _ in pts], [es for _, es, _ in pts], marker="o",
                label=f"{m} ({ds}/{model})" if several else m)
    ax.set_xscale("log")
    ax.set_xlabel("number of sequential edits")
    ax.set_ylabel("ES on all edits so far")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    ax.set_title("Retention under sequential editing")
    return _save(fig, out / "retention.png")


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------- output

TITLES = {
    "table1": "Table 1 (measured): editor properties",
    "results": "Table 3/4 style: edit success and drawdown",
    "rome": "ROME-style scores (true answer known)",
    "batch": "Table 5 style: batched edits",
    "cost": "Cost",
    "retention": "Sequential editing: retention",
    "tuning": "Tuning: every sample of each search space",
    "training": "Training of the learned editors: convergence",
}


def to_markdown(header: list[str], rows: list[list[str]]) -> str:
    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def to_latex(header: list[str], rows: list[list[str]]) -> str:
    def tex(s: str) -> str:
        s = s.replace("**", "")
        for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"),
                     ("±", r"$\pm$"), ("✓", r"\checkmark{}"), ("✗", r"$\times$"), (">=", r"$\geq$"),
                     ("<=", r"$\leq$")):
            s = s.replace(a, b)
        return s

    lines = [r"\begin{tabular}{" + "l" * len(header) + "}", r"\toprule", " & ".join(map(tex, header)) + r" \\",
             r"\midrule"]
    lines += [" & ".join(tex(c) for c in r) + r" \\" for r in rows]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines)


def to_html(rep: Report) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(rep.experiment)}</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}th{background:#f4f4f4}</style></head><body>",
             f"<h1>Editing report: {html.escape(rep.experiment)}</h1><p>{rep.n_runs} finished trial runs.</p>"]
    for key, (header, rows) in rep.tables.items():
        parts.append(f"<h2>{html.escape(TITLES[key])}</h2><table><tr>")
        parts += [f"<th>{html.escape(h)}</th>" for h in header]
        parts.append("</tr>")
        for r in rows:
            cells = []
            for c in r:
                bold = c.startswith("**") and c.endswith("**")
                c = html.escape(c.strip("*"))
                cells.append(f"<td>{'<b>' + c + '</b>' if bold else c}</td>")
            parts.append("<tr>" + "".join(cells) + "</tr>")
        parts.append(f"</table><p><small>{html.escape(rep.notes.get(key, ''))}</small></p>")
    for name, path in rep.plots.items():
        data = base64.b64encode(path.read_bytes()).decode()
        parts.append(f"<h2>{html.escape(name)}</h2><img alt='{name}' src='data:image/png;base64,{data}'/>")
    parts.append("</body></html>")
    return "\n".join(parts)


def build(uri: str, experiment: str, out: Path, formats: list[str]) -> Report:
    """Read the runs, write every table in ``formats`` and the plots into ``out``; return the report."""
    import polars as pl

    df = load_runs(uri, experiment)
    out.mkdir(parents=True, exist_ok=True)
    rep = Report(experiment=experiment, n_runs=df.height)
    ind = df.filter(pl.col("mode") == "independent")
    tables: list[tuple[str, Any, Any]] = [("table1", table_properties, df)]
    if not ind.is_empty():
        tables += [("results", table_results, ind), ("rome", table_rome, ind), ("batch", table_batch, ind),
                   ("cost", table_cost, ind)]
    for key, fn, frame in tables:
        header, rows, note = fn(frame)
        if key == "rome" and not rows:
            continue  # no run knows the true answers
        rep.tables[key] = (header, rows)
        rep.notes[key] = note
    curves = retention_curves(uri, df)
    if curves:
        header, rows, note = table_retention(curves, unedited_es(df))
        rep.tables["retention"] = (header, rows)
        rep.notes["retention"] = note
    trained = trained_runs(df)
    if trained:
        header, rows, note = table_training(trained)
        rep.tables["training"] = (header, rows)
        rep.notes["training"] = note
    tuned = tuning_runs(uri, experiment)
    if tuned:
        header, rows, note = table_tuning(tuned)
        rep.tables["tuning"] = (header, rows)
        rep.notes["tuning"] = note
    rep.plots = make_plots(ind, out) if not ind.is_empty() else {}
    if curves:
        rep.plots["retention"] = plot_retention(curves, out)
    val_curves = validation_curves(uri, trained) if trained else {}
    if val_curves:
        rep.plots["training_curves"] = plot_training(val_curves, out)
    if "md" in formats:
        md = [f"# Editing report: {experiment}", "", f"{rep.n_runs} finished trial runs.", ""]
        for key, (header, rows) in rep.tables.items():
            md += [f"## {TITLES[key]}", "", to_markdown(header, rows), "", rep.notes[key], ""]
        md += [f"![{k}]({p.name})" for k, p in rep.plots.items()]
        (out / "report.md").write_text("\n".join(md) + "\n")
    if "csv" in formats:
        import csv

        for key, (header, rows) in rep.tables.items():
            with open(out / f"{key}.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(header)
                w.writerows([[c.strip("*") for c in r] for r in rows])
    if "tex" in formats:
        (out / "report.tex").write_text("\n\n".join(f"% {TITLES[k]}\n" + to_latex(h, r)
                                                    for k, (h, r) in rep.tables.items()) + "\n")
    if "html" in formats:
        (out / "report.html").write_text(to_html(rep))
    return rep


def log_report(uri: str, experiment: str, out: Path) -> str:
    """Log the report folder as an MLflow run of its own in the experiment; returns its run id."""
    from bench.tracking import trial_run

    with trial_run(uri, experiment, f"report/{experiment}", {REPORT_TAG: "report"}) as run:
        run.log_artifact(out, "report")
        return run.run_id


def default_out(experiment: str) -> Path:
    """Where an experiment's report goes unless ``--out`` says: ``reports/<slug of the name>`` (``bench.cli.slug``),
    checked to resolve inside ``reports/`` whatever the name holds (``../../x`` lands in ``reports/x-<hash>``)."""
    from bench import cli

    return cli.inside(Path("reports"), cli.slug(experiment), "the report folder of experiment")


def main(argv: list[str] | None = None) -> int:
    from bench import cli
    from bench.tracking import TrackingError, check_tracking_uri, default_tracking_uri

    ap = cli.parser("python -m bench.report", __doc__,
                    {0: "report written", 2: "unknown experiment, no finished runs, no store, bad option or an "
                                              "unwritable --out (one line)"},
                    "python -m bench.report --experiment zsre --format md,html")
    ap.add_argument("--experiment", required=True, help="MLflow experiment (a sweep's name)")
    ap.add_argument("--tracking-uri", default=None, help="MLflow store; default: sqlite:///./mlruns.db")
    ap.add_argument("--out", type=Path, default=None,
                    help="output folder; default: reports/<experiment as a file name (bench.cli.slug)>")
    ap.add_argument("--format", default="md,csv,tex,html", help="comma-separated subset of md, csv, tex, html")
    ap.add_argument("--no-mlflow", action="store_true", help="do not log the report as an MLflow run")
    ap.add_argument("-v", "--verbose", action="store_true", help="show tracebacks of errors")
    args = ap.parse_args(argv)
    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    bad = [f for f in formats if f not in ("md", "csv", "tex", "html")]
    if bad or not formats:
        return cli.fail(f"--format {cli.cut(','.join(bad) or args.format)} unknown; valid: md, csv, tex, html")
    if not args.experiment.strip():
        return cli.fail("--experiment must not be blank")
    try:
        out = args.out or default_out(args.experiment)
        # Reading never creates a store; logging the report needs it writable.
        uri = check_tracking_uri(args.tracking_uri or default_tracking_uri(), must_exist=True,
                                 writable=not args.no_mlflow)
        cli.check_writable_dir(out, "--out")
        build(uri, args.experiment, out, formats)
    except (ReportError, TrackingError, cli.UserError) as e:
        return cli.report_user_error(e, args.verbose)
    if not args.no_mlflow:
        log_report(uri, args.experiment, out)
    print((out / "report.md").read_text() if "md" in formats else "")
    print(f"report written to {out}/" + (f" (HTML: {out / 'report.html'})" if "html" in formats else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
