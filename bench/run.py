"""``python -m bench.run SWEEP.yaml``: validate a sweep, run one Ray Tune trial per grid point, summarise.

Exit codes: 0 all trials finished; 1 some trial failed (its reason is printed); 2 the sweep is invalid (one line
naming the key or file, printed before Ray starts; no MLflow run is created).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

from bench.config import Sweep, SweepError, TuneSpec, load_sweep, validate

log = logging.getLogger("bench.run")

SUMMARY_COLUMNS = [
    "method", "model", "dataset", "edit_batch_size", "n_edits", "es", "es_ci95", "edit_acc", "drawdown",
    "loc_agree", "loc_kl", "edit_time_s", "edit_peak_mem_mb", "train_time_s", "status",
]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    ap.add_argument("sweep", help="sweep YAML file (see sweeps/)")
    ap.add_argument("--dry-run", action="store_true", help="validate and print the trial plan; load no weights")
    ap.add_argument("--address", help="Ray cluster address to join (default: start a local cluster)")
    ap.add_argument("--tracking-uri", help="MLflow tracking URI (default: the sweep's, else sqlite:///./mlruns.db)")
    ap.add_argument("--max-concurrent", type=int, help="trials running at once (default: the sweep's)")
    ap.add_argument("--experiment", help="MLflow experiment name (default: the sweep's name)")
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap.parse_args(argv)


def _print_plan(points: list[dict[str, Any]], sweep: Sweep) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{sweep.name}: {len(points)} grid point(s) x {sweep.num_samples} sample(s)")
    for c in ("#", "method", "model", "dataset", "bs", "seed", "hparams", "tuned"):
        t.add_column(c)
    for i, p in enumerate(points):
        t.add_row(str(i), p["method_label"], p["model"]["name"], p["dataset"]["name"], str(p["edit_batch_size"]),
                  str(p["seed"]), str(p["hparams"]), ", ".join(p["tuned"]) or "-")
    Console().print(t)


def _trainable(config: dict[str, Any], points: list[dict[str, Any]], tracking_uri: str, experiment: str,
               sweep_id: str) -> None:
    """Ray Tune function trainable: one grid point (plus sampled values) -> one MLflow run."""
    from ray import tune

    from bench.trial import run_trial

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    point = dict(points[int(config["point"])])
    sampled = {k.split("/", 1)[1]: v for k, v in (config.get("sampled") or {}).items()
               if k.split("/", 1)[0] == str(config["point"])}
    point["hparams"] = {**point["hparams"], **sampled}
    if sampled:
        point["run_name"] += "/" + ",".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                            for k, v in sampled.items())
    run_trial(point, tracking_uri, experiment, report=tune.report, extra_tags={"sweep_id": sweep_id})


def _summary(tracking_uri: str, experiment: str, sweep_id: str) -> Any:
    import polars as pl

    from bench.tracking import runs_frame

    df = runs_frame(tracking_uri, experiment, f"tags.sweep_id = '{sweep_id}'")
    if df.is_empty():
        return df
    df = df.rename({"p.method": "method", "p.model": "model", "p.dataset": "dataset",
                    "p.edit_batch_size": "edit_batch_size"}, strict=False)
    cols = [c for c in SUMMARY_COLUMNS if c in df.columns]
    num = [c for c in cols if df.schema[c] in (pl.Float64, pl.Float32)]
    return df.select(cols).with_columns([pl.col(c).round(3) for c in num]).sort(["dataset", "model", "method"])


def _finish(uri: str, experiment: str, sweep_text: str, sweep_path: str, df: Any) -> None:
    """Put the sweep file and its summary table in the experiment's description and write the report."""
    from bench import report, tracking

    summary = report.to_markdown(df.columns, [["" if v is None else str(v) for v in r] for r in df.iter_rows()])
    tracking.prepare_experiment(
        uri, experiment, f"Sweep `{sweep_path}`\n\n```yaml\n{sweep_text}\n```\n\n## Last summary\n\n{summary}\n")
    out = Path("reports") / experiment
    try:
        report.build(uri, experiment, out, ["md", "csv", "tex", "html"])
        report.log_report(uri, experiment, out)
        print(f"report: {out / 'report.md'} and {out / 'report.html'}")
    except Exception as e:  # a report problem must not hide the sweep's own result
        log.warning("report for %s not written: %s", experiment, e)
        print(f"report not written: {e}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    try:
        sweep = load_sweep(args.sweep)
        points = validate(sweep, args.sweep)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.max_concurrent is not None and args.max_concurrent < 1:
        print(f"error: --max-concurrent must be >= 1, got {args.max_concurrent}", file=sys.stderr)
        return 2
    if args.dry_run:
        _print_plan(points, sweep)
        return 0

    import ray
    from ray import tune

    from bench import tracking

    uri = args.tracking_uri or sweep.tracking_uri or tracking.default_tracking_uri()
    experiment = args.experiment or sweep.name
    sweep_id = uuid.uuid4().hex[:8]
    sweep_text = Path(args.sweep).read_text()
    # Schema and experiment are created here, in the driver, before any trial touches the store.
    tracking.prepare_experiment(uri, experiment, f"Sweep `{args.sweep}`\n\n```yaml\n{sweep_text}\n```")
    print(f"sweep {sweep.name}: {len(points)} grid point(s) x {sweep.num_samples} sample(s); "
          f"MLflow {uri} experiment {experiment!r}; sweep_id {sweep_id}", flush=True)

    sampled: dict[str, Any] = {}
    for i, p in enumerate(points):
        for k, spec in p["tuned"].items():
            sampled[f"{i}/{k}"] = TuneSpec(**spec).domain()
    param_space: dict[str, Any] = {"point": tune.grid_search(list(range(len(points))))}
    if sampled:
        param_space["sampled"] = sampled

    if args.address:
        ray.init(address=args.address, runtime_env={
            "working_dir": str(Path(__file__).resolve().parent.parent),
            "excludes": [".venv", ".git", "mlruns.db", "mlartifacts", "ray_results", "reports"],
        }, logging_level=logging.WARNING)
    else:
        # A short temp dir: Ray's unix sockets live under it and the path length is limited.
        tmp = os.environ.get("EDITBENCH_RAY_TMP", os.path.join(tempfile.gettempdir(), "ebray"))
        ray.init(_temp_dir=tmp, include_dashboard=False, logging_level=logging.WARNING,
                 runtime_env={"env_vars": {"EDITBENCH_THREADS": str(max(1, int(sweep.resources.cpu)))}})
    scheduler = None
    tune_kwargs: dict[str, Any] = {}
    if sweep.scheduler is not None:
        from ray.tune.schedulers import ASHAScheduler

        s = sweep.scheduler
        scheduler = ASHAScheduler(time_attr="training_iteration", grace_period=s.grace_period, max_t=s.max_t,
                                  reduction_factor=s.reduction_factor)
        tune_kwargs = {"metric": s.metric, "mode": s.mode}
    trainable = tune.with_parameters(_trainable, points=points, tracking_uri=uri, experiment=experiment,
                                     sweep_id=sweep_id)
    resources = {"cpu": sweep.resources.cpu, "gpu": sweep.resources.gpu}
    tuner = tune.Tuner(
        tune.with_resources(trainable, resources),
        param_space=param_space,
        tune_config=tune.TuneConfig(num_samples=sweep.num_samples, scheduler=scheduler,
                                    max_concurrent_trials=args.max_concurrent or sweep.max_concurrent, **tune_kwargs),
        run_config=tune.RunConfig(name=f"{experiment}-{sweep_id}",
                                  storage_path=str((Path.cwd() / "ray_results").resolve()), verbose=1),
    )
    results = tuner.fit()
    errors = list(results.errors)
    ray.shutdown()

    df = _summary(uri, experiment, sweep_id)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{experiment} (sweep_id {sweep_id})")
    for c in df.columns:
        table.add_column(c)
    for row in df.iter_rows():
        table.add_row(*["" if v is None else str(v) for v in row])
    Console(width=200).print(table)
    _finish(uri, experiment, sweep_text, args.sweep, df)
    print(f"MLflow: {uri}  experiment {experiment!r}; browse with: python -m bench.ui --tracking-uri {uri}")
    if errors:
        for e in errors:
            print(f"trial failed: {type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}",
                  file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
