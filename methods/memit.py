"""MEMIT: Mass-Editing Memory in a Transformer (Meng, Sen Sharma, Andonian, Belinkov, Bau, ICLR 2023), after the
authors' code (kmeng01/memit: ``memit_main.py``, ``compute_z.py``, ``compute_ks.py``).

A batch of requests is written into the MLP output projections of a band of blocks in one solve per layer:

1. for every request, z_i = the residual stream (block output) of the LAST layer of the band at the subject's
   last token plus a vector optimised so the model predicts the new object (the same objective as ROME's v*,
   :func:`methods.locate.optimise_value`, with MEMIT's clamp 0.75);
2. for each layer l of the band, lowest first, on the model with the updates of the layers below applied:
   keys K (d_in x n, the projection's input at the subject's last token averaged over the context templates),
   residuals R = (Z - current last-layer outputs) / (number of layers left) (the residual-distribution rule), and
   ``dW_l = R A^T`` with ``A = solve(lambda C_l + K K^T, K)``, C_l = E[k k^T] of that layer over the corpus
   (shared with ROME's cache) and lambda = ``mom2_update_weight``.

With one request and one layer the update is ROME's rank-one closed form scaled by
``k^T C^-1 k / (lambda + k^T C^-1 k)`` (Sherman-Morrison; it tends to ROME's as lambda -> 0). Defaults: the
paper's band and lambda for GPT-2 XL (13-17, 20000) and GPT-J (3-8, 15000); other models a band of five blocks
ending at ROME's layer, lambda = 15000 x d_in / 16384 (GPT-J's lambda scaled by the key dimension, since
k^T C^-1 k grows like d_in). Causal models only.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import torch
from pydantic import Field, PositiveInt, conlist
from torch import Tensor

from bench.data.batches import EditBatch
from bench.models import EditableModel
from methods.base import Edit, Hparams
from methods.locate import (LocateEditor, LocateHparams, as_weight, default_layer, io_at, keys_at, optimise_value,
                            require_causal)

log = logging.getLogger(__name__)

#: The paper's band and lambda (kmeng01/memit hparams/MEMIT/*.json).
DEFAULT_BAND: dict[str, tuple[list[int], float]] = {"gpt2-xl": ([13, 14, 15, 16, 17], 20000.0),
                                                     "EleutherAI/gpt-j-6B": ([3, 4, 5, 6, 7, 8], 15000.0)}


def default_layers(model: EditableModel) -> list[int]:
    """The paper's band for its models; else five blocks ending at ROME's default layer."""
    if model.name in DEFAULT_BAND:
        return DEFAULT_BAND[model.name][0]
    top = default_layer(model)
    return list(range(max(0, top - 4), top + 1))


class MEMITHparams(LocateHparams):
    """kmeng01/memit hparams/MEMIT/EleutherAI_gpt-j-6B.json: 25 value steps at lr 0.5, clamp 0.75, weight decay
    0.5, KL 0.0625, prefixes: five of 10 tokens after "The", "Therefore", "Because", "I", "You"."""

    v_num_grad_steps: int = Field(default=25, gt=0)
    clamp_norm_factor: float = Field(default=0.75, gt=0)
    context_lengths: list[conlist(PositiveInt, min_length=2, max_length=2)] = Field(default=[[10, 5]])
    mom2_update_weight: float | None = Field(default=None, gt=0, description="lambda; None: the model's default")


class MEMIT(LocateEditor):
    """Batched multi-layer closed-form editing."""

    name = "memit"
    Hparams = MEMITHparams
    hparams: MEMITHparams

    def __init__(self, model: EditableModel, hparams: Hparams | Mapping[str, Any] | None = None,
                 data_root: str | None = None) -> None:
        super().__init__(model, hparams, data_root)
        self.layers = sorted(self.hparams.layers or default_layers(model))
        lam = self.hparams.mom2_update_weight
        if lam is None:
            if model.name in DEFAULT_BAND:
                lam = DEFAULT_BAND[model.name][1]
            else:
                d_in = self.model.io_dims(f"{model.mlp_out(self.layers[0])}.weight")[0]
                lam = 15000.0 * d_in / 16384
        self.lam = float(lam)

    @classmethod
    def select_weights(cls, model: EditableModel, hparams: Hparams) -> list[str]:
        require_causal(model, cls.name)
        layers = sorted(getattr(hparams, "layers", None) or default_layers(model))
        return [f"{model.mlp_out(layer)}.weight" for layer in layers]

    def starts(self) -> list[str]:
        return ["The", "Therefore", "Because", "I", "You"]  # kmeng01/memit get_context_templates

    def edit(self, batch: EditBatch) -> Edit:
        if not batch.records:
            raise ValueError("memit: the edit batch carries no records (their subjects are needed)")
        m, recs = self.model, list(batch.records)
        z_module = m.block(self.layers[-1])
        values = [optimise_value(m, z_module, r, self.templates(), self.hparams) for r in recs]
        zs = torch.stack([v.target for v in values], 1)  # (d, n)
        deltas: dict[str, Tensor] = {}
        for i, layer in enumerate(self.layers):
            module = m.mlp_out(layer)
            name = f"{module}.weight"
            with m.applying(deltas):  # the updates of the layers below are in place
                ks = keys_at(m, module, recs, self.templates()).T.double()  # (d_in, n)
                cur = io_at(m, z_module, recs)[1].T.double()  # (d, n)
            resid = (zs.double() - cur) / (len(self.layers) - i)
            adj = torch.linalg.solve(self.lam * self.moment(module).double() + ks @ ks.T, ks)  # (d_in, n)
            deltas[name] = as_weight(m, name, resid @ adj.T)
        return Edit(deltas, steps=sum(v.steps for v in values),
                    info={"v_nll": sum(v.nll for v in values) / len(values)})
