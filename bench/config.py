"""Sweep files: pydantic models, validation with one-line errors, and the trial plan (the grid).

A sweep is a grid over methods x models x datasets x seeds x edit batch sizes x each method's hyper-parameter
values (a YAML list is a grid axis), optionally with Tune search spaces (``{tune: loguniform, lower, upper}``)
sampled ``num_samples`` times. Everything here runs before Ray starts: a bad sweep never reaches a worker and
never leaves an MLflow run behind.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

from bench.cli import ECHO_LIMIT, clip, control_characters, cut
from bench.data import (DataError, dataset_root, file_sha256, hub_file, load_card, load_task, resolve_file,
                        split_overlaps)
from bench.models import ModelSpecError, model_kind_hint, resolve_model_source
from methods import REGISTRY, Budget
from methods.base import budget_digest_fields


class SweepError(ValueError):
    """A sweep that cannot run; ``str(err)`` is one line naming the key or file and what would be valid."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (not "last one wins")."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                dup = key in seen
            except TypeError:  # unhashable key: let the base loader give its own error
                break
            if dup:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {clip(key)} (a key may appear once per mapping)", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path, what: str = "file") -> Any:
    """Parse one YAML file strictly: UTF-8 only, no duplicate keys, bounded nesting; errors are one-line
    :class:`SweepError` naming the file (and line where YAML knows it)."""
    if path.is_dir():
        raise SweepError(f"{path}: is a directory; give a {what} YAML file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SweepError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SweepError(f"{path}: not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r}); "
                         f"save the {what} as UTF-8") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise SweepError(f"{path}:{where} invalid YAML: {cut(str(getattr(e, 'problem', None) or e))}") from None
    except RecursionError:
        raise SweepError(f"{path}: YAML nested too deeply to read; a {what} is a few levels deep") from None


class _Strict(BaseModel):
    # strict: YAML's `yes` is not an int, "3" is not a number; ints still count as floats.
    model_config = ConfigDict(extra="forbid", strict=True)


class TuneSpec(_Strict):
    """A Ray Tune search space for one hyper-parameter."""

    tune: Literal["uniform", "loguniform", "choice", "randint", "quniform"]
    lower: float | None = None
    upper: float | None = None
    values: list[Any] | None = None
    q: float | None = None

    @model_validator(mode="after")
    def _check(self) -> "TuneSpec":
        if self.tune == "choice":
            if not self.values:
                raise ValueError("tune: choice needs a non-empty 'values' list")
            return self
        if self.lower is None or self.upper is None:
            raise ValueError(f"tune: {self.tune} needs 'lower' and 'upper'")
        if self.lower >= self.upper:
            raise ValueError(f"lower ({self.lower}) must be below upper ({self.upper})")
        if self.tune == "loguniform" and self.lower <= 0:
            raise ValueError(f"loguniform needs lower > 0, got {self.lower}")
        return self

    def domain(self) -> Any:
        """The ray.tune domain object (imports Ray lazily: only bench.run calls this)."""
        from ray import tune

        if self.tune == "choice":
            return tune.choice(self.values)
        if self.tune == "randint":
            return tune.randint(int(self.lower), int(self.upper))
        if self.tune == "quniform":
            return tune.quniform(self.lower, self.upper, self.q or 1.0)
        return getattr(tune, self.tune)(self.lower, self.upper)

    def probes(self) -> list[Any]:
        """Values at the edges of the space, used to validate the hyper-parameter before any trial runs."""
        return list(self.values) if self.tune == "choice" else [self.lower, self.upper]


def _printable(v: str | None, where: str = "") -> str | None:
    """A name, path or label that becomes a file name, a path or an MLflow key holds no control character
    (``where`` names the entry inside the field, as ``test: `` for ``paths.test``)."""
    if v is not None and control_characters(v):
        raise ValueError(f"{where}holds control characters ({', '.join(control_characters(v))}); use printable text")
    return v


class ModelEntry(_Strict):
    name: str
    edit_params: list[str] | None = Field(default=None, description="globs overriding the family default")

    @field_validator("name")
    @classmethod
    def _name_printable(cls, v: str) -> str:
        return _printable(v)  # type: ignore[return-value]


class GenerateEntry(_Strict):
    """Generation-task settings (Wikitext) overriding the dataset card's ``generate`` block."""

    n_tokens: PositiveInt | None = Field(default=None, description="length of the sampled target y_e")
    max_prompt_tokens: PositiveInt | None = Field(default=None, le=200,
                                                  description="x_e = the passage's first N tokens (paper: 200)")


class DatasetEntry(_Strict):
    name: str
    locality: str | None = Field(default=None, description="locality source named on the dataset card")
    n_train: PositiveInt | None = None
    n_val: PositiveInt | None = None
    paths: dict[str, str] = Field(default_factory=dict, description="split -> file replacing the card's")
    prepare: dict[str, float] | None = Field(default=None, description="override the card's base-model preparation")
    generate: GenerateEntry | None = Field(default=None, description="override the card's target generation")
    source: Literal["embedded", "local", "hub"] | None = Field(
        default=None, description="embedded: the files shipped in datasets/data/; local: files under data_root or "
        "$EDITBENCH_DATA; hub: the card's Hub dataset (by id and pinned revision; cached by datasets, offline "
        "from that cache); default: the data-root order (data_root, $EDITBENCH_DATA, the embedded files)")

    @field_validator("paths")
    @classmethod
    def _paths_printable(cls, v: dict[str, str]) -> dict[str, str]:
        for k, p in v.items():
            _printable(p, f"{k}: ")
        return v


class TrialSpec(_Strict):
    """One concrete trial, from :func:`plan` / :func:`trials` to ``bench.trial.run_trial`` (it travels through Ray
    as ``model_dump()`` and is validated again on the worker)."""

    method: str
    method_label: str
    hparams: dict[str, Any] = Field(default_factory=dict)
    tuned: dict[str, dict[str, Any]] = Field(default_factory=dict, description="search spaces (TuneSpec dicts)")
    sampled: dict[str, Any] = Field(default_factory=dict, description="values drawn from ``tuned``")
    point_digest: str = Field(default="", description="the grid point the trial was drawn from (its samples "
                              "compete under a scheduler); a point without search spaces: its config digest")
    budget: Budget = Field(default_factory=Budget)
    model: ModelEntry
    dataset: DatasetEntry
    data_files: dict[str, str] = Field(default_factory=dict, description="file key -> sha256 (or url)")
    seed: int = 0
    edit_batch_size: PositiveInt = 1
    edit_mode: Literal["independent", "sequential"] = "independent"
    checkpoints: list[PositiveInt] | None = None
    n_edits: PositiveInt
    data_root: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    retrain: bool = False
    reuse_converged: bool = False
    run_name: str
    config_digest: str | None = None
    shipped_data: bool = False


class MethodEntry(_Strict):
    name: str
    hparams: dict[str, Any] = Field(default_factory=dict)
    budget: Budget = Field(default_factory=Budget)
    label: str | None = Field(default=None, description="display name when one method appears twice")

    @field_validator("label")
    @classmethod
    def _label_printable(cls, v: str | None) -> str | None:
        return _printable(v)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in REGISTRY:
            raise ValueError(f"unknown method {v!r}; valid: {', '.join(sorted(REGISTRY))}")
        return v


class SchedulerEntry(_Strict):
    """ASHA over the validation metrics learned editors report (``methods.base.LearnedEditor.validation_metrics``);
    one time unit is one report (a validation)."""

    type: Literal["asha"] = "asha"
    metric: str = "val_es"
    mode: Literal["max", "min"] = "max"
    grace_period: PositiveInt = 1
    max_t: PositiveInt = 100
    reduction_factor: float = Field(default=3.0, gt=1)


class Resources(_Strict):
    cpu: float = Field(default=1.0, gt=0)
    gpu: float = Field(default=0.0, ge=0, description="fractions share one GPU between trials")


class Sweep(_Strict):
    """A validated sweep file."""

    name: str = Field(min_length=1, description="MLflow experiment name")
    description: str = ""
    tracking_uri: str | None = None
    data_root: str | None = None
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    n_edits: PositiveInt = 100
    edit_batch_size: list[PositiveInt] = Field(default_factory=lambda: [1], min_length=1)
    edit_mode: list[Literal["independent", "sequential"]] = Field(
        default_factory=lambda: ["independent"], min_length=1,
        description="independent: every test edit starts from the unedited model; sequential: edits pile up")
    checkpoints: list[PositiveInt] | None = Field(
        default=None, description="sequential mode: edit counts at which every edit so far is scored "
                                  "(default 1, 10, 50, 100, 250, ... and the last)")
    num_samples: PositiveInt = 1
    max_concurrent: PositiveInt = 1
    resources: Resources = Field(default_factory=Resources)
    scheduler: SchedulerEntry | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    retrain: bool = Field(default=False, description="train learned editors even when the store holds a FINISHED "
                                                     "run trained the same way (default: load its checkpoint)")
    reuse_converged: bool = Field(
        default=False, description="learned editors: load the editor of a FINISHED run whose training CONVERGED "
        "(patience on validation) under any step or time budget, and was otherwise trained the same way (method, "
        "code, hparams, model and weights, train/val data, seed, edit batch), before training under this sweep's "
        "budget; the run's tags name the source")
    models: list[ModelEntry] = Field(min_length=1)
    datasets: list[DatasetEntry] = Field(min_length=1)
    methods: list[MethodEntry] = Field(min_length=1)

    @field_validator("name")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be blank (it names the MLflow experiment)")
        return _printable(v)  # type: ignore[return-value]

    @field_validator("data_root", "tracking_uri")
    @classmethod
    def _path_printable(cls, v: str | None) -> str | None:
        return _printable(v)

    @model_validator(mode="after")
    def _batch_fits(self) -> "Sweep":
        too_big = [b for b in self.edit_batch_size if b > self.n_edits]
        if too_big:
            raise ValueError(f"edit_batch_size {too_big[0]} is larger than n_edits ({self.n_edits}); "
                             f"use a batch size <= n_edits")
        return self

    @model_validator(mode="after")
    def _checkpoints_in_stream(self) -> "Sweep":
        cps = self.checkpoints
        if cps is None:
            return self
        if "sequential" not in self.edit_mode:
            raise ValueError("checkpoints score a sequential stream; add edit_mode: [sequential] or remove them")
        past = [c for c in cps if c > self.n_edits]
        if past:
            raise ValueError(f"checkpoints: {past[0]} is past the end of the stream (n_edits {self.n_edits}); "
                             f"use checkpoints <= {self.n_edits}")
        dup = sorted({c for c in cps if cps.count(c) > 1})
        if dup:
            raise ValueError(f"checkpoints: {dup[0]} is given twice; give each edit count once")
        return self

    @field_validator("edit_batch_size", "seeds", "edit_mode", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return v if isinstance(v, list) else [v]

    @field_validator("models", mode="before")
    @classmethod
    def _model_names(cls, v: Any) -> Any:
        return [{"name": m} if isinstance(m, str) else m for m in v] if isinstance(v, list) else v

    @field_validator("datasets", mode="before")
    @classmethod
    def _dataset_names(cls, v: Any) -> Any:
        return [{"name": d} if isinstance(d, str) else d for d in v] if isinstance(v, list) else v


def _model_at(root: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class that holds the field at ``loc`` (for listing its valid keys)."""
    import typing

    cls: Any = root
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return None
        ann = field.annotation
        cands = [ann, *typing.get_args(ann)]
        cands += [a for c in list(cands) for a in typing.get_args(c)]
        nxt = next((c for c in cands if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nxt is None:
            return None
        cls = nxt
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def format_validation(err: ValidationError, source: str, root: type[BaseModel] | None = None) -> str:
    """One line for a pydantic error: where, what, the offending value (clipped), and valid keys for unknown ones."""
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
    msg = e["msg"].removeprefix("Value error, ")
    extra = f" ({len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    if e["type"] == "extra_forbidden":
        holder = _model_at(root, tuple(e["loc"])) if root is not None else None
        valid = f"; valid: {', '.join(holder.model_fields)}" if holder is not None else ""
        return f"{source}: {cut(loc)}: unknown key{valid}{extra}"
    got = ""
    if "input" in e and e["type"] not in ("missing", "value_error") and not isinstance(e["input"], dict):
        got = f" (got {clip(e['input'])})"
    return f"{source}: {cut(loc)}: {cut(msg, 2 * ECHO_LIMIT)}{got}{extra}"



def load_sweep(path: str | Path) -> Sweep:
    """Parse and validate a sweep file's structure; raises :class:`SweepError` with a one-line message."""
    path = Path(path)
    if not path.exists():
        raise SweepError(f"sweep file not found: {path}")
    raw = read_yaml(path, "sweep")
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return Sweep(**raw)
    except ValidationError as e:
        raise SweepError(format_validation(e, str(path), Sweep)) from None
    except RecursionError:
        raise SweepError(f"{path}: values nested too deeply to validate") from None


# ------------------------------------------------------------------------------------------------ the plan


def _tune_spec(key: str, value: dict[str, Any]) -> TuneSpec:
    """A search space for hyper-parameter ``key``; errors name it (``hparams.lr.lower: ...``)."""
    try:
        return TuneSpec(**value)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = f"unknown key; valid: {', '.join(TuneSpec.model_fields)}"
        got = f" (got {clip(err['input'])})" if err["type"] not in ("value_error", "missing") else ""
        raise SweepError(f"hparams.{key}{'.' + where if where else ''}: {msg}{got}") from None


def _grid_axes(hparams: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, TuneSpec]]:
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
    from bench.data import pack_files

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


def plan(sweep: Sweep) -> list[dict[str, Any]]:
    """All grid points of the sweep, each a validated :class:`TrialSpec` as a JSON-able dict. Search-space
    hyper-parameters appear under ``tuned`` as TuneSpec dicts; :func:`trials` draws their values."""
    points: list[dict[str, Any]] = []
    fingerprints = {i: data_files(ds, sweep.data_root) for i, ds in enumerate(sweep.datasets)}
    for m in sweep.methods:
        combos, tuned = _grid_axes(m.hparams)
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
                    "checkpoints": sweep.checkpoints,
                    "n_edits": sweep.n_edits,
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
        if "classifier" not in kinds:
            for i, ds in enumerate(sweep.datasets):
                if load_card(ds.name).kind == "classification":
                    raise SweepError(f"{source}: methods.{mi} ({m.name}) edits {' / '.join(kinds)} models; "
                                     f"datasets.{i} ({cut(ds.name, 80)}) is a classification task")
        for combo in _grid_axes(m.hparams)[0]:
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
            combos, tuned = _grid_axes(m.hparams)
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
                    err = e.errors()[0]
                    key = ".".join(str(p) for p in err["loc"])
                    valid = ", ".join(sorted(cls.Hparams.model_fields)) if err["type"] == "extra_forbidden" else ""
                    msg = f"unknown key for {m.name}; valid: {valid}" if valid else err["msg"]
                    raise SweepError(
                        f"{source}: methods.{mi}.hparams.{key}: {msg} (got {clip(err.get('input'))})"
                    ) from None
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
            if ds.generate is not None and card.kind != "generation":
                raise DataError(f"generate is only for generation datasets; {ds.name} is {card.kind}")
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
                if len(task["test"]) < sweep.n_edits:
                    raise DataError(f"n_edits ({sweep.n_edits}) is more than the test split holds "
                                    f"({len(task['test'])} records from {task.files['test']}, seed {seed}); "
                                    f"use n_edits <= {len(task['test'])}")
        except DataError as e:
            raise SweepError(f"{source}: datasets.{i} ({cut(ds.name, 80)}): {e}") from None
    return plan(sweep)
