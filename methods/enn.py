"""ENN: Editable Neural Networks (Sinitsin et al., ICLR 2020), as configured in the MEND paper.

The edit is ``n_steps`` gradient steps on -log p(y_e | x_e) over the edited weights, each weight tensor with a
LEARNED step size (init 1e-2). Training (the shared Alg. 1 loop) back-propagates through the edit step
(second order; ``first_order`` drops the second-order term) into both the step sizes and the base model's weights,
which ENN therefore changes (``modifies_base_model``). Which base weights are meta-trained is ``train_base``:
``all`` is what ENN (Sinitsin et al. train the whole model) and the MEND paper's runs mean (eric-mitchell/mend
``algs/enn.py``: ``outer_parameters`` is every parameter, ``no_grad_layers: null``); ``edited`` trains only the
matrices the inner step edits, a cheaper variant (a sweep using it says so). Its loss adds ``c_base`` times
KL(p_original(.|x_loc) || p_current(.|x_loc)), which keeps the trained base model close to the ORIGINAL one on
base data; that needs a copy of the original trained weights, which is where ENN's extra memory goes (and, with
``train_base: all``, Adam's state for every weight).
"""

from __future__ import annotations

from typing import Any, Literal, Mapping, Sequence

import torch
from pydantic import Field, PositiveInt
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.data.batches import EditBatch, loc_batch
from bench.data.records import EditRecord
from bench.losses import kl_div, loc_mask, nll
from bench.models import EditableModel
from methods.base import Edit, Hparams
from methods.learned import LearnedEditor, LearnedHparams


class ENNHparams(LearnedHparams):
    """MEND-paper setup: lr 1e-5 for the base model's editable weights, 1e-3 for the step sizes (init 1e-2),
    one inner step, c_edit 0.1, c_loc 1, c_base 1."""

    lr: float = Field(default=1e-5, gt=0, description="Adam lr of the base model's editable weights")
    step_lr: float = Field(default=1e-3, gt=0, description="Adam lr of the learned inner step sizes")
    inner_lr: float = Field(default=1e-2, gt=0, description="initial inner step size per weight tensor")
    n_steps: PositiveInt = 1
    first_order: bool = False
    c_base: float = Field(default=1.0, ge=0)
    train_base: Literal["all", "edited"] = Field(
        default="all", description="base weights meta-trained with the step sizes: every parameter (ENN, the "
        "official runs) or only the edited matrices")


class _StepSizes(nn.Module):
    def __init__(self, n: int, init: float) -> None:
        super().__init__()
        self.lr = nn.Parameter(torch.full((n,), float(init)))


class _BaseWeights(nn.Module):
    """A view of the meta-trained base weights (the same Parameter objects), so checkpoints carry them."""

    def __init__(self, model: EditableModel, names: Sequence[str]) -> None:
        super().__init__()
        named = dict(model.model.named_parameters())
        self.names = list(names)
        self.w = nn.ParameterDict({n.replace(".", "__"): named[n] for n in self.names})

    def named(self) -> dict[str, nn.Parameter]:
        """The trained weights by their name in the model."""
        return {n: self.w[n.replace(".", "__")] for n in self.names}


class ENN(LearnedEditor):
    """Learned-step-size gradient editing with a meta-trained base model."""

    name = "enn"
    Hparams = ENNHparams
    modifies_base_model = True
    hparams: ENNHparams

    def __init__(self, model: EditableModel, hparams: Hparams | Mapping[str, Any] | None = None,
                 data_root: str | None = None) -> None:
        super().__init__(model, hparams, data_root)
        self.steps = _StepSizes(len(model.edit_params), self.hparams.inner_lr).to(model.device)
        trained = ([n for n, _ in self.model.model.named_parameters()] if self.hparams.train_base == "all"
                   else list(self.model.edit_params))
        self.base = _BaseWeights(self.model, trained)
        # The original trained weights, for the c_base anchor (allocated when training starts).
        self.original: dict[str, Tensor] | None = None

    def modules(self) -> dict[str, nn.Module]:
        return {"steps": self.steps, "base": self.base}

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.base.parameters()), "lr": self.hparams.lr},
                {"params": [self.steps.lr], "lr": self.hparams.step_lr}]

    def train(self, on: bool = True) -> None:
        super().train(on)
        if on and self.original is None:
            self.original = {n: w.detach().clone() for n, w in self.base.named().items()}
        for w in self.base.parameters():
            w.requires_grad_(on)

    def edit(self, batch: EditBatch) -> Edit:
        names = self.model.edit_params
        second_order = self.training and not self.hparams.first_order
        deltas = {n: torch.zeros_like(w, requires_grad=True) for n, w in self.model.weights().items()}
        cur = dict(deltas)
        # The fused CPU/GPU attention kernels have no double backward: the inner step runs the math kernel when
        # the outer loss must differentiate through it.
        kernels = [SDPBackend.MATH] if second_order else [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]
        with torch.enable_grad(), sdpa_kernel(kernels):
            for _ in range(self.hparams.n_steps):
                loss = nll(self.model.logits(batch.inputs, cur), batch.labels)
                grads = torch.autograd.grad(loss, [cur[n] for n in names], create_graph=second_order)
                cur = {n: cur[n] - self.steps.lr[i] * g for i, (n, g) in enumerate(zip(names, grads))}
        if not self.training:
            cur = {n: d.detach() for n, d in cur.items()}
        return Edit(cur, steps=self.hparams.n_steps)

    def extra_loss(self, records: Sequence[EditRecord]) -> Tensor | None:
        """c_base * KL(p_original || p_current) on the locality inputs (base data) of the step."""
        if not self.training or self.hparams.c_base == 0 or self.original is None:
            return None
        lb = loc_batch(self.model, records)
        with torch.no_grad():  # the original weights themselves, not W + (W_original - W): 0.1-0.2 s of a 2.2 s step
            orig_logits = self.model.logits(lb.inputs, weights=self.original)
        cur = self.model.logits(lb.inputs)
        return self.hparams.c_base * kl_div(orig_logits, cur, loc_mask(lb.inputs, lb.labels, self.model.kind))
