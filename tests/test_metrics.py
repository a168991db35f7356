"""Scores on hand-made logits, confidence intervals, peak memory and evaluate() on a do-nothing editor."""

from __future__ import annotations

import math

import pytest
import torch

from bench.losses import argmax_agreement, argmax_scores, kl_div, nll, seq_logprob
from bench.memory import PeakMemory
from bench.metrics import aggregate, evaluate, mean_ci
from tests.conftest import NoiseEditor, NoOpEditor, tiny


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


_HEAP_PROBE = """
import json, resource, sys, threading
import torch
from bench.memory import PeakMemory, keep_freed_memory
out = {"kept": keep_freed_memory() if sys.argv[1] == "keep" else False}
def churn(numel, n):  # n blocks of numel floats, touched, then freed
    xs = [torch.ones(numel) for _ in range(n)]
    del xs
def faults(numel, n):  # page faults of the third of three identical rounds
    churn(numel, n); churn(numel, n)
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    churn(numel, n)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
def probe():
    out["faults_small"] = faults(2**20, 40)  # 160 MB in 4 MB blocks (under glibc's mmap threshold)
    out["faults_large"] = faults(16 * 2**20, 2)  # 128 MB in 64 MB blocks (over it, and over a thread heap's size)
    with PeakMemory("cpu") as mem:  # 64 MB in 8 MB blocks: heap memory that was freed before must count again
        ys = [torch.ones(2 * 2**20) for _ in range(8)]
    del ys
    out["peak_mb"] = mem.mb
if sys.argv[2] == "thread":  # as a Tune trial runs: in a thread of its worker process
    t = threading.Thread(target=probe)
    t.start()
    t.join()
else:
    probe()
print(json.dumps(out))
"""


def _heap_probe(mode: str, where: str = "main", env: dict[str, str] | None = None) -> dict:
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", _HEAP_PROBE, mode, where], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parent.parent, env={**clean, **(env or {})})
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_keep_freed_memory_reuses_the_heap_and_peak_memory_still_counts_it() -> None:
    """Each probe runs in a fresh process (the setting is process-wide). Kept, the third round of 160 MB in 4 MB
    blocks and of 128 MB in 64 MB blocks reuses the memory the second freed: under a tenth of their 40960 and 32768
    pages fault in (0 and 0 here). With glibc's defaults freed memory often goes back to the OS and faults in again
    (40929 of the small round's pages in 6 of 7 probes on one host, 1024 on another; 16385 of the large round's),
    but not always, so the default side is not asserted.
    PeakMemory trims the heap at entry, so an allocation inside it counts in full either way."""
    from bench.memory import _libc

    if _libc() is None:
        pytest.skip("not glibc: keep_freed_memory changes nothing here")
    default, kept = _heap_probe("default"), _heap_probe("keep")
    assert kept["kept"] is True and default["kept"] is False
    assert kept["faults_small"] < 4096 and kept["faults_large"] < 3277
    assert default["peak_mb"] >= 56 and kept["peak_mb"] >= 56


def test_a_trial_thread_reuses_freed_memory_only_with_the_workers_one_arena_env() -> None:
    """A Tune trial runs in a thread of its Ray worker. Such a thread gets a malloc arena of its own, whose heaps
    (64 MB at most) cannot hold a 64 MB block: glibc maps it and unmaps it at free, so every page faults in again
    (32768 of 32768 here), whatever keep_freed_memory set. With the environment bench.run gives the Ray workers
    (one arena), the thread allocates from the main heap and reuses it like the main thread."""
    from bench.memory import ONE_ARENA_ENV, _libc

    if _libc() is None:
        pytest.skip("not glibc: keep_freed_memory changes nothing here")
    own_arena = _heap_probe("keep", "thread")
    one_arena = _heap_probe("keep", "thread", ONE_ARENA_ENV)
    assert own_arena["faults_large"] > 16384
    assert one_arena["faults_large"] < 3277 and one_arena["faults_small"] < 4096
    assert one_arena["peak_mb"] >= 56


def test_the_trial_workers_get_one_arena_and_their_thread_count(monkeypatch: pytest.MonkeyPatch) -> None:
    from bench.memory import ONE_ARENA_ENV
    from bench.tuner import trial_worker_env

    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert trial_worker_env(1) == {"EDITBENCH_THREADS": "1", **ONE_ARENA_ENV}
    assert trial_worker_env(0.5)["EDITBENCH_THREADS"] == "1" and trial_worker_env(2)["EDITBENCH_THREADS"] == "2"
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")  # the user's own setting is passed on
    assert trial_worker_env(1)["MALLOC_ARENA_MAX"] == "4"




def test_evaluate_noop_editor_changes_nothing(zsre) -> None:
    m = tiny("tiny-gpt2")
    res = evaluate(NoOpEditor(), m, zsre["test"][:6], edit_batch_size=2)
    assert len(res.rows) == 6
    agg = res.metrics
    assert agg["es"] == agg["es_pre"] and agg["drawdown"] == 0 and agg["loc_agree"] == 1.0
    assert agg["loc_kl"] == pytest.approx(0.0, abs=1e-6)
    for key in ("es", "edit_acc", "loc_acc_pre", "loc_acc_post", "drawdown", "token_acc_rephrase", "edit_time_s",
                "edit_peak_mem_mb", "edit_steps", "loc_agree", "loc_kl", "es_ci95", "drawdown_ci95", "efficacy"):
        assert key in agg, key


def test_evaluate_sees_a_damaging_edit(zsre) -> None:
    m = tiny("tiny-gpt2")
    agg = evaluate(NoiseEditor(m), m, zsre["test"][:4]).metrics
    assert agg["loc_kl"] > 0.01 and agg["loc_agree"] < 1.0 and agg["edit_steps"] == 1


def test_base_model_verdicts_are_cached_by_weights_and_pairs(tmp_path, monkeypatch) -> None:
    """The locality filter's verdicts (is the unedited model right on each pair) are computed once per model weights
    and pool; changed weights or pairs are a new entry."""
    import bench.probes
    from bench.probes import base_correct
    from bench.models import load_model
    from tests.conftest import private_cache

    private_cache(monkeypatch, tmp_path / "cache")
    m = load_model("tiny-gpt2")
    pairs = [("The capital of France is", "Paris"), ("Two plus two is", "four")]
    first = base_correct(m, pairs)
    assert len(first) == 2 and all(isinstance(v, bool) for v in first)
    real = bench.probes.exact_match
    monkeypatch.setattr(bench.probes, "exact_match", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
    assert base_correct(m, pairs) == first  # from the cache: the model did not run
    calls = []
    monkeypatch.setattr(bench.probes, "exact_match", lambda *a, **k: calls.append(1) or real(*a, **k))
    base_correct(m, pairs[:1])
    with torch.no_grad():
        next(m.model.parameters()).add_(1.0)
    base_correct(m, pairs)
    assert len(calls) == 2  # other pairs, other weights: computed again


@pytest.mark.parametrize("alias", ["tiny-gpt2", "tiny-llama", "tiny-t5"])
def test_exact_match_equals_argmax_scores_over_full_logits(zsre, alias) -> None:
    """exact_match runs a causal model's output head on the target positions only; its verdicts are those of
    argmax_scores over every position's logits, with and without deltas (some rows right, some wrong)."""
    from bench.data import collate
    from bench.probes import exact_match

    m = tiny(alias)
    recs = zsre["test"][:8]
    prompts, answers = [r.prompt for r in recs], [r.target for r in recs]
    with torch.no_grad():  # make half of the answers the model's own argmax: both verdicts occur
        b = collate(m, prompts, answers)
        greedy = m.logits(b.inputs).argmax(-1)
    b.labels[:4] = torch.where(b.labels[:4] != -100, greedy[:4], b.labels[:4])
    g = torch.Generator().manual_seed(0)
    deltas = {n: 0.05 * torch.randn(w.shape, generator=g) for n, w in m.weights().items()}
    for d in (None, deltas):
        with torch.no_grad():
            want = argmax_scores(m.logits(b.inputs, d), b.labels)[0]
        got = exact_match(m, b, d)
        assert got.tolist() == want.tolist()
    assert exact_match(m, b).tolist()[:4] == [True] * 4 and not all(exact_match(m, b).tolist())


def test_base_correct_keeps_the_pairs_order_when_it_batches_by_length(tmp_path, monkeypatch, zsre) -> None:
    """Verdicts are computed in batches of pairs of similar length; each comes back at its pair's place (the same
    as judging each pair alone)."""
    from bench.data import collate
    from bench.probes import base_correct, exact_match
    from tests.conftest import private_cache

    private_cache(monkeypatch, tmp_path / "cache")
    m = tiny("tiny-llama")
    recs = zsre["test"][:12]
    with torch.no_grad():  # pairs of varied length, the model right on some of them
        pairs = []
        for i, r in enumerate(recs):
            prompt = r.prompt + " and so on" * (i % 4)
            b = collate(m, [prompt], [r.target])
            own = m.tokenizer.decode(m.logits(b.inputs)[0, b.labels[0] != -100].argmax(-1))
            pairs.append((prompt, own if i % 3 == 0 and own.strip() else r.target))
    alone = [bool(exact_match(m, collate(m, [p], [a]))[0]) for p, a in pairs]
    assert base_correct(m, pairs, batch_size=5) == alone
    assert any(alone)


def _strip_cost(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("edit_time_s", "edit_peak_mem_mb")} for r in rows]


@pytest.mark.parametrize("alias", ["tiny-gpt2", "tiny-llama"])
def test_pre_edit_probes_from_the_cache_equal_fresh_ones(zsre, alias, tmp_path, monkeypatch) -> None:
    """The unedited model's probes are computed once per model and test set: a second evaluation takes them from
    the cache without running them, and every per-edit value (ES before, locality agreement, KL, drawdown) is
    bit-identical to an evaluation that computes them; other weights are another entry."""
    import bench.probes
    from bench.probes import PreEditProbes
    from bench.models import load_model
    from tests.conftest import private_cache

    private_cache(monkeypatch, tmp_path / "cache")
    m = tiny(alias)
    recs = zsre["test"][:6]
    fresh = evaluate(NoiseEditor(m), m, recs, edit_batch_size=2, cache_pre=False)
    assert not list((tmp_path / "cache").glob("preedit/*.pt"))  # cache_pre=False stores nothing
    first = evaluate(NoiseEditor(m), m, recs, edit_batch_size=2)
    assert len(list((tmp_path / "cache").glob("preedit/*.pt"))) == 1
    calls: list[bool] = []
    real = bench.probes.probe
    monkeypatch.setattr(bench.probes, "probe", lambda mm, g, d: calls.append(d is None) or real(mm, g, d))
    second = evaluate(NoiseEditor(m), m, recs, edit_batch_size=2)
    assert calls and not any(calls)  # only post-edit probes ran: the unedited model's came from the cache
    assert _strip_cost(fresh.rows) == _strip_cost(first.rows) == _strip_cost(second.rows)
    assert 0 < second.metrics["loc_kl"] and second.metrics["loc_agree"] < 1.0  # the values compared are not trivial
    # Another batch size probes other batches; changed weights are another model: both computed again.
    calls.clear()
    evaluate(NoiseEditor(m), m, recs, edit_batch_size=3)
    assert any(calls)
    other = load_model(alias)
    with torch.no_grad():
        next(other.model.parameters()).add_(0.01)
    calls.clear()
    evaluate(NoiseEditor(other), other, recs, edit_batch_size=2)
    assert any(calls)
    # An entry over the size bound is not stored.
    monkeypatch.setattr(bench.probes, "PRE_CACHE_MAX_MB", 0.0)
    n = len(list((tmp_path / "cache").glob("preedit/*.pt")))
    evaluate(NoiseEditor(m), m, recs, edit_batch_size=1)
    assert len(list((tmp_path / "cache").glob("preedit/*.pt"))) == n
    assert PreEditProbes.VERSION == 1


def test_pre_edit_probes_serve_generation_perplexity(tmp_path, monkeypatch) -> None:
    """Generation edits score drawdown as a perplexity ratio over the locality passage: cached probes give the
    same ``ppl_pre`` as fresh ones (the zero logits outside the answer positions are masked out)."""
    from bench.data import EditRecord
    from tests.conftest import private_cache

    private_cache(monkeypatch, tmp_path / "cache")
    m = tiny("tiny-gpt2")
    recs = [EditRecord(case_id=str(i), task="wikitext", prompt=f"Passage {i} begins with a sentence about", target=" rivers and hills",
                       rephrases=("a sentence about",), loc_prompt="The", loc_answer=" weather today was cold and wet",
                       kind="generation") for i in range(3)]
    fresh = evaluate(NoiseEditor(m), m, recs, cache_pre=False)
    evaluate(NoiseEditor(m), m, recs)
    assert len(list((tmp_path / "cache").glob("preedit/*.pt"))) == 1
    cached = evaluate(NoiseEditor(m), m, recs)
    assert _strip_cost(fresh.rows) == _strip_cost(cached.rows)
    assert all(r["ppl_pre"] > 1 and r["ppl_post"] != r["ppl_pre"] for r in cached.rows)
