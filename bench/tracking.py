"""MLflow tracking: one run per trial (params, metrics, step metrics, per-edit table, editor checkpoint, tags).

This module and :mod:`bench.report` are the only places that touch MLflow. The default store is a sqlite file in
the working directory; its schema is created by the driver (:func:`prepare_experiment`) before trials start,
because concurrent first use of a sqlite store races.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import subprocess
import tempfile
import time
import warnings
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

# The store's side, re-exported: callers name everything MLflow through this module.
from bench.store import (KNOWN_SCHEMES, REPO_ROOT, TrackingError, check_tracking_uri, client,  # noqa: F401
                         default_tracking_uri, ping, prepare_experiment, sqlite_path)

log = logging.getLogger(__name__)


#: Tags of the suite's runs (one place for their names).
SWEEP_ID_TAG = "sweep_id"
#: The commit the code of the run was at (``-dirty`` with uncommitted changes).
GIT_COMMIT_TAG = "git.commit"


CONFIG_DIGEST_TAG = "editbench.config_digest"


END_REASON_TAG = "editbench.end_reason"


KIND_TAG = "editbench.kind"


#: Why the editor's training ended (``methods.base.STOP_REASONS``): converged, diverged (kept its untrained
#: state), or budget-limited (max_steps, max_seconds), or untrained (editors without a fit step).
FIT_STOP_TAG = "editbench.fit_stop"


#: Set on runs whose learned editor kept its untrained state (``FitResult.kept_initial_text``): step 0's and the
#: best later validation's loss and ES, and the validation ES at each validation.
FIT_KEPT_INITIAL_TAG = "editbench.fit_kept_initial"


#: The checkpoint selection that chose a learned editor's state (``methods.budget.Budget.selection``).
FIT_SELECT_TAG = "editbench.fit_select"


#: Digest of everything that determines a learned editor's training (see ``bench.trial.training_keys``), and the
#: run whose checkpoint a trial loaded instead of training.
TRAIN_KEY_TAG = "editbench.train_key"


#: The training key without the step and time budget (``bench.trial.training_keys``): runs whose fit converged
#: under it hold the same editor trained to convergence, whatever cap they ran under.
CONVERGENCE_KEY_TAG = "editbench.convergence_key"


TRAINED_FROM_TAG = "editbench.trained_from"


#: Why a trial loaded its source's editor: "training key" (trained exactly as this trial would) or "converged"
#: (the same editor trained to convergence; ``reuse_converged``).
REUSE_TAG = "editbench.reuse"


#: The step an interrupted training continued from (its saved state in the cache), when it did.
FIT_RESUMED_TAG = "editbench.fit_resumed_from"


#: A sampled trial's grid point (its samples compete under a scheduler) and the values drawn for it (JSON).
POINT_DIGEST_TAG = "editbench.point_digest"


SAMPLED_TAG = "editbench.sampled"


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> {"a.b.c": value}; lists are kept as their string form."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def environment_tags(device: str) -> dict[str, str]:
    """Git commit, package versions and device, for reproducibility."""
    tags = {"device": device, "python": platform.python_version(), "host.cpus": str(os.cpu_count())}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True, text=True,
                               timeout=5).stdout.strip()
        tags[GIT_COMMIT_TAG] = commit + ("-dirty" if dirty else "") if commit else "unknown"
    except (OSError, subprocess.SubprocessError):
        tags[GIT_COMMIT_TAG] = "unknown"
    for pkg in ("torch", "transformers", "mlflow", "ray", "editbench"):
        try:
            tags[f"version.{pkg}"] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return tags


class TrialRun:
    """A live MLflow run for one trial; all writes go through one client."""

    def __init__(self, uri: str, run: Any) -> None:
        self.uri = uri
        self.client = client(uri)
        self.run_id: str = run.info.run_id
        self.artifact_uri: str = run.info.artifact_uri

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param  # heavy: MLflow loads when a run is written

        flat = flatten(params)
        items = [Param(k, str(v)[:6000]) for k, v in flat.items()]
        for i in range(0, len(items), 90):
            self.client.log_batch(self.run_id, params=items[i : i + 90])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric  # heavy: MLflow loads when a run is written

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items()
                 if v is not None and not math.isnan(float(v))]
        for i in range(0, len(items), 900):
            self.client.log_batch(self.run_id, metrics=items[i : i + 900])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        p = Path(path)
        if p.is_dir():
            self.client.log_artifacts(self.run_id, str(p), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(p), artifact_path)

    def log_dataset_inputs(self, inputs: Sequence[tuple[str, str, Any, str, Mapping[str, Any]]]) -> None:
        """Log each ``(name, context, datasets.Dataset, digest, load_dataset call)`` as an MLflow dataset input
        (``mlflow.data.from_huggingface``; the context is the split it served), so the UI's Dataset column and
        filter show what the run was measured on. The digest is the data's own (a file's sha256, a Hub split's
        fingerprint), cut to the 36 characters MLflow keeps."""
        import mlflow.data  # heavy: MLflow loads when a run is written
        from mlflow.entities import DatasetInput, InputTag

        items = []
        for name, context, ds, digest, call in inputs:
            with warnings.catch_warnings():  # its schema inference warns about integer columns (ids): not a model
                warnings.simplefilter("ignore", UserWarning)
                d = mlflow.data.from_huggingface(ds, path=call["path"], data_files=call.get("data_files"),
                                                 revision=call.get("revision"), name=name, digest=digest[:36])
                entity = d._to_mlflow_entity()
            items.append(DatasetInput(entity, tags=[InputTag("mlflow.data.context", context)]))
        if not items:
            return
        for attempt in range(5):
            try:
                self.client.log_inputs(self.run_id, datasets=items)
                return
            except Exception as e:  # noqa: BLE001 - MlflowException / RestException carry the store's error as text
                # Two trials that log the same dataset first at once both find it missing and both insert it; the
                # store's unique key refuses the second (IntegrityError, rolled back). Once the first has
                # committed, a retry finds the row and only links it to this run.
                if attempt == 4 or not _duplicate_key(e):
                    raise
                log.info("dataset inputs of run %s: another run registered the same dataset at once; retrying",
                         self.run_id)
                time.sleep(0.2 * (attempt + 1))

    def log_table(self, rows: list[dict[str, Any]], name: str = "per_edit.parquet") -> None:
        """Write rows as a parquet artifact (polars)."""
        import polars as pl  # lazily: importing polars makes blocking waits ignore Ctrl-C until they end
        with tempfile.TemporaryDirectory() as tmp:
            f = Path(tmp) / name
            pl.DataFrame(rows, infer_schema_length=None).write_parquet(f)
            self.log_artifact(f)


def _duplicate_key(e: BaseException) -> bool:
    """Whether ``e`` is a store's unique-key refusal (SQLAlchemy's IntegrityError, directly or through the REST
    server, whose message keeps the SQL error's text and the SQLAlchemy error code ``gkpj``)."""
    text = str(e)
    return any(m in text for m in ("IntegrityError", "UNIQUE constraint", "duplicate key", "Duplicate entry", "/gkpj"))


@contextmanager
def trial_run(uri: str, experiment: str, run_name: str, tags: Mapping[str, str]) -> Iterator[TrialRun]:
    """Open one MLflow run; it ends FINISHED on success and FAILED (with the error as a tag) on an exception."""
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else prepare_experiment(uri, experiment)
    run = c.create_run(exp_id, run_name=run_name, tags=dict(tags))
    tr = TrialRun(uri, run)
    try:
        yield tr
    except (KeyboardInterrupt, SystemExit) as e:
        tr.set_tags({END_REASON_TAG: f"interrupted ({type(e).__name__})"})
        c.set_terminated(tr.run_id, "KILLED")
        raise
    except BaseException as e:
        tr.set_tags({"error": f"{type(e).__name__}: {e}"[:5000]})
        c.set_terminated(tr.run_id, "FAILED")
        raise
    c.set_terminated(tr.run_id, "FINISHED")


def close_open_runs(uri: str, experiment: str, status: str, reason: str, sweep_id: str | None = None,
                    digest: str | None = None, also: tuple[str, ...] = ()) -> int:
    """End every RUNNING run of ``experiment`` (only those tagged ``sweep_id`` and/or config ``digest`` when
    given) with ``status`` (KILLED or FAILED) and ``reason`` as a tag; runs in a status of ``also`` get the same
    status and reason (a driver that knows better than the trial, say a scheduler's stop). Returns the count."""
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return 0
    open_states = ("RUNNING", *also)
    flt = " and ".join([*([f"tags.{SWEEP_ID_TAG} = '{sweep_id}'"] if sweep_id else []),
                        *([f"tags.`{CONFIG_DIGEST_TAG}` = '{digest}'"] if digest else [])])
    if not also:
        flt = " and ".join(["attributes.status = 'RUNNING'", *([flt] if flt else [])])
    n = 0
    for r in c.search_runs([exp.experiment_id], filter_string=flt, max_results=5000):
        if r.info.status not in open_states:
            continue
        c.set_tag(r.info.run_id, END_REASON_TAG, reason)
        if r.info.status == "RUNNING" or r.info.status != status:
            c.set_terminated(r.info.run_id, status)
        n += 1
    return n


def runs_frame(uri: str, experiment: str, filter_string: str = "") -> Any:
    """All runs of an experiment as a polars DataFrame: run id/name/status/start time (ms), params (``p.``), metrics,
    tags (``t.``)."""
    import polars as pl  # lazily: importing polars makes blocking waits ignore Ctrl-C until they end
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return pl.DataFrame()
    rows = []
    token = None
    while True:
        page = c.search_runs([exp.experiment_id], filter_string=filter_string, max_results=1000, page_token=token)
        for r in page:
            row: dict[str, Any] = {"run_id": r.info.run_id, "run_name": r.info.run_name, "status": r.info.status,
                                   "start_time": r.info.start_time}
            row.update({f"p.{k}": v for k, v in r.data.params.items()})
            row.update(r.data.metrics)
            row.update({f"t.{k}": v for k, v in r.data.tags.items() if not k.startswith("mlflow.")})
            rows.append(row)
        token = page.token
        if not token:
            break
    return pl.DataFrame(rows, infer_schema_length=None) if rows else pl.DataFrame()


def finished_digests(uri: str, experiment: str) -> set[str]:
    """Config digests that have a FINISHED run in ``experiment`` (empty when it does not exist yet)."""
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return set()
    out: set[str] = set()
    token = None
    while True:
        page = c.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED'", max_results=1000,
                             page_token=token)
        out.update(r.data.tags[CONFIG_DIGEST_TAG] for r in page if CONFIG_DIGEST_TAG in r.data.tags)
        token = page.token
        if not token:
            return out


def find_trained(uri: str, train_key: str, converged: bool = False) -> Any | None:
    """The newest FINISHED run in any experiment of the store whose editor was trained under ``train_key`` and
    that logged an ``editor`` checkpoint (and did not itself load one), or None. With ``converged``,
    ``train_key`` is a convergence key (:data:`CONVERGENCE_KEY_TAG`) and only runs whose fit converged count."""
    c = client(uri)
    ids = [e.experiment_id for e in c.search_experiments()]
    if not ids:
        return None
    query = f"attributes.status = 'FINISHED' and tags.`{TRAIN_KEY_TAG}` = '{train_key}'"
    if converged:
        query = (f"attributes.status = 'FINISHED' and tags.`{CONVERGENCE_KEY_TAG}` = '{train_key}' and "
                 f"tags.`{FIT_STOP_TAG}` = 'converged'")
    runs = c.search_runs(ids, filter_string=query, order_by=["attributes.start_time DESC"], max_results=50)
    for r in runs:
        if TRAINED_FROM_TAG in r.data.tags:
            continue  # a reuse points at its source; take the source itself
        if any(a.path == "editor" for a in c.list_artifacts(r.info.run_id)):
            return r
    return None


def download_dir(uri: str, run_id: str, path: str, dest: str | Path) -> Path:
    """Download artifact folder ``path`` of ``run_id`` into ``dest``; returns the local folder."""
    return Path(client(uri).download_artifacts(run_id, path, str(dest)))
