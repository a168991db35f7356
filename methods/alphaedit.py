"""AlphaEdit: Null-Space Constrained Knowledge Editing (Fang, Jiang, Wang, Ma, Shi, Wang, He, Chua, ICLR 2025,
arXiv 2410.02355), after the authors' code (jianghoucheng/AlphaEdit: ``AlphaEdit/AlphaEdit_main.py``,
``get_project`` in ``experiments/evaluate.py``, ``hparams/AlphaEdit/*.json``).

MEMIT (:mod:`methods.memit`: the same value vectors z, keys, band of layers and residual spreading) with another
solve per layer: the update is projected onto the null space of the preserved knowledge's keys, so that what the
model computes on them does not change, and the keys of the edits made before in the same sequence enter the
normal equations instead of a covariance term:

    P = U0 U0^T, U0 = the eigenvectors of C = E[k k^T] (the key second moment ROME/MEMIT cache, unedited model)
        whose eigenvalues are below ``nullspace_threshold``;
    dW^T = solve(P (K K^T + K_p K_p^T) + L2 I, P K R^T),

K (d_in x n) the keys of this edit, R the residuals, K_p K_p^T the sum of k k^T over the keys of the edits applied
before (the authors' ``cache_c``, accumulated after each edit with the keys read on the model as just edited).
For every preserved key k0 with P k0 = 0, dW k0 = 0 (tested).

Defaults: the authors' files equal MEMIT's for GPT-2 XL and GPT-J plus ``nullspace_threshold: 2e-2`` and ``L2: 10``
(their Llama3-8B file: ``v_lr`` 0.1); as MEMIT here, other models take the GPT-J values and MEMIT's default band,
so AlphaEdit and MEMIT differ in a stream by the solve alone. Departures: C comes from this suite's offline corpus
(``mom2_corpus``, 100k tokens; the authors' 100k Wikipedia samples); eigendecomposition (``eigh``) instead of SVD (the
same for a symmetric PSD matrix) in float64. K_p K_p^T is kept by the editor for the edits it made and used while
the model's applied weight deltas are exactly those edits (a sequential stream); anything else applied starts a
new sequence (logged), and an independent edit (nothing applied) has no K_p. Causal models only.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Mapping

import torch
from pydantic import Field
from torch import Tensor

from bench.data.batches import EditBatch
from bench.models import EditableModel
from methods.base import Edit, FitResult, Hparams
from methods.locate import keys_at
from methods.memit import MEMIT, MEMITHparams

log = logging.getLogger(__name__)


class AlphaEditHparams(MEMITHparams):
    """MEMIT's settings plus the null space's threshold and the solve's ridge (the authors' 2e-2 and 10)."""

    nullspace_threshold: float = Field(default=2e-2, gt=0, description="eigenvalues of C below it span the null space")
    L2: float = Field(default=10.0, ge=0, description="ridge added to the projected normal equations")


def null_space_projection(moment: Tensor, threshold: float) -> tuple[Tensor, int]:
    """(P, its rank): the projection onto the eigenvectors of the symmetric PSD ``moment`` whose eigenvalues are
    below ``threshold`` (float64)."""
    vals, vecs = torch.linalg.eigh(moment.double())
    small = vecs[:, vals < threshold]
    return small @ small.T, int(small.shape[1])


def _fingerprint(deltas: Mapping[str, Any], names: list[str]) -> tuple:
    """What identifies the applied weight deltas of ``names`` (exact sums; empty when none is applied)."""
    return tuple((n, float(deltas[n].double().sum()), float(deltas[n].double().abs().sum()))
                 for n in names if isinstance(deltas.get(n), Tensor))


class AlphaEdit(MEMIT):
    """MEMIT with the update projected onto the preserved keys' null space (module docstring)."""

    name = "alphaedit"
    Hparams = AlphaEditHparams
    hparams: AlphaEditHparams

    def __init__(self, model: EditableModel, hparams: Hparams | Mapping[str, Any] | None = None,
                 data_root: str | None = None) -> None:
        hp = hparams if isinstance(hparams, AlphaEditHparams) else AlphaEditHparams(**dict(hparams or {}))
        super().__init__(model, hp, data_root)
        self._projections: dict[str, tuple[Tensor, int]] = {}
        self._seen: tuple = ()  # the fingerprint of the applied deltas after this editor's last edit
        self._kp: dict[str, Tensor] = {}  # sum of k k^T of the keys of the edits made so far, per module

    def projection(self, module: str) -> tuple[Tensor, int]:
        """(P, null-space dimension) of ``module``, from its key second moment; computed once per editor."""
        if module not in self._projections:
            self._projections[module] = null_space_projection(self.moment(module), self.hparams.nullspace_threshold)
            log.info("alphaedit: %s null space of dimension %d (eigenvalues < %g)", module,
                     self._projections[module][1], self.hparams.nullspace_threshold)
        return self._projections[module]

    def fit(self, *args: Any, **kwargs: Any) -> FitResult:
        """MEMIT's fit (templates, key second moments) and the null-space projections, so no edit pays for them."""
        t0 = time.time()
        result = super().fit(*args, **kwargs)
        for name in self.model.edit_params:
            self.projection(name.rsplit(".", 1)[0])
        result.seconds = time.time() - t0
        return result

    def edit(self, batch: EditBatch) -> Edit:
        names = list(self.model.edit_params)
        now = _fingerprint(self.model.applied, names)
        if not now:
            self._kp = {}
        elif now != self._seen:
            log.warning("alphaedit: the applied weight deltas are not this editor's last edits; the keys of earlier "
                        "edits (K_p) are not known and start from zero")
            self._kp = {}
        edit = super().edit(batch)
        with self.model.applying(edit.deltas):  # the authors read the keys for cache_c on the model just edited
            for name in names:
                module = name.rsplit(".", 1)[0]
                ks = keys_at(self.model, module, list(batch.records), self.templates(),
                             weights=self.key_weights()).T.double()
                self._kp[module] = self._kp.get(module, 0) + ks @ ks.T
            self._seen = _fingerprint(self.model.applied, names)
        edit.info["null_space_dim"] = float(min(self.projection(n.rsplit(".", 1)[0])[1] for n in names))
        return edit

    def update(self, module: str, ks: Tensor, resid: Tensor) -> Tensor:
        """``dW = solve(P (K K^T + K_p K_p^T) + L2 I, P K R^T)^T`` (d_out, d_in)."""
        P = self.projection(module)[0].to(ks)
        kk = ks @ ks.T + self._kp.get(module, torch.zeros_like(P))
        eye = torch.eye(P.shape[0], dtype=P.dtype, device=P.device)
        return torch.linalg.solve(P @ kk + self.hparams.L2 * eye, P @ ks @ resid.T).T
