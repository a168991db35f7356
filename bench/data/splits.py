"""Seeded train/val/test splits of a dataset, split overlap checks and locality prompt sources."""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass, replace
from typing import Callable, Sequence

log = logging.getLogger(__name__)

from bench.data.cards import DatasetCard, load_card
from bench.data.files import resolve_file
from bench.data.readers import READERS, _get, _load_json_rows, check_records
from bench.data.records import SPLITS, DataError, EditRecord


@dataclass
class TaskData:
    """Train/val/test records of one dataset, plus the card they came from and the files read."""

    card: DatasetCard
    splits: dict[str, list[EditRecord]]
    files: dict[str, str]

    def __getitem__(self, split: str) -> list[EditRecord]:
        return self.splits[split]


def load_task(
    name: str,
    data_root: str | os.PathLike | None = None,
    seed: int = 0,
    sizes: dict[str, int | None] | None = None,
    paths: dict[str, str] | None = None,
    fractions: dict[str, float] | None = None,
    file_overrides: dict[str, str] | None = None,
) -> TaskData:
    """Read a dataset through its card and split it deterministically.

    A split with its own file (card ``files.<split>`` or ``paths[split]``) reads that file whole; the other splits
    are carved, by a permutation seeded with ``seed``, from ``files.all`` (or, without it, from the train file)
    in the card's fractions. ``sizes[split]`` then keeps the first N of a split. An empty split is an error.
    ``file_overrides`` replaces entries of the card's ``files`` (and, under ``rephrase``, its rephrase file), e.g.
    with downloaded public copies.
    """
    card = load_card(name)
    if file_overrides:  # e.g. downloaded public copies; "rephrase" replaces the card's rephrase file
        extra = {k: v for k, v in file_overrides.items() if k != "rephrase"}
        card = card.model_copy(update={"files": {**card.files, **extra},
                                       "rephrase_file": file_overrides.get("rephrase", card.rephrase_file)})
    reader = READERS[card.reader]
    paths = dict(paths or {})
    for k in paths:
        if k not in SPLITS:
            raise DataError(f"datasets.{name}.paths: key {k!r} is not a split; valid: {', '.join(SPLITS)}")
    fractions = {**card.fractions, **(fractions or {})}
    own = {s: paths.get(s) or card.files.get(s) for s in SPLITS if paths.get(s) or card.files.get(s)}
    carved = [s for s in SPLITS if s not in own]
    read: dict[str, list[EditRecord]] = {}
    files: dict[str, str] = {}
    for s, rel in own.items():
        p = resolve_file(rel, data_root)
        read[s] = check_records(reader(p, card, data_root), str(p))
        files[s] = str(p)
    if carved:
        pool_key = "all" if "all" in card.files else "train"
        if pool_key == "train" and "train" in own:
            carved = ["train", *carved]
            pool = read.pop("train")
            pool_file = files["train"]
        else:
            if pool_key not in card.files:
                raise DataError(f"datasets/{name}.yaml: no file for splits {carved} and no files.all to carve them from")
            p = resolve_file(card.files[pool_key], data_root)
            pool, pool_file = check_records(reader(p, card, data_root), str(p)), str(p)
        order = list(range(len(pool)))
        random.Random(seed).shuffle(order)
        total = sum(fractions.get(s, 0.0) for s in carved)
        if total <= 0:
            raise DataError(f"datasets.{name}: fractions for {carved} sum to {total}; give positive fractions")
        start = 0
        for j, s in enumerate(carved):
            n = len(pool) - start if j == len(carved) - 1 else int(round(len(pool) * fractions.get(s, 0.0) / total))
            read[s] = [pool[i] for i in order[start : start + n]]
            files[s] = pool_file
            start += n
    sizes = sizes or {}
    for s in SPLITS:
        n = sizes.get(s)
        if n is not None:
            read[s] = read[s][:n]
        if not read[s]:
            raise DataError(f"dataset {name!r}: split {s!r} is empty (file {files.get(s)}); check its size/fraction")
    return TaskData(card=card, splits={s: read[s] for s in SPLITS}, files=files)


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
    rows = _load_json_rows(p)
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
