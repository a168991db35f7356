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

from typing import ClassVar

import torch
from pydantic import Field, PositiveFloat, PositiveInt

from bench.data.batches import EditBatch
from bench.losses import nll
from bench.models import EditableModel
from methods.base import Edit, Editor, Hparams


class FTLHparams(Hparams):
    """kmeng01/rome FT-L defaults (GPT-2 XL and GPT-J, constrained)."""

    layers: list[int] = Field(default=[0], min_length=1, description="blocks whose MLP output projection is tuned")
    lr: PositiveFloat = 5e-4
    max_steps: PositiveInt = 25
    norm_constraint: PositiveFloat | None = Field(
        default=5e-4, description="L-infinity bound on each weight's change; null: unconstrained (ROME's FT)")
    stop_loss: float = Field(default=1e-2, ge=0, description="stop once the edit loss is below this")


class FTL(Editor):
    """Constrained fine-tuning of chosen MLP output projections."""

    name = "ft_l"
    Hparams = FTLHparams
    hparams: FTLHparams
    #: The MLP output projection is named in the family table for decoder-only families only.
    supported_kinds: ClassVar[tuple[str, ...]] = ("causal",)

    @classmethod
    def select_weights(cls, model: EditableModel, hparams: Hparams) -> list[str]:
        """The output projection weight of the MLP of each block in ``layers``."""
        return [f"{model.mlp_out(layer)}.weight" for layer in getattr(hparams, "layers", None) or [0]]

    def edit(self, batch: EditBatch) -> Edit:
        hp = self.hparams
        deltas = {n: torch.zeros_like(w, requires_grad=True) for n, w in self.model.weights().items()}
        opt = torch.optim.Adam(list(deltas.values()), lr=hp.lr)  # the authors' weight_decay is 0
        steps, loss_val = 0, float("nan")
        for _ in range(hp.max_steps):
            loss = nll(self.model.logits(batch.inputs, deltas), batch.labels)
            loss_val = float(loss.detach())
            if loss_val < hp.stop_loss:
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            if hp.norm_constraint is not None:  # W stays within eps of the original, element-wise
                with torch.no_grad():
                    for d in deltas.values():
                        d.clamp_(-hp.norm_constraint, hp.norm_constraint)
        return Edit({n: d.detach() for n, d in deltas.items()}, steps=steps, info={"final_loss": loss_val})
