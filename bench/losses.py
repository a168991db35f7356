"""Losses and scores on aligned (logits, labels) pairs, shared by editors and metrics.

Labels follow :class:`bench.data.EditBatch`: ``logits[b, t]`` predicts ``labels[b, t]`` and -100 masks a position.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _up(x: Tensor) -> Tensor:
    """Half-precision logits are scored in float32; float32/float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def token_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    """log p(label) at every position, 0 where masked; shape of ``labels``."""
    mask = labels != -100
    lp = torch.log_softmax(_up(logits), dim=-1)
    picked = lp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * mask


def seq_logprob(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean log-probability per target token of each sequence, shape (B,)."""
    mask = labels != -100
    return token_logprobs(logits, labels).sum(-1) / mask.sum(-1).clamp(min=1)


def perplexity(logits: Tensor, labels: Tensor) -> Tensor:
    """exp(mean target-token NLL) of each sequence, shape (B,)."""
    return torch.exp(-seq_logprob(logits, labels))


def nll(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean over the batch of each sequence's mean target-token negative log-likelihood (a scalar)."""
    return -seq_logprob(logits, labels).mean()


def _kl_per_position(pre_logits: Tensor, post_logits: Tensor) -> Tensor:
    """KL(p_pre || p_post) at every position, with ``pre_logits`` treated as a constant target."""
    pre = torch.log_softmax(_up(pre_logits.detach()), dim=-1)
    post = torch.log_softmax(_up(post_logits), dim=-1)
    return (pre.exp() * (pre - post)).sum(-1)


def kl_div(pre_logits: Tensor, post_logits: Tensor, mask: Tensor) -> Tensor:
    """KL(p_pre || p_post) averaged over the positions where ``mask`` is true (a scalar)."""
    kl = _kl_per_position(pre_logits, post_logits)
    m = mask.to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp(min=1)


def per_seq_kl(pre_logits: Tensor, post_logits: Tensor, mask: Tensor) -> Tensor:
    """KL(p_pre || p_post) averaged over each sequence's masked positions, shape (B,)."""
    kl = _kl_per_position(pre_logits, post_logits)
    m = mask.to(kl.dtype)
    return (kl * m).sum(-1) / m.sum(-1).clamp(min=1)


def argmax_scores(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(exact, token_acc) per sequence: whether every target token is the argmax, and the share that is."""
    mask = labels != -100
    hit = (logits.argmax(-1) == labels) & mask
    n = mask.sum(-1).clamp(min=1)
    exact = hit.sum(-1) == mask.sum(-1)
    return exact, hit.sum(-1).float() / n


def argmax_agreement(pre_logits: Tensor, post_logits: Tensor, mask: Tensor) -> Tensor:
    """Share of masked positions whose argmax is unchanged, per sequence (B,)."""
    same = (pre_logits.argmax(-1) == post_logits.argmax(-1)) & mask
    return same.sum(-1).float() / mask.sum(-1).clamp(min=1)


def loc_mask(inputs: dict[str, Tensor], labels: Tensor, kind: str) -> Tensor:
    """Positions over which locality KL is taken during training: every attended position of the locality
    input for causal models (as MEND does), the decoder's target tokens for seq2seq, the label for classifiers."""
    if kind == "causal":
        return inputs["attention_mask"].bool()
    return labels != -100


__all__ = [
    "token_logprobs", "seq_logprob", "perplexity", "nll", "kl_div", "per_seq_kl", "argmax_scores", "argmax_agreement",
    "loc_mask",
]
