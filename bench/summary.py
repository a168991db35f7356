"""What a sweep leaves on the screen and in its experiment: the summary table (the newest run of each of its
configurations, with how each learned editor's training ended), the experiment's description and the report."""

from __future__ import annotations

import logging
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from bench import report, tracking
from bench.report import BUDGET_MARK, UNTRAINED_MARK
from bench.schema import SUMMARY, Param
from bench.tracking import CONFIG_DIGEST_TAG, FIT_KEPT_INITIAL_TAG, FIT_STOP_TAG, TRAINED_FROM_TAG, runs_frame
from methods.base import BUDGET_LIMITED

log = logging.getLogger(__name__)


SUMMARY_COLUMNS = ["method", "model", "dataset", "edit_batch_size", "edit_mode", "n_edits", *SUMMARY, "fit", "status"]


def summary(tracking_uri: str, experiment: str, digests: set[str]) -> Any:
    """The newest run of each of the sweep's configurations (finished earlier or now), one row each."""
    import polars as pl  # lazily: importing polars makes blocking waits ignore Ctrl-C until they end
    df = runs_frame(tracking_uri, experiment)
    col = f"t.{CONFIG_DIGEST_TAG}"
    if df.is_empty() or col not in df.columns:
        return pl.DataFrame()
    df = (df.filter(pl.col(col).is_in(sorted(digests))).sort("start_time", descending=True)
          .unique(subset=[col], keep="first", maintain_order=True))
    df = df.rename({Param.col(p): p for p in (Param.METHOD, Param.MODEL, Param.DATASET, Param.EDIT_BATCH_SIZE,
                                              Param.EDIT_MODE)}, strict=False)
    df = df.with_columns(fit_column(df))
    cols = [c for c in SUMMARY_COLUMNS if c in df.columns]
    num = [c for c in cols if df.schema[c] in (pl.Float64, pl.Float32)]
    return df.select(cols).with_columns([pl.col(c).round(3) for c in num]).sort(["dataset", "model", "method"])


def fit_column(df: Any) -> Any:
    """The summary's ``fit`` column: "converged (step S)", "budget† (step S, best B)" for a training its budget
    ended, "diverged‡ (step S, kept 0)" for one whose validation never beat the untrained editor's, or "-" for
    editors that do not train; "‡" after any fit that kept its untrained state, ", loaded" when the editor came
    from another run's training."""
    import polars as pl  # lazily: importing polars makes blocking waits ignore Ctrl-C until they end
    tag = f"t.{FIT_STOP_TAG}"
    if tag not in df.columns:
        return pl.lit("-").alias("fit")
    steps = pl.col("train_steps").cast(pl.Int64).cast(pl.Utf8) if "train_steps" in df.columns else pl.lit("?")
    best = (pl.col("train_best_step").cast(pl.Int64).cast(pl.Utf8) if "train_best_step" in df.columns
            else pl.lit("?"))
    src = f"t.{TRAINED_FROM_TAG}"
    loaded = (pl.when(pl.col(src).is_not_null()).then(pl.lit(", loaded")).otherwise(pl.lit(""))
              if src in df.columns else pl.lit(""))
    kept = f"t.{FIT_KEPT_INITIAL_TAG}"
    mark = (pl.when(pl.col(kept).is_not_null() & (pl.col(kept) != "")).then(pl.lit(UNTRAINED_MARK))
            .otherwise(pl.lit("")) if kept in df.columns else pl.lit(""))
    return (pl.when(pl.col(tag).is_in(list(BUDGET_LIMITED)))
            .then(pl.concat_str([pl.lit(f"budget{BUDGET_MARK}"), mark, pl.lit(" (step "), steps, pl.lit(", best "),
                                 best, loaded, pl.lit(")")]))
            .when(pl.col(tag) == "converged").then(pl.concat_str([pl.lit("converged (step "), steps, loaded,
                                                                  pl.lit(")")]))
            .when(pl.col(tag) == "diverged").then(pl.concat_str([pl.lit(f"diverged{UNTRAINED_MARK} (step "), steps,
                                                                 pl.lit(", kept 0"), loaded, pl.lit(")")]))
            .otherwise(pl.lit("-")).alias("fit"))


def print_summary(df: Any, title: str) -> None:
    fits = " ".join(str(v) for v in df["fit"]) if "fit" in df.columns else ""
    legend = []
    if BUDGET_MARK in fits:
        legend.append(f"{BUDGET_MARK} budget-limited: the budget ended the training before validation converged")
    if UNTRAINED_MARK in fits:
        legend.append(f"{UNTRAINED_MARK} kept its untrained state: no validation beat step 0's (see es_gain)")
    table = Table(title=title, caption="; ".join(legend) or None)
    for c in df.columns:
        # what names a row is never cut short; numbers and long headers give way first
        names = c in ("method", "model", "dataset", "status")
        width = max([len(str(v)) for v in df[c]] + [1]) if names else None
        table.add_column(c, min_width=min(width, 40) if width else None, no_wrap=names)
    for row in df.iter_rows():
        table.add_row(*["" if v is None else str(v) for v in row])
    Console(width=200).print(table)


def finish(uri: str, experiment: str, sweep_text: str, sweep_path: str, df: Any) -> None:
    """Put the sweep file and its summary table in the experiment's description and write the report."""
    summary = report.to_markdown(df.columns, [["" if v is None else str(v) for v in r] for r in df.iter_rows()])
    tracking.prepare_experiment(
        uri, experiment, f"Sweep `{sweep_path}`\n\n```yaml\n{sweep_text}\n```\n\n## Last summary\n\n{summary}\n")
    try:
        out = report.default_out(experiment)
        report.build(uri, experiment, out, ["md", "csv", "tex", "html"])
        report.log_report(uri, experiment, out)
        print(f"report: {out / 'report.md'} and {out / 'report.html'}")
    except Exception as e:  # a report problem must not hide the sweep's own result
        log.warning("report for %s not written: %s", experiment, e)
        print(f"report not written: {e}", file=sys.stderr)
