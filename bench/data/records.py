"""Edit records, the error type of everything data and the split names (task kinds: :mod:`bench.data.kinds`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """A dataset card, file or record that cannot be used; the message names the file/field and what is valid."""


@dataclass(frozen=True)
class EditRecord:
    """One edit request and its probes; holds all four tasks.

    - ``prompt`` / ``target``: x_e and y_e (for classification, ``target`` is the label's name and ``label`` its id;
      for generation, ``target`` is the continuation).
    - ``rephrases``: equivalence inputs x'_e (empty when the source has none: x_e stands in, see ``equiv_prompt``).
    - ``loc_prompt`` / ``loc_answer``: a locality input and the answer it must keep (for generation the answer is
      empty and locality is the perplexity of the passage).
    - ``true_answer``: the fact before the edit, where known (zsRE ``pred``, CounterFact ``ground_truth``).
    """

    case_id: str
    task: str
    kind: str  #: a registered task kind's name (bench.data.kinds)
    prompt: str
    target: str
    rephrases: tuple[str, ...] = ()
    loc_prompt: str = ""
    loc_answer: str = ""
    true_answer: str | None = None
    subject: str | None = None
    label: int | None = None
    loc_label: int | None = None

    @property
    def equiv_prompt(self) -> str:
        """The first equivalence input, or x_e itself when the record has no rephrase."""
        return self.rephrases[0] if self.rephrases else self.prompt

    @property
    def has_rephrase(self) -> bool:
        return bool(self.rephrases)
