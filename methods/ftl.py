"""FT-L: fine-tuning one MLP output projection under an L-infinity constraint, the fine-tuning baseline of the ROME
and MEMIT papers (Meng et al. 2022, after Zhu et al. 2020 "Modifying memories in transformer models").

The edit is at most ``max_steps`` Adam steps on -log p(y_e | x_e) over the output projection of the MLP in each
block of ``layers``; after every step each weight is clamped to within ``norm_constraint`` of its original value
(element-wise), and the loop stops once the loss is below ``stop_loss``. Defaults are kmeng01/rome's
``hparams/FT/gpt2-xl_constr.json`` (layer 0, 25 steps, lr 5e-4, constraint 5e-4, stop at loss 1e-2). One departure:
the authors' loss predicts every target token from the prompt's last position; here the target is teacher-forced
like every other editor of the suite (the same loss as FT).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field, PositiveFloat, PositiveInt
from torch import Tensor

from bench.data.batches import EditBatch
from bench.models import EditableModel
from methods.base import Hparams
from methods.finetune import FineTune, FTHparams


class FTLHparams(FTHparams):
    """kmeng01/rome FT-L defaults (GPT-2 XL and GPT-J, constrained): Adam (the authors' weight_decay is 0), no
    gradient clipping, no argmax stop (the loss threshold stops it)."""

    layers: list[int] = Field(default=[0], min_length=1, description="blocks whose MLP output projection is tuned")
    optimizer: Literal["rmsprop", "adam", "sgd"] = "adam"
    lr: PositiveFloat = 5e-4
    max_steps: PositiveInt = 25
    early_stop: bool = False
    grad_clip: PositiveFloat | None = None
    norm_constraint: PositiveFloat | None = Field(
        default=5e-4, description="L-infinity bound on each weight's change; null: unconstrained (ROME's FT)")
    stop_loss: float = Field(default=1e-2, ge=0, description="stop once the edit loss is below this")


class FTL(FineTune):
    """Constrained fine-tuning of chosen MLP output projections: FT's loop with a loss threshold as its stop test
    and the L-infinity clamp after every step."""

    name = "ft_l"
    Hparams = FTLHparams
    hparams: FTLHparams
    #: The MLP output projection is named in the family table for decoder-only families only.
    supported_kinds: ClassVar[tuple[str, ...]] = ("causal",)

    @classmethod
    def select_weights(cls, model: EditableModel, hparams: Hparams) -> list[str]:
        """The output projection weight of the MLP of each block in ``layers``."""
        return [f"{model.mlp_out(layer)}.weight" for layer in hparams.layers]  # type: ignore[attr-defined]

    def _done(self, logits: Tensor, loss: Tensor, batch: EditBatch) -> bool:
        return float(loss.detach()) < self.hparams.stop_loss or super()._done(logits, loss, batch)

    def _after_step(self, deltas: dict[str, Tensor]) -> None:
        if self.hparams.norm_constraint is not None:  # W stays within eps of the original, element-wise
            with torch.no_grad():
                for d in deltas.values():
                    d.clamp_(-self.hparams.norm_constraint, self.hparams.norm_constraint)
