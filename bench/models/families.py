"""The per-family table: which model types are causal / seq2seq / classifier models, where their MLP weights are
and which of them an editor changes by default (the MEND paper's last three layers)."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Literal


Kind = Literal["causal", "seq2seq", "classifier"]


@dataclass(frozen=True)
class FamilySpec:
    """Where a family keeps its MLP weights.

    ``stacks`` are regular expressions over parameter names; group 1 is the block index. The last ``n_last``
    blocks of every stack are edited (one stack for decoder-only / encoder-only models, two for
    encoder-decoders). ``conv1d`` marks GPT-2's ``Conv1D``, whose weight is stored (in, out).
    ``block`` and ``mlp_out`` name a decoder-only family's transformer block and MLP output projection at layer
    ``{}`` (module names; the locate-then-edit methods, ROME and MEMIT, write there); empty for other kinds.
    """

    model_types: tuple[str, ...]
    kind: Kind
    stacks: tuple[str, ...]
    n_last: int
    conv1d: bool = False
    block: str = ""
    mlp_out: str = ""


FAMILIES: dict[str, FamilySpec] = {
    "gpt2": FamilySpec(("gpt2",), "causal", (r"^transformer\.h\.(\d+)\.mlp\.(c_fc|c_proj)\.weight$",), 3, conv1d=True,
                       block="transformer.h.{}", mlp_out="transformer.h.{}.mlp.c_proj"),
    "gptj": FamilySpec(("gptj",), "causal", (r"^transformer\.h\.(\d+)\.mlp\.(fc_in|fc_out)\.weight$",), 3,
                       block="transformer.h.{}", mlp_out="transformer.h.{}.mlp.fc_out"),
    "gpt_neo": FamilySpec(("gpt_neo",), "causal", (r"^transformer\.h\.(\d+)\.mlp\.(c_fc|c_proj)\.weight$",), 3,
                          block="transformer.h.{}", mlp_out="transformer.h.{}.mlp.c_proj"),
    "gpt_neox": FamilySpec(
        ("gpt_neox",), "causal", (r"^gpt_neox\.layers\.(\d+)\.mlp\.(dense_h_to_4h|dense_4h_to_h)\.weight$",), 3,
        block="gpt_neox.layers.{}", mlp_out="gpt_neox.layers.{}.mlp.dense_4h_to_h",
    ),
    "llama": FamilySpec(
        ("llama", "mistral", "qwen2"), "causal", (r"^model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$",), 3,
        block="model.layers.{}", mlp_out="model.layers.{}.mlp.down_proj",
    ),
    "bert": FamilySpec(
        ("bert",), "classifier", (r"^(?:bert\.)?encoder\.layer\.(\d+)\.(intermediate\.dense|output\.dense)\.weight$",), 3
    ),
    "t5": FamilySpec(
        ("t5",),
        "seq2seq",
        (
            r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.(wi|wi_0|wi_1|wo)\.weight$",
            r"^decoder\.block\.(\d+)\.layer\.2\.DenseReluDense\.(wi|wi_0|wi_1|wo)\.weight$",
        ),
        2,
    ),
    "bart": FamilySpec(
        ("bart",),
        "seq2seq",
        (r"^model\.encoder\.layers\.(\d+)\.(fc1|fc2)\.weight$", r"^model\.decoder\.layers\.(\d+)\.(fc1|fc2)\.weight$"),
        2,
    ),
}


class ModelSpecError(ValueError):
    """A model name, path or edit-parameter glob that cannot be resolved."""


def family_of(model_type: str) -> str:
    """Return the family key of FAMILIES for a Hugging Face ``config.model_type``."""
    for name, spec in FAMILIES.items():
        if model_type in spec.model_types:
            return name
    known = sorted(t for s in FAMILIES.values() for t in s.model_types)
    raise ModelSpecError(f"model_type {model_type!r} has no entry in the family table; known: {', '.join(known)}")


def select_edit_params(
    param_names: list[str], family: str, globs: list[str] | None = None
) -> list[str]:
    """Names of the weights to edit: the family default (MLP in/out of the last blocks) or the given globs.

    Returned in model order. Raises :class:`ModelSpecError` when a glob matches nothing or the family default
    finds no MLP weights.
    """
    if globs:
        chosen: list[str] = []
        for g in globs:
            hits = [n for n in param_names if fnmatch.fnmatchcase(n, g)]
            if not hits:
                raise ModelSpecError(f"edit_params glob {g!r} matches no parameter of this model")
            chosen.extend(h for h in hits if h not in chosen)
        order = {n: i for i, n in enumerate(param_names)}
        return sorted(chosen, key=order.__getitem__)
    spec = FAMILIES[family]
    chosen = []
    for stack in spec.stacks:
        rx = re.compile(stack)
        hits = [(int(m.group(1)), n) for n in param_names if (m := rx.match(n))]
        if not hits:
            raise ModelSpecError(f"family {family!r}: no parameter matches {stack!r}")
        last = sorted({i for i, _ in hits})[-spec.n_last :]
        chosen.extend(n for i, n in hits if i in last)
    return chosen
