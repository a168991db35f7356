"""What the lifelong editors whose edits are module adaptors share (GRACE, WISE): causal models, one MLP output
projection at EasyEdit's LLaMA-2-7B depth (block 27 of 32 there), the module and block they adapt, and the target
NLL they train on with the output head run at the target positions only."""

from __future__ import annotations

import torch
from torch import Tensor

from bench.models import EditableModel
from methods.base import Editor, Hparams
from methods.locate import require_causal


def default_layer(model: EditableModel) -> int:
    """EasyEdit's LLaMA-2-7B depth (block 27 of 32) on this model."""
    return min(model.n_layers - 1, int(round(27 / 32 * model.n_layers)))


def target_nll(model: EditableModel, inputs: dict[str, Tensor], labels: Tensor, rows: int | None = None) -> Tensor:
    """The mean over the first ``rows`` sequences (all when None) of each one's mean target-token NLL
    (``bench.losses.nll``), the output head run at their target positions only
    (:meth:`~bench.models.EditableModel.logits_at`: the head is most of a small model's compute)."""
    n = labels.shape[0] if rows is None else rows
    wanted = labels != -100
    wanted[n:] = False
    r, c = wanted.nonzero(as_tuple=True)
    lp = torch.log_softmax(model.logits_at(inputs, r, c).float(), -1)
    lp = lp.gather(-1, labels[r, c][:, None])[:, 0]
    per = torch.zeros(n, dtype=lp.dtype, device=lp.device).index_add_(0, r, lp)
    return -(per / torch.bincount(r, minlength=n).clamp(min=1)).mean()


class AdaptorEditor(Editor):
    """An editor whose edits adapt one MLP output projection (hyper-parameter ``layer``; None: :func:`default_layer`)
    instead of changing a weight."""

    supported_kinds = ("causal",)

    @classmethod
    def select_weights(cls, model: EditableModel, hparams: Hparams) -> list[str]:
        require_causal(model, cls.name)
        layer = getattr(hparams, "layer", None)
        return [f"{model.mlp_out(default_layer(model) if layer is None else layer)}.weight"]

    @property
    def module(self) -> str:
        """The adapted module: the MLP output projection of :attr:`layer`."""
        return self.model.edit_params[0].rsplit(".", 1)[0]

    @property
    def layer(self) -> int:
        """The block whose MLP output projection is adapted."""
        return next(i for i in range(self.model.n_layers) if self.model.mlp_out(i) == self.module)
