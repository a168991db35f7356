"""MLflow tracking: one run per trial (params, metrics, step metrics, per-edit table, editor checkpoint, tags).

This module and :mod:`bench.report` are the only places that touch MLflow. The default store is a sqlite file in
the working directory; its schema is created by the driver (:func:`prepare_experiment`) before trials start,
because concurrent first use of a sqlite store races.
"""

from __future__ import annotations

import logging
import os
import platform
import subprocess
import tempfile
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
NOTE_TAG = "mlflow.note.content"
#: Tags of the suite's runs (one place for their names).
SWEEP_ID_TAG = "sweep_id"
CONFIG_DIGEST_TAG = "editbench.config_digest"
END_REASON_TAG = "editbench.end_reason"
KIND_TAG = "editbench.kind"
#: Why the editor's training ended (``methods.base.STOP_REASONS``): converged, diverged (kept its untrained
#: state), or budget-limited (max_steps, max_seconds), or untrained (editors without a fit step).
FIT_STOP_TAG = "editbench.fit_stop"
#: Set on runs whose learned editor kept its untrained state (``FitResult.kept_initial_text``): step 0's and the
#: best later validation's loss and ES, and the validation ES at each validation.
FIT_KEPT_INITIAL_TAG = "editbench.fit_kept_initial"
#: The checkpoint selection that chose a learned editor's state (``methods.base.Budget.selection``).
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

#: URI schemes MLflow 3 serves a tracking store from (``postgresql+psycopg2`` etc. count as their base).
KNOWN_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks")


class TrackingError(ValueError):
    """A tracking URI that cannot be used; ``str(err)`` is one line naming it and what would be valid."""


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative to the working directory when not absolute)."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def check_tracking_uri(uri: str, must_exist: bool = False, writable: bool = True) -> str:
    """Check a tracking URI before anything touches it and return it normalised (sqlite paths made absolute,
    so Ray workers in other folders open the same file).

    The scheme must be one MLflow serves (``sqlite:///PATH.db``, ``http(s)://``, a database URL); MLflow 3 refuses
    plain paths and ``file:`` stores. For sqlite: with ``must_exist`` the file must be there (read-only commands
    never create a store); with ``writable`` its folder must accept new files. Raises :class:`TrackingError`.
    """
    from bench.cli import UserError, check_writable_dir, cut

    shown = cut(uri)
    if "://" not in uri or uri.startswith("file:"):
        raise TrackingError(f"tracking URI {shown!r}: not a store MLflow 3 uses; give sqlite:///PATH.db or an "
                            "MLflow server http://HOST:PORT")
    scheme = uri.split("://", 1)[0].split("+", 1)[0].lower()
    if scheme not in KNOWN_SCHEMES:
        raise TrackingError(f"tracking URI {shown!r}: unknown scheme {scheme!r}; valid: sqlite:///PATH.db, "
                            "http(s)://HOST:PORT, postgresql://, mysql://, mssql://, databricks")
    if scheme != "sqlite":
        return uri
    db = sqlite_path(uri)
    if db is None or not str(db):
        raise TrackingError(f"tracking URI {shown!r}: a sqlite store is sqlite:///PATH.db (three slashes, then "
                            "the file)")
    db = db.expanduser().resolve()
    if db.is_dir():
        raise TrackingError(f"tracking URI {shown!r}: {db} is a directory; name a .db file")
    if must_exist and not db.exists():
        raise TrackingError(f"no MLflow store at {db}; run a sweep first (python -m bench.run sweeps/zsre.yaml) "
                            "or pass --tracking-uri")
    if writable:
        if not db.parent.exists():
            raise TrackingError(f"tracking URI {shown!r}: folder {db.parent} does not exist")
        try:
            check_writable_dir(db.parent, "tracking store folder")
        except UserError as e:
            raise TrackingError(str(e)) from None
        if db.exists() and not os.access(db, os.W_OK):
            raise TrackingError(f"tracking store {db}: not writable")
    return f"sqlite:///{db}"


def ping(uri: str, timeout: float = 10.0) -> None:
    """For an MLflow server URI, make sure it answers (``/health``); raises :class:`TrackingError` otherwise."""
    import urllib.error
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            if r.status == 200:
                return
            raise TrackingError(f"MLflow server {uri} answered /health with HTTP {r.status}")
    except (urllib.error.URLError, OSError) as e:
        raise TrackingError(f"MLflow server {uri} does not answer ({getattr(e, 'reason', e)}); start it or fix "
                            "--tracking-uri") from None


def default_tracking_uri() -> str:
    """``sqlite:///<cwd>/mlruns.db``, absolute so Ray workers (which run elsewhere) find the same store."""
    return f"sqlite:///{(Path.cwd() / 'mlruns.db').resolve()}"


def _artifact_root(uri: str) -> str | None:
    """Artifact location for new experiments of a local sqlite store: ``mlartifacts/`` beside the file."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        return (db.parent / "mlartifacts").resolve().as_uri()
    return None


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
        tags["git.commit"] = commit + ("-dirty" if dirty else "") if commit else "unknown"
    except (OSError, subprocess.SubprocessError):
        tags["git.commit"] = "unknown"
    for pkg in ("torch", "transformers", "mlflow", "ray", "editbench"):
        try:
            tags[f"version.{pkg}"] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return tags


def client(uri: str) -> Any:
    """An MlflowClient bound to ``uri`` (no global state is changed). A local sqlite store that does not exist yet
    is first created from the cached empty schema (:func:`_new_sqlite_store`)."""
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if not db.exists() and db.parent.is_dir():
            _new_sqlite_store(db)
    return MlflowClient(tracking_uri=uri)


def _empty_schema() -> bytes:
    """The bytes of a new, empty sqlite store made by this MLflow (its migrations run once, ~7 s on 2 cores)."""
    import tempfile

    from mlflow.tracking import MlflowClient

    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "schema.db"
        MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
        return db.read_bytes()


def _new_sqlite_store(db: Path) -> None:
    """Create the sqlite store ``db`` as a copy of the empty schema this MLflow, SQLAlchemy and Alembic make (kept in
    the keyed cache, ``bench.cache``), instead of running MLflow's migrations for every new store. The copy is made
    indistinguishable from a store MLflow created here: its Default experiment gets this store's artifact
    location (``./mlruns/0`` resolved in the working directory, as MLflow sets it) and the current time. Written
    atomically; a store another process created meanwhile is left as it is."""
    import sqlite3
    import time

    from bench.cache import cached

    versions = {pkg: metadata.version(pkg) for pkg in ("mlflow-skinny", "sqlalchemy", "alembic")
                if _installed(pkg)}
    schema, _ = cached("mlflow-schema", versions, "db", _empty_schema, lambda b, f: f.write_bytes(b),
                       lambda f: f.read_bytes())
    tmp = db.with_name(f".{db.name}.tmp{os.getpid()}")
    tmp.write_bytes(schema)
    now = int(time.time() * 1000)
    with sqlite3.connect(tmp) as con:
        con.execute("UPDATE experiments SET artifact_location = ?, creation_time = ?, last_update_time = ? "
                    "WHERE experiment_id = 0", (str((Path.cwd() / "mlruns" / "0").resolve()), now, now))
    con.close()
    try:
        os.link(tmp, db)  # fails when the store appeared meanwhile: never replace a store in use
    except FileExistsError:
        pass
    finally:
        tmp.unlink()


def _installed(pkg: str) -> bool:
    try:
        metadata.version(pkg)
        return True
    except metadata.PackageNotFoundError:
        return False


def prepare_experiment(uri: str, name: str, description: str = "", tags: Mapping[str, str] | None = None) -> str:
    """Create the store's schema (first use) and the experiment if needed; return its id.

    The experiment is tagged ``mlflow.experimentKind = custom_model_development`` so the MLflow 3 UI opens on
    the runs table, and its description (``mlflow.note.content``) is set when given.
    """
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is None:
        exp_id = c.create_experiment(name, artifact_location=_artifact_root(uri))
    else:
        exp_id = exp.experiment_id
    c.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, "custom_model_development")
    if description:
        c.set_experiment_tag(exp_id, NOTE_TAG, description)
    for k, v in (tags or {}).items():
        c.set_experiment_tag(exp_id, k, v)
    return exp_id


class TrialRun:
    """A live MLflow run for one trial; all writes go through one client."""

    def __init__(self, uri: str, run: Any) -> None:
        self.uri = uri
        self.client = client(uri)
        self.run_id: str = run.info.run_id
        self.artifact_uri: str = run.info.artifact_uri

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        flat = flatten(params)
        items = [Param(k, str(v)[:6000]) for k, v in flat.items()]
        for i in range(0, len(items), 90):
            self.client.log_batch(self.run_id, params=items[i : i + 90])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        import math
        import time

        from mlflow.entities import Metric

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
        import mlflow.data
        from mlflow.entities import DatasetInput, InputTag

        import warnings

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
        import polars as pl

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
    import polars as pl

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
