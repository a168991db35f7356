"""Seeded train/val/test splits of a dataset, split overlap checks and locality prompt sources."""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

log = logging.getLogger(__name__)

from bench.data.cards import DatasetCard, load_card
from bench.data.files import resolve_file
from bench.data.readers import READERS, _get, _json_rows, check_records
from bench.data.records import SPLITS, DataError, EditRecord
from bench.data.sources import DataRef, dataset_root, hub_file, local_ref


@dataclass
class TaskData:
    """Train/val/test records of one dataset, plus the card they came from and the file each split was read
    from (``refs``; ``files`` holds where each is, a path or ``hub:...``)."""

    card: DatasetCard
    splits: dict[str, list[EditRecord]]
    refs: dict[str, DataRef]
    root: str | None = None  #: the data root its local files (and locality sources) are read under

    @property
    def files(self) -> dict[str, str]:
        """Split -> where its records were read (a path, or ``hub:`` and the Hub split)."""
        return {s: r.where for s, r in self.refs.items()}

    def __getitem__(self, split: str) -> list[EditRecord]:
        return self.splits[split]


def load_task(
    name: str,
    data_root: str | os.PathLike | None = None,
    seed: int = 0,
    sizes: dict[str, int | None] | None = None,
    paths: dict[str, str] | None = None,
    fractions: dict[str, float] | None = None,
    source: str | None = None,
) -> TaskData:
    """Read a dataset through its card (every file through Hugging Face ``datasets``) and split it
    deterministically.

    ``source`` picks where the card's files come from (:mod:`bench.data.sources`): ``embedded``, ``local``
    (under ``data_root`` / ``$EDITBENCH_DATA``), ``hub`` (the card's ``hub`` block), or ``None`` for the data-root
    order. A split with its own file (the card's ``files.<split>`` or ``hub.files.<split>``, or ``paths[split]``)
    reads that file whole; the other splits are carved, by a permutation seeded with ``seed``, from the ``all``
    file (or, without one, from the train file) in the card's fractions. ``sizes[split]`` then keeps the first N
    of a split. An empty split is an error.
    """
    card = load_card(name)
    root = dataset_root(source, data_root)
    for k in paths or {}:
        if k not in SPLITS:
            raise DataError(f"datasets.{name}.paths: key {k!r} is not a split; valid: {', '.join(SPLITS)}")
    files = _CardFiles(card, source, root)
    own: dict[str, DataRef] = {}
    for s in SPLITS:
        if (paths or {}).get(s):
            own[s] = local_ref(resolve_file((paths or {})[s], root))
        elif s in files.keys:
            own[s] = files.ref(s)
    records: dict[str, list[EditRecord]] = {s: files.read(r) for s, r in own.items()}
    refs: dict[str, DataRef] = dict(own)
    carved = [s for s in SPLITS if s not in own]
    if carved:
        if "all" not in files.keys and "train" in own:
            carved = ["train", *carved]
            pool, pool_ref = records.pop("train"), own["train"]
        else:
            if "all" not in files.keys and "train" not in files.keys:
                raise DataError(f"datasets/{name}.yaml: no file for splits {carved} and no files.all to carve them from")
            pool_ref = files.ref("all" if "all" in files.keys else "train")
            pool = files.read(pool_ref)
        for s, part in _carve(name, pool, carved, {**card.fractions, **(fractions or {})}, seed).items():
            records[s], refs[s] = part, pool_ref
    for s in SPLITS:
        n = (sizes or {}).get(s)
        if n is not None:
            records[s] = records[s][:n]
        if not records[s]:
            raise DataError(f"dataset {name!r}: split {s!r} is empty (file {refs[s].where}); check its size/fraction")
    return TaskData(card=card, splits={s: records[s] for s in SPLITS}, refs=refs, root=root)


class _CardFiles:
    """A card's files from one source: which keys it has (splits, ``all``, ``rephrase``), the reference of each
    (a Hub split for ``source: hub``, else a local file under ``root``) and its records."""

    def __init__(self, card: DatasetCard, source: str | None, root: Path | None) -> None:
        self.card, self.source, self.root = card, source, root
        if source == "hub":
            if card.hub is None:
                raise DataError(f"datasets/{card.name}.yaml has no hub block; use source: embedded or local")
            self.keys = set(card.hub.files)
        else:
            self.keys = set(card.files) | ({"rephrase"} if card.rephrase_file else set())
        self.extra = {"rephrase": self.ref("rephrase")} if "rephrase" in self.keys else {}

    def ref(self, key: str) -> DataRef:
        if self.source == "hub":
            return hub_file(self.card, key)
        rel = self.card.rephrase_file if key == "rephrase" else self.card.files[key]
        return local_ref(resolve_file(rel or "", self.root))

    def read(self, r: DataRef) -> list[EditRecord]:
        return check_records(READERS[self.card.reader](r, self.card, self.extra), r.where)


def _carve(name: str, pool: list[EditRecord], splits: list[str], fractions: dict[str, float], seed: int
           ) -> dict[str, list[EditRecord]]:
    """``pool`` cut into ``splits`` in proportion to their ``fractions`` after a permutation seeded with ``seed``
    (the last split takes the remainder)."""
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    total = sum(fractions.get(s, 0.0) for s in splits)
    if total <= 0:
        raise DataError(f"datasets.{name}: fractions for {splits} sum to {total}; give positive fractions")
    out, start = {}, 0
    for j, s in enumerate(splits):
        n = len(pool) - start if j == len(splits) - 1 else int(round(len(pool) * fractions.get(s, 0.0) / total))
        out[s] = [pool[i] for i in order[start : start + n]]
        start += n
    return out


def split_overlaps(task: TaskData, own: Sequence[str]) -> list[tuple[str, str, str, str, int]]:
    """For each split in ``own`` (given its own file by a sweep's ``paths``): the other splits sharing records
    with it, as (split, its file, other split, other file, shared count). A record is its (prompt, target,
    label); the other splits are compared whole, before any size cut (the pool training draws from)."""
    def key(r: EditRecord) -> tuple:
        return (r.prompt, r.target, r.label)

    out = []
    for s in own:
        mine = {key(r) for r in task.splits[s]}
        for o in SPLITS:
            if o == s:
                continue
            n = len(mine & {key(r) for r in task.splits[o]})
            if n:
                out.append((s, task.files.get(s, "?"), o, task.files.get(o, "?"), n))
    return out


def locality_pool(card: DatasetCard, source: str, data_root: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """(prompt, answer) pairs of a file-based locality source named on the card."""
    if source not in card.locality:
        raise DataError(f"datasets.{card.name}.locality: {source!r} unknown; valid: {', '.join(card.locality)}")
    src = card.locality[source]
    if src.source == "record":
        return []
    p = resolve_file(src.file or "", data_root)
    rows = _json_rows(local_ref(p))
    out = []
    for i, row in enumerate(rows[: src.max_prompts]):
        out.append((str(_get(row, src.prompt_field, p, i)), str(_get(row, src.answer_field, p, i))))
    return out


def apply_locality(task: "TaskData", source: str, data_root: str | os.PathLike | None, seed: int,
                   correct: Callable[[list[tuple[str, str]]], list[bool]] | None = None) -> dict[str, float]:
    """Swap each record's locality prompt for one from a file-based source of the card, keeping only prompts
    the base model answers right (``correct``: the model's verdict per pair) when the card says so; the kept
    pool is split 70/10/20 (seeded) into disjoint train/val/test pools, so test locality prompts were never seen
    in training. The card's ``record`` source changes nothing. Returns counts for logging."""
    src = task.card.locality[source]
    if src.source == "record":
        return {}
    pairs = locality_pool(task.card, source, data_root)
    kept = pairs
    if src.keep == "base_correct":
        if correct is None:
            raise ValueError(f"locality source {source!r} keeps prompts the base model answers: pass correct=")
        kept = [p for p, good in zip(pairs, correct(pairs)) if good]
    log.info("locality %s: %d of %d prompts kept", source, len(kept), len(pairs))
    order = list(range(len(kept)))
    random.Random(seed).shuffle(order)
    n = len(order)
    cuts = {"train": order[: int(0.7 * n)], "val": order[int(0.7 * n): int(0.8 * n)], "test": order[int(0.8 * n):]}
    for split, idx in cuts.items():
        task.splits[split] = with_locality(task.splits[split], [kept[i] for i in idx], seed)
    return {"loc_pool_size": float(len(pairs)), "loc_pool_kept": float(len(kept))}


def with_locality(records: Sequence[EditRecord], pairs: Sequence[tuple[str, str]], seed: int) -> list[EditRecord]:
    """Give each record a locality prompt drawn (seeded, without repeats while the pool lasts) from ``pairs``."""
    if not pairs:
        raise DataError("locality pool is empty: no prompt kept (is the base model right on any of them?)")
    order = list(range(len(pairs)))
    random.Random(seed + 7919).shuffle(order)
    return [replace(r, loc_prompt=pairs[order[i % len(order)]][0], loc_answer=pairs[order[i % len(order)]][1])
            for i, r in enumerate(records)]
