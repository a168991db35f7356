"""Where a dataset's files come from, all read through Hugging Face ``datasets``.

A sweep picks a source per dataset (``datasets[].source``):

- ``embedded``: the real subsets shipped in the repository (``datasets/data/``); a clone with nothing beside it
  runs them. Read with ``datasets``' ``json`` / ``text`` builders (Arrow cache).
- ``local``: the same files under a data root (the sweep's ``data_root``, else ``$EDITBENCH_DATA``).
- ``hub``: the full public data by Hub id and pinned revision (the card's ``hub`` block), cached by ``datasets``;
  offline (``HF_DATASETS_OFFLINE=1``, or no network) it runs from that cache or fails at validation.

Left unset, a dataset follows the data-root order: the sweep's ``data_root``, ``$EDITBENCH_DATA``, the embedded
files. Every file is a :class:`DataRef`: its rows, its digest (sha256 of a local file's bytes; id, revision and
``datasets`` fingerprint for a Hub split) and the ``datasets.Dataset`` itself for MLflow's dataset inputs.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import datasets as hf_datasets  # Hugging Face's, not the repository's datasets/ folder (no __init__.py there)

from bench.data.files import EMBEDDED_ROOT, file_sha256, read_text
from bench.data.records import DataError

if TYPE_CHECKING:  # cards read readers and sources; a card is only a type here
    from bench.data.cards import DatasetCard, HubFile

log = logging.getLogger(__name__)

Source = Literal["embedded", "local", "hub"]
SOURCES: tuple[str, ...] = ("embedded", "local", "hub")

hf_datasets.disable_progress_bars()  # "Generating train split" bars would drown the sweep's own output
hf_datasets.logging.set_verbosity_error()
logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # its retries offline; load_hub says it in one line


def dataset_root(source: str | None, data_root: str | os.PathLike | None) -> str | None:
    """The data root a dataset's local files are read under: the embedded folder for ``embedded``; the sweep's
    ``data_root`` or ``$EDITBENCH_DATA`` for ``local`` (an error naming both when neither is set); for the
    default (``None``) and ``hub`` (whose locality files are local), ``data_root`` as given, which
    :func:`bench.data.files.resolve_file` completes with ``$EDITBENCH_DATA`` and the embedded files."""
    if source == "embedded":
        return str(EMBEDDED_ROOT)
    if source == "local":
        root = data_root or os.environ.get("EDITBENCH_DATA")
        if not root:
            raise DataError("source: local reads a data root, and none is set: set data_root in the sweep or "
                            "$EDITBENCH_DATA (or use source: embedded for the files shipped in datasets/data/)")
        return str(root)
    return None if data_root is None else str(data_root)


@dataclass(frozen=True)
class HubRef:
    """One split of a Hub dataset, exactly as :func:`load_hub` passes it to ``datasets.load_dataset``."""

    dataset_path: str
    revision: str
    dataset_name: str | None = None
    data_files: str | None = None
    split: str = "train"

    def load_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of the ``datasets.load_dataset`` call (``path`` first)."""
        kw: dict[str, Any] = {"path": self.dataset_path, "name": self.dataset_name, "revision": self.revision,
                              "split": self.split}
        if self.data_files:
            kw["data_files"] = self.data_files
        return kw

    def describe(self) -> str:
        """``id@revision`` with its config, file and split, for messages and digests."""
        parts = [f"{self.dataset_path}@{self.revision}"]
        if self.dataset_name:
            parts.append(f"config {self.dataset_name}")
        if self.data_files:
            parts.append(f"file {self.data_files}")
        parts.append(f"split {self.split}")
        return ", ".join(parts)


def load_hub(ref: HubRef) -> hf_datasets.Dataset:
    """``datasets.load_dataset`` of one Hub split (from ``datasets``' cache when it holds it). A split that can
    be neither downloaded nor found in the cache raises :class:`DataError` in one line naming the id, the
    revision and how to get the files onto this machine."""
    try:
        return hf_datasets.load_dataset(**ref.load_kwargs())
    except Exception as e:  # noqa: BLE001 (datasets raises ConnectionError, FileNotFoundError, ValueError ...)
        why = " ".join(str(e).split())[:160] or type(e).__name__
        offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
        raise DataError(
            f"Hub dataset {ref.describe()} is not in the datasets cache and could not be fetched"
            f"{' (offline mode)' if offline else ''}: {type(e).__name__}: {why}; on a machine with internet run "
            f"`python -c \"import datasets; datasets.load_dataset(**{ref.load_kwargs()!r})\"` and copy its "
            f"$HF_HOME (~/.cache/huggingface) here, or use source: local with the files under data_root"
        ) from None


def hub_ref(card: DatasetCard, key: str) -> HubRef:
    """The Hub split that stands for the card's file ``key`` (all/train/val/test/rephrase)."""
    if card.hub is None:
        raise DataError(f"datasets/{card.name}.yaml has no hub block; use source: embedded or local")
    if key not in card.hub.files:
        raise DataError(f"datasets/{card.name}.yaml: hub.files has no {key!r} (has: {', '.join(card.hub.files)})")
    f: HubFile = card.hub.files[key]
    return HubRef(card.hub.dataset_path, card.hub.revision, f.dataset_name, f.data_files, f.split)


@dataclass(frozen=True)
class DataRef:
    """One file a reader reads: a local JSON / JSON-lines / text file, or a Hub split. Rows come from
    ``datasets`` either way (loaded once per ref and process)."""

    path: Path | None = None
    hub: HubRef | None = None
    _cache: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        if (self.path is None) == (self.hub is None):
            raise ValueError("a DataRef is a local path or a Hub split, exactly one")

    @property
    def where(self) -> str:
        """The file's path, or ``hub:`` and the split's description (for messages and params)."""
        return str(self.path) if self.path is not None else f"hub:{self.hub.describe()}"  # type: ignore[union-attr]

    @property
    def is_text(self) -> bool:
        """A plain-text file (one record per line), read with the ``text`` builder."""
        return self.path is not None and self.path.suffix not in (".json", ".jsonl")

    def load_call(self) -> dict[str, Any]:
        """The ``datasets.load_dataset`` arguments that read this file (builder or Hub id first)."""
        if self.hub is not None:
            return self.hub.load_kwargs()
        return {"path": "text" if self.is_text else "json", "data_files": str(self.path), "split": "train"}

    def dataset(self) -> hf_datasets.Dataset:
        """The file as a ``datasets.Dataset`` (local files through the ``json`` / ``text`` builders)."""
        if "ds" not in self._cache:
            if self.hub is not None:
                ds = load_hub(self.hub)
            else:
                assert self.path is not None
                builder = "text" if self.is_text else "json"
                text = read_text(self.path)  # not UTF-8 / unreadable: a one-line error naming the byte
                try:
                    if text.strip() in ("", "[]"):  # no records: the split it serves reports itself empty
                        ds = hf_datasets.Dataset.from_dict({"text": []} if self.is_text else {})
                    else:
                        ds = hf_datasets.load_dataset(builder, data_files=str(self.path), split="train")
                except Exception as e:  # noqa: BLE001 (pyarrow / datasets raise many kinds on a bad file)
                    raise DataError(_why_unreadable(self.path, text, e)) from None
            self._cache["ds"] = ds
        return self._cache["ds"]

    def rows(self) -> list[dict[str, Any]]:
        """Every record as a dict (JSON files and Hub splits); columns a record lacks read as ``None``."""
        return self.dataset().to_list()

    def lines(self) -> list[str]:
        """The lines of a text file, or the ``text`` column of a Hub split, in order."""
        ds = self.dataset()
        if "text" not in ds.column_names:
            raise DataError(f"{self.where}: has no 'text' column (has: {', '.join(ds.column_names)})")
        return list(ds["text"])

    def digest(self) -> str:
        """What identifies the content: the sha256 of a local file's bytes (so digests do not depend on how the
        file is read), ``hf:`` + the split's description + ``datasets``' fingerprint for a Hub split."""
        if self.path is not None:
            return file_sha256(self.path)
        return f"hf:{self.hub.describe()}:{self.dataset()._fingerprint}"  # type: ignore[union-attr]


def _why_unreadable(path: Path, text: str, err: BaseException) -> str:
    """One line on why ``datasets`` could not read a local file: the JSON error the file holds (as the standard
    library sees it) where there is one, else the deepest cause ``datasets`` gave."""
    if path.suffix in (".json", ".jsonl"):
        try:
            rows = ([json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl"
                    else json.loads(text))
        except json.JSONDecodeError as e:
            return f"{path}: not valid JSON ({e})"
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            return f"{path}: expected a JSON list of records (objects), got {type(rows).__name__}"
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    return f"{path}: cannot be read ({type(err).__name__}: {' '.join(str(err).split())[:200]})"


def local_ref(path: Path) -> DataRef:
    """A :class:`DataRef` for a local file (one per path and process, so its rows load once)."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)  # a file rewritten in place is read again
    if key not in _LOCAL:
        _LOCAL[key] = DataRef(path=path)
    return _LOCAL[key]


def hub_file(card: DatasetCard, key: str) -> DataRef:
    """A :class:`DataRef` for the card's Hub split standing for file ``key`` (one per split and process)."""
    ref = hub_ref(card, key)
    if ref not in _HUB:
        _HUB[ref] = DataRef(hub=ref)
    return _HUB[ref]


_LOCAL: dict[tuple[str, int, int], DataRef] = {}
_HUB: dict[HubRef, DataRef] = {}
