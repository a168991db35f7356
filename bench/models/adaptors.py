"""Module adaptors: edits that are not weight deltas.

Some editors change what a module computes with tensors of their own instead of a weight delta: GRACE's codebook
of (key, value, radius) entries at one MLP. An :class:`Adaptor` is such a change to ONE module, keyed in a map of
changes by the module's name (weight deltas are keyed by parameter names, ``<module>.weight``, so the two never
collide). :class:`~bench.models.EditableModel` applies adaptors the way it applies deltas: as forward hooks that
rewrite the module's output for the duration of a call (the module is never modified), on top of the ones already
``applied``; sequential edits compose them with ``+``, which each adaptor defines (GRACE: the later codebook's
entries are merged into the earlier one, radii split or expand).

An adaptor names itself by :attr:`Adaptor.kind` so that a saved edit can be loaded (``methods.base.Edit.save``):
its tensors (:meth:`Adaptor.tensors`) go into safetensors, its scalars (:meth:`Adaptor.meta`) into the header.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, ClassVar, Iterator, Mapping, Union

import torch
from torch import Tensor, nn

#: Adaptor classes by :attr:`Adaptor.kind`, filled as they are defined (what :func:`load_adaptor` can rebuild).
ADAPTOR_KINDS: dict[str, type["Adaptor"]] = {}


class Adaptor:
    """A change to one module's output. Subclasses set :attr:`kind` and implement :meth:`forward`, ``__add__``
    (composition: ``earlier + later``), :meth:`tensors` / :meth:`from_tensors`; the rest has defaults."""

    kind: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            ADAPTOR_KINDS[cls.kind] = cls

    def forward(self, inputs: Tensor, output: Tensor, call: dict[str, Any]) -> Tensor:
        """The module's new output given its first input and its original output (both (B, T, d)). ``call`` is one
        scratch dict per hooked call (a forward pass, or a whole KV-cached decoding): ``attention_mask`` (B, T) of
        the first pass when the caller knows it; an adaptor may keep what it decided on the first pass there for
        the decoding steps after it (WISE's routing)."""
        raise NotImplementedError

    def __add__(self, later: "Adaptor") -> "Adaptor":
        """The adaptor that does ``self`` then ``later`` (sequential edits); neither operand is modified."""
        raise NotImplementedError

    def detach(self) -> "Adaptor":
        """The same adaptor without autograd history (what an edit keeps once it is made)."""
        return self

    def tensors(self) -> dict[str, Tensor]:
        """Every tensor of the adaptor by a flat name (for safetensors)."""
        raise NotImplementedError

    def meta(self) -> dict[str, str]:
        """Its scalar settings as strings (for the safetensors header); none by default."""
        return {}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], meta: Mapping[str, str]) -> "Adaptor":
        """Rebuild an adaptor from :meth:`tensors` and :meth:`meta`."""
        raise NotImplementedError

    def weight_change(self) -> float:
        """Frobenius norm of the weight change the adaptor amounts to (a side copy of a weight: its distance from
        the original); 0 for adaptors that add computation, not weights (GRACE's codebook)."""
        return 0.0

    def describe(self) -> dict[str, float]:
        """Diagnostics worth logging (``entries``: GRACE's number of codebook entries); none by default."""
        return {}


#: What a map of changes holds: a weight delta (by parameter name) or an adaptor (by module name).
Change = Union[Tensor, Adaptor]


def compose(earlier: Mapping[str, Change], later: Mapping[str, Change]) -> dict[str, Change]:
    """``earlier`` then ``later``: deltas of the same weight add up, adaptors of the same module compose with
    ``+``; neither map is modified."""
    out = dict(earlier)
    for n, c in later.items():
        out[n] = out[n] + c if n in out else c
    return out


def split(changes: Mapping[str, Change]) -> tuple[dict[str, Tensor], dict[str, Adaptor]]:
    """(weight deltas, adaptors) of a map of changes; anything else is a TypeError naming the key."""
    deltas: dict[str, Tensor] = {}
    adaptors: dict[str, Adaptor] = {}
    for n, c in changes.items():
        if isinstance(c, Adaptor):
            adaptors[n] = c
        elif isinstance(c, Tensor):
            deltas[n] = c
        else:
            raise TypeError(f"change {n!r} is a {type(c).__name__}; expected a weight delta (Tensor) or an Adaptor")
    return deltas, adaptors


def load_adaptor(kind: str, tensors: Mapping[str, Tensor], meta: Mapping[str, str]) -> Adaptor:
    """The adaptor of ``kind`` rebuilt from its saved tensors and settings; the error lists the known kinds (an
    editor's module must be imported for its adaptor kind to be known)."""
    if kind not in ADAPTOR_KINDS:
        raise ValueError(f"unknown adaptor kind {kind!r}; known: {', '.join(sorted(ADAPTOR_KINDS)) or 'none'}")
    return ADAPTOR_KINDS[kind].from_tensors(tensors, meta)


@contextmanager
def hooked(model: nn.Module, adaptors: Mapping[str, Adaptor], attention_mask: Tensor | None = None
           ) -> Iterator[None]:
    """Within the block, each named module's output is rewritten by its adaptor (forward hooks put before any
    other hook of the module, so what a trace records is the adapted output); hooks removed on exit. Each adaptor
    gets one ``call`` dict for the block (see :meth:`Adaptor.forward`), holding ``attention_mask``."""
    handles = []

    def hook(adaptor: Adaptor) -> Any:
        call: dict[str, Any] = {"attention_mask": attention_mask}

        def fn(mod: nn.Module, inp: tuple, out: Any) -> Any:
            if isinstance(out, tuple):
                return (adaptor.forward(inp[0], out[0], call), *out[1:])
            return adaptor.forward(inp[0], out, call)

        return fn

    try:
        for name, a in adaptors.items():
            handles.append(model.get_submodule(name).register_forward_hook(hook(a), prepend=True))
        yield
    finally:
        for h in handles:
            h.remove()


def norm(x: Tensor) -> float:
    """Frobenius norm in float64."""
    return float(torch.linalg.vector_norm(x.detach().double()))


def change_size(params: Mapping[str, Tensor], changes: Mapping[str, Change]) -> dict[str, float]:
    """How big a (composed) change is: ``delta_norm``, the Frobenius norm of the whole weight change (every weight
    delta, and what adaptors amount to as weights, :meth:`Adaptor.weight_change`); ``delta_rel``, the weight
    deltas' norm over the norm of the original weights they change (NaN without deltas); ``adaptor_entries``, the
    adaptors' entries (GRACE: codebook entries). ``params``: the model's parameters by name."""
    deltas, adaptors = split(changes)
    d2 = sum(norm(d) ** 2 for d in deltas.values())
    base = math.sqrt(sum(norm(params[n]) ** 2 for n in deltas))
    return {"delta_norm": math.sqrt(d2 + sum(a.weight_change() ** 2 for a in adaptors.values())),
            "delta_rel": math.sqrt(d2) / base if base else float("nan"),
            "adaptor_entries": float(sum(a.describe().get("entries", 0.0) for a in adaptors.values()))}
