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
import time
import uuid
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench import cli, progress, tracking
from bench.config import Sweep, SweepError, load_sweep, trials, validate
from bench.summary import finish, print_summary, summary
from bench.tracking import SWEEP_ID_TAG
from bench.tuner import Stop, check_devices, ray_auth, run_tune

log = logging.getLogger("bench.run")


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
    t = Table(title=f"{sweep.name}: {len(todo)} trial(s)")
    for c in ("#", "method", "model", "dataset", "bs", "seed", "hparams", "digest"):
        t.add_column(c)
    for i, p in enumerate(todo):
        t.add_row(str(i), p["method_label"], p["model"]["name"], p["dataset"]["name"], str(p["edit_batch_size"]),
                  str(p["seed"]), str(p["hparams"]), p["config_digest"])
    Console(width=200).print(t)


def resume_plan(uri: str, experiment: str, todo: list[dict], resume: bool) -> tuple[list[dict], list[dict], int]:
    """What a sweep runs: ``(to run, already FINISHED, stale runs closed)``. The trials of ``todo`` whose config
    digest has a FINISHED run in ``experiment`` are "already"; with ``resume`` they are left out, and every run
    still RUNNING in the experiment (its sweep died) is first marked KILLED with the reason as a tag; without it
    every trial runs again and nothing is closed."""
    done = tracking.finished_digests(uri, experiment)
    already = [t for t in todo if t["config_digest"] in done]
    if not resume:
        return list(todo), already, 0
    stale = tracking.close_open_runs(uri, experiment, "KILLED",
                                     "left RUNNING by a sweep that died; marked when --resume started")
    return [t for t in todo if t["config_digest"] not in done], already, stale


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    cli.setup_logging(args.verbose)
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
        lacking = None  # a dry run validates a GPU sweep on a machine without one, and says what the run needs
        if not args.address:
            try:
                check_devices(sweep, args.sweep)
            except SweepError as e:
                if not args.dry_run:
                    raise
                lacking = str(e)
        uri = tracking.check_tracking_uri(args.tracking_uri or sweep.tracking_uri or tracking.default_tracking_uri())
        if args.address and not uri.startswith(("http://", "https://")):
            raise SweepError(f"--address: trials on other nodes cannot reach {cli.cut(uri)}; pass --tracking-uri "
                             "http://HOST:PORT of an MLflow server every node reaches (mlflow server "
                             "--backend-store-uri sqlite:///runs.db --artifacts-destination DIR)")
    except (SweepError, tracking.TrackingError) as e:
        return cli.report_user_error(e, args.verbose)
    if args.dry_run:
        _print_plan(todo, sweep)
        if lacking:
            print(f"valid, but not runnable here: {lacking}")
        return 0
    try:
        if args.address:
            log.info("Ray auth token from %s", ray_auth())
        tracking.ping(uri)
    except (tracking.TrackingError, cli.UserError) as e:
        return cli.report_user_error(e, args.verbose)

    stop = Stop()
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


def _run(args: Any, sweep: Sweep, todo: list[dict[str, Any]], uri: str, stop: Stop) -> int:
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
            errors = run_tune(args, sweep, todo, uri, experiment, sweep_id, stop)
    except KeyboardInterrupt:
        if stop.signum is None:  # an interrupt that came another way (a debugger, say)
            stop.signum = signal.SIGINT
    finally:
        reason = (f"interrupted by {signal.Signals(stop.signum).name}" if stop.signum
                  else "the trial ended without closing its run (its process died)")
        n = tracking.close_open_runs(uri, experiment, "KILLED", reason, sweep_id=sweep_id)
        if n:
            log.warning("%d run(s) of sweep %s marked KILLED: %s", n, sweep_id, reason)

    df = summary(uri, experiment, {t["config_digest"] for t in everything})
    print_summary(df, f"{experiment} (sweep_id {sweep_id})")
    if stop.signum:
        print(f"stopped by {signal.Signals(stop.signum).name}; --resume runs what did not finish", file=sys.stderr)
        return stop.exit_code
    finish(uri, experiment, sweep_text, args.sweep, df)
    print(f"MLflow: {uri}  experiment {experiment!r}; browse with: python -m bench.ui --tracking-uri {uri}")
    for e in errors:
        print(f"trial failed: {e}", file=sys.stderr)
    return 1 if errors else 0


def _prepare_shared(todo: list[dict[str, Any]], uri: str, experiment: str, sweep_id: str) -> None:
    """Run the trials' data steps (model conversion, generated targets, locality verdicts, a prepared base model)
    once each in the driver, with all its threads, before Ray starts: two one-thread trials would otherwise
    compute the same cache entries side by side (bench.trial.prepare_shared)."""
    from bench.trial import prepare_shared  # heavy (torch, transformers): not for a dry run

    t0 = time.time()
    progress.show_on(sys.stdout)  # minutes of model conversion, verdicts and statistics are not silent
    try:
        lines = prepare_shared(todo, uri, experiment, {SWEEP_ID_TAG: sweep_id})
    finally:
        progress.show_on(None)
    if lines:
        print(f"prepared once for the trials ({time.time() - t0:.0f} s): " + "; ".join(lines), flush=True)


if __name__ == "__main__":
    sys.exit(main())
