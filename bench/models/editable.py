"""``EditableModel``: a frozen Hugging Face model run with replaced weights (``torch.func.functional_call``; the
module itself is never mutated), its tokenizer, family and kind, the weights an editor may change, and hidden
states traced through forward hooks."""

from __future__ import annotations

import dataclasses
import hashlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from bench.models.adaptors import Adaptor, Change, compose, hooked, split
from bench.models.families import FAMILIES, FamilySpec, Kind, ModelSpecError


class StopForward(Exception):
    """Raised inside a forward hook to end a forward pass early (see :meth:`EditableModel.capture`)."""


@dataclass
class LayerIO:
    """What a module saw and produced in one forward pass: its first positional input and its output (the first
    element when the module returns a tuple, as transformer blocks may)."""

    input: Tensor
    output: Tensor


def _first(x: object) -> Tensor:
    return x[0] if isinstance(x, tuple) else x  # type: ignore[return-value]


@dataclass
class EditableModel:
    """A frozen Hugging Face model plus what an editor needs to know about it.

    Promises: every parameter has ``requires_grad=False`` and the module is in eval mode; ``edit_params`` are
    names of 2-D weights in model order; ``conv1d`` tells whether those weights are stored (in, out).

    ``applied`` holds the changes every forward pass makes (see :meth:`applying`): weight deltas by parameter name
    and module adaptors by module name (:mod:`bench.models.adaptors`), the model "as already edited" for sequential
    editing, without touching the module. Views made by :meth:`with_edit_params` share it (and the module).
    """

    name: str
    model: nn.Module
    tokenizer: object
    family: str
    kind: Kind
    edit_params: list[str]
    conv1d: bool = False
    meta: dict = field(default_factory=dict)
    applied: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        named = dict(self.model.named_parameters())
        for n in self.edit_params:
            if n not in named:
                raise ModelSpecError(f"edit parameter {n!r} is not a parameter of {self.name}")
            if named[n].dim() != 2:
                raise ModelSpecError(f"edit parameter {n!r} has shape {tuple(named[n].shape)}; only 2-D weights")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def spec(self) -> FamilySpec:
        """The family table entry of this model."""
        return FAMILIES[self.family]

    @property
    def n_layers(self) -> int:
        """Number of transformer blocks of a decoder-only model (``config.num_hidden_layers`` / ``n_layer``)."""
        cfg = self.model.config
        n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
        if not n:
            raise ModelSpecError(f"{self.name}: config has no num_hidden_layers / n_layer")
        return int(n)

    def mlp_out(self, layer: int) -> str:
        """Module name of the MLP output projection of block ``layer`` (decoder-only families)."""
        return self._layer_module(self.spec.mlp_out, layer, "mlp_out")

    def block(self, layer: int) -> str:
        """Module name of transformer block ``layer`` (decoder-only families)."""
        return self._layer_module(self.spec.block, layer, "block")

    def _layer_module(self, template: str, layer: int, what: str) -> str:
        if not template:
            raise ModelSpecError(f"family {self.family!r} ({self.kind}) has no {what} module in the family table; "
                                 f"only decoder-only families do")
        if not 0 <= layer < self.n_layers:
            raise ModelSpecError(f"layer {layer} is out of range for {self.name} (0..{self.n_layers - 1})")
        return template.format(layer)

    def with_edit_params(self, names: list[str]) -> "EditableModel":
        """A view of the same module (and the same ``applied`` deltas) that edits ``names`` instead."""
        return dataclasses.replace(self, edit_params=list(names))

    def weights(self) -> dict[str, Tensor]:
        """The base model's edited weights by name (the live tensors, without ``applied``; do not modify them)."""
        named = dict(self.model.named_parameters())
        return {n: named[n] for n in self.edit_params}

    def io_dims(self, name: str) -> tuple[int, int]:
        """(input dim, output dim) of an edited weight, whatever its storage layout."""
        w = dict(self.model.named_parameters())[name]
        return (w.shape[0], w.shape[1]) if self.conv1d else (w.shape[1], w.shape[0])

    def outer(self, u: Tensor, delta: Tensor) -> Tensor:
        """sum_i delta_i u_i^T laid out like the stored weight: (out, in) for Linear, (in, out) for Conv1D."""
        if self.conv1d:
            return u.transpose(0, 1) @ delta
        return delta.transpose(0, 1) @ u

    def module_of(self, param_name: str) -> nn.Module:
        """The module that owns a parameter (``a.b.weight`` -> module ``a.b``)."""
        return self.model.get_submodule(param_name.rsplit(".", 1)[0])

    @contextmanager
    def applying(self, changes: Mapping[str, Change]) -> Iterator[None]:
        """Within the block every forward pass (``logits``, ``capture``, greedy decoding) sees ``changes`` on top of
        what is already applied: ``W + dW`` for weight deltas, adaptors composed with the applied ones (``+``); the
        module's parameters are never modified. Restores the previous state on exit."""
        saved = dict(self.applied)
        try:
            detached = {n: c.detach() for n, c in changes.items()}
            self.applied.clear()
            self.applied.update(compose(saved, detached))
            yield
        finally:
            self.applied.clear()
            self.applied.update(saved)

    def adaptors(self, changes: Mapping[str, Change] | None = None) -> dict[str, Adaptor]:
        """The module adaptors of ``applied`` composed with those of ``changes``."""
        return split(compose(self.applied, changes or {}))[1]

    @contextmanager
    def adapted(self, changes: Mapping[str, Change] | None = None, attention_mask: Tensor | None = None
                ) -> Iterator[None]:
        """Within the block the module runs with the adaptors of ``applied`` and ``changes`` hooked in (what
        :meth:`logits` does for one call; for callers that run the module themselves, like greedy decoding, which
        pass the prompts' ``attention_mask``)."""
        with hooked(self.model, self.adaptors(changes), attention_mask):
            yield

    def edited_params(self, deltas: Mapping[str, Change] | None = None,
                      weights: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The parameters to run the model with: ``W + dW`` for every weight delta in ``deltas`` and in ``applied``
        (adaptors are not parameters: see :meth:`adapted`), where ``W`` is ``weights[name]`` for the parameters
        ``weights`` names and the module's own otherwise, plus the other ``weights``; empty when nothing differs
        from the module's own parameters."""
        total = split(compose(self.applied, deltas or {}))[0]
        if not total:
            return dict(weights or {})
        base = {**dict(self.model.named_parameters()), **(weights or {})}
        return {**(weights or {}), **{n: base[n] + d for n, d in total.items()}}

    def logits(self, inputs: Mapping[str, Tensor], deltas: Mapping[str, Change] | None = None,
               weights: Mapping[str, Tensor] | None = None) -> Tensor:
        """Logits of the model on ``inputs`` with ``W + dW`` for every weight in ``deltas`` (and in ``applied``),
        where ``W`` is ``weights[name]`` for the parameters ``weights`` names (another set of base weights, such as
        ENN's copy of the original ones) and the module's own parameter otherwise, and the module adaptors of
        ``deltas`` and ``applied`` hooked in (their ``attention_mask``: the inputs').

        Uses ``torch.func.functional_call``; the module's own parameters are not touched. Classifier logits
        are returned as (B, 1, C) so every kind is (B, T, V) and token labels align position by position.
        """
        params = self.edited_params(deltas, weights)
        with self.adapted(deltas, inputs.get("attention_mask")):
            if params:
                out = torch.func.functional_call(self.model, params, args=(), kwargs=dict(inputs), strict=False)
            else:
                out = self.model(**inputs)
        logits = out.logits
        return logits.unsqueeze(1) if self.kind == "classifier" else logits

    def logits_at(self, inputs: Mapping[str, Tensor], rows: Tensor, cols: Tensor,
                  deltas: Mapping[str, Change] | None = None) -> Tensor:
        """(N, V) logits at positions ``(rows[i], cols[i])`` only (causal models): the forward pass stops at the
        output head's input and the head runs on the N chosen positions, not on every position (equal to
        ``logits(inputs, deltas)[rows, cols]``; much cheaper with a large vocabulary). Keeps the autograd graph."""
        head = self.model.get_output_embeddings()
        seen: dict[str, Tensor] = {}

        def grab(mod: nn.Module, args: tuple) -> None:
            seen["h"] = args[0]
            raise StopForward("output head")

        handle = head.register_forward_pre_hook(grab)
        try:
            self.logits(inputs, deltas)
        except StopForward:
            pass
        finally:
            handle.remove()
        return head(seen["h"][rows, cols])

    @contextmanager
    def trace(self, modules: Sequence[str], edit_output: Callable[[str, Tensor], Tensor] | None = None,
              stop_after: str | None = None) -> Iterator[dict[str, LayerIO]]:
        """Record the input and output of each named module in every forward pass run inside the block.

        The yielded dict maps module name -> :class:`LayerIO` of the latest pass (tensors as produced: outputs
        keep their autograd graph). ``edit_output(name, output)`` may return a replacement output (ROME adds its
        value delta; gradient capture starts a graph there). ``stop_after`` raises :class:`StopForward` once
        that module has run, which the caller catches (see :meth:`capture`). Hooks are removed on exit.
        """
        store: dict[str, LayerIO] = {}

        def hook(name: str) -> Callable:
            def fn(mod: nn.Module, inp: tuple, out: object) -> object:
                o = _first(out)
                if edit_output is not None:
                    new = edit_output(name, o)
                    if new is not o:
                        out = (new, *out[1:]) if isinstance(out, tuple) else new
                        o = new
                store[name] = LayerIO(inp[0] if inp else o, o)
                if name == stop_after:
                    raise StopForward(name)
                return out

            return fn

        handles = [self.model.get_submodule(m).register_forward_hook(hook(m)) for m in modules]
        try:
            yield store
        finally:
            for h in handles:
                h.remove()

    @contextmanager
    def upper_blocks_only(self, inputs: Mapping[str, Tensor], layer: int) -> Iterator[None]:
        """Within the block, forward passes on exactly ``inputs`` run the blocks from ``layer`` up only: each block
        below returns the output it gave on ``inputs`` in one pass run here first (with ``applied``), without
        computing. Exact for any change at or above ``layer`` (what an editor that optimises a vector at one block
        repeats many times: GRACE's values); wrong for other inputs, which the caller must not pass. Decoder-only
        families."""
        if layer <= 0:
            yield
            return
        lower = [self.model.get_submodule(self.block(i)) for i in range(layer)]
        outs: dict[int, object] = {}

        def keep(i: int) -> Callable:
            def fn(mod: nn.Module, inp: tuple, out: object) -> None:
                outs[i] = out
            return fn

        handles = [mod.register_forward_hook(keep(i)) for i, mod in enumerate(lower)]
        try:
            with torch.no_grad(), self.trace([self.block(layer - 1)], stop_after=self.block(layer - 1)):
                try:
                    self.logits(inputs)
                except StopForward:
                    pass
        finally:
            for h in handles:
                h.remove()
        try:
            for i, mod in enumerate(lower):
                mod.forward = (lambda o: lambda *a, **k: o)(outs[i])  # type: ignore[method-assign]
            yield
        finally:
            for mod in lower:
                mod.__dict__.pop("forward", None)

    @torch.no_grad()
    def capture(self, inputs: Mapping[str, Tensor], modules: Sequence[str],
                deltas: Mapping[str, Change] | None = None) -> dict[str, LayerIO]:
        """Inputs and outputs of the named modules for ``inputs`` (with ``deltas`` and ``applied``), without
        gradients; the forward pass stops after the deepest of them (the rest of the model is not run)."""
        order = {n: i for i, (n, _) in enumerate(self.model.named_modules())}
        missing = [m for m in modules if m not in order]
        if missing:
            raise ModelSpecError(f"{self.name} has no module {missing[0]!r}")
        last = max(modules, key=order.__getitem__)
        with self.trace(modules, stop_after=last) as store:
            try:
                self.logits(inputs, deltas)
            except StopForward:
                pass
        return dict(store)


def weights_digest(model: "EditableModel") -> str:
    """SHA-256 over every parameter's bytes, in name order: proves whether the base model changed, and keys what is
    cached about a model's current weights."""
    h = hashlib.sha256()
    for n, p in sorted(model.model.named_parameters(), key=lambda kv: kv[0]):
        h.update(n.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
