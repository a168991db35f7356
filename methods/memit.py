"""MEMIT: Mass-Editing Memory in a Transformer (Meng, Sen Sharma, Andonian, Belinkov, Bau, ICLR 2023), after the
authors' code (kmeng01/memit: ``memit_main.py``, ``compute_z.py``, ``compute_ks.py``).

A batch of requests is written into the MLP output projections of a band of blocks in one solve per layer:

1. for every request, z_i = the residual stream (block output) of the LAST layer of the band at the subject's
   last token plus a vector optimised so the model predicts the new object (the same objective as ROME's v*,
   :func:`methods.values.optimise_values`, all facts of a batch in one batched pass per step, with MEMIT's clamp 0.75);
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
from methods.locate import (LocateEditor, LocateHparams, as_weight, default_layer, group_weights, io_at, keys_at,
                            require_causal)
from methods.values import optimise_values

log = logging.getLogger(__name__)

#: The authors' settings for the paper's models, field by field from kmeng01/memit (commit 80426fd)
#: ``hparams/MEMIT/gpt2-xl.json`` and ``hparams/MEMIT/EleutherAI_gpt-j-6B.json``; a field a sweep sets wins.
#: Same in both files and so the class defaults: ``fact_token: subject_last`` (keys and values at the subject's
#: last token), ``mom2_adjustment: true``. Departures: ``v_loss_layer`` (47 / 27, the last block) is where this
#: suite reads the prediction too (the model's output); ``mom2_dataset: wikipedia, mom2_n_samples: 100000`` is
#: replaced offline by ``mom2_corpus`` / ``mom2_n_tokens``; ``mom2_dtype: float32`` by float64 here.
PAPER_HPARAMS: dict[str, dict[str, Any]] = {
    "gpt2-xl": {
        "layers": [13, 14, 15, 16, 17],  # "layers"
        "clamp_norm_factor": 0.75,       # "clamp_norm_factor"
        "v_num_grad_steps": 20,          # "v_num_grad_steps"
        "v_lr": 0.5,                     # "v_lr": 5e-1
        "v_weight_decay": 0.5,           # "v_weight_decay"
        "kl_factor": 0.0625,             # "kl_factor"
        "mom2_update_weight": 20000.0,   # "mom2_update_weight"
    },
    "EleutherAI/gpt-j-6B": {
        "layers": [3, 4, 5, 6, 7, 8],
        "clamp_norm_factor": 0.75,
        "v_num_grad_steps": 25,
        "v_lr": 0.5,
        "v_weight_decay": 0.5,
        "kl_factor": 0.0625,
        "mom2_update_weight": 15000.0,
    },
}
#: The paper's band and lambda per model (from :data:`PAPER_HPARAMS`).
DEFAULT_BAND: dict[str, tuple[list[int], float]] = {
    name: (hp["layers"], hp["mom2_update_weight"]) for name, hp in PAPER_HPARAMS.items()}


def default_layers(model: EditableModel) -> list[int]:
    """The paper's band for its models; else five blocks ending at ROME's default layer."""
    if model.name in DEFAULT_BAND:
        return DEFAULT_BAND[model.name][0]
    top = default_layer(model)
    return list(range(max(0, top - 4), top + 1))


class MEMITHparams(LocateHparams):
    """kmeng01/memit hparams/MEMIT/EleutherAI_gpt-j-6B.json: 25 value steps at lr 0.5, clamp 0.75, weight decay
    0.5, KL 0.0625, prefixes: five of 10 tokens after "The", "Therefore", "Because", "I", "You" (memit_main.py
    get_context_templates). GPT-2 XL takes its own file's values (:data:`PAPER_HPARAMS`: 20 value steps)."""

    v_num_grad_steps: int = Field(default=25, gt=0)
    clamp_norm_factor: float = Field(default=0.75, gt=0)
    context_lengths: list[conlist(PositiveInt, min_length=2, max_length=2)] = Field(default=[[10, 5]])
    mom2_update_weight: float | None = Field(default=None, gt=0, description="lambda; None: the model's default")


def paper_hparams(model_name: str, hp: MEMITHparams) -> MEMITHparams:
    """``hp`` with the authors' values for ``model_name`` (:data:`PAPER_HPARAMS`) in every field the sweep left
    unset; unchanged for other models."""
    paper = {k: v for k, v in PAPER_HPARAMS.get(model_name, {}).items() if k not in hp.model_fields_set}
    return hp.model_copy(update=paper) if paper else hp


class MEMIT(LocateEditor):
    """Batched multi-layer closed-form editing."""

    name = "memit"
    Hparams = MEMITHparams
    hparams: MEMITHparams

    def __init__(self, model: EditableModel, hparams: Hparams | Mapping[str, Any] | None = None,
                 data_root: str | None = None) -> None:
        hp = hparams if isinstance(hparams, MEMITHparams) else MEMITHparams(**dict(hparams or {}))
        super().__init__(model, paper_hparams(model.name, hp), data_root)
        self.layers = sorted(self.hparams.layers or default_layers(model))
        lam = self.hparams.mom2_update_weight
        if lam is None:  # not a paper model: GPT-J's lambda scaled by the key dimension
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

    def key_weights(self) -> list[float]:
        """kmeng01/memit ``compute_ks`` averages a fact's keys within each template group, then across groups:
        the bare prompt weighs 1/2 and each of the five default prefixes 1/10 (ROME's code averages flat)."""
        return group_weights(self.template_groups())

    def edit(self, batch: EditBatch) -> Edit:
        if not batch.records:
            raise ValueError("memit: the edit batch carries no records (their subjects are needed)")
        m, recs = self.model, list(batch.records)
        z_module = m.block(self.layers[-1])
        values = optimise_values(m, z_module, recs, self.templates(), self.hparams)  # all facts at once
        zs = torch.stack([v.target for v in values], 1)  # (d, n)
        deltas: dict[str, Tensor] = {}
        for i, layer in enumerate(self.layers):
            module = m.mlp_out(layer)
            name = f"{module}.weight"
            with m.applying(deltas):  # the updates of the layers below are in place
                ks = keys_at(m, module, recs, self.templates(), weights=self.key_weights()).T.double()  # (d_in, n)
                cur = io_at(m, z_module, recs)[1].T.double()  # (d, n)
            resid = (zs.double() - cur) / (len(self.layers) - i)
            deltas[name] = as_weight(m, name, self.update(module, ks, resid))
        return Edit(deltas, steps=sum(v.steps for v in values),
                    info={"v_nll": sum(v.nll for v in values) / len(values)})

    def update(self, module: str, ks: Tensor, resid: Tensor) -> Tensor:
        """The (d_out, d_in) update of one layer of the band from its keys K (d_in, n) and residuals R (d_out, n):
        ``R A^T`` with ``A = solve(lambda C + K K^T, K)`` (float64)."""
        adj = torch.linalg.solve(self.lam * self.moment(module).double() + ks @ ks.T, ks)  # (d_in, n)
        return resid @ adj.T
