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
   checkpoint, with locality agreement against the original model at the last one; and every checkpoint's scores
   (both protocols) with the norm of the accumulated weight change and the adaptor entries (lifelong table).
6. Plots: ES vs drawdown per task, ES vs batch size, memory per editor, retention vs number of edits (PNG;
   embedded in the HTML).
Tables 3-5 and the cost table use the independent-mode runs; Table 1 uses both (its "Sequential edits?").
The report is also logged to MLflow as a run of its own (tag ``editbench.kind = report``).
"""

from __future__ import annotations

import csv
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench import cli
from bench.report.plots import PLOT_TITLES, editor_colours, make_plots, plot_retention, plot_training
from bench.report.properties import table_properties
from bench.report.render import TITLES, to_html, to_latex, to_markdown
from bench.report.runs import (Report, ReportError, checkpoint_metrics, load_runs, retention_curves, trained_runs,
                               tuning_runs, unedited_es, validation_curves)
from bench.report.tables import (table_batch, table_cost, table_lifelong, table_protocols, table_results,
                                 table_retention, table_rome, table_training, table_tuning)
from bench.store import NOTE_TAG
from bench.tracking import (GIT_COMMIT_TAG, TrackingError, check_tracking_uri, client, default_tracking_uri,
                            trial_run)
from bench.tracking import KIND_TAG as REPORT_TAG  # one place for tag names


def build(uri: str, experiment: str, out: Path, formats: list[str]) -> Report:
    """Read the runs, write every table in ``formats`` and the plots into ``out``; return the report."""
    import polars as pl  # lazily: importing polars makes blocking waits ignore Ctrl-C until they end
    df = load_runs(uri, experiment)
    out.mkdir(parents=True, exist_ok=True)
    rep = Report(experiment=experiment, n_runs=df.height)
    ind = df.filter(pl.col("mode") == "independent")
    tables: list[tuple[str, Any, Any]] = [("table1", table_properties, df)]
    if not ind.is_empty():
        tables += [("results", table_results, ind), ("protocols", table_protocols, ind), ("rome", table_rome, ind),
                   ("batch", table_batch, ind), ("cost", table_cost, ind)]
    marks = checkpoint_metrics(uri, df)
    curves = retention_curves(uri, df, marks)
    if curves:
        tables.append(("retention", lambda c: table_retention(c, unedited_es(df)), curves))
        tables.append(("lifelong", table_lifelong, marks))
    trained = trained_runs(df)
    if trained:
        tables.append(("training", table_training, trained))
    tuned = tuning_runs(uri, experiment)
    if tuned:
        tables.append(("tuning", table_tuning, tuned))
    for key, fn, data in tables:
        header, rows, note = fn(data)
        if key in ("rome", "protocols") and not rows:
            continue  # no run knows the true answers / has the generation protocol
        rep.tables[key] = (header, rows)
        rep.notes[key] = note
    colours = editor_colours(df["method"].unique().to_list()) if not df.is_empty() else {}
    rep.plots = make_plots(ind, out, colours) if not ind.is_empty() else {}
    retention_png = plot_retention(curves, out, colours) if curves else None
    if retention_png is not None:
        rep.plots["retention"] = retention_png
    val_curves = validation_curves(uri, trained) if trained else {}
    if val_curves:
        rep.plots["training_curves"] = plot_training(val_curves, out)
    for stale in set(PLOT_TITLES) - set(rep.plots):  # a plot an earlier report drew that this one does not
        (out / f"{stale}.png").unlink(missing_ok=True)
    write(rep, out, formats)
    return rep


def write(rep: Report, out: Path, formats: list[str]) -> None:
    """Write ``rep``'s tables into ``out`` in each of ``formats`` (md: report.md with the plots linked; csv: one
    file per table; tex: report.tex; html: one self-contained report.html)."""
    if "md" in formats:
        md = [f"# Editing report: {rep.experiment}", "", f"{rep.n_runs} finished trial runs.", ""]
        for key, (header, rows) in rep.tables.items():
            md += [f"## {TITLES[key]}", "", to_markdown(header, rows), "", rep.notes[key], ""]
        for k, p in rep.plots.items():
            md += [f"## {PLOT_TITLES.get(k, k)}", "", f"![{PLOT_TITLES.get(k, k)}]({p.name})", ""]
        (out / "report.md").write_text("\n".join(md) + "\n")
    if "csv" in formats:
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


def log_report(uri: str, experiment: str, out: Path) -> str:
    """Log the report folder as an MLflow run of its own in the experiment; returns its run id."""
    with trial_run(uri, experiment, f"report/{experiment}", {REPORT_TAG: "report"}) as run:
        run.log_artifact(out, "report")
        return run.run_id


def default_out(experiment: str) -> Path:
    """Where an experiment's report goes unless ``--out`` says: ``reports/<slug of the name>`` (``bench.cli.slug``),
    checked to resolve inside ``reports/`` whatever the name holds (``../../x`` lands in ``reports/x-<hash>``)."""
    return cli.inside(Path("reports"), cli.slug(experiment), "the report folder of experiment")


def results_block(uri: str, experiment: str) -> str:
    """The experiment's results table as the README and ``docs/results.md`` show it, regenerated from its runs: the
    report's results table (Tables 3/4; for an experiment of sequential streams only, the lifelong table: every
    checkpoint), its note, and where the numbers come from (the command that ran the sweep, the commit(s) its
    runs ran at and the date of the newest one)."""
    import polars as pl  # lazily: importing polars makes blocking waits ignore Ctrl-C until they end
    df = load_runs(uri, experiment)
    ind = df.filter(pl.col("mode") == "independent")
    if not ind.is_empty():
        header, rows, note = table_results(ind)
    else:
        ind = df.filter(pl.col("mode") == "sequential")
        if ind.is_empty():
            raise ReportError(f"experiment {experiment!r}: no finished run to tabulate")
        header, rows, note = table_lifelong(checkpoint_metrics(uri, ind))
    # a commit the runs ran with uncommitted changes on top of says so ("-dirty" in the tag)
    commits = sorted({str(c)[:7] + (" (with uncommitted changes)" if str(c).endswith("-dirty") else "")
                      for c in ind[f"t.{GIT_COMMIT_TAG}"].to_list()}) if f"t.{GIT_COMMIT_TAG}" in \
        ind.columns else ["unknown"]
    newest = datetime.fromtimestamp(int(ind["start_time"].max()) / 1000, tz=timezone.utc).strftime("%Y-%m-%d")
    description = (client(uri).get_experiment_by_name(experiment).tags or {}).get(NOTE_TAG, "")
    sweep = re.search(r"Sweep `([^`]+)`", description)
    command = f"python -m bench.run {sweep.group(1)}" if sweep else f"(experiment {experiment})"
    source = (f"`{command}`, {len(ind)} run(s) at commit {', '.join(commits)}, newest {newest}; regenerated by "
              f"`python -m bench.report --experiment {experiment} --results-into FILE`")
    return "\n".join([to_markdown(header, rows), "", note, "", source])


def results_into(path: Path, experiment: str, block: str) -> None:
    """Replace what lies between ``<!-- results:EXPERIMENT -->`` and ``<!-- /results:EXPERIMENT -->`` in ``path``
    with ``block``; :class:`ReportError` when the file holds no such markers."""
    start, end = f"<!-- results:{experiment} -->", f"<!-- /results:{experiment} -->"
    text = path.read_text(encoding="utf-8")
    if start not in text or end not in text or text.index(start) > text.index(end):
        raise ReportError(f"--results-into {path}: no '{start}' ... '{end}' markers to write between")
    head, rest = text.split(start, 1)
    path.write_text(head + start + "\n" + block + "\n" + end + rest.split(end, 1)[1], encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
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
    ap.add_argument("--results-into", type=Path, action="append", default=[], metavar="FILE",
                    help="also write the results table (sequential streams only: every checkpoint) between the "
                         "experiment's results markers in FILE (README.md, docs/results.md; repeatable)")
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
        block = results_block(uri, args.experiment) if args.results_into else ""
        for path in args.results_into:
            if not path.is_file():
                raise cli.UserError(f"--results-into {path}: not a file")
            results_into(path, args.experiment, block)
    except (ReportError, TrackingError, cli.UserError) as e:
        return cli.report_user_error(e, args.verbose)
    if not args.no_mlflow:
        log_report(uri, args.experiment, out)
    print((out / "report.md").read_text() if "md" in formats else "")
    print(f"report written to {out}/" + (f" (HTML: {out / 'report.html'})" if "html" in formats else ""))
    return 0

