"""``python -m bench.run SWEEP.yaml``: validate a sweep, run one Ray Tune trial per grid point, summarise.

Every trial is one MLflow run tagged with a digest of its configuration (``editbench.config_digest``): the
tracking store is the record of what is done. ``--resume`` runs only the trials without a FINISHED run for their
digest. SIGINT/SIGTERM stop the sweep: trials still running end KILLED, the summary of what finished is printed.
No run of the sweep is left RUNNING on any exit path.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import cli
from bench.config import Sweep, SweepError, load_sweep, ship_data, trials, validate
from bench.schema import SUMMARY

log = logging.getLogger("bench.run")

SUMMARY_COLUMNS = ["method", "model", "dataset", "edit_batch_size", "edit_mode", "n_edits", *SUMMARY, "fit", "status"]
EXIT_CODES = {0: "every trial finished", 1: "some trial failed (its reason is printed)",
              2: "invalid sweep or option (one line, before Ray starts; no MLflow run is created)",
              130: "interrupted by SIGINT (Ctrl-C): running trials were stopped and their runs marked KILLED",
              143: "stopped by SIGTERM, as for SIGINT"}


def _parse(argv: list[str] | None) -> Any:
    ap = cli.parser("python -m bench.run", __doc__, EXIT_CODES,
                    "python -m bench.run sweeps/zsre.yaml --resume --tracking-uri sqlite:///./mlruns.db")
    ap.add_argument("sweep", help="sweep YAML file (see sweeps/)")
    ap.add_argument("--dry-run", action="store_true", help="validate and print the trial plan; load no weights")
    ap.add_argument("--resume", action="store_true",
                    help="run only the trials without a FINISHED run in the experiment (same config digest); "
                         "runs left RUNNING by a dead sweep are marked KILLED first")
    ap.add_argument("--retrain", action="store_true",
                    help="train learned editors even when a FINISHED run in the store was trained the same way "
                         "(same training key); by default its checkpoint is loaded instead")
    ap.add_argument("--address", default=None, help="Ray cluster address to join (default: start a local cluster)")
    ap.add_argument("--tracking-uri", default=None,
                    help="MLflow tracking URI (default: the sweep's, else sqlite:///./mlruns.db)")
    ap.add_argument("--max-concurrent", type=int, default=None, help="trials running at once (default: the sweep's)")
    ap.add_argument("--experiment", default=None, help="MLflow experiment name (default: the sweep's name)")
    ap.add_argument("-v", "--verbose", action="store_true", help="log progress; show tracebacks of errors")
    return ap.parse_args(argv)


def _print_plan(todo: list[dict[str, Any]], sweep: Sweep) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{sweep.name}: {len(todo)} trial(s)")
    for c in ("#", "method", "model", "dataset", "bs", "seed", "hparams", "digest"):
        t.add_column(c)
    for i, p in enumerate(todo):
        t.add_row(str(i), p["method_label"], p["model"]["name"], p["dataset"]["name"], str(p["edit_batch_size"]),
                  str(p["seed"]), str(p["hparams"]), p["config_digest"])
    Console(width=200).print(t)


def _trainable(config: dict[str, Any], todo: list[dict[str, Any]], bundle: dict[str, bytes], tracking_uri: str,
               experiment: str, sweep_id: str) -> None:
    """Ray Tune function trainable: one concrete trial -> one MLflow run. The data arrives with the trial (Ray's
    object store) and is unpacked on this node; the run is tagged with the node it ran on."""
    import socket

    import ray
    from ray import tune

    from bench.data import unpack_files
    from bench.trial import run_trial

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    point = dict(todo[int(config["trial"])])
    if point.get("shipped_data"):
        point["data_root"] = str(unpack_files(bundle))
    from bench.tracking import SWEEP_ID_TAG

    tags = {SWEEP_ID_TAG: sweep_id, "ray.node_id": ray.get_runtime_context().get_node_id(),
            "host": socket.gethostname()}
    run_trial(point, tracking_uri, experiment, report=tune.report, extra_tags=tags)


def _summary(tracking_uri: str, experiment: str, digests: set[str]) -> Any:
    """The newest run of each of the sweep's configurations (finished earlier or now), one row each."""
    import polars as pl

    from bench.tracking import CONFIG_DIGEST_TAG, runs_frame

    df = runs_frame(tracking_uri, experiment)
    col = f"t.{CONFIG_DIGEST_TAG}"
    if df.is_empty() or col not in df.columns:
        return pl.DataFrame()
    df = (df.filter(pl.col(col).is_in(sorted(digests))).sort("start_time", descending=True)
          .unique(subset=[col], keep="first", maintain_order=True))
    df = df.rename({"p.method": "method", "p.model": "model", "p.dataset": "dataset",
                    "p.edit_batch_size": "edit_batch_size", "p.edit_mode": "edit_mode"}, strict=False)
    df = df.with_columns(fit_column(df))
    cols = [c for c in SUMMARY_COLUMNS if c in df.columns]
    num = [c for c in cols if df.schema[c] in (pl.Float64, pl.Float32)]
    return df.select(cols).with_columns([pl.col(c).round(3) for c in num]).sort(["dataset", "model", "method"])


def resume_plan(uri: str, experiment: str, todo: list[dict], resume: bool) -> tuple[list[dict], list[dict], int]:
    """What a sweep runs: ``(to run, already FINISHED, stale runs closed)``. The trials of ``todo`` whose config
    digest has a FINISHED run in ``experiment`` are "already"; with ``resume`` they are left out, and every run
    still RUNNING in the experiment (its sweep died) is first marked KILLED with the reason as a tag; without it
    every trial runs again and nothing is closed."""
    from bench import tracking

    done = tracking.finished_digests(uri, experiment)
    already = [t for t in todo if t["config_digest"] in done]
    if not resume:
        return list(todo), already, 0
    stale = tracking.close_open_runs(uri, experiment, "KILLED",
                                     "left RUNNING by a sweep that died; marked when --resume started")
    return [t for t in todo if t["config_digest"] not in done], already, stale


def fit_column(df: Any) -> Any:
    """The summary's ``fit`` column: "converged (step S)", "budget† (step S, best B)" for a training its budget
    ended, "diverged‡ (step S, kept 0)" for one whose validation never beat the untrained editor's, or "-" for
    editors that do not train; "‡" after any fit that kept its untrained state, ", loaded" when the editor came
    from another run's training."""
    import polars as pl

    from bench.report import BUDGET_MARK, UNTRAINED_MARK
    from bench.tracking import FIT_KEPT_INITIAL_TAG, FIT_STOP_TAG, TRAINED_FROM_TAG
    from methods.base import BUDGET_LIMITED

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


def _print_summary(df: Any, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    from bench.report import BUDGET_MARK, UNTRAINED_MARK

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


def _finish(uri: str, experiment: str, sweep_text: str, sweep_path: str, df: Any) -> None:
    """Put the sweep file and its summary table in the experiment's description and write the report."""
    from bench import report, tracking

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


def check_devices(sweep: Sweep, source: str, cluster: dict[str, float] | None = None) -> None:
    """GPUs and CPUs a trial asks for must exist: on this machine, or in ``cluster`` (Ray's resources) when
    joining one. Raises :class:`SweepError` naming the key; a trial that cannot be placed would wait for ever."""
    import math

    import torch

    if cluster is None:
        gpus, cpus, where = float(torch.cuda.device_count()), float(os.cpu_count() or 1), "this machine"
    else:
        gpus, cpus, where = float(cluster.get("GPU", 0.0)), float(cluster.get("CPU", 0.0)), "the cluster"
    want_gpu = sweep.resources.gpu
    if sweep.device == "cuda" and gpus == 0:
        raise SweepError(f"{source}: device: cuda, but {where} has no visible GPU; use device: auto (or cpu), or "
                         "run where there is one")
    if want_gpu > 0 and gpus < math.ceil(want_gpu):
        raise SweepError(f"{source}: resources.gpu: {want_gpu} per trial, but {where} has {int(gpus)} GPU(s); "
                         "use resources.gpu: 0 here (a trial would wait for ever)")
    if sweep.resources.cpu > cpus:
        raise SweepError(f"{source}: resources.cpu: {sweep.resources.cpu} per trial, but {where} has {int(cpus)} "
                         f"CPU(s); use resources.cpu <= {int(cpus)}")


def ray_auth() -> str:
    """Make the driver present the cluster's token the way Ray documents it, before ``ray.init(address=...)``.

    ``RAY_AUTH_MODE=disabled`` (the user's own choice for a cluster started that way) is respected; otherwise the
    token comes from ``RAY_AUTH_TOKEN``, the file ``RAY_AUTH_TOKEN_PATH`` names, or ``~/.ray/auth_token``, and
    token mode is switched on for this process (Ray does not do it for a driver that joins). Authentication is
    never switched off here. Returns where the token came from; raises :class:`cli.UserError` when there is none.
    """
    mode = os.environ.get("RAY_AUTH_MODE", "").lower()
    if mode == "disabled":
        return "RAY_AUTH_MODE=disabled (set by you)"
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        where = "RAY_AUTH_TOKEN"
    else:
        named = os.environ.get("RAY_AUTH_TOKEN_PATH")
        path = Path(named).expanduser() if named else Path.home() / ".ray" / "auth_token"
        if not path.is_file() or not path.read_text().strip():
            src = f"RAY_AUTH_TOKEN_PATH={named}" if named else f"{path}"
            raise cli.UserError(
                f"--address: no Ray auth token ({src} has none); copy the head node's ~/.ray/auth_token here, or "
                "set RAY_AUTH_TOKEN to it or RAY_AUTH_TOKEN_PATH to its file (a cluster started with "
                "RAY_AUTH_MODE=disabled: set RAY_AUTH_MODE=disabled here too)")
        where = str(path)
    os.environ["RAY_AUTH_MODE"] = "token"
    return where


@dataclass
class _Stop:
    """The first SIGINT/SIGTERM seen. Either signal interrupts the main thread wherever it is: the driver shuts Ray
    down at once (running trials end with their workers; Tune's own graceful stop waits ~10 s for them) and marks
    their runs KILLED. The tracking store, not Tune's state, is what ``--resume`` reads."""

    signum: int | None = None

    def handler(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
            print(f"{signal.Signals(signum).name}: stopping the sweep", file=sys.stderr, flush=True)
        raise KeyboardInterrupt

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGINT)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    cli.setup_logging(args.verbose)
    from bench import tracking

    try:
        sweep = load_sweep(args.sweep)
        points = validate(sweep, args.sweep)
        todo = trials(sweep, points)
        if args.retrain:
            todo = [{**t, "retrain": True} for t in todo]
        if args.max_concurrent is not None and args.max_concurrent < 1:
            raise SweepError(f"--max-concurrent must be >= 1, got {args.max_concurrent}")
        if args.experiment is not None and not args.experiment.strip():
            raise SweepError("--experiment must not be blank")
        if args.experiment is not None and cli.control_characters(args.experiment):
            raise SweepError(f"--experiment holds control characters ({', '.join(cli.control_characters(args.experiment))}"
                             "); use printable text")
        if not args.address:
            check_devices(sweep, args.sweep)
        uri = tracking.check_tracking_uri(args.tracking_uri or sweep.tracking_uri or tracking.default_tracking_uri())
        if args.address and not uri.startswith(("http://", "https://")):
            raise SweepError(f"--address: trials on other nodes cannot reach {cli.cut(uri)}; pass --tracking-uri "
                             "http://HOST:PORT of an MLflow server every node reaches (mlflow server "
                             "--backend-store-uri sqlite:///runs.db --artifacts-destination DIR)")
    except (SweepError, tracking.TrackingError) as e:
        return cli.report_user_error(e, args.verbose)
    if args.dry_run:
        _print_plan(todo, sweep)
        return 0
    try:
        if args.address:
            log.info("Ray auth token from %s", ray_auth())
        tracking.ping(uri)
    except (tracking.TrackingError, cli.UserError) as e:
        return cli.report_user_error(e, args.verbose)

    stop = _Stop()
    old = {s: signal.signal(s, stop.handler) for s in (signal.SIGINT, signal.SIGTERM)}
    # Our handler stays in charge of SIGINT (Tune would otherwise install its own during fit()).
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    try:
        return _run(args, sweep, todo, uri, stop)
    except KeyboardInterrupt:
        return stop.exit_code
    except (SweepError, cli.UserError) as e:  # found on joining a cluster: no trial has run
        return cli.report_user_error(e, args.verbose)
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _run(args: Any, sweep: Sweep, todo: list[dict[str, Any]], uri: str, stop: _Stop) -> int:
    from bench import tracking

    experiment = args.experiment or sweep.name
    sweep_id = uuid.uuid4().hex[:8]
    sweep_text = Path(args.sweep).read_text(encoding="utf-8")
    everything = list(todo)
    # Schema and experiment are created here, in the driver, before any trial touches the store.
    tracking.prepare_experiment(uri, experiment, f"Sweep `{args.sweep}`\n\n```yaml\n{sweep_text}\n```")
    todo, already, stale = resume_plan(uri, experiment, everything, args.resume)
    if args.resume:
        print(f"resume: {len(already)} of {len(everything)} trial(s) already FINISHED in experiment "
              f"{experiment!r}; running {len(todo)}" + (f"; {stale} stale RUNNING run(s) marked KILLED" if stale
                                                       else ""), flush=True)
    elif already:
        print(f"note: {len(already)} of {len(everything)} trial(s) already have a FINISHED run in experiment "
              f"{experiment!r}; running all again (--resume runs only the rest)", flush=True)
    print(f"sweep {sweep.name}: {len(todo)} trial(s); MLflow {uri} experiment {experiment!r}; sweep_id {sweep_id}",
          flush=True)

    errors: list[str] = []
    try:
        if todo:
            if not args.address:  # trials on this machine share its cache: each data step once, here
                _prepare_shared(todo, uri, experiment, sweep_id)
            errors = _tune(args, sweep, todo, uri, experiment, sweep_id, stop)
    except KeyboardInterrupt:
        if stop.signum is None:  # an interrupt that came another way (a debugger, say)
            stop.signum = signal.SIGINT
    finally:
        reason = (f"interrupted by {signal.Signals(stop.signum).name}" if stop.signum
                  else "the trial ended without closing its run (its process died)")
        n = tracking.close_open_runs(uri, experiment, "KILLED", reason, sweep_id=sweep_id)
        if n:
            log.warning("%d run(s) of sweep %s marked KILLED: %s", n, sweep_id, reason)

    df = _summary(uri, experiment, {t["config_digest"] for t in everything})
    _print_summary(df, f"{experiment} (sweep_id {sweep_id})")
    if stop.signum:
        print(f"stopped by {signal.Signals(stop.signum).name}; --resume runs what did not finish", file=sys.stderr)
        return stop.exit_code
    _finish(uri, experiment, sweep_text, args.sweep, df)
    print(f"MLflow: {uri}  experiment {experiment!r}; browse with: python -m bench.ui --tracking-uri {uri}")
    for e in errors:
        print(f"trial failed: {e}", file=sys.stderr)
    return 1 if errors else 0


def _prepare_shared(todo: list[dict[str, Any]], uri: str, experiment: str, sweep_id: str) -> None:
    """Run the trials' data steps (model conversion, generated targets, locality verdicts, a prepared base model)
    once each in the driver, with all its threads, before Ray starts: two one-thread trials would otherwise
    compute the same cache entries side by side (bench.trial.prepare_shared)."""
    import time

    from bench.tracking import SWEEP_ID_TAG
    from bench.trial import prepare_shared

    t0 = time.time()
    lines = prepare_shared(todo, uri, experiment, {SWEEP_ID_TAG: sweep_id})
    if lines:
        print(f"prepared once for the trials ({time.time() - t0:.0f} s): " + "; ".join(lines), flush=True)


def trial_worker_env(cpus_per_trial: float) -> dict[str, str]:
    """Environment variables of the Ray workers that run the trials: ``EDITBENCH_THREADS`` (each trial's torch
    threads: its CPUs, the sweep's ``resources.cpu``, at least 1) and :data:`bench.metrics.ONE_ARENA_ENV` (a trial
    runs in a thread of its worker; with one malloc arena it reuses freed memory as
    :func:`bench.metrics.keep_freed_memory` intends: ENN's training steps 3.4 -> 2.1 s on SmolLM2). A value the
    driver's environment already sets is passed on instead."""
    from bench.metrics import ONE_ARENA_ENV

    return {"EDITBENCH_THREADS": str(max(1, int(cpus_per_trial))),
            **{k: os.environ.get(k, v) for k, v in ONE_ARENA_ENV.items()}}


def _tune(args: Any, sweep: Sweep, todo: list[dict[str, Any]], uri: str, experiment: str, sweep_id: str,
          stop: _Stop) -> list[str]:
    """Run ``todo`` as Tune trials; returns one line per failed trial. Runs of trials that a scheduler stopped
    early end KILLED, of failed ones FAILED (with the error), here in the driver."""
    import ray
    from ray import tune

    from bench import tracking

    worker_env = trial_worker_env(sweep.resources.cpu)
    if args.address:
        try:
            ray.init(address=args.address, logging_level=logging.WARNING, runtime_env={
                "working_dir": str(Path(__file__).resolve().parent.parent), "env_vars": worker_env,
                "excludes": [".venv", ".git", "*.db", "mlartifacts", "ray_results", "reports", "__pycache__"],
            })
        except Exception as e:  # refused token, wrong address, version mismatch: one line, not a traceback
            text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise cli.UserError(f"--address {args.address}: could not join the Ray cluster ({cli.cut(text)}); check "
                                "the address, and that RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH (default "
                                "~/.ray/auth_token) holds the head node's token") from None
        try:
            check_devices(sweep, args.sweep, ray.cluster_resources())
        except SweepError:
            ray.shutdown()
            raise
    else:
        # A short temp dir: Ray's unix sockets live under it and the path length is limited.
        tmp = os.environ.get("EDITBENCH_RAY_TMP", os.path.join(tempfile.gettempdir(), "ebray"))
        ray.init(_temp_dir=tmp, include_dashboard=False, logging_level=logging.WARNING,
                 runtime_env={"env_vars": worker_env})
    # ray.init installs a SIGTERM handler of its own (it logs a stack and exits 1): ours again, for a clean stop.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop.handler)
    try:
        scheduler = None
        if sweep.scheduler is not None:
            from bench.scheduling import PerPointASHA

            s = sweep.scheduler
            # The metric goes to the scheduler alone: trials of editors that never report it (FT) run to the end,
            # and Tune's strict check (every result must carry it) is off for that reason; validation made sure
            # the metric is one that learned editors report at each validation. Samples compete only with the
            # samples of their own grid point (MEND's learning rates with MEND's, not with ENN's).
            os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
            points = [t["point_digest"] for t in todo]
            scheduler = PerPointASHA(lambda trial: points[int(trial.config["trial"])], metric=s.metric,
                                     mode=s.mode, time_attr="training_iteration", grace_period=s.grace_period,
                                     max_t=s.max_t, reduction_factor=s.reduction_factor)
            silent = sorted({t["method"] for t in todo if s.metric not in _validation_metrics(t["method"])})
            if silent:
                print(f"scheduler: {', '.join(silent)} never report {s.metric}; their trials run to the end",
                      flush=True)
        bundle, todo = ship_data(sweep, todo)
        trainable = tune.with_parameters(_trainable, todo=todo, bundle=bundle, tracking_uri=uri,
                                         experiment=experiment, sweep_id=sweep_id)
        tuner = tune.Tuner(
            tune.with_resources(trainable, {"cpu": sweep.resources.cpu, "gpu": sweep.resources.gpu}),
            param_space={"trial": tune.grid_search(list(range(len(todo))))},
            tune_config=tune.TuneConfig(scheduler=scheduler,
                                        max_concurrent_trials=args.max_concurrent or sweep.max_concurrent),
            run_config=tune.RunConfig(name=f"{cli.slug(experiment)}-{sweep_id}",
                                      storage_path=str((Path.cwd() / "ray_results").resolve()), verbose=1),
        )
        results = tuner.fit()
        errors = []
        for r in results:
            t = todo[int(r.config["trial"])]
            if r.error is not None:
                text = str(r.error).strip()
                line = f"{t['run_name']}: {type(r.error).__name__}: {text.splitlines()[-1] if text else ''}"
                errors.append(line)
                tracking.close_open_runs(uri, experiment, "FAILED", line[:5000], sweep_id=sweep_id,
                                         digest=t["config_digest"])
            elif not stop.signum and "es" not in (r.metrics or {}):
                why = (f"stopped early by the {sweep.scheduler.type} scheduler ({sweep.scheduler.metric}) before "
                       "its evaluation" if sweep.scheduler else "ended before its evaluation")
                tracking.close_open_runs(uri, experiment, "KILLED", why, sweep_id=sweep_id,
                                         digest=t["config_digest"], also=("KILLED",))
        return errors
    finally:
        ray.shutdown()


def _validation_metrics(method: str) -> dict[str, str]:
    from methods import REGISTRY

    return REGISTRY[method].validation_metrics


if __name__ == "__main__":
    sys.exit(main())
