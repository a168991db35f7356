"""Task kinds: one object per kind of task, owning everything that differs between them.

A dataset card names its kind (``kind: qa``); every record carries it. What a kind decides:

- which field of a record is the edit's target and the locality answer (:meth:`TaskKind.target`,
  :meth:`TaskKind.loc_target`), and whether a target follows its prompt after a space (:attr:`TaskKind.spaced`);
- whether a record without a target is usable (:attr:`TaskKind.needs_target`) and whether targets are sampled from
  the base model itself (:attr:`TaskKind.targets_generated`);
- which model kinds it is measured on (:attr:`TaskKind.model_kinds`) and whether the ROME-style comparisons against
  the true answer apply (:attr:`TaskKind.compares_true_answer`);
- how locality is scored against the unedited model (:meth:`TaskKind.locality_scores`);
- how the generation protocol asks and stops (:attr:`TaskKind.generation_forms`, :attr:`TaskKind.answer_stops`,
  :attr:`TaskKind.answer_margin`);
- what the interactive edit shows and accepts as a target (:meth:`TaskKind.show_answer`,
  :meth:`TaskKind.parse_target`).

A new kind is one subclass and one :func:`register_kind` call; nothing else tests kind names.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

from torch import Tensor

from bench.data.records import DataError, EditRecord
from bench.losses import argmax_scores, perplexity

if TYPE_CHECKING:
    from bench.models import EditableModel

log = logging.getLogger(__name__)


class TaskKind:
    """The behaviour of one kind of task. Subclasses set :attr:`name` and override what differs; the defaults
    are those of question answering (a short text answer after a space, locality by exact match)."""

    name: ClassVar[str] = ""
    #: model kinds (``EditableModel.kind``) this task is measured on
    model_kinds: ClassVar[tuple[str, ...]] = ("causal", "seq2seq")
    #: targets follow their prompt after a space (False: kept verbatim, they may continue a word)
    spaced: ClassVar[bool] = True
    #: a record whose target is empty cannot be an edit (False where targets are made later)
    needs_target: ClassVar[bool] = True
    #: y_e is sampled from the base model itself (cached per dataset) before editing
    targets_generated: ClassVar[bool] = False
    #: the ROME-style comparisons against the fact before the edit apply (records with ``true_answer``)
    compares_true_answer: ClassVar[bool] = True
    #: how the generation protocol (``bench.answers``) asks: ``question`` (the card's question template, inside
    #: the chat template where the model has one) and ``plain`` (the prompt continued as it is); empty where the
    #: task's answer already is free (a classifier's label)
    generation_forms: ClassVar[tuple[str, ...]] = ("question", "plain")
    #: where a free answer ends besides EOS: the stop strings of WILD ("The Mirage of Model Editing", ACL 2025);
    #: empty: the answer runs to its cap
    answer_stops: ClassVar[tuple[str, ...]] = (".", "\n")
    #: new tokens a free answer may take beyond the target's own (the cap is the target's tokens plus this)
    answer_margin: ClassVar[int] = 5

    def target(self, record: EditRecord) -> str | int:
        """y_e as the batch tokenises it."""
        return record.target

    def loc_target(self, record: EditRecord) -> str | int:
        """The answer the locality input must keep."""
        return record.loc_answer

    def targets(self, records: Sequence[EditRecord]) -> list[Any]:
        """:meth:`target` of each record."""
        return [self.target(r) for r in records]

    def loc_targets(self, records: Sequence[EditRecord]) -> list[Any]:
        """:meth:`loc_target` of each record."""
        return [self.loc_target(r) for r in records]

    def locality_scores(self, pre_logits: Tensor, post_logits: Tensor, labels: Tensor) -> dict[str, list[float]]:
        """Per locality input, what the edit cost against the unedited model: ``drawdown`` (here the loss of
        exact-match accuracy on the locality answer, 1 = a correct answer was lost) and any columns of the kind's
        own (per-edit rows carry them)."""
        pre = argmax_scores(pre_logits, labels)[0].float()
        post = argmax_scores(post_logits, labels)[0].float()
        return {"drawdown": (pre - post).tolist()}

    def parse_target(self, text: str, model: "EditableModel") -> str | int:
        """A target typed by a user (``bench.edit --target``) as :meth:`target` gives it; raises ``ValueError``
        naming what would be valid."""
        if not text.strip():
            raise ValueError("the target is empty; give the new answer")
        return text

    def show_answer(self, model: "EditableModel", answer: Any) -> str:
        """How the interactive edit prints the model's answer (generated text as is)."""
        return str(answer)

    def protocol(self, protocol: str) -> str:
        """The protocol a metric of ``protocol`` (``bench.schema.PROTOCOLS``) follows on this kind's tasks."""
        return protocol


class QA(TaskKind):
    """Question answering (zsRE): a question and a short answer."""

    name = "qa"


class Completion(TaskKind):
    """Prompt completion (CounterFact): a statement's prefix and the object that completes it."""

    name = "completion"


class Classification(TaskKind):
    """Classification (FEVER): a text and a label id; measured on classifier models, whose output is the label."""

    name = "classification"
    model_kinds = ("classifier",)
    compares_true_answer = False
    generation_forms = ()  # the predicted label is the classifier's free answer

    def target(self, record: EditRecord) -> int:
        if record.label is None:
            raise DataError(f"record {record.case_id} of {record.task}: a classification record needs a label")
        return record.label

    def loc_target(self, record: EditRecord) -> int:
        if record.loc_label is None:
            raise DataError(f"record {record.case_id} of {record.task}: its locality input has no label")
        return record.loc_label

    def parse_target(self, text: str, model: "EditableModel") -> int:
        n = max(2, int(getattr(model.model.config, "num_labels", 2)))
        if not text.strip().isdigit() or int(text) >= n:
            raise ValueError(f"this run's model is a classifier; give a label id 0..{n - 1}")
        return int(text)

    def protocol(self, protocol: str) -> str:
        """The predicted label is the classifier's free answer: its teacher-forced scores are the classifier's."""
        return "classifier" if protocol == "teacher-forced" else protocol

    def show_answer(self, model: "EditableModel", answer: Any) -> str:
        names = getattr(model.model.config, "id2label", None) or {}
        name = names.get(int(answer), names.get(str(answer), ""))
        return f"{answer} ({name})" if name else str(answer)


class Generation(TaskKind):
    """Text generation (Wikitext): a passage's prefix and a continuation sampled from the base model; locality is
    the perplexity of an unrelated passage."""

    name = "generation"
    model_kinds = ("causal",)
    spaced = False
    needs_target = False
    targets_generated = True
    generation_forms = ("plain",)  # a passage is continued, not asked
    answer_stops = ()  # the continuation runs to the target's length and is compared token by token
    answer_margin = 0

    def locality_scores(self, pre_logits: Tensor, post_logits: Tensor, labels: Tensor) -> dict[str, list[float]]:
        """``drawdown`` is the relative perplexity increase of the locality passage, ``ppl_post / ppl_pre - 1``."""
        ppl_pre = perplexity(pre_logits, labels).tolist()
        ppl_post = perplexity(post_logits, labels).tolist()
        return {"ppl_pre": ppl_pre, "ppl_post": ppl_post,
                "drawdown": [b / a - 1.0 for a, b in zip(ppl_pre, ppl_post)]}


KINDS: dict[str, TaskKind] = {}


def register_kind(kind: TaskKind) -> TaskKind:
    """Make ``kind`` usable by name in dataset cards and records; returns it. A name taken by another class is an
    error (the same class again is a no-op, so a module may be imported twice)."""
    if not kind.name:
        raise ValueError(f"{type(kind).__name__}: a task kind needs a name")
    old = KINDS.get(kind.name)
    if old is not None and type(old) is not type(kind):
        raise ValueError(f"task kind {kind.name!r} is already {type(old).__name__}; choose another name")
    KINDS[kind.name] = kind
    return kind


for _kind in (QA(), Completion(), Classification(), Generation()):
    register_kind(_kind)


def task_kind(name: str) -> TaskKind:
    """The registered kind called ``name``; :class:`DataError` naming the valid ones otherwise."""
    try:
        return KINDS[name]
    except (KeyError, TypeError):
        raise DataError(f"unknown task kind {name!r}; valid: {', '.join(sorted(KINDS))}") from None


def kind_of(records: Sequence[EditRecord]) -> TaskKind:
    """The kind of a batch's records (one kind per batch; QA for an empty batch)."""
    if not records:
        return KINDS["qa"]
    kinds = {r.kind for r in records}
    if len(kinds) > 1:
        raise DataError(f"one batch holds records of several task kinds ({', '.join(sorted(kinds))})")
    return task_kind(records[0].kind)
