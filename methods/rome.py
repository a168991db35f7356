"""ROME: Rank-One Model Editing (Meng, Bau, Andonian, Belinkov, NeurIPS 2022), after the authors' code
(kmeng01/rome: ``rome_main.py``, ``compute_u.py``, ``compute_v.py``).

One request writes a new key -> value association into the MLP output projection W of one block l:

- key k* = the projection's input at the subject's last token, averaged over the bare prompt and random
  prefixes sampled from the model (``context_lengths``: ten of 5 and ten of 10 tokens, as the paper);
- value v* = the projection's output there plus a vector delta optimised so the model predicts the new object
  from every prefixed prompt, with the KL "essence" term and weight decay of the paper's hparams
  (:func:`methods.values.optimise_value`);
- the rank-one closed form ``W' = W + (v* - W k) (C^-1 k*)^T / ((C^-1 k*)^T k)`` with C = E[k k^T] the second
  moment of keys over ``mom2_n_tokens`` tokens of WikiText-2 (the data root's ``wikitext/wiki2_valid.txt``;
  the paper: 100,000 Wikipedia samples), cached on disk by (model, weights, layer, corpus, token count) and
  k the key of the bare prompt, so ``W' k = v*`` exactly.

Layer: the paper's per model (GPT-2 medium 8, large 12, XL 17, GPT-J 5; ``methods.locate.DEFAULT_LAYER``).
SmolLM2-135M (30 blocks): block 5, chosen by a layer sweep on the first 8 CounterFact training records (seed 0;
MEMIT's prefixes; efficacy / paraphrase / neighbourhood / MEND-style ES):

    layer  2: 1.00 / 1.00 / 0.875 / 0.375      layer 11: 1.00 / 1.00 / 0.750 / 0.375
    layer  5: 1.00 / 1.00 / 0.875 / 0.500      layer 15: 1.00 / 1.00 / 0.625 / 0.250
    layer  8: 1.00 / 1.00 / 0.875 / 0.500

(5 and 8 tie; 5 is cheaper and sits at GPT-J's relative depth, 5 of 28). Other models: 30% of the depth, the
paper's GPT-2 XL fraction (17 of 48). A batched edit applies its requests one after another, each computed on
the model with the previous ones applied (as the authors' code does for a sequence of requests). Causal models
only.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import torch
from torch import Tensor

from bench.data.batches import EditBatch
from bench.models import EditableModel
from methods.base import Edit, Hparams
from methods.locate import (LocateEditor, LocateHparams, as_weight, default_layer, io_at, keys_at,
                            require_causal)
from methods.values import optimise_value

log = logging.getLogger(__name__)

class ROMEHparams(LocateHparams):
    """kmeng01/rome hparams/ROME/gpt2-xl.json: 20 value steps at lr 0.5, weight decay 0.5, clamp 4x, KL 0.0625,
    prefixes (5 tokens x 10, 10 tokens x 10). ``layers``: one block (None: :func:`default_layer`)."""

    mom2_adjustment: bool = True


class ROME(LocateEditor):
    """Rank-one update of one MLP output projection per request."""

    name = "rome"
    Hparams = ROMEHparams
    hparams: ROMEHparams

    def __init__(self, model: EditableModel, hparams: Hparams | Mapping[str, Any] | None = None,
                 data_root: str | None = None) -> None:
        super().__init__(model, hparams, data_root)
        layers = self.hparams.layers or [default_layer(model)]
        if len(layers) != 1:
            raise ValueError(f"rome.layers: ROME edits one block, got {layers}; use memit for several")
        self.layer = layers[0]

    @classmethod
    def select_weights(cls, model: EditableModel, hparams: Hparams) -> list[str]:
        require_causal(model, cls.name)
        layers = getattr(hparams, "layers", None) or [default_layer(model)]
        return [f"{model.mlp_out(layers[0])}.weight"]

    @classmethod
    def data_files(cls, hparams: Mapping[str, Any]) -> list[str]:
        hp = cls.Hparams(**dict(hparams))
        return [hp.mom2_corpus] if hp.mom2_adjustment else []

    def uses_moment(self) -> bool:
        return self.hparams.mom2_adjustment

    def left_vector(self, module: str, record: Any) -> Tensor:
        """u = C^-1 k* / ||C^-1 k*|| (k* alone without ``mom2_adjustment``), on the model as currently edited."""
        k = keys_at(self.model, module, [record], self.templates(), weights=self.key_weights())[0]
        u = k.double()
        if self.hparams.mom2_adjustment:
            u = torch.linalg.solve(self.moment(module), u)
        return (u / u.norm()).to(k.dtype)

    def edit(self, batch: EditBatch) -> Edit:
        if not batch.records:
            raise ValueError("rome: the edit batch carries no records (their subjects are needed)")
        module = self.model.mlp_out(self.layer)
        name = f"{module}.weight"
        deltas: dict[str, Tensor] = {}
        steps = 0
        nlls = []
        for record in batch.records:
            with self.model.applying(deltas):  # requests of a batch one after another (the authors' loop)
                u = self.left_vector(module, record)
                v = optimise_value(self.model, module, record, self.templates(), self.hparams)
                k, out = io_at(self.model, module, [record])
            right = (v.target - out[0]) / torch.dot(k[0], u)
            upd = as_weight(self.model, name, torch.outer(right, u))
            deltas[name] = deltas[name] + upd if name in deltas else upd
            steps += v.steps
            nlls.append(v.nll)
        return Edit(deltas, steps=steps, info={"v_nll": sum(nlls) / len(nlls)})
