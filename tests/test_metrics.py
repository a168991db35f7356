"""Scores on hand-made logits, confidence intervals, peak memory and evaluate() on a do-nothing editor."""

from __future__ import annotations

import math

import pytest
import torch

from bench.losses import argmax_agreement, argmax_scores, kl_div, nll, seq_logprob
from bench.metrics import PeakMemory, aggregate, evaluate, mean_ci
from methods.base import Edit
from tests.conftest import tiny


def _logits(rows: list[list[int]], vocab: int = 5, hi: float = 5.0) -> torch.Tensor:
    out = torch.zeros(len(rows), len(rows[0]), vocab)
    for b, r in enumerate(rows):
        for t, k in enumerate(r):
            out[b, t, k] = hi
    return out


def test_exact_match_and_token_accuracy_on_hand_made_logits() -> None:
    logits = _logits([[1, 2, 3], [1, 4, 3]])
    labels = torch.tensor([[-100, 2, 3], [-100, 2, 3]])
    exact, tok = argmax_scores(logits, labels)
    assert exact.tolist() == [True, False]
    assert tok.tolist() == [1.0, 0.5]


def test_nll_and_logprob_match_the_formula() -> None:
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]]])  # p(1)=3/4 at t=0
    labels = torch.tensor([[1, -100]])
    assert seq_logprob(logits, labels).item() == pytest.approx(math.log(0.75), abs=1e-6)
    assert nll(logits, labels).item() == pytest.approx(-math.log(0.75), abs=1e-6)


def test_kl_and_agreement() -> None:
    pre = torch.tensor([[[0.0, 0.0], [2.0, 0.0]]])
    post = torch.tensor([[[0.0, 0.0], [0.0, 2.0]]])
    mask = torch.tensor([[True, True]])
    p = torch.softmax(torch.tensor([2.0, 0.0]), 0)
    q = torch.softmax(torch.tensor([0.0, 2.0]), 0)
    expected = float((p * (p.log() - q.log())).sum()) / 2  # position 0 contributes 0
    assert kl_div(pre, post, mask).item() == pytest.approx(expected, rel=1e-5)
    assert kl_div(pre, pre, mask).item() == pytest.approx(0.0, abs=1e-7)
    assert argmax_agreement(pre, post, mask).tolist() == [0.5]


def test_mean_ci() -> None:
    m, ci = mean_ci([0.0, 1.0, 1.0, 0.0])
    assert m == 0.5 and ci == pytest.approx(1.96 * math.sqrt((4 * 0.25 / 3) / 4))
    assert mean_ci([1.0]) == (1.0, 0.0)
    assert all(math.isnan(x) for x in mean_ci([]))


def test_aggregate_counts_cost_per_edit_call() -> None:
    rows = [dict(batch=0, es=1.0, has_rephrase=True, edit_time_s=2.0, edit_steps=3.0, edit_peak_mem_mb=10.0),
            dict(batch=0, es=0.0, has_rephrase=False, edit_time_s=2.0, edit_steps=3.0, edit_peak_mem_mb=10.0)]
    agg = aggregate(rows)
    assert agg["es"] == 0.5 and agg["edit_time_s"] == 2.0 and agg["n_edits"] == 2
    assert agg["es_with_rephrase"] == 1.0 and agg["es_without_rephrase"] == 0.0


def test_peak_memory_sees_an_allocation() -> None:
    with PeakMemory("cpu") as mem:
        x = torch.ones(64 * 2**20 // 4)  # 64 MB
        x += 1
    del x
    assert mem.mb >= 48


class _NoOp:
    def edit(self, batch):
        return Edit({})


class _Noise:
    def __init__(self, m):
        self.m = m

    def edit(self, batch):
        g = torch.Generator().manual_seed(0)
        return Edit({n: 0.5 * torch.randn(w.shape, generator=g) for n, w in self.m.weights().items()}, steps=1)


def test_evaluate_noop_editor_changes_nothing(zsre) -> None:
    m = tiny("tiny-gpt2")
    res = evaluate(_NoOp(), m, zsre["test"][:6], edit_batch_size=2)
    assert len(res.rows) == 6
    agg = res.metrics
    assert agg["es"] == agg["es_pre"] and agg["drawdown"] == 0 and agg["loc_agree"] == 1.0
    assert agg["loc_kl"] == pytest.approx(0.0, abs=1e-6)
    for key in ("es", "edit_acc", "loc_acc_pre", "loc_acc_post", "drawdown", "token_acc_rephrase", "edit_time_s",
                "edit_peak_mem_mb", "edit_steps", "loc_agree", "loc_kl", "es_ci95", "drawdown_ci95", "efficacy"):
        assert key in agg, key


def test_evaluate_sees_a_damaging_edit(zsre) -> None:
    m = tiny("tiny-gpt2")
    agg = evaluate(_Noise(m), m, zsre["test"][:4]).metrics
    assert agg["loc_kl"] > 0.01 and agg["loc_agree"] < 1.0 and agg["edit_steps"] == 1


def test_base_model_verdicts_are_cached_by_weights_and_pairs(tmp_path, monkeypatch) -> None:
    """The locality filter's verdicts (is the unedited model right on each pair) are computed once per model weights
    and pool; changed weights or pairs are a new entry."""
    import bench.metrics
    from bench.metrics import base_correct
    from bench.models import load_model
    from tests.conftest import private_cache

    private_cache(monkeypatch, tmp_path / "cache")
    m = load_model("tiny-gpt2")
    pairs = [("The capital of France is", "Paris"), ("Two plus two is", "four")]
    first = base_correct(m, pairs)
    assert len(first) == 2 and all(isinstance(v, bool) for v in first)
    real = bench.metrics._scores
    monkeypatch.setattr(bench.metrics, "_scores", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
    assert base_correct(m, pairs) == first  # from the cache: the model did not run
    calls = []
    monkeypatch.setattr(bench.metrics, "_scores", lambda *a, **k: calls.append(1) or real(*a, **k))
    base_correct(m, pairs[:1])
    with torch.no_grad():
        next(m.model.parameters()).add_(1.0)
    base_correct(m, pairs)
    assert len(calls) == 2  # other pairs, other weights: computed again
