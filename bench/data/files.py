"""Data files: the data root, lookup, hashing, atomic writes, packing for cluster workers."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

from bench.data.records import DataError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
#: The dataset cards (``datasets/<name>.yaml``).
CARDS_DIR = REPO_ROOT / "datasets"
#: The real data subsets shipped in the repository (``datasets/data/<name>/``, each with its source and licence).
EMBEDDED_ROOT = CARDS_DIR / "data"


def data_root_candidates(data_root: str | os.PathLike | None = None) -> list[Path]:
    """Places searched for a data file, in order: the sweep's ``data_root`` alone when it is set; else
    ``$EDITBENCH_DATA`` (when set), then the files embedded in the repository (``datasets/data/``)."""
    if data_root:
        return [Path(data_root).expanduser()]
    out = []
    if os.environ.get("EDITBENCH_DATA"):
        out.append(Path(os.environ["EDITBENCH_DATA"]).expanduser())
    return [*out, EMBEDDED_ROOT]


def resolve_file(rel: str, data_root: str | os.PathLike | None = None) -> Path:
    """Absolute path of a data file; a missing file raises :class:`DataError` naming every place tried (a name the
    file system cannot hold, too long or with a NUL, is missing too), a folder one saying it is a folder."""
    def exists(p: Path) -> bool:
        try:
            found = p.exists()
        except (OSError, ValueError):  # ENAMETOOLONG, an embedded NUL byte
            return False
        if found and p.is_dir():
            raise DataError(f"data file {rel!r}: {str(p)[:200]} is a folder; name a file in it")
        return found

    p = Path(rel).expanduser()
    if p.is_absolute():
        if exists(p):
            return p
        raise DataError(f"data file not found: {str(p)[:200]!r}")
    tried = []
    for root in data_root_candidates(data_root):
        try:
            cand = (root / rel).resolve()
        except (OSError, ValueError):
            cand = root / rel
        if exists(cand):
            return cand
        tried.append(str(cand)[:200])
    raise DataError(
        f"data file {rel!r} not found; tried: {'; '.join(tried)} (set data_root in the sweep or $EDITBENCH_DATA)"
    )


def read_text(path: Path) -> str:
    """A data file's text; a file that is not UTF-8 (or cannot be read) is a :class:`DataError` naming it."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); data files must be UTF-8") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes (memoised per path, size and modification time)."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def write_atomic(path: Path, data: bytes) -> Path:
    """Write ``path`` whole or not at all (a temp file beside it, then a rename): a process killed mid-write
    leaves no truncated file for the next one to trust."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path


def pack_files(files: dict[str, Path]) -> dict[str, bytes]:
    """The bytes of each file, by the relative path it will have under a data root (see :func:`unpack_files`).
    The driver reads the data once and ships it with the trials: workers need no shared file system."""
    out = {}
    for rel, path in files.items():
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise ValueError(f"packed data path {rel!r} must be relative and stay inside the data root")
        out[rel] = path.read_bytes()
    return out


def unpack_files(bundle: dict[str, bytes], parent: Path | None = None) -> Path:
    """Write a :func:`pack_files` bundle under a data root named by its content (reused when already there,
    written atomically per file) and return that root, for ``data_root`` of a trial on any node."""
    h = hashlib.sha256()
    for rel in sorted(bundle):
        h.update(rel.encode() + b"\0" + hashlib.sha256(bundle[rel]).digest())
    root = (parent or Path(tempfile.gettempdir())) / f"editbench-data-{h.hexdigest()[:16]}"
    for rel, blob in bundle.items():
        dest = root / rel
        if not (dest.exists() and dest.stat().st_size == len(blob)):
            write_atomic(dest, blob)
    return root
