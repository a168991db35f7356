"""The generation protocol's pieces: teacher-forced all-argmax equals greedy decoding producing the target as a
prefix (with and without weight deltas, in one left-padded batch); the stopping rule, the question templates and
SQuAD's normalisation on hand-made cases."""

from __future__ import annotations

import pytest
import torch

from bench.generation import contains, cut_at_stop, exact_match, greedy, greedy_ids, normalize_answer, question_prompt
from conftest import tiny

PROMPTS = ["The capital of France is", "Water boils at", "The first president of the United States was George",
           "Q"]


def _teacher_forced_all_argmax(model, prompt_ids: list[int], target_ids: list[int], deltas=None) -> bool:
    """Every target token is the argmax given the gold prefix (MEND's ES on one pair), from one forward pass."""
    ids = torch.tensor([prompt_ids + target_ids])
    logits = model.logits({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, deltas)[0]
    pred = logits[len(prompt_ids) - 1 : len(prompt_ids) - 1 + len(target_ids)].argmax(-1)
    return pred.tolist() == target_ids


@pytest.mark.parametrize("alias", ["tiny-gpt2", "tiny-llama"])
def test_teacher_forced_all_argmax_is_greedy_producing_the_target_as_a_prefix(alias: str) -> None:
    m = tiny(alias)
    tok = m.tokenizer
    prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    g = torch.Generator().manual_seed(0)
    deltas = {n: 0.5 * torch.randn(w.shape, generator=g) for n, w in m.weights().items()}
    assert len(set(map(len, prompt_ids))) > 1  # the batch is padded
    for d in (None, deltas):
        gen = greedy_ids(m, prompt_ids, 4, d)  # one batch, prompts of different lengths (left padding)
        for p, out in zip(prompt_ids, gen):
            assert len(out) == 4
            assert _teacher_forced_all_argmax(m, p, out, d)  # its own greedy answer is all-argmax
            wrong = [out[0] + 1] + out[1:]  # another first token: neither argmax nor greedy's
            assert not _teacher_forced_all_argmax(m, p, wrong, d)
            assert greedy_ids(m, [p], 4, d)[0] == out  # alone, unpadded: the same tokens
    plain, edited = greedy_ids(m, prompt_ids, 4), greedy_ids(m, prompt_ids, 4, deltas)
    assert plain != edited  # the deltas were applied (tiny random models change their argmax under them)
    assert all(torch.equal(w, m.model.get_parameter(n)) for n, w in m.weights().items())  # nothing written


def test_answers_stop_at_the_end_of_the_line_and_at_eos() -> None:
    assert cut_at_stop("Paris\nThe capital") == "Paris"
    assert cut_at_stop("Paris. Then", (". ", "\n")) == "Paris"
    assert cut_at_stop("no stop here") == "no stop here"
    m = tiny("tiny-llama")
    tok = m.tokenizer
    ids = greedy_ids(m, [tok("Hello", add_special_tokens=False)["input_ids"]], 12)[0]
    assert tok.eos_token_id not in ids
    text = greedy(m, ["Hello"], 12)[0]
    assert "\n" not in text and text == text.strip()


def test_the_question_is_asked_through_the_template_and_the_chat_template() -> None:
    m = tiny("tiny-llama")
    plain = question_prompt(m, "Who wrote Hamlet?", "Question: {prompt}\nAnswer:", chat=False)
    assert plain == "Question: Who wrote Hamlet?\nAnswer:"
    assert m.tokenizer.chat_template  # SmolLM2-Instruct's tokenizer: an instruction-tuned model's turns
    chat = question_prompt(m, "Who wrote Hamlet?")
    assert chat.index("Who wrote Hamlet?") > chat.index("user")
    assert chat.rstrip().endswith("assistant")  # the assistant's turn opened, the answer to come


@pytest.mark.parametrize("pred,gold,em,inside", [
    ("The Eiffel Tower.", "eiffel tower", True, True),
    ("  PARIS  ", "Paris", True, True),
    ("It is Paris, France", "Paris", False, True),
    ("Parisian", "Paris", False, False),
    ("an apple", "Apple!", True, True),
    ("anything", "", False, False),
])
def test_squad_normalisation_exact_match_and_containment(pred: str, gold: str, em: bool, inside: bool) -> None:
    assert exact_match(pred, gold) is em
    assert contains(pred, gold) is inside
    assert normalize_answer("The  quick, brown fox!") == "quick brown fox"
