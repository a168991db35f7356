"""Building blocks of learned editors: a running normaliser and MEND's low-rank residual MLP with FiLM.

Both are plain ``nn.Module``s whose whole state (parameters and buffers) lives in ``state_dict`` so checkpoints
carry the normaliser statistics too.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class RunningNorm(nn.Module):
    """Per-dimension running mean and variance (Chan/Welford merge of batches), applied as
    ``(x - mean) / (std + eps)`` with the unbiased variance.

    Statistics update only through :meth:`update` (MEND calls it on every training edit); :meth:`forward` never
    changes them, so they are frozen at evaluation. Before any update it is the identity.
    """

    def __init__(self, dim: int, eps: float = 1e-7) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(dim, dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Merge the rows of ``x`` (N, dim) into the statistics."""
        x = x.detach().reshape(-1, self.mean.shape[0]).to(torch.float64)
        n_b = x.shape[0]
        if n_b == 0:
            return
        mean_b = x.mean(0)
        m2_b = ((x - mean_b) ** 2).sum(0)
        n_a = self.count.clone()
        n = n_a + n_b
        d = mean_b - self.mean
        self.mean += d * (n_b / n)
        self.m2 += m2_b + d * d * (n_a * n_b / n)
        self.count.fill_(n)

    @property
    def var(self) -> Tensor:
        return self.m2 / (self.count - 1).clamp(min=1)

    @property
    def std(self) -> Tensor:
        return self.var.sqrt()

    def forward(self, x: Tensor) -> Tensor:
        if self.count < 2:
            return x
        return (x - self.mean.to(x.dtype)) / (self.std.to(x.dtype) + self.eps)


class LowRankFiLMLayer(nn.Module):
    """``y = x + act(s[mode] * (U V x + b) + o[mode])``: a residual low-rank linear layer with per-mode (per edited
    layer) scale ``s`` and offset ``o`` (FiLM).

    Identity init (``id_init``): U = 0 and b = 0 so the layer starts as the identity; V is standard normal
    (``v_init="randn"``, the official ``LRLinear(init="id")``) or Xavier-uniform (``v_init="xavier"``). The
    activation is ``clamp(min=0)``, whose gradient passes at exactly 0 (``torch.relu``'s does not), so U leaves zero
    when training starts; ``act=False`` makes the layer linear.
    """

    def __init__(self, dim: int, rank: int, n_modes: int, act: bool = True, id_init: bool = True,
                 v_init: str = "randn") -> None:
        super().__init__()
        if v_init not in ("randn", "xavier"):
            raise ValueError(f"v_init: {v_init!r} is not one of 'randn', 'xavier'")
        self.act = act
        self.v = nn.Parameter(torch.empty(rank, dim))
        self.u = nn.Parameter(torch.empty(dim, rank))
        self.b = nn.Parameter(torch.zeros(dim))
        self.scale = nn.Parameter(torch.ones(n_modes, dim))
        self.shift = nn.Parameter(torch.zeros(n_modes, dim))
        if id_init and v_init == "randn":
            nn.init.normal_(self.v)
        else:
            nn.init.xavier_uniform_(self.v)
        if id_init:
            nn.init.zeros_(self.u)
        else:
            nn.init.xavier_uniform_(self.u)
            nn.init.uniform_(self.b, -1 / math.sqrt(dim), 1 / math.sqrt(dim))

    def forward(self, x: Tensor, mode: Tensor) -> Tensor:
        pre = (x @ self.v.t()) @ self.u.t() + self.b
        pre = self.scale[mode] * pre + self.shift[mode]
        return x + (pre.clamp(min=0) if self.act else pre)


class LowRankMLP(nn.Module):
    """MEND's editor network g: ``n_hidden`` activated low-rank residual layers, then an output layer.

    With the default ``output_act=True`` every layer, the output layer included, applies the activation, as Eq. 3b
    of the paper writes it and as the official implementation does (eric-mitchell/mend ``nn.py``: ``IDMLP`` passes
    ``relu=False`` to its last ``LRLinear``, but ``LRLinear.forward`` ignores the flag and always clamps);
    ``output_act=False`` makes the output layer linear. At identity init the network is exactly the identity.
    """

    def __init__(self, dim: int, rank: int, n_modes: int, n_hidden: int = 1, id_init: bool = True,
                 output_act: bool = True, v_init: str = "randn") -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [LowRankFiLMLayer(dim, rank, n_modes, act=i < n_hidden or output_act, id_init=id_init, v_init=v_init)
             for i in range(n_hidden + 1)]
        )

    def forward(self, x: Tensor, mode: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x, mode)
        return x
