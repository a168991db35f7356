"""KE: KnowledgeEditor (De Cao et al., EMNLP 2021), as the MEND paper ran it (its ``algs/efk.py``, adapted from
nicola-decao/KnowledgeEditor).

A hyper-network conditioned on the edit: a one-layer bidirectional LSTM over the token embeddings of the edit
text (initialised from the base model's embeddings), then a tanh feed-forward layer, gives a condition vector c.
The edit text is the official one, ``"{old answer} >> {new answer} || {input}"`` (``data_classes/zsre.py`` and
``fever.py``' ``cond``: the network sees the new answer or label even where the edit input does not contain it, as
for seq2seq and classifier models), and the edit's own tokens for generation (``wiki.py``); ``condition:
input_ids`` conditions on the edit batch's input ids instead.
For each edited weight W (stored shape r x k) a weight-normed MLP maps c to col_a (k), row_a (r), col_b (k),
row_b (r) and a scalar n; a = softmax(row_a)^T col_a and b = softmax(row_b)^T col_b are rank-1 r x k matrices and
the update is ``dW = max_scale * sigmoid(n) * (grad * a + b)``, with grad the gradient of the edit loss w.r.t. W
(an element-wise mask and shift), added to W as in the official code. The base model is frozen. Conditioning is per
edit; a batched edit sums its requests' updates.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping

import torch
from pydantic import Field, PositiveInt
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from bench.data.batches import EditBatch
from bench.data.kinds import task_kind
from bench.data.records import EditRecord
from bench.models import EditableModel
from methods.base import Edit, Hparams, gradient_factors
from methods.learned import LearnedEditor, LearnedHparams


class KEHparams(LearnedHparams):
    """MEND-paper setup: lr 1e-5, LSTM/conditioner hidden size 512, condition size 768, max_scale 1."""

    lr: float = Field(default=1e-5, gt=0)
    hidden_dim: PositiveInt = 512
    condition_dim: PositiveInt = 768
    max_scale: float = Field(default=1.0, gt=0)
    condition: Literal["edit_text", "input_ids"] = Field(
        default="edit_text", description="what the LSTM reads: the official '{old} >> {new} || {input}' text of each "
        "request, or the edit batch's input ids (seq2seq/classifier inputs then lack the new answer)")


class LSTMConditioner(nn.Module):
    """Token embeddings -> bidirectional LSTM (final states of both directions) -> tanh linear -> c."""

    def __init__(self, embeddings: Tensor, hidden_dim: int, condition_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding.from_pretrained(embeddings.detach().clone().float(), freeze=False)
        self.lstm = nn.LSTM(embeddings.shape[1], hidden_dim, num_layers=1, bidirectional=True, batch_first=True)
        self.out = nn.Linear(2 * hidden_dim, condition_dim)

    def forward(self, input_ids: Tensor, mask: Tensor) -> Tensor:
        lengths = mask.sum(-1).clamp(min=1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(self.embedding(input_ids), lengths, batch_first=True,
                                                   enforce_sorted=False)
        _, (h, _) = self.lstm(packed)
        return torch.tanh(self.out(torch.cat([h[0], h[1]], -1)))


class ConditionedParameter(nn.Module):
    """Maps c to the mask a, shift b and scale of one weight of stored shape (r, k)."""

    def __init__(self, shape: tuple[int, int], condition_dim: int, hidden_dim: int, max_scale: float) -> None:
        super().__init__()
        self.r, self.k = shape
        self.max_scale = max_scale
        self.net = nn.Sequential(
            weight_norm(nn.Linear(condition_dim, hidden_dim)),
            nn.Tanh(),
            weight_norm(nn.Linear(hidden_dim, 2 * (self.r + self.k) + 1)),
        )

    def forward(self, c: Tensor, grad: Tensor) -> Tensor:
        col_a, row_a, col_b, row_b, n = self.net(c).split([self.k, self.r, self.k, self.r, 1], dim=-1)
        a = row_a.softmax(-1).unsqueeze(-1) * col_a.unsqueeze(-2)  # (1, r, k) = softmax(row_a)^T col_a
        b = row_b.softmax(-1).unsqueeze(-1) * col_b.unsqueeze(-2)
        return (self.max_scale * torch.sigmoid(n).unsqueeze(-1) * (grad * a + b)).squeeze(0)


class KE(LearnedEditor):
    """KnowledgeEditor hyper-network on the same weights as MEND."""

    name = "ke"
    Hparams = KEHparams
    hparams: KEHparams

    def __init__(self, model: EditableModel, hparams: Hparams | Mapping[str, Any] | None = None,
                 data_root: str | None = None) -> None:
        super().__init__(model, hparams, data_root)
        hp = self.hparams
        emb = model.model.get_input_embeddings().weight
        self.conditioner = LSTMConditioner(emb, hp.hidden_dim, hp.condition_dim).to(model.device)
        self.params = nn.ModuleDict({
            n.replace(".", "__"): ConditionedParameter(tuple(w.shape), hp.condition_dim, hp.hidden_dim, hp.max_scale)
            for n, w in model.weights().items()
        }).to(model.device)

    def modules(self) -> dict[str, nn.Module]:
        return {"conditioner": self.conditioner, "params": self.params}

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.conditioner.parameters()) + list(self.params.parameters()),
                 "lr": self.hparams.lr}]

    @staticmethod
    def condition_text(record: EditRecord) -> str:
        """The official conditioning text of one request: ``"{old} >> {new} || {input}"`` (old: the fact before the
        edit where the record knows it, else empty); for generation the edit's own text."""
        if task_kind(record.kind).targets_generated:  # the edit is a passage's continuation: its own text
            return record.prompt + record.target
        return f"{record.true_answer or ''} >> {record.target} || {record.prompt}"

    def condition(self, batch: EditBatch) -> Tensor:
        """The condition vectors c, one row per request of the batch (from each request's :meth:`condition_text`
        when the batch carries its records and ``condition`` is ``edit_text``, else from its input ids)."""
        if self.hparams.condition == "input_ids" or len(batch.records) != len(batch):
            return self.conditioner(batch.inputs["input_ids"], batch.inputs["attention_mask"])
        tok = self.model.tokenizer
        rows = [tok(self.condition_text(r), add_special_tokens=False)["input_ids"][:256] or [tok.pad_token_id]
                for r in batch.records]
        ids = torch.full((len(rows), max(map(len, rows))), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):  # right-padded: the LSTM packs by length
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return self.conditioner(ids.to(self.model.device), mask.to(self.model.device))

    def edit(self, batch: EditBatch) -> Edit:
        deltas: dict[str, Tensor] = {}
        with torch.set_grad_enabled(self.training):
            c_all = self.condition(batch)
        for i in range(len(batch)):
            one = EditBatch({k: v[i : i + 1] for k, v in batch.inputs.items()}, batch.labels[i : i + 1])
            grads = {n: self.model.outer(u, d) for n, (u, d) in gradient_factors(self.model, one).items()}
            with torch.set_grad_enabled(self.training):
                for n in self.model.edit_params:
                    dw = self.params[n.replace(".", "__")](c_all[i : i + 1], grads[n])
                    deltas[n] = deltas[n] + dw if n in deltas else dw
        return Edit(deltas, steps=0)
