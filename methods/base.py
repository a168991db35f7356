"""The editor contract shared by every method.

An :class:`Editor` wraps an :class:`~bench.models.EditableModel`. ``edit(batch)`` returns an :class:`Edit`, a map
from parameter names to weight deltas and, for methods whose edits are not weight deltas (GRACE), from module names
to module adaptors (:mod:`bench.models.adaptors`); the model is evaluated with ``W + dW`` through
``torch.func.functional_call`` and the adaptors hooked in (see :meth:`EditableModel.logits`) and is never mutated
by an edit. A batched edit is one ``edit`` call on B requests; sequential edits compose with ``+``.

Each editor declares what it is with flags that each mean one thing: ``learned`` (``fit`` trains parameters on
training edits; the state is a checkpoint, reused across trials trained the same way), ``has_fit_step`` (``fit``
does work before the first edit: training, or statistics such as ROME's key second moment; its time and memory
are logged as the fit's), ``uses_training_data_at_edit_time`` (reads training records when editing, like FT+KL),
``modifies_base_model`` (its ``fit`` changes the pre-edit model, like ENN), the model kinds it supports
(``supported_kinds``), which weights it edits (:meth:`Editor.select_weights`: by default the model's, i.e. the
family's MLPs of the last blocks or the sweep's ``edit_params``; ROME one MLP output projection) and the data files
it reads besides the task's (:meth:`Editor.data_files`, e.g. ROME's covariance corpus). Hyper-parameters are a
pydantic model per method with the paper's defaults.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from bench import losses
from bench.data.batches import EditBatch
from bench.data.records import EditRecord
from bench.models import (Adaptor, Change, EditableModel, compose, load_adaptor, split,  # noqa: F401
                          weights_digest)  # weights_digest: re-exported
from methods import nets
from methods.budget import Budget, selection_rank

log = logging.getLogger(__name__)


StepLogger = Callable[[int, Mapping[str, float]], None]


class Hparams(BaseModel):
    """Base of every method's hyper-parameters: unknown keys are errors, values are validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class Edit:
    """What an edit changes: weight deltas by parameter name and module adaptors by module name (edits that are
    not weight deltas, :mod:`bench.models.adaptors`; none for most methods), plus how many optimiser steps the edit
    took and diagnostics."""

    deltas: dict[str, Tensor]
    steps: int = 0
    info: dict[str, float] = field(default_factory=dict)
    adaptors: dict[str, Adaptor] = field(default_factory=dict)

    @property
    def changes(self) -> dict[str, Change]:
        """Deltas and adaptors in one map: what ``EditableModel.logits`` / ``applying`` take."""
        return {**self.deltas, **self.adaptors}

    def __add__(self, other: "Edit") -> "Edit":
        """Compose two edits (apply ``self`` then ``other``): deltas add up, adaptors of one module compose as
        their method defines, steps add up, diagnostics are merged (``other``'s win)."""
        deltas, adaptors = split(compose(self.changes, other.changes))
        return Edit(deltas, self.steps + other.steps, {**self.info, **other.info}, adaptors)

    def detach(self) -> "Edit":
        return Edit({n: d.detach() for n, d in self.deltas.items()}, self.steps, dict(self.info),
                    {n: a.detach() for n, a in self.adaptors.items()})

    def save(self, path: str | Path) -> Path:
        """Write the edit to one safetensors file (deltas as ``delta/<name>``, adaptor tensors as
        ``adaptor/<module>/<tensor>``, adaptor kinds and settings and the steps in its header); returns the path."""
        from safetensors.torch import save_file  # only when an edit is saved

        tensors = {f"delta/{n}": d.detach().cpu().contiguous() for n, d in self.deltas.items()}
        meta = {"steps": str(self.steps)}
        for m, a in self.adaptors.items():
            tensors.update({f"adaptor/{m}/{k}": v.detach().cpu().contiguous() for k, v in a.tensors().items()})
            meta[f"adaptor/{m}"] = json.dumps({"kind": a.kind, **a.meta()})
        path = Path(path)
        save_file(tensors, str(path), metadata=meta)
        return path

    @staticmethod
    def load(path: str | Path, device: str | torch.device = "cpu") -> "Edit":
        """An edit written by :meth:`save` (its adaptors' kinds must be importable, i.e. their editor imported)."""
        from safetensors import safe_open  # only when an edit is loaded

        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        deltas = {k[len("delta/"):]: v for k, v in tensors.items() if k.startswith("delta/")}
        adaptors = {}
        for key, text in meta.items():
            if key.startswith("adaptor/"):
                m, settings = key[len("adaptor/"):], json.loads(text)
                mine = {k[len(key) + 1:]: v for k, v in tensors.items() if k.startswith(key + "/")}
                adaptors[m] = load_adaptor(settings.pop("kind"), mine, settings)
        return Edit(deltas, int(meta.get("steps", 0)), {}, adaptors)


#: Why a fit ended. Only ``converged`` (patience on validation ran out after the editor improved on its untrained
#: state) is a finished training; ``diverged``: patience ran out and no validation was better than step 0's, so
#: the editor kept its untrained state; ``max_steps`` and ``max_seconds`` mean the budget ended it while
#: validation had not stopped improving (budget-limited).
STOP_REASONS = ("untrained", "converged", "diverged", "max_steps", "max_seconds")


BUDGET_LIMITED = ("max_steps", "max_seconds")


@dataclass
class FitResult:
    """What ``fit`` did: steps, wall time, best validation metrics and at which step, and why it stopped
    (one of :data:`STOP_REASONS`)."""

    steps: int = 0
    seconds: float = 0.0
    best_step: int = 0
    best: dict[str, float] = field(default_factory=dict)
    stop_reason: str = "untrained"
    val_seconds: float = 0.0  #: of ``seconds``, the time spent validating
    resumed_step: int = 0  #: the step a resumed fit continued from (0: it started from scratch)
    #: Every validation: ``{"step", "val_loss", "val_es"}`` (and ``val_loc_agree``), step 0 first.
    history: list[dict[str, float]] = field(default_factory=list)
    select: str = "val_loss"  #: the checkpoint selection that chose ``best_step`` (:meth:`Budget.selection`)

    @property
    def budget_limited(self) -> bool:
        """True when the step or time budget, not convergence on validation, ended the training."""
        return self.stop_reason in BUDGET_LIMITED

    @property
    def kept_initial(self) -> bool:
        """True when the editor trained but kept its untrained state (step 0 was the best validation): its
        results are the untrained editor's, which for MEND / ENN / KE at init is (nearly) no edit at all."""
        return self.steps > 0 and self.best_step == 0 and self.stop_reason != "untrained"

    def kept_initial_text(self) -> str:
        """What a run's ``editbench.fit_kept_initial`` tag says: the losses and ES at step 0 and at the best later
        validation, and the validation ES at each validation. Empty unless :attr:`kept_initial`."""
        if not self.kept_initial or not self.history:
            return ""
        first, later = self.history[0], self.history[1:]
        text = (f"kept its untrained state after {self.steps} steps (chosen by {self.select.split(' (')[0]}): step 0 "
                f"val_loss {first['val_loss']:.4g}, val_es {first['val_es']:.3f}")
        if later:
            b = max(later, key=lambda h: selection_rank(self.select, h))
            text += f"; best later: step {b['step']:.0f} val_loss {b['val_loss']:.4g}, val_es {b['val_es']:.3f}"
        return text + "; val_es per validation: " + " ".join(f"{h['step']:.0f}:{h['val_es']:.3f}"
                                                              for h in self.history)


class Editor:
    """Base class of all editors. Subclasses set the class attributes and implement :meth:`edit`."""

    name: ClassVar[str] = "editor"
    Hparams: ClassVar[type[Hparams]] = Hparams
    #: ``fit`` trains parameters (MEND, ENN, KE): a checkpoint, a training key, a budget that applies.
    learned: ClassVar[bool] = False
    #: ``fit`` does work before the first edit (every learned editor; ROME/MEMIT's key statistics).
    has_fit_step: ClassVar[bool] = False
    uses_training_data_at_edit_time: ClassVar[bool] = False
    modifies_base_model: ClassVar[bool] = False
    #: Metrics reported during ``fit`` (name -> "max"/"min"); empty for editors that do not train.
    validation_metrics: ClassVar[dict[str, str]] = {}
    #: Model kinds (``EditableModel.kind``) the editor can edit; a sweep pairing it with another is refused.
    supported_kinds: ClassVar[tuple[str, ...]] = ("causal", "seq2seq", "classifier")
    #: Whether each edit request must name its subject (``EditRecord.subject``; ROME and MEMIT locate it).
    needs_subject: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.learned and not cls.has_fit_step:
            raise TypeError(f"{cls.__name__}: a learned editor has a fit step (set has_fit_step = True)")

    def __init__(self, model: EditableModel, hparams: Hparams | Mapping[str, Any] | None = None,
                 data_root: str | None = None) -> None:
        if hparams is None:
            hparams = self.Hparams()
        elif not isinstance(hparams, self.Hparams):
            hparams = self.Hparams(**dict(hparams))
        self.hparams = hparams
        if model.kind not in self.supported_kinds:
            raise ValueError(f"{self.name} edits {' / '.join(self.supported_kinds)} models; {model.name} is "
                             f"{model.kind}")
        chosen = self.select_weights(model, hparams)
        self.model = model if chosen == list(model.edit_params) else model.with_edit_params(chosen)
        #: Where :meth:`data_files` are resolved (``bench.data.resolve_file``): the sweep's data root.
        self.data_root = data_root

    @classmethod
    def select_weights(cls, model: EditableModel, hparams: Hparams) -> list[str]:
        """Names of the weights this editor changes on ``model``: by default the model's own choice (the family's
        MLP weights of the last blocks, or the sweep's ``models[].edit_params`` globs)."""
        return list(model.edit_params)

    @classmethod
    def data_files(cls, hparams: Mapping[str, Any]) -> list[str]:
        """Files (relative to the data root) the editor reads besides the task's; shipped to cluster workers and
        part of the trial's config digest. None by default."""
        return []

    @classmethod
    def code_version(cls) -> str:
        """16 hex digits of sha256 over the source of the modules this editor's class hierarchy lives in, the
        shared networks (``methods/nets.py``) and the losses (``bench/losses.py``): a trained editor is reused only
        by the same code (see ``bench.trial``'s training key)."""
        files = {inspect.getsourcefile(k) for k in cls.__mro__ if k.__module__.startswith("methods")}
        files |= {inspect.getsourcefile(nets), inspect.getsourcefile(losses)}
        h = hashlib.sha256()
        for f in sorted(x for x in files if x):
            h.update(Path(f).name.encode() + b"\0" + Path(f).read_bytes())
        return h.hexdigest()[:16]

    # ------------------------------------------------------------------ contract
    def fit(
        self,
        train: Sequence[EditRecord],
        val: Sequence[EditRecord],
        budget: Budget | None = None,
        log_fn: StepLogger | None = None,
        state_dir: str | Path | None = None,
    ) -> FitResult:
        """Prepare the editor before its first edit: train it on training edits (learned editors) or compute what
        every edit reads (ROME/MEMIT's statistics; the splits may then be empty). Editors without a fit step
        (:attr:`has_fit_step` False) do nothing.

        ``state_dir``: a folder where a learned editor keeps its training state while it trains, so that a fit
        that was interrupted (killed, Ctrl-C, a lost machine) continues where its last saved state left it when
        called again with the same folder, splits and budget, and ends as the uninterrupted fit would have. Editors
        that do not train ignore it."""
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
        from safetensors.torch import save_file  # only when an editor is saved

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file(self.state_dict(), str(path / "editor.safetensors"))
        (path / "editor.json").write_text(json.dumps(self.checkpoint_meta(), indent=2))
        return path

    def load(self, path: str | Path) -> None:
        """Load a checkpoint written by :meth:`save`; refuses one made for another method, family or weights."""
        from safetensors.torch import load_file  # only when an editor is loaded

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


def gradient_factors(model: EditableModel, batch: EditBatch, deltas: Mapping[str, Tensor] | None = None
                     ) -> dict[str, tuple[Tensor, Tensor]]:
    """(u, delta) rows of every edited weight for the edit loss on ``batch`` at ``W (+ deltas, + applied)``: the
    factors of the weight gradient, ``dL/dW = sum_i delta_i u_i^T`` (MEND's input; KE's gradient).

    The loss is the sum over requests of each request's mean target-token NLL, so a batched edit equals the sum
    of its requests' edits. u rows are the weight's inputs, delta rows the loss gradient w.r.t. its outputs;
    rows where either is all zero (padding, positions after the target) are dropped. Only the edited modules'
    outputs are differentiated: autograd stops at the lowest edited layer and forms no weight gradient.
    """
    modules = {n: n.rsplit(".", 1)[0] for n in model.edit_params}

    def start_graph(name: str, out: Tensor) -> Tensor:
        # The lowest edited layer(s) see outputs without a graph: the graph starts there.
        return out if out.requires_grad else out.detach().requires_grad_()

    with torch.enable_grad(), model.trace(list(dict.fromkeys(modules.values())), edit_output=start_graph) as io:
        logits = model.logits(batch.inputs, None if deltas is None else {k: v.detach() for k, v in deltas.items()})
        loss = -losses.seq_logprob(logits, batch.labels).sum()
        outs = [io[modules[n]].output for n in model.edit_params]
        grads = torch.autograd.grad(loss, outs, allow_unused=True)
    factors: dict[str, tuple[Tensor, Tensor]] = {}
    for n, g in zip(model.edit_params, grads):
        d_in, d_out = model.io_dims(n)
        u = io[modules[n]].input.detach().reshape(-1, d_in)
        g = torch.zeros(u.shape[0], d_out, dtype=u.dtype, device=u.device) if g is None else g.reshape(-1, d_out)
        keep = (u != 0).any(-1) & (g != 0).any(-1)
        factors[n] = (u[keep], g[keep].detach())
    return factors
