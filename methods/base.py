"""The editor contract shared by every method.

An :class:`Editor` wraps an :class:`~bench.models.EditableModel`. ``edit(batch)`` returns an :class:`Edit`, a map
from parameter names to weight deltas; the model is evaluated with ``W + dW`` through
``torch.func.functional_call`` (see :meth:`EditableModel.logits`) and is never mutated by an edit. A batched edit
is one ``edit`` call on B requests; sequential edits compose deltas with ``+``.

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
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Mapping, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator
from torch import Tensor

from bench.data.batches import EditBatch
from bench.data.records import EditRecord
from bench.models import EditableModel, weights_digest  # noqa: F401 (re-exported)

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
        """Compose two edits (apply ``self`` then ``other``): deltas add up, steps add up, diagnostics are
        merged (``other``'s win)."""
        deltas = dict(self.deltas)
        for n, d in other.deltas.items():
            deltas[n] = deltas[n] + d if n in deltas else d
        return Edit(deltas, self.steps + other.steps, {**self.info, **other.info})

    def detach(self) -> "Edit":
        return Edit({n: d.detach() for n, d in self.deltas.items()}, self.steps, dict(self.info))


class Budget(BaseModel):
    """Training budget of a learned editor (ignored by editors that need no training); the sweep file's
    ``methods[].budget`` is validated against this model (unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    max_steps: PositiveInt = 1000
    max_seconds: float | None = Field(default=None, gt=0)
    val_every: PositiveInt = 50
    val_edits: PositiveInt = 50
    patience: PositiveInt = 5
    batch_size: PositiveInt = 1
    grad_accum: PositiveInt = 1
    #: Which validation chooses the checkpoint the editor keeps (and what patience counts).
    select: Literal["val_loss", "val_es"] = Field(
        default="val_loss",
        description="val_loss: the lowest c_edit * L_e + c_loc * L_loc, the authors' early-stop key (it keeps "
                    "an editor that does nothing whenever the edit term gains less than the locality term, zero "
                    "at step 0, loses); val_es: the highest validation ES (ties: lower val_loss) among "
                    "validations whose locality agreement is at least loc_floor")
    loc_floor: float | None = Field(
        default=None, ge=0.0, le=1.0,
        description="with select: val_es, the least validation locality agreement (share of locality positions "
                    "whose argmax is unchanged) a checkpoint needs to be chosen")

    @model_validator(mode="after")
    def _floor_needs_es(self) -> "Budget":
        if self.loc_floor is not None and self.select != "val_es":
            raise ValueError(f"loc_floor applies to select: val_es only (select is {self.select!r}): set select: "
                             "val_es or drop loc_floor")
        return self

    def selection(self) -> str:
        """The checkpoint selection in words, as runs record it (``editbench.fit_select``)."""
        if self.select == "val_loss":
            return "val_loss (lowest; the authors' key)"
        floor = f", loc_agree >= {self.loc_floor:g}" if self.loc_floor is not None else ""
        return f"val_es (highest{floor}; ties: lower val_loss)"

    def better(self, cur: Mapping[str, float], best: Mapping[str, float]) -> bool:
        """Whether validation ``cur`` is a better checkpoint than ``best`` under :attr:`select`."""
        if self.select == "val_es" and self.loc_floor is not None and cur.get("val_loc_agree", 1.0) < self.loc_floor:
            return False
        return selection_rank(self.select, cur) > selection_rank(self.select, best)


def selection_rank(select: str, validation: Mapping[str, float]) -> tuple[float, ...]:
    """How good a validation is as a checkpoint under ``select`` (``val_loss`` or ``val_es``; a
    :meth:`Budget.selection` text works too): higher is better."""
    if select.startswith("val_loss"):
        return (-validation["val_loss"],)
    return (validation["val_es"], -validation["val_loss"])


#: Budget fields added after digests were first taken: left out of a digest while at their default, so sweeps
#: that do not set them keep their config digests (``--resume``).
SELECTION_DEFAULTS: dict[str, Any] = {"select": "val_loss", "loc_floor": None}


def budget_digest_fields(budget: Mapping[str, Any]) -> dict[str, Any]:
    """``budget`` (a :class:`Budget` dump) without the selection fields that are at their default."""
    return {k: v for k, v in budget.items() if not (k in SELECTION_DEFAULTS and v == SELECTION_DEFAULTS[k])}


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
    #: Former name of :attr:`learned`, kept for code written against it (set from ``learned`` on every subclass).
    requires_training: ClassVar[bool] = False
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
        cls.requires_training = cls.learned

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
        import inspect

        import bench.losses
        import methods.nets

        files = {inspect.getsourcefile(k) for k in cls.__mro__ if k.__module__.startswith("methods")}
        files |= {inspect.getsourcefile(methods.nets), inspect.getsourcefile(bench.losses)}
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


def gradient_factors(model: EditableModel, batch: EditBatch, deltas: Mapping[str, Tensor] | None = None
                     ) -> dict[str, tuple[Tensor, Tensor]]:
    """(u, delta) rows of every edited weight for the edit loss on ``batch`` at ``W (+ deltas, + applied)``: the
    factors of the weight gradient, ``dL/dW = sum_i delta_i u_i^T`` (MEND's input; KE's gradient).

    The loss is the sum over requests of each request's mean target-token NLL, so a batched edit equals the sum
    of its requests' edits. u rows are the weight's inputs, delta rows the loss gradient w.r.t. its outputs;
    rows where either is all zero (padding, positions after the target) are dropped. Only the edited modules'
    outputs are differentiated: autograd stops at the lowest edited layer and forms no weight gradient.
    """
    from bench.losses import seq_logprob

    modules = {n: n.rsplit(".", 1)[0] for n in model.edit_params}

    def start_graph(name: str, out: Tensor) -> Tensor:
        # The lowest edited layer(s) see outputs without a graph: the graph starts there.
        return out if out.requires_grad else out.detach().requires_grad_()

    with torch.enable_grad(), model.trace(list(dict.fromkeys(modules.values())), edit_output=start_graph) as io:
        logits = model.logits(batch.inputs, None if deltas is None else {k: v.detach() for k, v in deltas.items()})
        loss = -seq_logprob(logits, batch.labels).sum()
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


class LearnedHparams(Hparams):
    """Loss weights and optimiser settings shared by editors trained with Alg. 1 (MEND, ENN, KE)."""

    lr: float = Field(default=1e-6, gt=0, description="Adam learning rate of the editor's parameters")
    c_edit: float = Field(default=0.1, ge=0, description="weight of L_e = -log p_new(y'_e | x'_e)")
    c_loc: float = Field(default=1.0, ge=0, description="weight of L_loc = KL(p_old(.|x_loc) || p_new(.|x_loc))")
    grad_clip: float = Field(default=100.0, gt=0)


class LearnedEditor(Editor):
    """An editor trained with the MEND paper's Alg. 1, shared by MEND, ENN and KE.

    Each step samples edits (x_e, y_e) with their equivalence inputs x'_e and locality inputs x_loc from the
    training split, edits, and minimises ``c_edit * L_e + c_loc * L_loc (+ extra_loss)`` with Adam over
    :meth:`param_groups`, with gradient accumulation and norm clipping. Every ``val_every`` steps it validates on
    a fixed slice of the validation split (normalisers frozen), logs ``val_*`` metrics, keeps the best state under
    the budget's ``select`` (by default the lowest validation loss, the official code's early-stop key; or the
    highest validation ES above a locality floor) and stops after ``patience`` validations without improvement
    or when the step/time budget is spent. The best state is loaded at the end; a fit whose best state is the
    untrained one says so (:attr:`FitResult.kept_initial`, stop reason ``diverged`` when patience ended it).
    Subclasses implement :meth:`edit` (differentiable w.r.t. their parameters while training) and
    :meth:`param_groups`.
    """

    learned = True
    has_fit_step = True
    hparams: LearnedHparams
    #: What every validation reports (``log_fn`` and so a Tune scheduler see them), with the better direction.
    validation_metrics: ClassVar[dict[str, str]] = {
        "val_es": "max", "val_edit_acc": "max", "val_loss": "min", "val_L_e": "min", "val_L_loc": "min",
        "val_loc_agree": "max",
    }

    @staticmethod
    def reports_per_fit(budget: Budget) -> int:
        """How many validations a fit under ``budget`` makes at most: step 0, every ``val_every`` steps, the last."""
        return 1 + -(-budget.max_steps // budget.val_every)

    def __init__(self, model: EditableModel, hparams: Hparams | Mapping[str, Any] | None = None,
                 data_root: str | None = None) -> None:
        super().__init__(model, hparams, data_root)
        self.training = False

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimiser parameter groups (each a dict with ``params`` and ``lr``)."""
        raise NotImplementedError

    def train(self, on: bool = True) -> None:
        """Training mode: running statistics update and edits stay differentiable."""
        self.training = on
        for m in self.modules().values():
            m.train(on)

    def extra_loss(self, records: Sequence[EditRecord]) -> Tensor | None:
        """An additional training term (ENN's base-model anchor); ``None`` by default."""
        return None

    def _losses(self, records: Sequence[EditRecord]) -> dict[str, Tensor]:
        from bench.data.batches import edit_batch, equiv_batch, loc_batch, stack_batches
        from bench.losses import argmax_agreement, argmax_scores, kl_div, loc_mask, nll

        m = self.model
        eb, qb, lb = edit_batch(m, records), equiv_batch(m, records), loc_batch(m, records)
        with torch.no_grad():
            pre = m.logits(lb.inputs)
        edit = self.edit(eb)
        # x'_e and x_loc go through the edited model in ONE forward pass (their rows are independent).
        both = m.logits(stack_batches(qb, lb, m.tokenizer.pad_token_id).inputs, edit.deltas)
        post_q = both[: len(qb), : qb.labels.shape[1]]
        post_l = both[len(qb) :, : lb.labels.shape[1]]
        l_e = nll(post_q, qb.labels)
        mask = loc_mask(lb.inputs, lb.labels, m.kind)
        l_loc = kl_div(pre, post_l, mask)
        loss = self.hparams.c_edit * l_e + self.hparams.c_loc * l_loc
        extra = self.extra_loss(records)
        out = {"loss": loss if extra is None else loss + extra, "L_e": l_e, "L_loc": l_loc,
               "es": argmax_scores(post_q.detach(), qb.labels)[0].float().mean()}
        if extra is not None:
            out["L_extra"] = extra
        if not self.training:
            with torch.no_grad():
                out["edit_acc"] = argmax_scores(m.logits(eb.inputs, edit.deltas), eb.labels)[0].float().mean()
                out["loc_agree"] = argmax_agreement(pre, post_l.detach(), mask).mean()
        return out

    def validate(self, val: Sequence[EditRecord], batch_size: int = 1) -> dict[str, float]:
        """Mean ``val_loss``, ``val_L_e``, ``val_L_loc``, ``val_es``, ``val_edit_acc``, ``val_loc_agree`` over
        ``val`` (frozen editor)."""
        was = self.training
        self.train(False)
        sums: dict[str, float] = {}
        n = 0
        with torch.no_grad():
            for i in range(0, len(val), batch_size):
                recs = list(val[i : i + batch_size])
                for k, v in self._losses(recs).items():
                    sums[k] = sums.get(k, 0.0) + float(v) * len(recs)
                n += len(recs)
        self.train(was)
        return {f"val_{k}": v / max(n, 1) for k, v in sums.items()}

    #: Least seconds between two saves of the training state into ``fit``'s ``state_dir`` (saves happen right
    #: after a validation; the final state is always saved).
    state_every_s: ClassVar[float] = 300.0

    def _fit_fingerprint(self, train: Sequence[EditRecord], val: Sequence[EditRecord], budget: Budget) -> dict:
        """What a saved training state must match to be continued: editor, code, hparams, budget, seed, splits."""
        import dataclasses

        def digest(records: Sequence[EditRecord]) -> str:
            blob = json.dumps([dataclasses.asdict(r) for r in records], sort_keys=True, default=str)
            return hashlib.sha256(blob.encode()).hexdigest()

        return {"method": self.name, "code": self.code_version(), "hparams": self.hparams.model_dump(mode="json"),
                "budget": budget.model_dump(), "seed": int(torch.initial_seed()), "train": digest(train),
                "val": digest(val)}

    def fit(self, train: Sequence[EditRecord], val: Sequence[EditRecord], budget: Budget | None = None,
            log_fn: StepLogger | None = None, state_dir: str | Path | None = None) -> FitResult:
        import dataclasses
        import random
        import time

        budget = budget or Budget()
        if not train or not val:
            raise ValueError(f"{self.name}: fit needs non-empty train and val splits (got {len(train)}, {len(val)})")
        rng = random.Random(torch.initial_seed())
        val = list(val[: budget.val_edits])
        saver = (_FitState(state_dir, self._fit_fingerprint(train, val, budget), self.state_every_s)
                 if state_dir is not None else None)
        saved = saver.load() if saver is not None else None
        if saved is not None and saved["done"]:  # the fit had ended; only its result was not used yet
            self.load_state_dict(saved["best_state"])
            self.train(False)
            log.info("%s: fit had finished before (%s); best state loaded from %s", self.name,
                     saved["result"]["stop_reason"], saver.path)
            return FitResult(**saved["result"])
        params = [p for g in self.param_groups() for p in g["params"]]
        opt = make_adam(self.param_groups())
        log_fn = log_fn or (lambda step, metrics: None)
        t0 = time.time()
        running: dict[str, float] = {}
        # Training mode before any saved state is loaded: an editor may keep what it sees when training starts
        # (ENN's copy of the original weights for its c_base anchor), which must be the untrained state.
        self.train(True)
        if saved is None:
            best = self.validate(val, budget.batch_size)
            val_s = time.time() - t0
            log_fn(0, best)
            log.info("%s step 0: %s", self.name, _fmt(best))
            best_state = {k: v.clone() for k, v in self.state_dict().items()}
            best_step, bad, step = 0, 0, 0
            history = [_point(0, best)]
        else:  # continue exactly where the saved state left off
            self.load_state_dict(saved["editor"])
            opt.load_state_dict(saved["opt"])
            rng.setstate(saved["rng"])
            torch.set_rng_state(saved["torch_rng"])
            best, best_state, best_step, bad, step = (saved["best"], saved["best_state"], saved["best_step"],
                                                      saved["bad"], saved["step"])
            val_s, running, history = saved["val_s"], saved["running"], saved["history"]
            t0 -= saved["elapsed"]
            log.info("%s: resumed at step %d (best %d) from %s", self.name, step, best_step, saver.path)
        resumed_step = step
        reason = "max_steps"
        while step < budget.max_steps:
            step += 1
            for _ in range(budget.grad_accum):
                recs = rng.sample(list(train), min(budget.batch_size, len(train)))
                losses = self._losses(recs)
                (losses["loss"] / budget.grad_accum).backward()
                for k, v in losses.items():
                    running[k] = running.get(k, 0.0) + float(v.detach()) / budget.grad_accum
            gnorm = torch.nn.utils.clip_grad_norm_(params, self.hparams.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            running["grad_norm"] = running.get("grad_norm", 0.0) + float(gnorm)
            out_of_time = budget.max_seconds is not None and time.time() - t0 > budget.max_seconds
            if step % 10 == 0:
                log_fn(step, {f"train_{k}": v / 10 for k, v in running.items()})
                running = {}
            if step % budget.val_every == 0 or step == budget.max_steps or out_of_time:
                t_val = time.time()
                cur = self.validate(val, budget.batch_size)
                val_s += time.time() - t_val
                cur["elapsed_s"] = time.time() - t0
                log_fn(step, cur)
                log.info("%s step %d: %s", self.name, step, _fmt(cur))
                history.append(_point(step, cur))
                if budget.better(cur, best):
                    best, best_state, best_step, bad = cur, {k: v.clone() for k, v in self.state_dict().items()}, step, 0
                else:
                    bad += 1
                    if bad >= budget.patience:
                        log.info("%s: early stop at step %d (best %d)", self.name, step, best_step)
                        reason = "converged" if best_step > 0 else "diverged"
                        break
                if saver is not None and not out_of_time and step < budget.max_steps:
                    saver.save({"done": False, "step": step, "editor": self.state_dict(), "opt": opt.state_dict(),
                                "rng": rng.getstate(), "torch_rng": torch.get_rng_state(), "best": best,
                                "best_state": best_state, "best_step": best_step, "bad": bad, "val_s": val_s,
                                "running": running, "history": history, "elapsed": time.time() - t0})
            if out_of_time:
                log.info("%s: time budget spent at step %d", self.name, step)
                reason = "max_seconds"
                break
        self.train(False)
        self.load_state_dict(best_state)
        if reason in BUDGET_LIMITED:
            log.info("%s: budget-limited (%s) at step %d; last validation improvement at step %d", self.name,
                     reason, step, best_step)
        result = FitResult(steps=step, seconds=time.time() - t0, best_step=best_step,
                           best={k: v for k, v in best.items() if k != "elapsed_s"}, stop_reason=reason,
                           val_seconds=val_s, resumed_step=resumed_step, history=history,
                           select=budget.selection())
        if result.kept_initial:
            log.warning("%s: %s", self.name, result.kept_initial_text())
        if saver is not None:  # a crash before the caller has used the result then costs no training
            saver.save({"done": True, "best_state": best_state, "result": dataclasses.asdict(result)}, force=True)
        return result


#: The file ``LearnedEditor.fit`` keeps its training state in, inside its ``state_dir``.
FIT_STATE_FILE = "fit_state.pt"


class _FitState:
    """A learned editor's saved training state: one file in ``state_dir``, replaced atomically (a reader never
    sees half of it), saved at most every ``every_s`` seconds unless forced, and loaded only when its
    ``fingerprint`` (editor, code, hparams, budget, seed, splits) matches."""

    def __init__(self, state_dir: str | Path, fingerprint: dict, every_s: float) -> None:
        import time

        self.path = Path(state_dir) / FIT_STATE_FILE
        self.fingerprint = fingerprint
        self.every_s = every_s
        self.last = time.time()

    def load(self) -> dict[str, Any] | None:
        """The saved state, or None when there is none, it is unreadable or it was saved for another fit."""
        if not self.path.exists():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # a damaged file costs the training done so far, not the trial
            log.warning("fit state %s unreadable (%s): training from the start", self.path, e)
            return None
        if state.get("fingerprint") != self.fingerprint:
            log.warning("fit state %s was saved by another fit (editor, code, hparams, budget, seed or splits "
                        "differ): training from the start", self.path)
            return None
        return state

    def save(self, state: Mapping[str, Any], force: bool = False) -> None:
        """Write ``state`` (atomically) unless the last save is younger than ``every_s`` and not ``force``."""
        import os
        import time

        if not force and time.time() - self.last < self.every_s:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        torch.save({**state, "fingerprint": self.fingerprint}, tmp)
        os.replace(tmp, self.path)
        self.last = time.time()


def make_adam(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """Adam over parameter groups, fused where the device supports it (about 3x faster steps on CPU for MEND's
    32M editor parameters), else the default implementation."""
    try:
        return torch.optim.Adam(groups, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(groups)


def _point(step: int, metrics: Mapping[str, float]) -> dict[str, float]:
    """One validation as :attr:`FitResult.history` keeps it."""
    return {"step": float(step), **{k: float(metrics[k]) for k in ("val_loss", "val_es", "val_loc_agree")
                                    if k in metrics}}


def _fmt(metrics: Mapping[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
