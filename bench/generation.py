"""What the edited model says when it answers freely: the pieces of the generation protocol (issue 32).

Teacher-forced scores feed the gold target and check each of its tokens; the generation protocol lets the edited
model answer by itself and scores the whole answer:

- :func:`greedy_ids` / :func:`greedy`: batched greedy decoding with the KV cache (Hugging Face ``generate``) on
  the model with ``W + deltas`` swapped in for the duration of the call (the module's own parameters are never
  written), stopping at EOS, at a stop string (end of line by default) or after ``max_new_tokens``;
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
from typing import Mapping, Sequence

import torch
from torch import Tensor
from torch.nn.utils.stateless import _reparametrize_module  # what torch.func.functional_call swaps weights with

from bench.models import EditableModel

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


@torch.no_grad()
def greedy_ids(model: EditableModel, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int,
               deltas: Mapping[str, Tensor] | None = None, stop_strings: Sequence[str] = ()) -> list[list[int]]:
    """Greedy continuations (token ids, EOS left out) of each prompt, decoded in one left-padded batch with the
    KV cache on the model with ``W + deltas``; each stops at EOS, after a token that completes one of
    ``stop_strings``, or after ``max_new_tokens``. Causal models only."""
    if model.kind != "causal":
        raise ValueError(f"greedy decoding is for causal models; {model.name} is {model.kind}")
    tok = model.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for i, p in enumerate(prompt_ids):  # left padding: every continuation starts at the same column
        ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p):] = 1
    extra = {"stop_strings": list(stop_strings), "tokenizer": tok} if stop_strings else {}
    with _reparametrize_module(model.model, model.edited_params(deltas)):
        out = model.model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                                   max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                   pad_token_id=pad, eos_token_id=tok.eos_token_id, **extra)
    rows = []
    for row in out[:, width:].tolist():
        if tok.eos_token_id in row:
            row = row[: row.index(tok.eos_token_id)]
        rows.append(row)
    return rows


def greedy(model: EditableModel, prompts: Sequence[str], max_new_tokens: int,
           deltas: Mapping[str, Tensor] | None = None, stops: Sequence[str] = STOP_STRINGS) -> list[str]:
    """The model's free answers to ``prompts`` (:func:`greedy_ids`), decoded and cut at the first of ``stops``,
    leading and trailing whitespace stripped."""
    tok = model.tokenizer
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    rows = greedy_ids(model, ids, max_new_tokens, deltas, stop_strings=stops)
    return [cut_at_stop(tok.decode(r, skip_special_tokens=True), stops).strip() for r in rows]
