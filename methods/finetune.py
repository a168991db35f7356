"""The fine-tuning loop shared by the fine-tuning editors (FT and FT+KL in :mod:`methods.ft`, FT-L in
:mod:`methods.ftl`): at most ``max_steps`` optimiser steps on -log p(y_e | x_e) over the edited weights only, with
the gradient norm clipped at ``grad_clip`` (official config: 100), stopping as soon as every target token is the
argmax. Editors change its hooks, never one another."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, PositiveFloat, PositiveInt
from torch import Tensor

from bench.data.batches import EditBatch
from bench.losses import argmax_scores, nll
from methods.base import Edit, Editor, Hparams


class FTHparams(Hparams):
    """Paper defaults: RMSprop, lr 1e-6 (small models; 1e-4 for T5, 5e-6 for GPT-Neo/J), at most 100 steps."""

    optimizer: Literal["rmsprop", "adam", "sgd"] = "rmsprop"
    lr: PositiveFloat = 1e-6
    max_steps: PositiveInt = 100
    early_stop: bool = True
    grad_clip: PositiveFloat | None = Field(default=100.0, description="max gradient norm per step (official "
                                            "config.grad_clip); null: no clipping")


def make_optimizer(kind: str, params: list[Tensor], lr: float) -> torch.optim.Optimizer:
    """The optimiser named by ``kind`` over ``params``."""
    if kind == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr)
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr)
    raise ValueError(f"optimizer {kind!r} unknown; valid: rmsprop, adam, sgd")


class FineTune(Editor):
    """The fine-tuning loop FT, FT+KL and FT-L share: optimiser steps on the edit loss over zero-initialised deltas
    of the edited weights, with hooks for what each changes (an extra loss term, its stop test, a projection after
    each step). Not registered itself: each editor names itself and its hyper-parameters."""

    Hparams = FTHparams
    hparams: FTHparams

    def _step(self, deltas: dict[str, Tensor], batch: EditBatch) -> tuple[Tensor, Tensor | None]:
        """One step's forward: the edit input's logits under ``deltas`` and the additional loss term of a subclass
        (FT+KL's locality KL, from the same forward pass); ``None`` for plain FT."""
        return self.model.logits(batch.inputs, deltas), None

    def _prepare(self, batch: EditBatch) -> None:
        """Per-edit set-up before the first step (FT+KL computes its pre-edit locality logits)."""

    def _done(self, logits: Tensor, loss: Tensor, batch: EditBatch) -> bool:
        """Whether the edit is finished before another step: every target token is the argmax (``early_stop``)."""
        return self.hparams.early_stop and bool(argmax_scores(logits.detach(), batch.labels)[0].all())

    def _after_step(self, deltas: dict[str, Tensor]) -> None:
        """Called after every optimiser step (FT-L projects the deltas back into its constraint)."""

    def edit(self, batch: EditBatch) -> Edit:
        """At most ``max_steps`` steps on the edit loss over zero-initialised deltas of the edited weights, stopping
        when :meth:`_done`; ``info["final_loss"]`` is the edit NLL at the last check."""
        hp = self.hparams
        deltas = {n: torch.zeros_like(w, requires_grad=True) for n, w in self.model.weights().items()}
        opt = make_optimizer(hp.optimizer, list(deltas.values()), hp.lr)
        self._prepare(batch)
        steps = 0
        loss_val = float("nan")
        for _ in range(hp.max_steps):
            logits, extra = self._step(deltas, batch)
            loss = nll(logits, batch.labels)
            loss_val = float(loss.detach())
            if self._done(logits, loss, batch):
                break
            if extra is not None:
                loss = self.hparams.c_edit * loss + extra  # type: ignore[attr-defined]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if hp.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(list(deltas.values()), hp.grad_clip)
            opt.step()
            self._after_step(deltas)
            steps += 1
        return Edit({n: d.detach() for n, d in deltas.items()}, steps=steps, info={"final_loss": loss_val})
