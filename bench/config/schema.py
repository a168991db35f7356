"""The sweep file's schema (pydantic, strict: unknown keys and wrong types are errors) and its loader."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PositiveInt, ValidationError, field_validator, model_validator

from bench.cli import control_characters
from bench.yamlio import Strict, one_line, read_yaml
from methods import REGISTRY, Budget


class SweepError(ValueError):
    """A sweep that cannot run; ``str(err)`` is one line naming the key or file and what would be valid."""


class TuneSpec(Strict):
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

    def probes(self) -> list[Any]:
        """Values at the edges of the space, used to validate the hyper-parameter before any trial runs."""
        return list(self.values) if self.tune == "choice" else [self.lower, self.upper]


def _printable(v: str | None, where: str = "") -> str | None:
    """A name, path or label that becomes a file name, a path or an MLflow key holds no control character
    (``where`` names the entry inside the field, as ``test: `` for ``paths.test``)."""
    if v is not None and control_characters(v):
        raise ValueError(f"{where}holds control characters ({', '.join(control_characters(v))}); use printable text")
    return v


class ModelEntry(Strict):
    name: str
    edit_params: list[str] | None = Field(default=None, description="globs overriding the family default")

    @field_validator("name")
    @classmethod
    def _name_printable(cls, v: str) -> str:
        return _printable(v)  # type: ignore[return-value]


class GenerateEntry(Strict):
    """Generation-task settings (Wikitext) overriding the dataset card's ``generate`` block."""

    n_tokens: PositiveInt | None = Field(default=None, description="length of the sampled target y_e")
    max_prompt_tokens: PositiveInt | None = Field(default=None, le=200,
                                                  description="x_e = the passage's first N tokens (paper: 200)")


class DatasetEntry(Strict):
    name: str
    locality: str | None = Field(default=None, description="locality source named on the dataset card")
    n_train: PositiveInt | None = None
    n_val: PositiveInt | None = None
    n_edits: PositiveInt | None = Field(default=None, description="this dataset's test edits (the length of its "
                                        "sequential stream); default: the sweep's n_edits")
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
            if not p.strip():
                raise ValueError(f"{k}: an empty path; name the file that replaces the card's {k} split")
        return v


class TrialSpec(Strict):
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
    generation: bool = True
    n_edits: PositiveInt
    data_root: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    retrain: bool = False
    reuse_converged: bool = False
    run_name: str
    config_digest: str | None = None
    shipped_data: bool = False


class MethodEntry(Strict):
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


class SchedulerEntry(Strict):
    """ASHA over the validation metrics learned editors report (``methods.learned.LearnedEditor.validation_metrics``);
    one time unit is one report (a validation)."""

    type: Literal["asha"] = "asha"
    metric: str = "val_es"
    mode: Literal["max", "min"] = "max"
    grace_period: PositiveInt = 1
    max_t: PositiveInt = 100
    reduction_factor: float = Field(default=3.0, gt=1)


class Resources(Strict):
    cpu: float = Field(default=1.0, gt=0)
    gpu: float = Field(default=0.0, ge=0, description="fractions share one GPU between trials")


class Sweep(Strict):
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
    generation: bool = Field(
        default=True, description="score every edit by the generation protocol too (the edited model's free "
                                  "answers, bench.answers) besides the teacher-forced and probability metrics")
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

    def edits_of(self, ds: DatasetEntry) -> int:
        """The test edits of one dataset: its own ``n_edits``, else the sweep's."""
        return ds.n_edits or self.n_edits

    @model_validator(mode="after")
    def _batch_fits(self) -> "Sweep":
        shortest = min(self.edits_of(ds) for ds in self.datasets)
        too_big = [b for b in self.edit_batch_size if b > shortest]
        if too_big:
            raise ValueError(f"edit_batch_size {too_big[0]} is larger than n_edits ({shortest}); "
                             f"use a batch size <= n_edits")
        return self

    @model_validator(mode="after")
    def _checkpoints_in_stream(self) -> "Sweep":
        cps = self.checkpoints
        if cps is None:
            return self
        if "sequential" not in self.edit_mode:
            raise ValueError("checkpoints score a sequential stream; add edit_mode: [sequential] or remove them")
        longest = max(self.edits_of(ds) for ds in self.datasets)
        past = [c for c in cps if c > longest]
        if past:
            raise ValueError(f"checkpoints: {past[0]} is past the end of the stream (n_edits {longest}); "
                             f"use checkpoints <= {longest}")
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


def load_sweep(path: str | Path) -> Sweep:
    """Parse and validate a sweep file's structure; raises :class:`SweepError` with a one-line message."""
    path = Path(path)
    if not path.exists():
        raise SweepError(f"sweep file not found: {path}")
    raw = read_yaml(path, "sweep", SweepError)
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return Sweep(**raw)
    except ValidationError as e:
        raise SweepError(one_line(e, str(path), Sweep)) from None
    except RecursionError:
        raise SweepError(f"{path}: values nested too deeply to validate") from None
