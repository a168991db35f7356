"""The editor contract shared by every method.

An :class:`Editor` wraps an :class:`~bench.models.EditableModel`. ``edit(batch)`` returns an :class:`Edit`, a map
from parameter names to weight deltas; the model is evaluated with ``W + dW`` through
``torch.func.functional_call`` (see :meth:`EditableModel.logits`) and is never mutated by an edit. A batched edit
is one ``edit`` call on B requests; sequential edits compose deltas with ``+``.

Each editor declares ``requires_training`` (needs ``fit`` on training edits), ``uses_training_data_at_edit_time``
(reads training records when editing, like FT+KL) and ``modifies_base_model`` (its ``fit`` changes the pre-edit
model, like ENN). Hyper-parameters are a pydantic model per method with the paper's defaults.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from bench.data import EditBatch, EditRecord
from bench.models import EditableModel

log = logging.getLogger(__name__)

StepLogger = Callable[[int, Mapping[str, float]], None]


class Hparams(BaseModel):
    """Base of every method's hyper-parameters: unknown keys are errors, values are validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class Edit:
    """Weight deltas by parameter name, plus how many optimiser steps the edit took and diagnostics."""

    deltas: dict[str, Tensor]
    steps: int = 0
    info: dict[str, float] = field(default_factory=dict)

    def __add__(self, other: "Edit") -> "Edit":
        """Compose two edits (apply ``self`` then ``other``): deltas add up, steps add up."""
        deltas = dict(self.deltas)
        for n, d in other.deltas.items():
            deltas[n] = deltas[n] + d if n in deltas else d
        return Edit(deltas, self.steps + other.steps)

    def detach(self) -> "Edit":
        return Edit({n: d.detach() for n, d in self.deltas.items()}, self.steps, dict(self.info))


@dataclass
class Budget:
    """Training budget of a learned editor (ignored by editors that need no training)."""

    max_steps: int = 1000
    max_seconds: float | None = None
    val_every: int = 50
    val_edits: int = 50
    patience: int = 5
    batch_size: int = 1
    grad_accum: int = 1


@dataclass
class FitResult:
    """What ``fit`` did: steps, wall time, best validation metrics and at which step."""

    steps: int = 0
    seconds: float = 0.0
    best_step: int = 0
    best: dict[str, float] = field(default_factory=dict)


class Editor:
    """Base class of all editors. Subclasses set the class attributes and implement :meth:`edit`."""

    name: ClassVar[str] = "editor"
    Hparams: ClassVar[type[Hparams]] = Hparams
    requires_training: ClassVar[bool] = False
    uses_training_data_at_edit_time: ClassVar[bool] = False
    modifies_base_model: ClassVar[bool] = False

    def __init__(self, model: EditableModel, hparams: Hparams | Mapping[str, Any] | None = None) -> None:
        self.model = model
        if hparams is None:
            hparams = self.Hparams()
        elif not isinstance(hparams, self.Hparams):
            hparams = self.Hparams(**dict(hparams))
        self.hparams = hparams

    # ------------------------------------------------------------------ contract
    def fit(
        self,
        train: Sequence[EditRecord],
        val: Sequence[EditRecord],
        budget: Budget | None = None,
        log_fn: StepLogger | None = None,
    ) -> FitResult:
        """Prepare the editor on training edits. Editors that need no training do nothing."""
        return FitResult()

    def edit(self, batch: EditBatch) -> Edit:
        """Return weight deltas that make the model produce ``batch``'s targets. Must not mutate the model."""
        raise NotImplementedError

    # ------------------------------------------------------------------ state
    def modules(self) -> dict[str, torch.nn.Module]:
        """Trainable sub-modules whose state makes up a checkpoint (empty for editors without state)."""
        return {}

    def state_dict(self) -> dict[str, Tensor]:
        """All tensors of the editor's state, flat, for safetensors."""
        out: dict[str, Tensor] = {}
        for prefix, mod in self.modules().items():
            for k, v in mod.state_dict().items():
                out[f"{prefix}.{k}"] = v.detach().cpu().contiguous()
        return out

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        for prefix, mod in self.modules().items():
            sub = {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
            mod.load_state_dict(sub)

    def checkpoint_meta(self) -> dict[str, Any]:
        """What a checkpoint must match to be loaded: method, model family, edited names and shapes."""
        return {
            "method": self.name,
            "family": self.model.family,
            "model": self.model.name,
            "edit_params": {n: list(w.shape) for n, w in self.model.weights().items()},
            "hparams": self.hparams.model_dump(mode="json"),
        }

    def save(self, path: str | Path) -> Path:
        """Write ``<path>/editor.safetensors`` and ``<path>/editor.json``; returns the folder."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file(self.state_dict(), str(path / "editor.safetensors"))
        (path / "editor.json").write_text(json.dumps(self.checkpoint_meta(), indent=2))
        return path

    def load(self, path: str | Path) -> None:
        """Load a checkpoint written by :meth:`save`; refuses one made for another method, family or weights."""
        from safetensors.torch import load_file

        path = Path(path)
        meta = json.loads((path / "editor.json").read_text())
        mine = self.checkpoint_meta()
        for key in ("method", "family"):
            if meta.get(key) != mine[key]:
                raise ValueError(f"checkpoint {path}: {key} is {meta.get(key)!r}, this editor has {mine[key]!r}")
        theirs, ours = meta.get("edit_params", {}), mine["edit_params"]
        if list(theirs) != list(ours):
            missing = sorted(set(ours) - set(theirs))
            extra = sorted(set(theirs) - set(ours))
            raise ValueError(
                f"checkpoint {path}: edited parameter names differ (missing {missing}, unexpected {extra})"
            )
        for n in ours:
            if list(theirs[n]) != list(ours[n]):
                raise ValueError(f"checkpoint {path}: shape of {n} is {theirs[n]}, the model has {ours[n]}")
        self.load_state_dict(load_file(str(path / "editor.safetensors")))


def weights_digest(model: EditableModel) -> str:
    """SHA-256 over every parameter's bytes, in name order: proves whether the base model changed."""
    h = hashlib.sha256()
    for n, p in sorted(model.model.named_parameters(), key=lambda kv: kv[0]):
        h.update(n.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
