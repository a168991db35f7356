"""What the edited model says when it answers freely: the pieces of the generation protocol (issue 32).

Teacher-forced scores feed the gold target and check each of its tokens; the generation protocol lets the edited
model answer by itself and scores the whole answer:

- :func:`greedy_ids` / :func:`greedy` / :func:`free_answers`: batched greedy decoding with the KV cache (Hugging
  Face ``generate``) on the model with ``W + deltas`` swapped in and any module adaptors hooked in for the
  duration of the call (the module's own parameters are never written), each row stopping at EOS, at a stop string (end of line by default) or after its
  own cap of new tokens;
- :func:`question_prompt`: the question as a user asks it: a card's question template, and the chat template
  for an instruction-tuned model that has one;
- :func:`normalize_answer`, :func:`exact_match`, :func:`contains`: SQuAD's normalisation (lower case, no
  punctuation, no articles, single spaces), exact match and "target contained" on normalised text.

Requiring every target token to be the teacher-forced argmax is the same as greedy decoding producing the target
as a prefix (``tests/test_generation.py`` pins it); the protocols differ in where the answer ends, how the question
is asked and how the whole answer is scored.
"""

from __future__ import annotations

import re
import string
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor
from torch.nn.utils.stateless import _reparametrize_module  # what torch.func.functional_call swaps weights with

from transformers import StoppingCriteria, StoppingCriteriaList

from bench.models import Change, EditableModel

#: Where a free answer ends besides EOS: the end of its line (short-answer tasks answer on one line).
STOP_STRINGS: tuple[str, ...] = ("\n",)


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, punctuation removed, the articles a / an / the removed, runs of
    whitespace made one space, ends stripped."""
    text = text.lower()
    text = "".join(c for c in text if c not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, target: str) -> bool:
    """Whether the answer is the target after :func:`normalize_answer` (an empty target matches nothing)."""
    gold = normalize_answer(target)
    return bool(gold) and normalize_answer(prediction) == gold


def contains(prediction: str, target: str) -> bool:
    """Whether the normalised target occurs in the normalised answer as whole words (an empty target never does)."""
    gold = normalize_answer(target)
    return bool(gold) and f" {gold} " in f" {normalize_answer(prediction)} "


def cut_at_stop(text: str, stops: Sequence[str] = STOP_STRINGS) -> str:
    """``text`` up to the first of ``stops`` (the stop string itself left out)."""
    cut = len(text)
    for s in stops:
        i = text.find(s)
        if s and 0 <= i < cut:
            cut = i
    return text[:cut]


def question_prompt(model: EditableModel, prompt: str, template: str | None = None, chat: bool = True) -> str:
    """The question as a user asks it: ``template`` (a card's question template, with ``{prompt}``) around the
    edit input, then, when ``chat`` and the tokenizer has a chat template (instruction-tuned models such as
    SmolLM2-135M-Instruct), the user turn with the assistant's turn opened."""
    question = template.format(prompt=prompt) if template else prompt
    tok = model.tokenizer
    if chat and getattr(tok, "chat_template", None):
        return tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                       add_generation_prompt=True)
    return question


class _StopAtText(StoppingCriteria):
    """Stops each row of a batched ``generate`` once its new text holds one of ``stops`` or it has its own cap of
    new tokens (``caps``), so the batch ends when its last row does: each step decodes the rows' new tokens, a few
    dozen at most, instead of building Hugging Face's stop-string tables over the whole vocabulary on every call."""

    def __init__(self, tokenizer: Any, start: int, stops: Sequence[str], caps: Sequence[int]) -> None:
        self.tok, self.start, self.stops, self.caps = tokenizer, start, [s for s in stops if s], list(caps)

    def __call__(self, input_ids: Tensor, scores: Tensor, **kwargs: Any) -> Tensor:
        new = input_ids[:, self.start:]
        texts = self.tok.batch_decode(new, skip_special_tokens=True) if self.stops else [""] * len(new)
        done = [new.shape[1] >= cap or any(s in t for s in self.stops) for t, cap in zip(texts, self.caps)]
        return torch.tensor(done, device=input_ids.device)


@torch.no_grad()
def greedy_ids(model: EditableModel, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int],
               deltas: Mapping[str, Change] | None = None, stop_strings: Sequence[str] = ()) -> list[list[int]]:
    """Greedy continuations (token ids, EOS left out) of each prompt, decoded in one left-padded batch with the
    KV cache on the model with ``W + deltas``; each stops at EOS, after a token that completes one of
    ``stop_strings``, or after its ``max_new_tokens`` (one cap for all, or one per prompt: a row is the same as
    decoded alone with its own cap). Causal models only."""
    if model.kind != "causal":
        raise ValueError(f"greedy decoding is for causal models; {model.name} is {model.kind}")
    caps = [int(max_new_tokens)] * len(prompt_ids) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(caps) != len(prompt_ids) or min(caps, default=1) < 1:
        raise ValueError(f"max_new_tokens: one cap >= 1 per prompt, got {caps} for {len(prompt_ids)} prompts")
    tok = model.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for i, p in enumerate(prompt_ids):  # left padding: every continuation starts at the same column
        ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p):] = 1
    stop = StoppingCriteriaList([_StopAtText(tok, width, stop_strings, caps)])
    with _reparametrize_module(model.model, model.edited_params(deltas)), model.adapted(deltas, mask):
        out = model.model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                                   max_new_tokens=max(caps), do_sample=False, num_beams=1, pad_token_id=pad,
                                   eos_token_id=tok.eos_token_id, stopping_criteria=stop)
    rows = []
    for row, cap in zip(out[:, width:].tolist(), caps):
        row = row[:cap]
        if tok.eos_token_id in row:
            row = row[: row.index(tok.eos_token_id)]
        while row and row[-1] == pad:  # what generate fills a finished row with while others go on
            row.pop()
        rows.append(row)
    return rows


def greedy(model: EditableModel, prompts: Sequence[str], max_new_tokens: int | Sequence[int],
           deltas: Mapping[str, Change] | None = None, stops: Sequence[str] = STOP_STRINGS) -> list[str]:
    """The model's free answers to ``prompts`` (:func:`greedy_ids`), decoded and cut at the first of ``stops``,
    leading and trailing whitespace stripped."""
    return [text for text, _ in free_answers(model, prompts, max_new_tokens, deltas, stops)]


def free_answers(model: EditableModel, prompts: Sequence[str], max_new_tokens: int | Sequence[int],
            deltas: Mapping[str, Change] | None = None, stops: Sequence[str] = STOP_STRINGS
            ) -> list[tuple[str, list[int]]]:
    """Per prompt, the free answer (:func:`greedy`'s text) and the generated ids it was decoded from (EOS left
    out, not cut at the stop)."""
    tok = model.tokenizer
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    rows = greedy_ids(model, ids, max_new_tokens, deltas, stop_strings=stops)
    return [(cut_at_stop(tok.decode(r, skip_special_tokens=True), stops).strip(), r) for r in rows]
