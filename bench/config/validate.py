"""Everything about a sweep that can be checked before Ray starts and without weights: hyper-parameters per
method, search spaces, the scheduler, models, pairings of methods with models and tasks, dataset cards, data
files and splits. A bad sweep never reaches a worker and never leaves an MLflow run behind."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from bench.cli import clip, cut
from bench.config.plan import grid_axes, plan
from bench.config.schema import Sweep, SweepError
from bench.data import DataError, dataset_root, load_card, load_task, resolve_file, split_overlaps, task_kind
from bench.models import ModelSpecError, model_kind_hint, resolve_model_source
from bench.yamlio import one_line
from methods import REGISTRY


def _check_scheduler(sweep: Sweep, source: str) -> None:
    """A scheduler needs a metric that learned editors report at each validation, in its better direction, at
    least one method that reports it, and a ``max_t`` that lets a full fit end with its evaluation."""
    sc = sweep.scheduler
    if sc is None:
        return
    known: dict[str, str] = {}
    for cls in REGISTRY.values():
        known.update(cls.validation_metrics)
    if sc.metric not in known:
        raise SweepError(f"{source}: scheduler.metric: {clip(sc.metric)} is not reported during training; "
                         f"valid: {', '.join(sorted(known))}")
    if known[sc.metric] != sc.mode:
        raise SweepError(f"{source}: scheduler.mode: {sc.metric} is better when "
                         f"{'higher' if known[sc.metric] == 'max' else 'lower'}; use mode: {known[sc.metric]}")
    reporting = [(i, m) for i, m in enumerate(sweep.methods) if sc.metric in REGISTRY[m.name].validation_metrics]
    if not reporting:
        silent = ", ".join(dict.fromkeys(m.name for m in sweep.methods))
        learned = ", ".join(n for n, c in REGISTRY.items() if sc.metric in c.validation_metrics)
        raise SweepError(f"{source}: scheduler: no method here reports {sc.metric} ({silent} never do: they do not "
                         f"train); add a learned editor ({learned}) or remove the scheduler")
    for i, m in reporting:
        b = m.budget
        need = REGISTRY[m.name].reports_per_fit(b) + 1  # + the final evaluation's report
        if sc.max_t < need:
            raise SweepError(f"{source}: scheduler.max_t ({sc.max_t}) is below the {need} reports of methods.{i} "
                             f"({m.name}: max_steps {b.max_steps}, val_every {b.val_every}, plus its evaluation); "
                             f"ASHA would stop a full fit before it is evaluated; use max_t >= {need}")


def _check_pairings(sweep: Sweep, source: str) -> None:
    """Every method supports every model kind and task it is paired with, and finds the data files it reads."""
    for mi, m in enumerate(sweep.methods):
        cls = REGISTRY[m.name]
        kinds = cls.supported_kinds
        for i, model in enumerate(sweep.models):
            kind = model_kind_hint(model.name)
            if kind is not None and kind not in kinds:
                raise SweepError(f"{source}: methods.{mi} ({m.name}) edits {' / '.join(kinds)} models; models.{i} "
                                 f"({clip(model.name)}) is {kind}; remove one of them")
        for i, ds in enumerate(sweep.datasets):
            try:
                card = load_card(ds.name)
            except DataError:  # an unknown or broken card: the datasets' check below names it
                continue
            if not set(task_kind(card.kind).model_kinds) & set(kinds):
                raise SweepError(f"{source}: methods.{mi} ({m.name}) edits {' / '.join(kinds)} models; "
                                 f"datasets.{i} ({cut(ds.name, 80)}) is a {card.kind} task (measured on "
                                 f"{' / '.join(task_kind(card.kind).model_kinds)} models)")
        for combo in grid_axes(m.hparams)[0]:
            for rel in cls.data_files(combo):
                try:
                    resolve_file(rel, sweep.data_root)
                except DataError as e:
                    raise SweepError(f"{source}: methods.{mi} ({m.name}) reads {rel}: {e}") from None


def validate(sweep: Sweep, source: str = "sweep") -> list[dict[str, Any]]:
    """Check everything that can be checked without weights: hyper-parameter values per method (strictly typed),
    search spaces, the scheduler, model names, dataset cards, locality sources, data files, record fields,
    non-empty splits, ``n_edits`` against the test split, and ``paths`` files that share records with another
    split. Returns the plan."""
    for mi, m in enumerate(sweep.methods):
        cls = REGISTRY[m.name]
        try:
            combos, tuned = grid_axes(m.hparams)
        except SweepError as e:
            raise SweepError(f"{source}: methods.{mi}.{e}") from None
        for combo in combos:
            probes = [combo] if not tuned else [
                {**combo, **{k: t.probes()[i % len(t.probes())] for k, t in tuned.items()}} for i in range(2)
            ]
            for values in probes:
                try:
                    cls.Hparams.model_validate(values, strict=True)
                except ValidationError as e:
                    raise SweepError(one_line(e, source, cls.Hparams, prefix=f"methods.{mi}.hparams",
                                              unknown=f"unknown key for {m.name}")) from None
    _check_scheduler(sweep, source)
    for i, model in enumerate(sweep.models):
        try:
            resolve_model_source(model.name)
        except ModelSpecError as e:
            raise SweepError(f"{source}: models.{i}.name: {e}") from None
    _check_pairings(sweep, source)
    for i, ds in enumerate(sweep.datasets):
        try:
            card = load_card(ds.name)
            if ds.generate is not None and not task_kind(card.kind).targets_generated:
                raise DataError(f"generate is only for datasets whose targets are generated (generation); "
                                f"{ds.name} is {card.kind}")
            if ds.source == "hub" and card.hub is None:
                raise DataError(f"source: hub, but datasets/{ds.name}.yaml names no Hub dataset; "
                                f"use source: embedded or local")
            root = dataset_root(ds.source, sweep.data_root)
            loc = ds.locality or card.default_locality
            if loc not in card.locality:
                raise DataError(f"locality {loc!r} unknown for {ds.name}; valid: {', '.join(card.locality)}")
            if card.locality[loc].file:
                resolve_file(card.locality[loc].file, root)
            for seed in sweep.seeds:  # a Hub split is loaded here: from the cache offline, else a one-line error
                task = load_task(ds.name, sweep.data_root, seed=seed, source=ds.source,
                                 sizes={"train": ds.n_train, "val": ds.n_val}, paths=ds.paths)
                for split, file, other, other_file, n in split_overlaps(task, ds.paths):
                    raise DataError(f"paths.{split} ({file}) shares {n} record(s) with the {other} split "
                                    f"({other_file}); a split must not contain another's edits")
                if len(task["test"]) < sweep.edits_of(ds):
                    raise DataError(f"n_edits ({sweep.edits_of(ds)}) is more than the test split holds "
                                    f"({len(task['test'])} records from {task.files['test']}, seed {seed}); "
                                    f"use n_edits <= {len(task['test'])}")
        except DataError as e:
            raise SweepError(f"{source}: datasets.{i} ({cut(ds.name, 80)}): {e}") from None
    return plan(sweep)
