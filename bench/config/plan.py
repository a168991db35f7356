"""The trial plan: a sweep's grid points (methods x models x datasets x seeds x batch sizes x edit modes x each
method's hyper-parameter values), the concrete trials with their search spaces drawn, the digests that
``--resume`` and editor reuse key on, and the data files shipped to cluster workers."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from bench.config.schema import DatasetEntry, Sweep, SweepError, TrialSpec, TuneSpec
from bench.data import DataError, dataset_root, file_sha256, hub_file, load_card, pack_files, resolve_file
from bench.yamlio import one_line
from methods import REGISTRY
from methods.budget import budget_digest_fields


def _tune_spec(key: str, value: dict[str, Any]) -> TuneSpec:
    """A search space for hyper-parameter ``key``; errors name it (``hparams.lr.lower: ...``)."""
    try:
        return TuneSpec(**value)
    except ValidationError as e:
        raise SweepError(one_line(e, "", TuneSpec, prefix=f"hparams.{key}")) from None


def grid_axes(hparams: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, TuneSpec]]:
    """Split a method's hparams into concrete grid combinations and Tune search spaces."""
    fixed: dict[str, list[Any]] = {}
    tuned: dict[str, TuneSpec] = {}
    for k, v in hparams.items():
        if isinstance(v, dict) and "tune" in v:
            tuned[k] = _tune_spec(k, v)
        elif isinstance(v, list):
            if not v:
                raise SweepError(f"hparams.{k}: an empty list is an empty grid axis; give at least one value")
            fixed[k] = v
        else:
            fixed[k] = [v]
    keys = list(fixed)
    combos = [dict(zip(keys, vals)) for vals in itertools.product(*(fixed[k] for k in keys))] or [{}]
    return combos, tuned


def digest(obj: Any, n: int = 6) -> str:
    """Short stable hash of a JSON-able object (used in run names)."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def dataset_files(ds: DatasetEntry, data_root: str | None) -> dict[str, tuple[str, Path]]:
    """Every local file a dataset entry can read, as key -> (path relative to the data root it is read from, the
    resolved file): the card's split files or the sweep's ``paths`` replacing them (key = split), the rephrase file
    and the chosen locality file (for ``source: hub`` only ``paths`` and the locality file: the rest comes from the
    Hub). Card files this entry never reads and cannot find are left out."""
    card = load_card(ds.name)
    data_root = dataset_root(ds.source, data_root)
    rel = dict(ds.paths) if ds.source == "hub" else {**card.files, **ds.paths}
    if card.rephrase_file and ds.source != "hub":
        rel["rephrase"] = card.rephrase_file
    loc = card.locality.get(ds.locality or card.default_locality)
    if loc is not None and loc.file:
        rel["locality"] = loc.file
    out: dict[str, tuple[str, Path]] = {}
    for key, f in sorted(rel.items()):
        try:
            out[key] = (f, resolve_file(f, data_root))
        except DataError:
            if key in ds.paths:
                raise
    return out


def data_files(ds: DatasetEntry, data_root: str | None) -> dict[str, str]:
    """Content digests of every file a dataset entry can read: the sha256 of each local file
    (:func:`dataset_files`) and, for ``source: hub``, each Hub split's id, revision and ``datasets`` fingerprint
    (loading it: validation does that anyway). Part of a trial's configuration digest, so the same point on other
    data is another point; where a file lies (embedded or a data root) is not."""
    out = {k: file_sha256(p) for k, (_, p) in dataset_files(ds, data_root).items()}
    if ds.source == "hub":
        card = load_card(ds.name)
        for key in (card.hub.files if card.hub else {}):
            if key not in ds.paths:
                out[key] = hub_file(card, key).digest()
    return dict(sorted(out.items()))


def ship_data(sweep: Sweep, todo: list[dict[str, Any]]) -> tuple[dict[str, bytes], list[dict[str, Any]]]:
    """What the trials need from the data root, packed (``bench.data.pack_files``) to travel with them, and the
    trials rewritten to read it: ``paths`` files become relative paths inside the bundle and ``data_root`` is
    left for the worker to set where it unpacks. A worker then needs no file of the driver's machine."""
    files: dict[str, Path] = {}
    mounted: dict[str, dict[str, str]] = {}  # dataset entry -> its paths as mounted in the bundle
    for ds in sweep.datasets:
        paths = dict(ds.paths)
        for key, (rel, path) in dataset_files(ds, sweep.data_root).items():
            if key in ds.paths:  # a user's file anywhere: mounted under its split and content
                rel = f"_paths/{key}/{file_sha256(path)[:16]}/{path.name}"
                paths[key] = rel
            files[rel] = path
        mounted[json.dumps(ds.model_dump(), sort_keys=True)] = paths
    for t in todo:  # files editors read besides the task's (ROME/MEMIT's covariance corpus)
        for rel in REGISTRY[t["method"]].data_files(t["hparams"]):
            files[rel] = resolve_file(rel, sweep.data_root)
    # On the worker the bundle is the data root: embedded and local files are read from it (source: local).
    out = [{**t, "dataset": {**t["dataset"], "paths": mounted[json.dumps(t["dataset"], sort_keys=True)],
                             "source": "hub" if t["dataset"].get("source") == "hub" else "local"},
            "data_root": None, "shipped_data": True} for t in todo]
    return pack_files(files), out


def _reached(checkpoints: list[int] | None, n: int) -> list[int] | None:
    """The checkpoints a stream of ``n`` edits reaches (a dataset with a shorter stream than the sweep's longest
    stops at its own end, which is always scored)."""
    if checkpoints is None:
        return None
    return [c for c in checkpoints if c <= n] or [n]


def plan(sweep: Sweep) -> list[dict[str, Any]]:
    """All grid points of the sweep, each a validated :class:`TrialSpec` as a JSON-able dict. Search-space
    hyper-parameters appear under ``tuned`` as TuneSpec dicts; :func:`trials` draws their values."""
    points: list[dict[str, Any]] = []
    fingerprints = {i: data_files(ds, sweep.data_root) for i, ds in enumerate(sweep.datasets)}
    for m in sweep.methods:
        combos, tuned = grid_axes(m.hparams)
        for model, (di, ds), seed, bs, mode, hp in itertools.product(
            sweep.models, enumerate(sweep.datasets), sweep.seeds, sweep.edit_batch_size, sweep.edit_mode, combos
        ):
            label = m.label or m.name
            tuned_specs = {k: t.model_dump(exclude_none=True) for k, t in tuned.items()}
            seq = "/seq" if mode == "sequential" else ""
            extra_files = {f"editor:{rel}": file_sha256(resolve_file(rel, sweep.data_root))
                           for rel in REGISTRY[m.name].data_files(hp)}
            points.append(TrialSpec.model_validate(
                {
                    "method": m.name,
                    "method_label": label,
                    "hparams": hp,
                    "tuned": tuned_specs,
                    "budget": m.budget.model_dump(),
                    "model": model.model_dump(),
                    "dataset": ds.model_dump(),
                    "data_files": {**fingerprints[di], **extra_files},
                    "seed": seed,
                    "edit_batch_size": bs,
                    "edit_mode": mode,
                    "checkpoints": _reached(sweep.checkpoints, sweep.edits_of(ds)),
                    "generation": sweep.generation,
                    "n_edits": sweep.edits_of(ds),
                    "data_root": sweep.data_root,
                    "device": sweep.device,
                    "retrain": sweep.retrain,
                    "reuse_converged": sweep.reuse_converged,
                    "run_name": f"{label}/{model.name}/{ds.name}/bs{bs}{seq}/s{seed}/{digest({**hp, **tuned_specs})}",
                }
            ).model_dump())
    return points


def config_digest(point: dict[str, Any], hparams: dict[str, Any]) -> str:
    """Stable digest of everything that determines a trial's result: method (and label), concrete hparams,
    budget, model and edited-weight globs, dataset options and file contents, seed, batch size and n_edits. Not
    the data root, the device or the store: the same trial elsewhere has the same digest (``--resume`` key).
    ``reuse_converged`` counts (when on): its trials may evaluate an editor trained longer than their budget."""
    ds = dict(point["dataset"])
    ds.pop("n_edits", None)  # the trial's n_edits is in the blob below (datasets without it keep their digests)
    ds["paths"] = sorted(ds.get("paths") or {})  # which splits are replaced; their contents are in data_files
    # Where local files lie (embedded, a data root) is not the result's business: their contents are in
    # data_files. "local" is what every local source digested as before sources were named.
    ds["source"] = "hub" if ds.get("source") == "hub" else "local"
    blob = {"method": point["method"], "label": point["method_label"], "hparams": hparams,
            "budget": budget_digest_fields(point["budget"]), "model": point["model"], "dataset": ds,
            "data_files": point["data_files"], "seed": point["seed"],
            "edit_batch_size": point["edit_batch_size"], "n_edits": point["n_edits"]}
    if point.get("edit_mode", "independent") != "independent":  # independent trials keep their earlier digests
        blob.update(edit_mode=point["edit_mode"], checkpoints=point.get("checkpoints"))
    if not point.get("generation", True):  # fewer metrics; trials with the protocol on keep their digests
        blob["generation"] = False
    if point.get("reuse_converged"):  # the editor may come from a longer training: another result
        blob["reuse_converged"] = True
    return digest(blob, 16)


def sample(spec: TuneSpec, rng: random.Random) -> Any:
    """One value from a search space, with Ray Tune's semantics (``randint`` excludes ``upper``)."""
    if spec.tune == "choice":
        return rng.choice(list(spec.values or []))
    lo, hi = float(spec.lower), float(spec.upper)  # type: ignore[arg-type]
    if spec.tune == "randint":
        return rng.randrange(int(lo), int(hi))
    if spec.tune == "loguniform":
        return math.exp(rng.uniform(math.log(lo), math.log(hi)))
    v = rng.uniform(lo, hi)
    if spec.tune == "quniform":
        q = spec.q or 1.0
        v = round(v / q) * q
    return v


def trials(sweep: Sweep, points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The concrete trials: each grid point once, or ``num_samples`` times with its search spaces drawn.

    Draws are seeded by the point's configuration and the sample index, so the same sweep gives the same trials
    (what ``--resume`` needs to recognise finished ones). Every trial carries ``config_digest``, ``point_digest``
    naming its grid point and, when drawn, ``sampled``; a grid point without search spaces is one trial (a repeat
    would be identical: trials are deterministic).
    """
    out: list[dict[str, Any]] = []
    for p in points:
        if not p["tuned"]:
            digest = config_digest(p, p["hparams"])
            out.append({**p, "sampled": {}, "config_digest": digest, "point_digest": digest})
            continue
        specs = {k: TuneSpec(**v) for k, v in p["tuned"].items()}
        base = config_digest(p, {"fixed": p["hparams"], "tuned": p["tuned"]})
        for s in range(sweep.num_samples):
            rng = random.Random(f"{base}/{s}")
            drawn = {k: sample(specs[k], rng) for k in sorted(specs)}
            hp = {**p["hparams"], **drawn}
            suffix = ",".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in drawn.items())
            out.append({**p, "hparams": hp, "sampled": drawn, "run_name": f"{p['run_name']}/{suffix}",
                        "config_digest": config_digest(p, hp), "point_digest": base})
    return out
