"""The MLflow tracking store: which URIs are accepted (sqlite, a server; checked in one line before anything
runs), the sqlite schema created once in the driver, the client, and the experiment a sweep writes to."""

from __future__ import annotations

import os
import sqlite3
import tempfile
import time
import urllib.error
import urllib.request
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

from bench.cache import cached
from bench.cli import UserError, check_writable_dir, cut


REPO_ROOT = Path(__file__).resolve().parent.parent


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"


NOTE_TAG = "mlflow.note.content"


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


def client(uri: str) -> Any:
    """An MlflowClient bound to ``uri`` (no global state is changed). A local sqlite store that does not exist yet
    is first created from the cached empty schema (:func:`_new_sqlite_store`)."""
    from mlflow.tracking import MlflowClient  # heavy (seconds): only when a store is opened

    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if not db.exists() and db.parent.is_dir():
            _new_sqlite_store(db)
    return MlflowClient(tracking_uri=uri)


def _empty_schema() -> bytes:
    """The bytes of a new, empty sqlite store made by this MLflow (its migrations run once, ~7 s on 2 cores)."""
    from mlflow.tracking import MlflowClient  # heavy (seconds): only when a store is opened

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
