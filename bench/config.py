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
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

from bench.data import DataError, load_card, load_task
from bench.models import ModelSpecError, resolve_model_source
from methods import REGISTRY


class SweepError(ValueError):
    """A sweep that cannot run; ``str(err)`` is one line naming the key or file and what would be valid."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


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


class ModelEntry(_Strict):
    name: str
    edit_params: list[str] | None = Field(default=None, description="globs overriding the family default")


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
    source: Literal["local", "public"] = Field(
        default="local", description="local: files under the data root; public: the card's public URLs (internet)")


class BudgetEntry(_Strict):
    """Training budget for learned editors (see methods.base.Budget)."""

    max_steps: PositiveInt = 1000
    max_seconds: float | None = Field(default=None, gt=0)
    val_every: PositiveInt = 50
    val_edits: PositiveInt = 50
    patience: PositiveInt = 5
    batch_size: PositiveInt = 1
    grad_accum: PositiveInt = 1


class MethodEntry(_Strict):
    name: str
    hparams: dict[str, Any] = Field(default_factory=dict)
    budget: BudgetEntry = Field(default_factory=BudgetEntry)
    label: str | None = Field(default=None, description="display name when one method appears twice")

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in REGISTRY:
            raise ValueError(f"unknown method {v!r}; valid: {', '.join(sorted(REGISTRY))}")
        return v


class SchedulerEntry(_Strict):
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

    name: str = Field(description="MLflow experiment name")
    description: str = ""
    tracking_uri: str | None = None
    data_root: str | None = None
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    n_edits: PositiveInt = 100
    edit_batch_size: list[PositiveInt] = Field(default_factory=lambda: [1], min_length=1)
    num_samples: PositiveInt = 1
    max_concurrent: PositiveInt = 1
    resources: Resources = Field(default_factory=Resources)
    scheduler: SchedulerEntry | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    models: list[ModelEntry] = Field(min_length=1)
    datasets: list[DatasetEntry] = Field(min_length=1)
    methods: list[MethodEntry] = Field(min_length=1)

    @field_validator("edit_batch_size", "seeds", mode="before")
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


def _format_validation(err: ValidationError, source: str) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
    msg = e["msg"].removeprefix("Value error, ")
    extra = f" ({len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    if e["type"] == "extra_forbidden":
        msg = "unknown key"
    return f"{source}: {loc}: {msg}{extra}"


def load_sweep(path: str | Path) -> Sweep:
    """Parse and validate a sweep file's structure; raises :class:`SweepError` with a one-line message."""
    path = Path(path)
    if not path.exists():
        raise SweepError(f"sweep file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise SweepError(f"{path}:{where} invalid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return Sweep(**raw)
    except ValidationError as e:
        raise SweepError(_format_validation(e, str(path))) from None


# ------------------------------------------------------------------------------------------------ the plan


def _grid_axes(hparams: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, TuneSpec]]:
    """Split a method's hparams into concrete grid combinations and Tune search spaces."""
    fixed: dict[str, list[Any]] = {}
    tuned: dict[str, TuneSpec] = {}
    for k, v in hparams.items():
        if isinstance(v, dict) and "tune" in v:
            tuned[k] = TuneSpec(**v)
        elif isinstance(v, list):
            fixed[k] = v
        else:
            fixed[k] = [v]
    keys = list(fixed)
    combos = [dict(zip(keys, vals)) for vals in itertools.product(*(fixed[k] for k in keys))] or [{}]
    return combos, tuned


def digest(obj: Any, n: int = 6) -> str:
    """Short stable hash of a JSON-able object (used in run names)."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def plan(sweep: Sweep) -> list[dict[str, Any]]:
    """All grid points of the sweep, each a JSON-able trial spec. Search-space hyper-parameters appear under
    ``tuned`` as TuneSpec dicts and are sampled by Ray Tune."""
    points: list[dict[str, Any]] = []
    for m in sweep.methods:
        combos, tuned = _grid_axes(m.hparams)
        for model, ds, seed, bs, hp in itertools.product(
            sweep.models, sweep.datasets, sweep.seeds, sweep.edit_batch_size, combos
        ):
            label = m.label or m.name
            tuned_specs = {k: t.model_dump(exclude_none=True) for k, t in tuned.items()}
            points.append(
                {
                    "method": m.name,
                    "method_label": label,
                    "hparams": hp,
                    "tuned": tuned_specs,
                    "budget": m.budget.model_dump(),
                    "model": model.model_dump(),
                    "dataset": ds.model_dump(),
                    "seed": seed,
                    "edit_batch_size": bs,
                    "n_edits": sweep.n_edits,
                    "data_root": sweep.data_root,
                    "device": sweep.device,
                    "run_name": f"{label}/{model.name}/{ds.name}/bs{bs}/s{seed}/{digest({**hp, **tuned_specs})}",
                }
            )
    return points


def validate(sweep: Sweep, source: str = "sweep") -> list[dict[str, Any]]:
    """Check everything that can be checked without weights: hyper-parameter values per method, model names,
    dataset cards, locality sources, data files, record fields and non-empty splits. Returns the plan."""
    for mi, m in enumerate(sweep.methods):
        cls = REGISTRY[m.name]
        try:
            combos, tuned = _grid_axes(m.hparams)
        except ValidationError as e:
            raise SweepError(_format_validation(e, f"{source}: methods.{mi}.hparams")) from None
        for combo in combos:
            probes = [combo] if not tuned else [
                {**combo, **{k: t.probes()[i % len(t.probes())] for k, t in tuned.items()}} for i in range(2)
            ]
            for values in probes:
                try:
                    cls.Hparams(**values)
                except ValidationError as e:
                    err = e.errors()[0]
                    key = ".".join(str(p) for p in err["loc"])
                    valid = ", ".join(sorted(cls.Hparams.model_fields)) if err["type"] == "extra_forbidden" else ""
                    msg = f"unknown key for {m.name}; valid: {valid}" if valid else err["msg"]
                    raise SweepError(
                        f"{source}: methods.{mi}.hparams.{key}: {msg} (got {err.get('input')!r})"
                    ) from None
    for i, model in enumerate(sweep.models):
        try:
            resolve_model_source(model.name)
        except ModelSpecError as e:
            raise SweepError(f"{source}: models.{i}.name: {e}") from None
    for i, ds in enumerate(sweep.datasets):
        try:
            card = load_card(ds.name)
            if ds.generate is not None and card.kind != "generation":
                raise DataError(f"generate is only for generation datasets; {ds.name} is {card.kind}")
            if ds.source == "public":
                urls = (card.source or {}).get("files") or {}
                if not urls:
                    raise DataError(f"datasets/{ds.name}.yaml has no public source.files; use source: local")
                continue  # downloaded by the trial on a machine with internet
            loc = ds.locality or card.default_locality
            if loc not in card.locality:
                raise DataError(f"locality {loc!r} unknown for {ds.name}; valid: {', '.join(card.locality)}")
            if card.locality[loc].file:
                from bench.data import resolve_file

                resolve_file(card.locality[loc].file, sweep.data_root)
            for seed in sweep.seeds:
                load_task(ds.name, sweep.data_root, seed=seed,
                          sizes={"train": ds.n_train, "val": ds.n_val, "test": sweep.n_edits}, paths=ds.paths)
        except DataError as e:
            raise SweepError(f"{source}: datasets.{i} ({ds.name}): {e}") from None
    return plan(sweep)
