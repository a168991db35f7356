"""Dataset cards: ``datasets/<name>.yaml`` parsed and validated."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal


log = logging.getLogger(__name__)

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationError,
    field_validator,
)

from bench.data.files import CARDS_DIR, EMBEDDED_ROOT, REPO_ROOT  # noqa: F401 (re-exported)
from bench.data.kinds import task_kind
from bench.data.readers import READERS
from bench.data.records import SPLITS, DataError
from bench.yamlio import one_line, read_yaml


class _Card(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LocalitySource(_Card):
    """Where locality prompts come from: the record's own (``record``), or another file of the data root.

    ``keep: base_correct`` keeps only prompts whose answer the unedited model already produces (teacher-forced
    argmax), so accuracy drawdown can move on small models.
    """

    name: str
    source: Literal["record", "file"] = "record"
    file: str | None = None
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    keep: Literal["all", "base_correct"] = "all"
    max_prompts: PositiveInt = 2000


class HubFile(_Card):
    """One file of a dataset on the Hugging Face Hub, named as lm-evaluation-harness task configs name them:
    ``dataset_name`` (the config), ``data_files`` (a file inside the repository, for repositories of raw files)
    and ``split``; the repository and revision are the card's ``hub.dataset_path`` / ``hub.revision``."""

    dataset_name: str | None = None
    data_files: str | None = None
    split: str = "train"


class HubSource(_Card):
    """Where the full public data lives on the Hub: ``dataset_path`` (the repository id), a pinned ``revision``
    (a commit, or a ref such as ``refs/convert/parquet``) and, per card file key (all/train/val/test/rephrase),
    the :class:`HubFile` that takes its place. Files the block does not name (locality sources) come from the
    data root as with ``source: local``."""

    dataset_path: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
    revision: str = Field(min_length=1)
    files: dict[str, HubFile]
    note: str = ""

    @field_validator("files")
    @classmethod
    def _keys(cls, v: dict[str, HubFile]) -> dict[str, HubFile]:
        if not v or not set(v) <= {"all", "rephrase", *SPLITS}:
            raise ValueError(f"must map some of all/train/val/test/rephrase to Hub files, got {sorted(v)}")
        return v


class DatasetCard(_Card):
    """A parsed and validated ``datasets/<name>.yaml`` (unknown keys are errors, as in sweep files)."""

    name: str
    reader: str
    kind: str = Field(description="a registered task kind (bench.data.kinds)")
    files: dict[str, str]
    fields: dict[str, Any] = Field(default_factory=dict, description="record field -> source key (and reader options)")
    fractions: dict[str, float] = Field(default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1})
    locality: dict[str, LocalitySource] = Field(default_factory=dict)
    default_locality: str = "record"
    rome_neighbourhood: bool = False
    question_template: str | None = Field(default=None, description="how the generation protocol asks x_e as a "
                                          "question, with {prompt}; none: the prompt itself")
    labels: tuple[str, ...] = ()
    label_seed: int = 0
    rephrase_file: str | None = None
    prepare: dict[str, Any] = Field(default_factory=dict)
    generate: dict[str, Any] = Field(default_factory=dict)
    hub: HubSource | None = Field(default=None, description="the full public data on the Hugging Face Hub")
    licence: str = ""
    citation: str = ""

    @field_validator("files")
    @classmethod
    def _files(cls, v: dict[str, str]) -> dict[str, str]:
        if not v or not set(v) <= {"all", *SPLITS}:
            raise ValueError(f"must map some of all/train/val/test to paths, got {v!r}")
        return v

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: str) -> str:
        return task_kind(v).name  # a DataError (a ValueError) names the registered kinds

    @field_validator("question_template")
    @classmethod
    def _template(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            shown = v.format(prompt="")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"must be text with one {{prompt}} field and no other braces ({e!r}); got {v!r}") from None
        if "{prompt}" not in v or not shown.strip():
            raise ValueError(f"must contain {{prompt}} (where x_e goes) and some words around it; got {v!r}")
        return v

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, v: dict[str, float]) -> dict[str, float]:
        if not set(v) <= set(SPLITS) or any(x < 0 for x in v.values()):
            raise ValueError(f"must map splits (train/val/test) to non-negative fractions, got {v!r}")
        return v


def available_cards() -> list[str]:
    """Names of the dataset cards shipped in ``datasets/``."""
    return sorted(p.stem for p in CARDS_DIR.glob("*.yaml"))


def load_card(name: str) -> DatasetCard:
    """Parse and validate the card of dataset ``name``; an invalid card raises :class:`DataError` naming the
    file, the key and what would be valid."""
    if name not in available_cards():  # a name never becomes a path before it is known to be a card
        shown = repr(name) if len(name) <= 80 else repr(name[:80]) + "..."
        raise DataError(f"unknown dataset {shown}; valid: {', '.join(available_cards())}")
    path = CARDS_DIR / f"{name}.yaml"
    raw = read_yaml(path, "dataset card", DataError, shown=path.name) or {}
    if not isinstance(raw, dict):
        raise DataError(f"{path.name}: a card is a mapping of keys, got {type(raw).__name__}")
    if raw.get("reader") not in READERS:
        raise DataError(f"{path.name}: reader {raw.get('reader')!r} unknown; valid: {', '.join(READERS)}")
    loc = {"record": {"name": "record"}}
    for lname, lraw in (raw.get("locality") or {}).items():
        loc[lname] = {"name": lname, **(lraw or {})}
    body = {k: v for k, v in raw.items() if v is not None or k in ("rephrase_file",)}
    try:
        return DatasetCard.model_validate({**body, "name": name, "locality": loc})
    except ValidationError as e:
        raise DataError(one_line(e, path.name, DatasetCard)) from None
