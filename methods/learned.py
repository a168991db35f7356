"""Learned editors (MEND, ENN, KE): parameters trained on training edits with the paper's Algorithm 1 loop (edit
loss on x'_e plus locality KL, Adam, early stopping on validation), resumable from a saved training state."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import torch
from pydantic import Field
from torch import Tensor

from bench.data.batches import edit_batch, equiv_batch, loc_batch, stack_batches
from bench.data.records import EditRecord
from bench.losses import argmax_agreement, argmax_scores, kl_div, loc_mask, nll
from bench.models import EditableModel
from methods.base import BUDGET_LIMITED, Editor, FitResult, Hparams, StepLogger
from methods.budget import Budget

log = logging.getLogger(__name__)


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

        def digest(records: Sequence[EditRecord]) -> str:
            blob = json.dumps([dataclasses.asdict(r) for r in records], sort_keys=True, default=str)
            return hashlib.sha256(blob.encode()).hexdigest()

        return {"method": self.name, "code": self.code_version(), "hparams": self.hparams.model_dump(mode="json"),
                "budget": budget.model_dump(), "seed": int(torch.initial_seed()), "train": digest(train),
                "val": digest(val)}

    def fit(self, train: Sequence[EditRecord], val: Sequence[EditRecord], budget: Budget | None = None,
            log_fn: StepLogger | None = None, state_dir: str | Path | None = None) -> FitResult:
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
        opt = make_adam(self.param_groups())
        log_fn = log_fn or (lambda step, metrics: None)
        t0 = time.time()
        # Training mode before any saved state is loaded: an editor may keep what it sees when training starts
        # (ENN's copy of the original weights for its c_base anchor), which must be the untrained state.
        self.train(True)
        if saved is None:
            best = self.validate(val, budget.batch_size)
            log_fn(0, best)
            log.info("%s step 0: %s", self.name, _fmt(best))
            at = _Progress(best=best, best_state=self._state_copy(), val_s=time.time() - t0,
                           history=[_point(0, best)])
        else:  # continue exactly where the saved state left off
            self.load_state_dict(saved["editor"])
            opt.load_state_dict(saved["opt"])
            rng.setstate(saved["rng"])
            torch.set_rng_state(saved["torch_rng"])
            at = _Progress(**{k: saved[k] for k in _Progress.__dataclass_fields__})
            t0 -= saved["elapsed"]
            log.info("%s: resumed at step %d (best %d) from %s", self.name, at.step, at.best_step, saver.path)
        resumed_step = at.step
        reason = self._fit_loop(at, train, val, budget, opt, rng, log_fn, saver, t0)
        self.train(False)
        self.load_state_dict(at.best_state)
        if reason in BUDGET_LIMITED:
            log.info("%s: budget-limited (%s) at step %d; last validation improvement at step %d", self.name,
                     reason, at.step, at.best_step)
        result = FitResult(steps=at.step, seconds=time.time() - t0, best_step=at.best_step,
                           best={k: v for k, v in at.best.items() if k != "elapsed_s"}, stop_reason=reason,
                           val_seconds=at.val_s, resumed_step=resumed_step, history=at.history,
                           select=budget.selection())
        if result.kept_initial:
            log.warning("%s: %s", self.name, result.kept_initial_text())
        if saver is not None:  # a crash before the caller has used the result then costs no training
            saver.save({"done": True, "best_state": at.best_state, "result": dataclasses.asdict(result)}, force=True)
        return result

    def _state_copy(self) -> dict[str, Tensor]:
        return {k: v.clone() for k, v in self.state_dict().items()}

    def _fit_loop(self, at: "_Progress", train: Sequence[EditRecord], val: Sequence[EditRecord], budget: Budget,
                  opt: torch.optim.Optimizer, rng: random.Random, log_fn: StepLogger, saver: "_FitState | None",
                  t0: float) -> str:
        """Algorithm 1's loop from ``at`` on: steps of ``grad_accum`` sampled edit batches, validation every
        ``val_every`` steps keeping the best state (``at`` is updated in place), the training state saved after
        validations. Returns why it ended (a :data:`~methods.base.STOP_REASONS` entry)."""
        params = [p for g in self.param_groups() for p in g["params"]]
        while at.step < budget.max_steps:
            at.step += 1
            for _ in range(budget.grad_accum):
                recs = rng.sample(list(train), min(budget.batch_size, len(train)))
                losses = self._losses(recs)
                (losses["loss"] / budget.grad_accum).backward()
                for k, v in losses.items():
                    at.running[k] = at.running.get(k, 0.0) + float(v.detach()) / budget.grad_accum
            gnorm = torch.nn.utils.clip_grad_norm_(params, self.hparams.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            at.running["grad_norm"] = at.running.get("grad_norm", 0.0) + float(gnorm)
            out_of_time = budget.max_seconds is not None and time.time() - t0 > budget.max_seconds
            if at.step % 10 == 0:
                log_fn(at.step, {f"train_{k}": v / 10 for k, v in at.running.items()})
                at.running = {}
            if at.step % budget.val_every == 0 or at.step == budget.max_steps or out_of_time:
                if self._validation(at, val, budget, log_fn, t0):
                    return "converged" if at.best_step > 0 else "diverged"
                if saver is not None and not out_of_time and at.step < budget.max_steps:
                    saver.save({"done": False, **at.fields(), "editor": self.state_dict(),
                                "opt": opt.state_dict(), "rng": rng.getstate(), "torch_rng": torch.get_rng_state(),
                                "elapsed": time.time() - t0})
            if out_of_time:
                log.info("%s: time budget spent at step %d", self.name, at.step)
                return "max_seconds"
        return "max_steps"

    def _validation(self, at: "_Progress", val: Sequence[EditRecord], budget: Budget, log_fn: StepLogger,
                    t0: float) -> bool:
        """Validate at ``at.step``, keep the state if it is the best so far; whether patience has run out."""
        t_val = time.time()
        cur = self.validate(val, budget.batch_size)
        at.val_s += time.time() - t_val
        cur["elapsed_s"] = time.time() - t0
        log_fn(at.step, cur)
        log.info("%s step %d: %s", self.name, at.step, _fmt(cur))
        at.history.append(_point(at.step, cur))
        if budget.better(cur, at.best):
            at.best, at.best_state, at.best_step, at.bad = cur, self._state_copy(), at.step, 0
            return False
        at.bad += 1
        if at.bad >= budget.patience:
            log.info("%s: early stop at step %d (best %d)", self.name, at.step, at.best_step)
            return True
        return False


@dataclass
class _Progress:
    """Where a fit stands (saved with the training state, restored on resume): the step, the best validation and
    the state that had it, validations without improvement, validation seconds, running training losses since the
    last report and the validation history."""

    best: dict[str, float]
    best_state: dict[str, Tensor]
    step: int = 0
    best_step: int = 0
    bad: int = 0
    val_s: float = 0.0
    running: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)

    def fields(self) -> dict[str, Any]:
        """The fields by name, values not copied (what the training state saves)."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


#: The file ``LearnedEditor.fit`` keeps its training state in, inside its ``state_dir``.
FIT_STATE_FILE = "fit_state.pt"


class _FitState:
    """A learned editor's saved training state: one file in ``state_dir``, replaced atomically (a reader never
    sees half of it), saved at most every ``every_s`` seconds unless forced, and loaded only when its
    ``fingerprint`` (editor, code, hparams, budget, seed, splits) matches."""

    def __init__(self, state_dir: str | Path, fingerprint: dict, every_s: float) -> None:
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
