"""Ray Tune's side of a sweep: one Tune trial per concrete trial, each one MLflow run, on this machine or on a
cluster joined with its token; trials named readably in Tune's status table; the devices a trial asks for
checked before it is placed."""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import cli, tracking
from bench.config import Sweep, SweepError, ship_data
from bench.data import unpack_files
from bench.memory import ONE_ARENA_ENV
from bench.tracking import SWEEP_ID_TAG
from methods import REGISTRY

log = logging.getLogger(__name__)


def _short(v: Any) -> str:
    """A hyper-parameter value as a status table shows it: floats with 3 significant digits."""
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def trial_labels(todo: list[dict[str, Any]]) -> list[str]:
    """One readable label per trial, in ``todo``'s order, for Ray Tune's status table: ``#index`` then the method
    label, model and dataset, then what tells the trial apart from the others of its method: the hyper-parameters
    whose values differ among them (grid axes and drawn samples), and the batch size, edit mode and seed where the
    sweep has more than one. Equal labels stay told apart by their index."""
    varies = {k: len({str(t.get(k)) for t in todo}) > 1 for k in ("edit_batch_size", "edit_mode", "seed")}
    by_method: dict[str, list[dict[str, Any]]] = {}
    for t in todo:
        by_method.setdefault(t["method_label"], []).append(t)
    keys = {m: [k for k in sorted({k for t in ts for k in t["hparams"]})
                if len({_short(t["hparams"].get(k)) for t in ts}) > 1] for m, ts in by_method.items()}
    out = []
    for i, t in enumerate(todo):
        parts = [f"#{i}", t["method_label"], t["model"]["name"], t["dataset"]["name"]]
        parts += [f"{k}={_short(t['hparams'].get(k))}" for k in keys[t["method_label"]]]
        parts += [f"bs={t['edit_batch_size']}"] if varies["edit_batch_size"] else []
        parts += [str(t["edit_mode"])] if varies["edit_mode"] else []
        parts += [f"seed={t['seed']}"] if varies["seed"] else []
        out.append(" ".join(parts))
    return out


def _trainable(config: dict[str, Any], todo: list[dict[str, Any]], bundle: dict[str, bytes], tracking_uri: str,
               experiment: str, sweep_id: str) -> None:
    """Ray Tune function trainable: one concrete trial -> one MLflow run. The data arrives with the trial (Ray's
    object store) and is unpacked on this node; the run is tagged with the node it ran on."""
    import ray  # heavy: Ray and the trial's torch stack load where trials run, not for a dry run
    from ray import tune

    from bench.trial import run_trial  # heavy (torch, transformers): in the Ray worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    point = dict(todo[int(config["trial"])])
    if point.get("shipped_data"):
        point["data_root"] = str(unpack_files(bundle))
    tags = {SWEEP_ID_TAG: sweep_id, "ray.node_id": ray.get_runtime_context().get_node_id(),
            "host": socket.gethostname()}
    run_trial(point, tracking_uri, experiment, report=tune.report, extra_tags=tags)


def check_devices(sweep: Sweep, source: str, cluster: dict[str, float] | None = None) -> None:
    """GPUs and CPUs a trial asks for must exist: on this machine, or in ``cluster`` (Ray's resources) when
    joining one. Raises :class:`SweepError` naming the key; a trial that cannot be placed would wait for ever."""
    import torch  # heavy: only when a sweep is about to run

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
class Stop:
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


def trial_worker_env(cpus_per_trial: float) -> dict[str, str]:
    """Environment variables of the Ray workers that run the trials: ``EDITBENCH_THREADS`` (each trial's torch
    threads: its CPUs, the sweep's ``resources.cpu``, at least 1) and :data:`bench.memory.ONE_ARENA_ENV` (a trial
    runs in a thread of its worker; with one malloc arena it reuses freed memory as
    :func:`bench.memory.keep_freed_memory` intends: ENN's training steps 3.4 -> 2.1 s on SmolLM2). A value the
    driver's environment already sets is passed on instead."""
    return {"EDITBENCH_THREADS": str(max(1, int(cpus_per_trial))),
            **{k: os.environ.get(k, v) for k, v in ONE_ARENA_ENV.items()}}


def run_tune(args: Any, sweep: Sweep, todo: list[dict[str, Any]], uri: str, experiment: str, sweep_id: str,
             stop: Stop) -> list[str]:
    """Run ``todo`` as Tune trials; returns one line per failed trial. Runs of trials that a scheduler stopped
    early end KILLED, of failed ones FAILED (with the error), here in the driver."""
    import ray  # heavy (seconds): only when trials run
    from ray import tune

    _start_ray(args, sweep)
    # ray.init installs a SIGTERM handler of its own (it logs a stack and exits 1): ours again, for a clean stop.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop.handler)
    try:
        scheduler = _scheduler(sweep, todo)
        bundle, todo = ship_data(sweep, todo)
        labels = trial_labels(todo)
        trainable = tune.with_parameters(_trainable, todo=todo, bundle=bundle, tracking_uri=uri,
                                         experiment=experiment, sweep_id=sweep_id)
        tuner = tune.Tuner(
            tune.with_resources(trainable, {"cpu": sweep.resources.cpu, "gpu": sweep.resources.gpu}),
            param_space={"trial": tune.grid_search(list(range(len(todo))))},
            tune_config=tune.TuneConfig(scheduler=scheduler,
                                        max_concurrent_trials=args.max_concurrent or sweep.max_concurrent,
                                        # the status table's names: method, model, dataset and what varies
                                        trial_name_creator=lambda trial: labels[int(trial.config["trial"])],
                                        trial_dirname_creator=lambda trial: f"trial_{int(trial.config['trial'])}"),
            run_config=tune.RunConfig(name=f"{cli.slug(experiment)}-{sweep_id}",
                                      storage_path=str((Path.cwd() / "ray_results").resolve()), verbose=1),
        )
        return _close_runs(tuner.fit(), sweep, todo, uri, experiment, sweep_id, stop)
    finally:
        ray.shutdown()


def _start_ray(args: Any, sweep: Sweep) -> None:
    """Join the cluster at ``--address`` (with its token; its devices checked), or start a local one."""
    import ray  # heavy (seconds): only when trials run

    worker_env = trial_worker_env(sweep.resources.cpu)
    if not args.address:
        # A short temp dir: Ray's unix sockets live under it and the path length is limited.
        tmp = os.environ.get("EDITBENCH_RAY_TMP", os.path.join(tempfile.gettempdir(), "ebray"))
        ray.init(_temp_dir=tmp, include_dashboard=False, logging_level=logging.WARNING,
                 runtime_env={"env_vars": worker_env})
        return
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


def _scheduler(sweep: Sweep, todo: list[dict[str, Any]]) -> Any:
    """The sweep's trial scheduler (ASHA per grid point), or ``None``."""
    if sweep.scheduler is None:
        return None
    from bench.scheduling import PerPointASHA  # imports Ray's schedulers

    s = sweep.scheduler
    # The metric goes to the scheduler alone: trials of editors that never report it (FT) run to the end, and
    # Tune's strict check (every result must carry it) is off for that reason; validation made sure the metric is
    # one that learned editors report at each validation. Samples compete only with the samples of their own grid
    # point (MEND's learning rates with MEND's, not with ENN's).
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    points = [t["point_digest"] for t in todo]
    silent = sorted({t["method"] for t in todo if s.metric not in _validation_metrics(t["method"])})
    if silent:
        print(f"scheduler: {', '.join(silent)} never report {s.metric}; their trials run to the end", flush=True)
    return PerPointASHA(lambda trial: points[int(trial.config["trial"])], metric=s.metric, mode=s.mode,
                        time_attr="training_iteration", grace_period=s.grace_period, max_t=s.max_t,
                        reduction_factor=s.reduction_factor)


def _close_runs(results: Any, sweep: Sweep, todo: list[dict[str, Any]], uri: str, experiment: str, sweep_id: str,
                stop: Stop) -> list[str]:
    """After Tune: the run of each failed trial ends FAILED with its error, of each trial a scheduler stopped
    before its evaluation KILLED with why; returns one line per failed trial."""
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
            why = (f"stopped early by the {sweep.scheduler.type} scheduler ({sweep.scheduler.metric}) before its "
                   "evaluation" if sweep.scheduler else "ended before its evaluation")
            tracking.close_open_runs(uri, experiment, "KILLED", why, sweep_id=sweep_id, digest=t["config_digest"],
                                     also=("KILLED",))
    return errors


def _validation_metrics(method: str) -> dict[str, str]:
    return REGISTRY[method].validation_metrics
