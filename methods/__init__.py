"""Editors behind one contract (see :mod:`methods.base`) and the registry that names them.

A new editor is one file defining an :class:`~methods.base.Editor` subclass plus one line here.
"""

from __future__ import annotations

from methods.alphaedit import AlphaEdit
from methods.base import Edit, Editor, FitResult, Hparams
from methods.budget import Budget
from methods.enn import ENN
from methods.ft import FT, FTKL
from methods.ftl import FTL
from methods.grace import GRACE
from methods.ke import KE
from methods.memit import MEMIT
from methods.mend import MEND
from methods.rome import ROME
from methods.wise import WISE

REGISTRY: dict[str, type[Editor]] = {
    FT.name: FT,
    FTKL.name: FTKL,
    MEND.name: MEND,
    ENN.name: ENN,
    KE.name: KE,
    ROME.name: ROME,
    MEMIT.name: MEMIT,
    FTL.name: FTL,
    GRACE.name: GRACE,
    AlphaEdit.name: AlphaEdit,
    WISE.name: WISE,
}


def get_editor(name: str) -> type[Editor]:
    """The editor class registered under ``name``; the error lists the valid names."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; valid: {', '.join(sorted(REGISTRY))}") from None


__all__ = ["REGISTRY", "get_editor", "Budget", "Edit", "Editor", "FitResult", "Hparams"]
