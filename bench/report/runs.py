"""An experiment's runs for the report: loading the FINISHED trial runs, pooling their per-edit metrics into cells,
the marks of budget-limited and untrained editors, and the curves (retention, validation) and tuning samples
the tables and plots read."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.schema import BY_NAME, Param
from bench.tracking import KIND_TAG as REPORT_TAG  # one place for tag names
from bench.tracking import (CONFIG_DIGEST_TAG, FIT_KEPT_INITIAL_TAG, FIT_STOP_TAG, SAMPLED_TAG, TRAIN_KEY_TAG,
                            TRAINED_FROM_TAG, client, runs_frame)
from methods.base import BUDGET_LIMITED


#: Marks a cell whose editor's training was ended by its budget, not by convergence on validation.
BUDGET_MARK = "†"


#: Marks a cell whose learned editor kept its untrained state (its best validation was step 0's): the cell is
#: the untrained editor's result, for MEND / ENN / KE at init (nearly) the unedited model's.
UNTRAINED_MARK = "‡"


log = logging.getLogger("bench.report")


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
    import polars as pl  # lazily: importing polars makes blocking waits ignore Ctrl-C until they end
    if client(uri).get_experiment_by_name(experiment) is None:
        raise ReportError(f"unknown experiment {experiment!r} in {uri}")
    df = runs_frame(uri, experiment)
    if df.is_empty() or Param.col(Param.METHOD) not in df.columns:
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
    p = Param.col
    casts = [pl.col(p(Param.METHOD)).alias("method"), pl.col(p(Param.MODEL)).alias("model"),
             pl.col(p(Param.DATASET)).alias("dataset"), pl.col(p(Param.EDIT_BATCH_SIZE)).cast(pl.Int64).alias("bs")]
    if p(Param.MODEL_PARAMS) in df.columns:
        casts.append(pl.col(p(Param.MODEL_PARAMS)).cast(pl.Float64).alias("model_params"))
    mode = pl.col(p(Param.EDIT_MODE)) if p(Param.EDIT_MODE) in df.columns else pl.lit(None, dtype=pl.Utf8)
    casts.append(mode.fill_null("independent").alias("mode"))
    df = df.with_columns(casts)
    return df.with_columns(pl.Series("method", config_labels(df.to_dicts())))


#: Run params that only say how many of the test split's first edits a run evaluated (see ``_largest_test_set``).
TEST_SIZE_PARAMS = (Param.col(Param.N_EDITS), Param.col(Param.N_TEST))


def _largest_test_set(df: Any) -> Any:
    """Of runs whose params agree on everything but the test size, the one with the most edits (the newest of equal
    ones). Their test edits are the first ``n_edits`` of the same split (seed, files and options are params), so the
    smaller runs' edits are the larger one's first ones: pooling them would count those edits twice and narrow the
    CI as if they were new. Runs whose params differ anywhere else (seed, hyper-parameters, files) are untouched."""
    import polars as pl  # lazily: importing polars makes blocking waits ignore Ctrl-C until they end
    if Param.col(Param.N_EDITS) not in df.columns:
        return df
    same = [c for c in sorted(df.columns) if c.startswith("p.") and c not in TEST_SIZE_PARAMS]
    cell = pl.concat_str([pl.col(c).cast(pl.Utf8).fill_null("\x00") for c in same], separator="\x1f")
    kept = (df.with_columns(cell.alias("_cell"), pl.col(Param.col(Param.N_EDITS)).cast(pl.Int64).alias("_n"))
            .sort(["_n", "start_time"], descending=True)
            .unique(subset=["_cell"], keep="first", maintain_order=True).drop("_cell", "_n"))
    if kept.height < df.height:
        log.info("%d run(s) on the first edits of a larger run's test set left out (the larger run counts)",
                 df.height - kept.height)
    return kept


def config_labels(rows: list[dict]) -> list[str]:
    """Each run's method name, followed by the hyper-parameter, budget (and ``reuse_converged``) values that tell its
    configuration apart from the method's other runs (none when the method ran in one configuration)."""
    keys = sorted({k for r in rows for k in r if k.startswith(tuple(Param.col(x) for x in (f"{Param.HPARAMS}.", f"{Param.BUDGET}.", Param.REUSE_CONVERGED)))})
    differing: dict[str, list[str]] = {}
    for m in {r["method"] for r in rows}:
        mine = [r for r in rows if r["method"] == m]
        differing[m] = [k for k in keys if len({r.get(k) for r in mine}) > 1]
    return [r["method"] if not differing[r["method"]] else
            f"{r['method']} ({', '.join(f'{k[2:]}={r.get(k)}' for k in differing[r['method']])})" for r in rows]


def num(row: dict, key: str) -> float:
    v = row.get(key)
    return float("nan") if v is None else float(v)


def pm(mean: float, ci: float, digits: int = 3) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f} ± {ci:.{digits}f}" if not math.isnan(ci) else f"{mean:.{digits}f}"


def cell_runs(df: Any, **eq: Any) -> list[dict]:
    import polars as pl  # lazily: importing polars makes blocking waits ignore Ctrl-C until they end
    sub = df
    for k, v in eq.items():
        sub = sub.filter(pl.col(k) == v)
    return sub.to_dicts()


def pooled(runs: list[dict], key: str) -> tuple[float, float, int]:
    """Edit-weighted mean of a metric over runs, its pooled CI half-width (NaN for a metric the schema declares
    without one), and the number of edits. ``key`` must be a metric of :data:`bench.schema.METRICS`."""
    if key not in BY_NAME:
        raise KeyError(f"report: {key!r} is not a metric of bench.schema.METRICS")
    ns = [num(r, "n_edits") for r in runs]
    vals = [num(r, key) for r in runs]
    cis = [num(r, f"{key}_ci95") if BY_NAME[key].ci else float("nan") for r in runs]
    pairs = [(n, v, c) for n, v, c in zip(ns, vals, cis) if not math.isnan(v)]
    if not pairs:
        return float("nan"), float("nan"), 0
    total = sum(n for n, _, _ in pairs)
    mean = sum(n * v for n, v, _ in pairs) / total
    ci = math.sqrt(sum((n / total) ** 2 * c ** 2 for n, _, c in pairs if not math.isnan(c)))
    return mean, ci, int(total)


def glossary(*names: str) -> str:
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
            out.append(f"{r['method']} ({r['dataset']} / {r['model']}, seed {r.get(Param.col(Param.SEED), '?')}): stopped by "
                       f"{why} at step {num(r, 'train_steps'):.0f}, last validation improvement at step "
                       f"{num(r, 'train_best_step'):.0f}")
    return out


def kept_untrained(runs: list[dict]) -> list[str]:
    """One line per run of a cell whose learned editor kept its untrained state (tag
    ``editbench.fit_kept_initial``): its losses and validation ES at step 0 and later. Empty when none did."""
    return [f"{r['method']} ({r['dataset']} / {r['model']}, seed {r.get(Param.col(Param.SEED), '?')}): {r[f't.{FIT_KEPT_INITIAL_TAG}']}"
            for r in runs if r.get(f"t.{FIT_KEPT_INITIAL_TAG}")]


class Marks:
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


def gain(runs: list[dict]) -> str:
    """ES minus the unedited model's ES on the same edits, with its CI ("-" for runs logged before it existed)."""
    return pm(*pooled(runs, "es_gain")[:2])


#: The metrics a sequential run logs at every checkpoint (metric history, step = edits so far).
CHECKPOINT_METRICS = ("retention_es", "retention_edit_acc", "retention_loc_agree", "retention_gen_rephrase_em",
                      "retention_gen_edit_em", "retention_gen_loc_agree", "retention_delta_norm",
                      "retention_delta_rel", "retention_adaptor_entries")


def checkpoint_metrics(uri: str, df: Any) -> dict[tuple[str, str, str], dict[int, dict[str, float]]]:
    """(method, dataset, model) -> edits so far -> every :data:`CHECKPOINT_METRICS` the sequential runs logged at
    that checkpoint (averaged over the runs of one key; a metric a run did not log is left out)."""
    c = client(uri)
    acc: dict[tuple[str, str, str], dict[int, dict[str, list[float]]]] = {}
    for r in df.to_dicts():
        if r["mode"] != "sequential":
            continue
        key = (r["method"], r["dataset"], r["model"])
        for name in CHECKPOINT_METRICS:
            for h in c.get_metric_history(r["run_id"], name):
                if h.step > 0:
                    acc.setdefault(key, {}).setdefault(h.step, {}).setdefault(name, []).append(h.value)
    return {key: {k: {n: sum(v) / len(v) for n, v in by.items()} for k, by in sorted(pts.items())}
            for key, pts in acc.items()}


def retention_curves(uri: str, df: Any, marks: dict | None = None
                     ) -> dict[tuple[str, str, str], list[tuple[int, float, float, float]]]:
    """(method, dataset, model) -> [(edits so far, retention ES, retention locality agreement, retention of the
    free answers on x'_e (NaN without the generation protocol))] from the metric history of the sequential runs
    (averaged over runs of one key at equal edit counts); ``marks``: :func:`checkpoint_metrics` when the caller has
    them."""
    marks = checkpoint_metrics(uri, df) if marks is None else marks
    nan = float("nan")
    return {key: [(k, v["retention_es"], v.get("retention_loc_agree", nan), v.get("retention_gen_rephrase_em", nan))
                  for k, v in pts.items() if "retention_es" in v]
            for key, pts in marks.items()}


def unedited_es(df: Any) -> dict[tuple[str, str, str], float]:
    """(method, dataset, model) -> the unedited model's ES (``es_pre``) pooled over the sequential runs."""
    keys: dict[tuple[str, str, str], list[dict]] = {}
    for r in df.to_dicts():
        if r["mode"] == "sequential":
            keys.setdefault((r["method"], r["dataset"], r["model"]), []).append(r)
    return {k: pooled(runs, "es_pre")[0] for k, runs in keys.items()}


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
    c = client(uri)
    curves: dict[str, list[tuple[int, float, float]]] = {}
    for r in runs:
        rid = r.get(f"t.{TRAINED_FROM_TAG}") or r["run_id"]
        es = {h.step: h.value for h in c.get_metric_history(rid, "val_es")}
        loss = {h.step: h.value for h in c.get_metric_history(rid, "val_loss")}
        if es:
            curves[training_label(r)] = [(k, es[k], loss.get(k, float("nan"))) for k in sorted(es)]
    return curves


def training_label(r: dict) -> str:
    return f"{r['method']} ({r['dataset']} / {r['model']})"


def tuning_runs(uri: str, experiment: str) -> list[dict]:
    """The sampled trial runs of ``experiment`` (a search space's draws): FINISHED ones and those a scheduler
    stopped (KILLED), newest run per run name; empty when the experiment sampled nothing."""
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
    if any(not math.isnan(num(r, "best_val_es")) for r in done):
        best = max(done, key=lambda r: (num(r, "best_val_es"), -num(r, "best_val_loss")))
        return best, "validation ES"
    return max(done, key=lambda r: num(r, "es")), "test ES (no validation)"
