"""The generation protocol inside an evaluation (issue 32): what each record is asked, the unedited model's free
answers (cached per model and test set), the edited model's, and their scores.

After every edit the edited model answers, in one batched greedy call (``bench.generation``):

- ``edit``: x_e asked in the task kind's first form (QA and CounterFact: ``question``, the card's question
  template inside the chat template of a model that has one; Wikitext: ``plain``, the passage continued);
- ``edit_plain``: x_e continued as it is, where the kind asks questions too;
- ``equiv``: x'_e, and ``loc``: the locality input, in the first form.

Each answer stops at EOS, at one of the kind's stop strings or at its cap: the reference answer's tokens plus the
kind's margin (locality answers at most :data:`LOC_CAP` tokens). Scores per record (``gen_*`` columns):
normalised exact match and "target contained" (SQuAD normalisation) against y_e; for continuations (no stop
strings) also the share of y_e's tokens reproduced before the first wrong one; locality agreement of the edited
model's answer with the unedited model's, and both against the gold locality answer. The texts before and after
the edit are kept in the per-edit rows (``gen_*_text``), so a reader can audit any row.

The unedited model's answers are computed in exactly the batches the edited model's are (one edit batch's prompts,
in the same order), so an edit that changes nothing gives the same answers bit for bit; they are kept in the keyed
cache (namespace ``preanswers``) under everything they depend on. Causal models only; a classifier's label already
is its free answer (its metrics say ``classifier``) and seq2seq models are not asked.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Mapping, Sequence

import torch

from bench.cache import cached
from bench.data import EditRecord, kind_of
from bench.generation import contains, exact_match, free_answers, normalize_answer, question_prompt
from bench.models import EditableModel, weights_digest

log = logging.getLogger(__name__)

#: Most new tokens a locality answer may take (Wikitext's locality passages are long; their first tokens show
#: whether the edit changed how they continue).
LOC_CAP = 16

Asked = dict[str, tuple[list[str], list[int]]]  # key -> (prompts, caps), one entry per record


def applies(model: EditableModel, records: Sequence[EditRecord]) -> bool:
    """Whether the protocol runs for these records on this model (a causal model and a kind that is asked)."""
    return model.kind == "causal" and bool(records) and bool(kind_of(records).generation_forms)


def _n_tokens(model: EditableModel, text: str, spaced: bool) -> int:
    return len(model.tokenizer((" " + text.lstrip()) if spaced else text, add_special_tokens=False)["input_ids"])


def asked(model: EditableModel, recs: Sequence[EditRecord], template: str | None) -> Asked:
    """The prompts each record is asked after its edit and their caps, by key (``edit``, ``edit_plain`` where the
    kind asks questions, ``equiv``, ``loc``)."""
    kind = kind_of(recs)
    first = kind.generation_forms[0]

    def form(prompt: str) -> str:
        return question_prompt(model, prompt, template) if first == "question" else prompt

    caps = [_n_tokens(model, str(kind.target(r)), kind.spaced) + kind.answer_margin for r in recs]
    loc_caps = [min(LOC_CAP, _n_tokens(model, str(kind.loc_target(r)), True) + kind.answer_margin) for r in recs]
    out: Asked = {"edit": ([form(r.prompt) for r in recs], caps)}
    if first != "plain" and "plain" in kind.generation_forms:
        out["edit_plain"] = ([r.prompt for r in recs], caps)
    out["equiv"] = ([form(r.equiv_prompt) for r in recs], caps)
    out["loc"] = ([form(r.loc_prompt) for r in recs], loc_caps)
    return out


def answer(model: EditableModel, recs: Sequence[EditRecord], ask: Asked, deltas: Mapping[str, Any] | None
           ) -> dict[str, list[tuple[str, list[int]]]]:
    """Every prompt of ``ask`` answered in ONE batched greedy call on the model with ``deltas`` (None: unedited),
    by key, each answer as (text cut at the stop, generated ids)."""
    keys = list(ask)
    prompts = [p for k in keys for p in ask[k][0]]
    caps = [c for k in keys for c in ask[k][1]]
    got = free_answers(model, prompts, caps, deltas, kind_of(recs).answer_stops)
    out, i = {}, 0
    for k in keys:
        n = len(ask[k][0])
        out[k] = got[i : i + n]
        i += n
    return out


def _same(a: tuple[str, list[int]], b: tuple[str, list[int]], stops: Sequence[str]) -> bool:
    """Whether two free answers agree: normalised text for answers, the very tokens for continuations."""
    return normalize_answer(a[0]) == normalize_answer(b[0]) if stops else a[1] == b[1]


def _prefix_share(model: EditableModel, ids: list[int], target: str) -> float:
    """The share of ``target``'s tokens (tokenised as the batch tokenises a continuation) that ``ids`` reproduces
    before its first wrong token."""
    gold = model.tokenizer(target, add_special_tokens=False)["input_ids"]
    n = 0
    while n < min(len(gold), len(ids)) and gold[n] == ids[n]:
        n += 1
    return n / max(1, len(gold))


def scores(model: EditableModel, recs: Sequence[EditRecord], pre: Mapping[str, list], post: Mapping[str, list]
           ) -> list[dict[str, Any]]:
    """Per record, the ``gen_*`` scores and texts of its answers after the edit (``post``) against the unedited
    model's (``pre``), as :func:`answer` gives them."""
    kind = kind_of(recs)
    stops = kind.answer_stops
    rows = []
    for i, r in enumerate(recs):
        target, loc = str(kind.target(r)), str(kind.loc_target(r))
        row: dict[str, Any] = {
            "gen_edit_em": float(exact_match(post["edit"][i][0], target)),
            "gen_edit_contains": float(contains(post["edit"][i][0], target)),
            "gen_edit_em_pre": float(exact_match(pre["edit"][i][0], target)),
            "gen_rephrase_em": float(exact_match(post["equiv"][i][0], target)),
            "gen_rephrase_contains": float(contains(post["equiv"][i][0], target)),
            "gen_loc_agree": float(_same(pre["loc"][i], post["loc"][i], stops)),
            "gen_edit_text_pre": pre["edit"][i][0], "gen_edit_text": post["edit"][i][0],
            "gen_rephrase_text_pre": pre["equiv"][i][0], "gen_rephrase_text": post["equiv"][i][0],
            "gen_loc_text_pre": pre["loc"][i][0], "gen_loc_text": post["loc"][i][0],
        }
        if "edit_plain" in post:
            row.update({"gen_edit_plain_em": float(exact_match(post["edit_plain"][i][0], target)),
                        "gen_edit_plain_contains": float(contains(post["edit_plain"][i][0], target)),
                        "gen_edit_plain_text_pre": pre["edit_plain"][i][0],
                        "gen_edit_plain_text": post["edit_plain"][i][0]})
        if stops:  # an answer: the locality answer against its gold answer
            row.update({"gen_loc_em_pre": float(exact_match(pre["loc"][i][0], loc)),
                        "gen_loc_em_post": float(exact_match(post["loc"][i][0], loc))})
        else:  # a continuation: how much of y_e it reproduces
            row["gen_prefix"] = _prefix_share(model, post["edit"][i][1], target)
        rows.append(row)
    return rows


class PreAnswers:
    """The unedited model's free answers for every edit batch of an evaluation, computed batch by batch exactly
    as the edited model's are and kept in the keyed cache (``bench.cache``, namespace ``preanswers``) under the
    model's name and weight digest, device, dtype, thread count, torch version and every prompt, cap and stop
    string, so an entry is never served for other inputs."""

    VERSION = 1

    def __init__(self, model: EditableModel, batches: Sequence[Sequence[EditRecord]], template: str | None,
                 digest: str | None = None, use_cache: bool = True) -> None:
        self.model = model
        self.asks = [asked(model, b, template) if applies(model, b) else {} for b in batches]
        self._batches = batches
        self._answers: list[dict[str, list]] | None = None
        self._use_cache = use_cache and any(self.asks)
        self._inputs = {"v": self.VERSION, "model": model.name, "weights": digest or weights_digest(model),
                        "device": model.device.type, "dtype": str(next(model.model.parameters()).dtype),
                        "threads": torch.get_num_threads(), "torch": torch.__version__,
                        "stops": [list(kind_of(b).answer_stops) if b else [] for b in batches],
                        "asked": [{k: [v[0], v[1]] for k, v in a.items()} for a in self.asks]
                        } if self._use_cache else {}

    def _compute(self) -> list[dict[str, list]]:
        return [answer(self.model, b, a, None) if a else {} for b, a in zip(self._batches, self.asks)]

    def get(self, i: int) -> dict[str, list[tuple[str, list[int]]]]:
        """Batch ``i``'s answers before the edit, by key (empty where the protocol does not apply)."""
        if self._answers is None:
            if self._use_cache:
                self._answers, hit = cached(
                    "preanswers", self._inputs, "json", self._compute, lambda v, f: f.write_text(json.dumps(v)),
                    lambda f: json.loads(f.read_text()))
                if hit:
                    log.info("pre-edit answers of %d batches served from the cache", len(self._batches))
            else:
                self._answers = self._compute()
        return self._answers[i]
