"""Fine-tuning baselines of the MEND paper.

FT: up to ``max_steps`` optimiser steps (RMSprop, as in the paper; Adam or SGD selectable) on -log p(y_e | x_e)
over the edited weights only, stopping as soon as every target token is the argmax.
FT+KL: the same, with loss ``c_edit * L_e + c_loc * KL(p_before || p_after)`` on locality inputs drawn from the
training split at edit time (so it uses training data when editing), a fresh batch of them at every step as the
official code does (``next(self.loc_sampler)`` in ``algs/ft.py``). Both clip the gradient norm at ``grad_clip``
(official config: 100).
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Literal, Sequence

import torch
from pydantic import Field, PositiveFloat, PositiveInt
from torch import Tensor

from bench.data.batches import EditBatch, loc_batch, stack_batches
from bench.data.records import EditRecord
from bench.losses import argmax_scores, kl_div, loc_mask, nll
from methods.base import FitResult, StepLogger
from methods.budget import Budget
from methods.finetune import FineTune, FTHparams  # noqa: F401 (FTHparams re-exported)


class FTKLHparams(FTHparams):
    """FT+KL adds the locality KL; the paper weights the edit loss by 1e-2. One locality input per step, as the
    official config (``ft.locality.batch_size: 1``; ``run.py`` samples it with each step's ``edit_generator``)."""

    c_edit: PositiveFloat = 1e-2
    c_loc: PositiveFloat = 1.0
    loc_batch_size: PositiveInt = Field(default=1, description="locality inputs per step (official: 1)")
    fresh_loc: bool = Field(default=True, description="draw a new locality batch at every step (official); false: "
                            "one batch per edit")


class FT(FineTune):
    """Fine-tune the edited weights on the edit example."""

    name = "ft"
    Hparams = FTHparams
    hparams: FTHparams


#: Memory FT+KL may keep for the unedited model's logits of locality batches it draws again (see ``_draw_loc``).
PRE_MEMO_MB = 512


class FTKL(FT):
    """FT with a KL penalty on locality inputs sampled from the training split at edit time."""

    name = "ft_kl"
    Hparams = FTKLHparams
    uses_training_data_at_edit_time = True
    has_fit_step = True  # keeps the training split as its locality pool (no training)
    hparams: FTKLHparams

    def __init__(self, model, hparams=None, data_root=None) -> None:  # type: ignore[no-untyped-def]
        super().__init__(model, hparams, data_root)
        self.pool: list[EditRecord] = []
        self._rng = random.Random(0)
        self._loc: tuple[EditBatch, Tensor, Tensor] | None = None
        self._pre: dict[tuple, Tensor] = {}  # unedited locality logits by input ids (see _draw_loc)
        self._pre_bytes = 0

    def fit(self, train: Sequence[EditRecord], val: Sequence[EditRecord], budget: Budget | None = None,
            log_fn: StepLogger | None = None, state_dir: str | Path | None = None) -> FitResult:
        """No training: keep the training records as the pool of locality inputs used at edit time."""
        self.pool = list(train)
        self._pre, self._pre_bytes = {}, 0
        return FitResult()

    def _prepare(self, batch: EditBatch) -> None:
        if not self.pool:
            raise RuntimeError("ft_kl needs training records for its locality loss: call fit(train, val) first")
        # Seeded by the edit's own text so an edit does not depend on what was edited before it.
        key = "\x1f".join(r.prompt for r in batch.records) or str(batch.inputs["input_ids"].tolist())
        self._rng = random.Random(int(hashlib.sha256(key.encode()).hexdigest()[:12], 16))
        self._loc = None

    def _draw_loc(self) -> tuple[EditBatch, Tensor, Tensor]:
        """``loc_batch_size`` locality inputs from the pool, their pre-edit logits (base model, with the deltas
        already applied in sequential editing) and KL mask."""
        recs = self._rng.sample(self.pool, min(self.hparams.loc_batch_size, len(self.pool)))
        lb = loc_batch(self.model, recs)
        # Edits draw the same locality inputs again and again (zsRE's `known` pool: ~200 prompts for ~300 draws
        # per 100 edits): the unedited model's logits of a batch are kept (up to PRE_MEMO_MB) and reused, the same
        # values a new forward pass gives. Not in sequential editing, where "unedited" moves with every edit.
        key = (tuple((k, tuple(v.shape), tuple(v.flatten().tolist())) for k, v in sorted(lb.inputs.items()))
               if not self.model.applied else None)
        pre = self._pre.get(key) if key is not None else None
        if pre is None:
            with torch.no_grad():
                pre = self.model.logits(lb.inputs)
            size = pre.numel() * pre.element_size()
            if key is not None and self._pre_bytes + size <= PRE_MEMO_MB * 2**20:
                self._pre[key], self._pre_bytes = pre, self._pre_bytes + size
        return lb, pre, loc_mask(lb.inputs, lb.labels, self.model.kind)

    def _step(self, deltas: dict[str, Tensor], batch: EditBatch) -> tuple[Tensor, Tensor]:
        """The edit input and this step's locality inputs share one forward pass (right-padded into one batch, as
        the learned editors' training does; the official code runs two passes, which give the same values up to
        float rounding). The step that ends the edit (every target token the argmax) has drawn and scored a
        locality batch it does not use."""
        if self._loc is None or self.hparams.fresh_loc:
            self._loc = self._draw_loc()
        lb, pre, mask = self._loc
        n, width = batch.labels.shape
        both = self.model.logits(stack_batches(batch, lb, self.model.tokenizer.pad_token_id).inputs, deltas)
        post = both[n:, : lb.labels.shape[1]]
        return both[:n, :width], self.hparams.c_loc * kl_div(pre, post, mask)
