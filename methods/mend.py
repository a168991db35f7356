"""MEND: Model Editor Networks with Gradient Decomposition (Mitchell et al., ICLR 2022).

For every edited weight W_l, forward hooks cache its input u_l and backward gives the gradient delta_{l+1} of
the edit loss w.r.t. its output, for every token of the edit batch (rows where either is all zero, i.e. padding,
are dropped). The weight gradient is sum_i delta_i u_i^T; MEND's network g maps z = [u; delta] (normalised
by running statistics) to pseudo-activations and pseudo-deltas, and the edit is
``W~ = W - alpha_l * sum_i delta~_i u~_i^T`` with a learned per-layer step alpha_l (Alg. 2). Batched edits sum
over every token of every request (footnote 2).

Networks are shared per weight shape (``shared``), with per-layer FiLM scale/offset; the layers of one shape run
through their network in one call. The backward that produces delta stops at the lowest edited layer and no
weight gradient of the base model is ever formed.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Literal, Mapping

import torch
from pydantic import Field, PositiveInt, model_validator
from torch import Tensor, nn

from bench.data.batches import EditBatch
from bench.models import EditableModel
from methods.base import Edit, Hparams, gradient_factors
from methods.learned import LearnedEditor, LearnedHparams
from methods.nets import LowRankMLP, RunningNorm


class MENDHparams(LearnedHparams):
    """Paper defaults: editor lr 1e-6 (Adam), alpha init 1e-4 with its own lr 1e-4, c_edit 0.1, rank 1920,
    one hidden layer, shared per shape, combined [u; delta] input, normalised inputs, identity init."""

    edit_lr: float = Field(default=1e-4, gt=0, description="initial per-layer step alpha_l")
    lr_lr: float = Field(default=1e-4, gt=0, description="learning rate of the alphas")
    rank: PositiveInt = 1920
    n_hidden: PositiveInt = 1
    combine: bool = True
    one_sided: bool = False
    x_only: bool = False
    delta_only: bool = False
    norm: bool = True
    id_init: bool = True
    shared: bool = True
    alphas_only: bool = False
    output_act: bool = Field(default=True, description="clamp(min=0) after the output layer too (Eq. 3b; the "
                             "official LRLinear always clamps); false: a linear output layer")
    v_init: Literal["randn", "xavier"] = Field(default="randn", description="init of each layer's V at identity "
                                               "init: standard normal (official) or Xavier-uniform")

    @model_validator(mode="after")
    def _variants(self) -> "MENDHparams":
        sided = [k for k in ("one_sided", "x_only", "delta_only") if getattr(self, k)]
        if len(sided) > 1:
            raise ValueError(f"choose at most one of one_sided, x_only, delta_only (got {', '.join(sided)})")
        if sided and self.combine:
            raise ValueError(f"{sided[0]} needs combine: false (a combined network sees both sides)")
        return self


class GradientTransform(nn.Module):
    """Normalisers and network(s) for all edited weights of one shape (or one weight when not shared).

    ``forward(u, delta, mode) -> (u~, delta~)``; ``mode`` is the row's layer index within the group.
    """

    def __init__(self, d_in: int, d_out: int, n_modes: int, hp: MENDHparams) -> None:
        super().__init__()
        self.d_in, self.d_out, self.use_norm = d_in, d_out, hp.norm
        self.norm_u, self.norm_d = RunningNorm(d_in), RunningNorm(d_out)

        def net(dim: int) -> LowRankMLP:
            return LowRankMLP(dim, min(hp.rank, dim), n_modes, hp.n_hidden, hp.id_init, hp.output_act, hp.v_init)

        self.net = net(d_in + d_out) if hp.combine else None
        transform_u = not hp.combine and not hp.delta_only and not (hp.one_sided and d_in > d_out)
        transform_d = not hp.combine and not hp.x_only and not (hp.one_sided and d_in <= d_out)
        self.u_net = net(d_in) if transform_u else None
        self.d_net = net(d_out) if transform_d else None

    def update_stats(self, u: Tensor, delta: Tensor) -> None:
        self.norm_u.update(u)
        self.norm_d.update(delta)

    def forward(self, u: Tensor, delta: Tensor, mode: Tensor) -> tuple[Tensor, Tensor]:
        if self.use_norm:
            u, delta = self.norm_u(u), self.norm_d(delta)
        if self.net is not None:
            out = self.net(torch.cat([u, delta], -1), mode)
            return out[:, : self.d_in], out[:, self.d_in :]
        return (self.u_net(u, mode) if self.u_net is not None else u,
                self.d_net(delta, mode) if self.d_net is not None else delta)


class _Alphas(nn.Module):
    def __init__(self, n: int, init: float) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.full((n,), float(init)))


class MEND(LearnedEditor):
    """MEND with the paper's defaults and its ablation flags (see :class:`MENDHparams`)."""

    name = "mend"
    Hparams = MENDHparams
    hparams: MENDHparams

    def __init__(self, model: EditableModel, hparams: Hparams | Mapping[str, Any] | None = None,
                 data_root: str | None = None) -> None:
        super().__init__(model, hparams, data_root)
        hp = self.hparams
        groups: "OrderedDict[str, list[str]]" = OrderedDict()
        for n in model.edit_params:
            d_in, d_out = model.io_dims(n)
            key = f"{d_in}x{d_out}" if hp.shared else n.replace(".", "#")
            groups.setdefault(key, []).append(n)
        self.groups = groups
        self.nets = nn.ModuleDict({
            key: GradientTransform(*model.io_dims(names[0]), len(names), hp) for key, names in groups.items()
        })
        self.alphas = _Alphas(len(model.edit_params), hp.edit_lr)
        self.nets.to(model.device)
        self.alphas.to(model.device)
        self.train(False)

    def modules(self) -> dict[str, nn.Module]:
        return {"nets": self.nets, "alphas": self.alphas}

    def param_groups(self) -> list[dict[str, Any]]:
        groups = [{"params": [self.alphas.alpha], "lr": self.hparams.lr_lr}]
        if not self.hparams.alphas_only:
            groups.insert(0, {"params": list(self.nets.parameters()), "lr": self.hparams.lr})
        return groups

    def transform(self, factors: Mapping[str, tuple[Tensor, Tensor]]) -> dict[str, tuple[Tensor, Tensor]]:
        """Run every group's rows (all its layers at once) through its network; returns (u~, delta~) per weight.
        In training mode the running statistics first absorb the rows."""
        out: dict[str, tuple[Tensor, Tensor]] = {}
        for key, names in self.groups.items():
            gt = self.nets[key]
            us = [factors[n][0] for n in names]
            ds = [factors[n][1] for n in names]
            u, d = torch.cat(us), torch.cat(ds)
            if self.training:
                gt.update_stats(u, d)
            mode = torch.cat([torch.full((x.shape[0],), i, dtype=torch.long, device=u.device)
                              for i, x in enumerate(us)])
            u_t, d_t = gt(u, d, mode)
            sizes = [x.shape[0] for x in us]
            for n, ut, dt in zip(names, u_t.split(sizes), d_t.split(sizes)):
                out[n] = (ut, dt)
        return out

    def edit(self, batch: EditBatch) -> Edit:
        factors = gradient_factors(self.model, batch)
        with torch.set_grad_enabled(self.training):
            pseudo = self.transform(factors)
            deltas = {n: -self.alphas.alpha[i] * self.model.outer(*pseudo[n])
                      for i, n in enumerate(self.model.edit_params)}
        return Edit(deltas, steps=0)

    def checkpoint_meta(self) -> dict[str, Any]:
        meta = super().checkpoint_meta()
        meta["groups"] = {k: v for k, v in self.groups.items()}
        meta["normaliser"] = {k: {"count_u": float(g.norm_u.count), "count_delta": float(g.norm_d.count)}
                              for k, g in self.nets.items()}
        return meta
