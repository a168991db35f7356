"""A keyed on-disk cache for anything expensive that is a pure function of its inputs.

Location: ``$EDITBENCH_CACHE`` when set, else the user cache dir (``platformdirs``). Entries live under
``<root>/<namespace>/<key>.<suffix>``; the key is a digest of a JSON-able description of every input (see
:func:`key_of`), so a change of any input is a new entry and an old entry is never served for new inputs.
Writes are atomic (a reader never sees half a file), so concurrent trials may share one cache.

Used for converted and prepared base models, generated targets, the unedited model's verdicts and pre-edit
probes (``bench.probes``), saved training states and editor statistics (ROME/MEMIT's key second moments).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Callable, TypeVar

import platformdirs

log = logging.getLogger(__name__)

T = TypeVar("T")


def cache_root() -> Path:
    """Where cached files live: ``$EDITBENCH_CACHE``, else the user cache dir."""
    env = os.environ.get("EDITBENCH_CACHE")
    if env:
        return Path(env)

    return Path(platformdirs.user_cache_dir("editbench"))


def rng_kept() -> AbstractContextManager:
    """A block whose use of torch's global random generators (the CPU one and every visible CUDA device's) is
    undone on exit, seed included. Whatever is cached because it is expensive runs in one (generated targets,
    a prepared base model, tiny random models): a trial's random state is then what its seed made it, whether
    such a product was computed in the trial or read from the cache (or prepared by the driver)."""
    import torch  # heavy: only to keep its random state

    return torch.random.fork_rng(devices=None if torch.cuda.is_available() else [])


def key_of(inputs: Any, n: int = 32) -> str:
    """``n`` hex digits of sha256 over the canonical JSON of ``inputs`` (keys sorted; non-JSON values by str)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:n]


def path_for(namespace: str, key: str, suffix: str) -> Path:
    """The file of entry ``key`` in ``namespace`` (it may not exist yet)."""
    if not namespace or "/" in namespace or namespace.startswith("."):
        raise ValueError(f"cache namespace {namespace!r} must be one non-empty folder name")
    return cache_root() / namespace / f"{key}.{suffix.lstrip('.')}"


def cached(namespace: str, inputs: Any, suffix: str, compute: Callable[[], T], save: Callable[[T, Path], None],
           load: Callable[[Path], T]) -> tuple[T, bool]:
    """The value for ``inputs``: loaded from the cache when present, else computed, stored atomically and
    returned. Returns ``(value, hit)``; ``hit`` says whether the cache served it (no computation ran)."""
    path = path_for(namespace, key_of(inputs), suffix)
    if path.exists():
        try:
            return load(path), True
        except Exception as e:  # a corrupt entry is recomputed, not fatal
            log.warning("cache entry %s unreadable (%s); recomputing", path, e)
    value = compute()
    store(path, inputs, value, save)
    return value, False


def store(path: Path, inputs: Any, value: T, save: Callable[[T, Path], None]) -> None:
    """Write ``value`` as the entry at ``path`` (from :func:`path_for`) atomically, with the ``inputs`` it was
    computed from beside it (``<entry>.inputs.txt``, for a reader; never read back)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save(value, tmp)
    os.replace(tmp, path)
    path.with_name(f"{path.name}.inputs.txt").write_text(json.dumps(inputs, sort_keys=True, default=str, indent=1))
