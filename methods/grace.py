"""GRACE: General Retrieval Adaptors for Continual Editing (Hartvigsen, Sankaranarayanan, Palangi, Kim, Ghassemi,
NeurIPS 2023), after the authors' code (Thartvigsen/GRACE) as EasyEdit ships it (``easyeditor/models/grace``,
``hparams/GRACE/*.yaml``).

The model's weights are never changed. One MLP output projection gets a codebook (:class:`Codebook`, a module
adaptor): entries of a key (the projection's INPUT at the last prompt token of an edit), a value (a vector that
replaces the projection's output there) and a deferral radius epsilon. At inference, every position whose input is
within the radius of its nearest key has its output replaced by that key's value; all others are untouched, so
inputs far from every edit behave exactly as the unedited model.

An edit: the key is read at the last prompt token; its value is trained (Adam, ``edit_lr``, ``n_iter`` steps on the
target's NLL, the value replacing the output at that position); the entry joins the codebook by GRACE's rules
(:meth:`Codebook.__add__`): no key within ``eps + eps_nearest`` -> a new entry with radius ``eps``; the nearest key
has another target -> a new entry, both radii set to half their distance (the nearest's minus 1e-5); the same
target -> the nearest's radius grows to the distance (``coverage``; ``moving_average`` also moves its key halfway)
and its value becomes the new one, trained from the old (EasyEdit trains the nearest's value in place).

Defaults (EasyEdit ``hparams/GRACE/llama-7b.yaml``): ``eps`` 1.0, ``n_iter`` 50, ``edit_lr`` 1.0, Euclidean
distance, cold value init (uniform [0, 1)), ``eps_expand: coverage``, ``replacement: replace_last``; the layer at
EasyEdit's LLaMA-2-7B depth (block 27 of 32: 27/32 of the depth, block 25 of SmolLM2's 30). Departures: targets
are compared by their token ids (EasyEdit compares the mean of the label ids); the cold init draws from a generator
seeded with ``seed`` (EasyEdit: the global RNG); several requests in one edit call train their values together in
one batched pass (the papers edit one at a time; the lifelong sweep does too) and join the codebook in order; at
inference every position is a query, not only the last (what makes teacher-forced scoring, where the target
follows the prompt, and KV-cached decoding, where each step sees one new position, use the same rule). Causal
models only.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Literal, Mapping

import torch
from pydantic import Field
from torch import Tensor

from bench.data.batches import EditBatch
from bench.models import Adaptor
from methods.adapted import AdaptorEditor, target_nll
from methods.base import Edit, Hparams

log = logging.getLogger(__name__)


class GRACEHparams(Hparams):
    """EasyEdit ``hparams/GRACE/llama-7b.yaml`` (see the module docstring for what departs)."""

    layer: int | None = Field(default=None, ge=0, description="block whose MLP output projection is adapted")
    eps: float = Field(default=1.0, gt=0, description="initial deferral radius")
    n_iter: int = Field(default=50, gt=0)
    edit_lr: float = Field(default=1.0, gt=0)
    eps_expand: Literal["coverage", "moving_average"] = "coverage"
    val_init: Literal["cold", "warm"] = "cold"
    seed: int = 0


class Codebook(Adaptor):
    """GRACE's codebook at one module: ``keys`` (N, d_in), ``values`` (N, d_out), radii ``eps`` (N,), each entry's
    target token ids (``labels``), and the settings new entries join with (``init_eps``, ``expand``)."""

    kind = "grace_codebook"

    def __init__(self, keys: Tensor, values: Tensor, eps: Tensor, labels: list[tuple[int, ...]], init_eps: float,
                 expand: str = "coverage") -> None:
        if not (len(keys) == len(values) == len(eps) == len(labels)):
            raise ValueError(f"codebook: {len(keys)} keys, {len(values)} values, {len(eps)} radii, "
                             f"{len(labels)} labels; one of each per entry")
        self.keys, self.values, self.eps, self.labels = keys, values, eps, list(labels)
        self.init_eps, self.expand = float(init_eps), expand

    def __len__(self) -> int:
        return len(self.labels)

    def forward(self, inputs: Tensor, output: Tensor, call: dict[str, Any]) -> Tensor:
        """Each position within the radius of its nearest key gets that key's value; the others are unchanged."""
        if not len(self):
            return output
        q = inputs.reshape(-1, inputs.shape[-1]).float()
        dist, idx = torch.cdist(q, self.keys.float()).min(-1)
        hit = dist <= self.eps[idx]
        if not bool(hit.any()):
            return output
        flat = output.reshape(-1, output.shape[-1]).clone()
        flat[hit] = self.values[idx[hit]].to(flat.dtype)
        return flat.view_as(output)

    def nearest(self, key: Tensor) -> tuple[int, float]:
        """(index, distance) of the entry whose key is nearest to ``key``; (-1, inf) when the codebook is empty."""
        if not len(self):
            return -1, float("inf")
        d = torch.cdist(key.float()[None], self.keys.float())[0]
        j = int(d.argmin())
        return j, float(d[j])

    def __add__(self, later: Adaptor) -> "Codebook":
        if not isinstance(later, Codebook):
            raise TypeError(f"a GRACE codebook composes with another codebook, not a {type(later).__name__}")
        out = Codebook(self.keys.clone(), self.values.clone(), self.eps.clone(), self.labels, self.init_eps,
                       self.expand)
        for i in range(len(later)):
            out._join(later.keys[i], later.values[i], later.labels[i])
        return out

    def within_reach(self, key: Tensor) -> tuple[int, float, bool]:
        """(nearest entry, its distance, whether ``key`` is within ``init_eps`` + its radius): what decides how a new
        entry joins (-1, inf, False for an empty codebook)."""
        j, d = self.nearest(key)
        return j, d, j >= 0 and d <= self.init_eps + float(self.eps[j])

    def updated_by(self, key: Tensor, label: tuple[int, ...]) -> int:
        """The entry a new entry with this key and target updates instead of being added (the same target within
        reach); -1 when it is added."""
        j, _, near = self.within_reach(key)
        return j if near and self.labels[j] == label else -1

    def _join(self, key: Tensor, value: Tensor, label: tuple[int, ...]) -> None:
        """Add one trained entry by GRACE's rules (module docstring); modifies this (fresh) codebook."""
        j, d, near = self.within_reach(key)
        if not near or self.labels[j] != label:
            radius = self.init_eps
            if near:  # a conflict: both radii halve
                self.eps[j] = d / 2 - 1e-5
                radius = d / 2
            self.keys = torch.cat([self.keys, key[None].to(self.keys)])
            self.values = torch.cat([self.values, value[None].to(self.values)])
            self.eps = torch.cat([self.eps, torch.tensor([radius], dtype=self.eps.dtype, device=self.eps.device)])
            self.labels.append(label)
            return
        if d > float(self.eps[j]):  # the same target, outside its radius: the entry grows to cover it
            if self.expand == "moving_average":
                self.keys[j] = 0.5 * self.keys[j] + 0.5 * key.to(self.keys)
            self.eps[j] = d
        self.values[j] = value.to(self.values)

    def detach(self) -> "Codebook":
        return Codebook(self.keys.detach(), self.values.detach(), self.eps.detach(), self.labels, self.init_eps,
                        self.expand)

    def tensors(self) -> dict[str, Tensor]:
        return {"keys": self.keys, "values": self.values, "eps": self.eps}

    def meta(self) -> dict[str, str]:
        return {"labels": json.dumps([list(x) for x in self.labels]), "init_eps": repr(self.init_eps),
                "expand": self.expand}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], meta: Mapping[str, str]) -> "Codebook":
        return cls(tensors["keys"], tensors["values"], tensors["eps"],
                   [tuple(x) for x in json.loads(meta["labels"])], float(meta["init_eps"]), meta["expand"])

    def describe(self) -> dict[str, float]:
        return {"entries": float(len(self))}

    @staticmethod
    def empty(d_in: int, d_out: int, init_eps: float, expand: str, like: Tensor) -> "Codebook":
        """A codebook with no entries for a module of these dimensions."""
        return Codebook(like.new_zeros(0, d_in), like.new_zeros(0, d_out), like.new_zeros(0), [], init_eps, expand)


class GRACE(AdaptorEditor):
    """A codebook adaptor at one MLP output projection; the weights are never changed."""

    name = "grace"
    Hparams = GRACEHparams
    hparams: GRACEHparams

    def edit(self, batch: EditBatch) -> Edit:
        m, hp, module = self.model, self.hparams, self.module
        first = (batch.labels != -100).int().argmax(-1)  # logits[t] predicts labels[t]: t = the last prompt token
        rows = torch.arange(len(batch), device=first.device)
        io = m.capture(batch.inputs, [module])[module]
        keys, outs = io.input[rows, first].detach(), io.output[rows, first].detach()
        labels = [tuple(int(t) for t in row[row != -100]) for row in batch.labels]
        init = self._initial_values(keys, outs, labels)
        values, nll = self._train(batch, rows, first, init)
        d_in, d_out = m.io_dims(m.edit_params[0])
        book = Codebook.empty(d_in, d_out, hp.eps, hp.eps_expand, keys)
        for i in range(len(batch)):
            book._join(keys[i], values[i], labels[i])
        return Edit({}, steps=hp.n_iter, info={"v_nll": nll}, adaptors={module: book})

    def _initial_values(self, keys: Tensor, outs: Tensor, labels: list[tuple[int, ...]]) -> Tensor:
        """Each request's starting value: the entry's current value where it will update an entry of the applied
        codebook (same target, within reach), else cold (uniform [0, 1), seeded) or warm (the current output)."""
        gen = torch.Generator().manual_seed(self.hparams.seed)
        cold = torch.rand(len(labels), outs.shape[-1], generator=gen).to(outs)
        init = outs.clone() if self.hparams.val_init == "warm" else cold
        book = self.model.adaptors().get(self.module)
        if isinstance(book, Codebook):
            for i, key in enumerate(keys):
                j = book.updated_by(key, labels[i])
                if j >= 0:
                    init[i] = book.values[j].to(init)
        return init

    def _train(self, batch: EditBatch, rows: Tensor, first: Tensor, init: Tensor) -> tuple[Tensor, float]:
        """``n_iter`` Adam steps on the values (one per request), each replacing the module's output at its
        request's last prompt token; returns the values and the last mean target NLL."""
        values = init.clone().requires_grad_()
        opt = torch.optim.Adam([values], lr=self.hparams.edit_lr)

        def put(name: str, out: Tensor) -> Tensor:
            out = out.clone()
            out[rows, first] = values.to(out.dtype)
            return out

        nll = torch.tensor(float("nan"))
        with self.model.upper_blocks_only(batch.inputs, self.layer):  # the blocks below never see the value
            for _ in range(self.hparams.n_iter):
                opt.zero_grad()
                with torch.enable_grad(), self.model.trace([self.module], edit_output=put):
                    nll = target_nll(self.model, batch.inputs, batch.labels)
                    nll.backward()
                opt.step()
        return values.detach(), float(nll.detach())
