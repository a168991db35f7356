"""Evaluation of an editor on test edits: per-edit rows and aggregates, each metric labelled by its style.

- MEND style: ``es`` (edit success: every target token is the teacher-forced argmax on the equivalence input),
  ``edit_acc`` (the same on x_e), ``loc_acc_pre``/``loc_acc_post`` (exact match of the locality answer before and
  after) and ``drawdown`` = pre - post; generation tasks (Wikitext) use the relative perplexity increase on the
  locality passage instead, ``drawdown`` = ppl_post / ppl_pre - 1 (with ``ppl_pre``/``ppl_post``).
- EasyEdit style: token-level accuracy ``token_acc_edit`` (reliability), ``token_acc_rephrase`` (generalisation),
  ``loc_agree`` (share of locality answer tokens whose post-edit argmax equals the pre-edit one).
- ROME style, where the true answer is known: ``efficacy`` p(new) > p(true) on x_e, ``paraphrase`` the same on
  x'_e, ``neighbourhood`` p(true) > p(new) on x_loc (CounterFact).
- Generation (``bench.answers``): the edited model answers freely and its whole answer is scored (``gen_*``:
  exact match and "target contained" on x_e, x'_e and x_e continued plainly; locality agreement with the unedited
  model's answer); ``gen_time_s`` is what it cost.
- Cost: ``edit_time_s``, ``edit_steps``, ``edit_peak_mem_mb`` (CUDA: max_memory_allocated above the start;
  CPU: resident high-water mark above the start, reset before each edit).

Means come with 95% confidence intervals over edits (normal approximation, 1.96 standard errors).
"""

from __future__ import annotations

import gc
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import torch

from bench import answers, probes  # called through the modules: one place where every probe passes
from bench.data import EditBatch, EditRecord, edit_batch, kind_of
from bench.losses import argmax_agreement, argmax_scores, per_seq_kl, seq_logprob
from bench.memory import PeakMemory
from bench.models import EditableModel, weights_digest
from bench.models.adaptors import change_size
from bench.probes import PreEditProbes
from bench.schema import STYLES, WITH_CI  # per-edit metric -> style, and those with CIs: declared once there

log = logging.getLogger(__name__)


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """(mean, 95% CI half-width) of finite values; (nan, nan) when there are none, CI 0 for a single value."""
    v = [float(x) for x in values if x is not None and not math.isnan(float(x))]
    if not v:
        return float("nan"), float("nan")
    m = sum(v) / len(v)
    if len(v) < 2:
        return m, 0.0
    var = sum((x - m) ** 2 for x in v) / (len(v) - 1)
    return m, 1.96 * math.sqrt(var / len(v))


class EditorLike(Protocol):
    """What :func:`evaluate` needs of an editor: ``edit(batch)`` returning an object with ``deltas`` (weight deltas
    by parameter name), ``steps`` and ``detach()`` (``methods.base.Edit``)."""

    def edit(self, batch: EditBatch) -> Any: ...


@dataclass
class EvalResult:
    """Per-edit rows (one dict per test edit), the aggregated metrics and, for sequential editing, one dict per
    checkpoint (``n_edits`` made so far and the retention scores on all of them, see :func:`evaluate`)."""

    rows: list[dict[str, Any]]
    metrics: dict[str, float]
    checkpoints: list[dict[str, float]] = field(default_factory=list)


EDIT_MODES = ("independent", "sequential")


#: Numbers of edits after which sequential editing is scored on everything edited so far (plus the last).
CHECKPOINTS = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000)


def checkpoint_schedule(n: int, points: Sequence[int] | None = None) -> list[int]:
    """The checkpoints (edit counts) used for ``n`` sequential edits: ``points`` (default :data:`CHECKPOINTS`)
    up to ``n``, and ``n`` itself."""
    return sorted({p for p in (points or CHECKPOINTS) if 1 <= p <= n} | {n})


#: Retention under the generation protocol: per-edit score -> retention metric.
GEN_RETENTION = {"gen_edit_em": "retention_gen_edit_em", "gen_rephrase_em": "retention_gen_rephrase_em",
                 "gen_loc_agree": "retention_gen_loc_agree"}


@torch.no_grad()
def retention(model: EditableModel, records: Sequence[EditRecord], deltas: dict, chunk: int = 16,
              template: str | None = None, generation: bool = True) -> tuple[dict[str, float], list[float]]:
    """Scores of the model with ``deltas`` on ALL of ``records`` (the edits made so far): ES (x'_e), edit
    accuracy (x_e), and, against the ORIGINAL model (no deltas), locality agreement, KL and drawdown (accuracy
    drawdown; for generation records the relative perplexity increase). With ``generation`` (where it applies)
    also the free answers' exact match on x_e and x'_e and their locality agreement with the original model's
    (``retention_gen_*``; ``template``: the card's question template). Returns the means (``retention_*``) and
    each record's ES (and ``gen_time_s``, the seconds the free answers took, where they ran)."""
    es: list[float] = []
    acc, agree, kl, draw = [], [], [], []
    gen: dict[str, list[float]] = {k: [] for k in GEN_RETENTION}
    gen_s = 0.0
    for i in range(0, len(records), chunk):
        recs = list(records[i : i + chunk])
        kind = kind_of(recs)
        tgt, sp = kind.targets(recs), kind.spaced
        groups = {"edit": ([r.prompt for r in recs], tgt, sp), "equiv": ([r.equiv_prompt for r in recs], tgt, sp),
                  "loc": ([r.loc_prompt for r in recs], kind.loc_targets(recs), True)}
        post = probes.probe(model, groups, deltas)
        pre = probes.probe(model, {"loc": groups["loc"]}, None)
        es.extend(float(x) for x in argmax_scores(*post["equiv"])[0])
        acc.extend(float(x) for x in argmax_scores(*post["edit"])[0])
        (pre_l, lab), (post_l, _) = pre["loc"], post["loc"]
        mask = lab != -100
        agree.extend(argmax_agreement(pre_l, post_l, mask).tolist())
        kl.extend(per_seq_kl(pre_l, post_l, mask).tolist())
        draw.extend(kind.locality_scores(pre_l, post_l, lab)["drawdown"])
        if generation and answers.applies(model, recs):
            t0 = time.perf_counter()
            ask = answers.asked(model, recs, template)
            for row in answers.scores(model, recs, answers.answer(model, recs, ask, None),
                                      answers.answer(model, recs, ask, deltas)):
                for k in gen:
                    gen[k].append(row[k])
            gen_s += time.perf_counter() - t0
    means = {"retention_es": mean_ci(es)[0], "retention_edit_acc": mean_ci(acc)[0],
             "retention_loc_agree": mean_ci(agree)[0], "retention_loc_kl": mean_ci(kl)[0],
             "retention_drawdown": mean_ci(draw)[0]}
    means.update({GEN_RETENTION[k]: mean_ci(v)[0] for k, v in gen.items() if v})
    if gen_s:
        means["gen_time_s"] = gen_s  # what the free answers cost (the caller takes it out)
    return means, es


def evaluate(
    editor: EditorLike,
    model: EditableModel,
    records: Sequence[EditRecord],
    edit_batch_size: int = 1,
    rome_neighbourhood: bool = False,
    progress: Callable[[int, int], None] | None = None,
    mode: str = "independent",
    checkpoints: Sequence[int] | None = None,
    digest: str | None = None,
    cache_pre: bool = True,
    question_template: str | None = None,
    generation: bool = True,
) -> EvalResult:
    """Edit the model once per batch of ``edit_batch_size`` test records and score every record of the batch.
    ``editor`` is any object with ``edit(EditBatch) -> Edit``.

    ``mode="independent"``: every edit starts from the unedited model. ``mode="sequential"``: the batches are
    applied one after another; each edit is computed on the model as already edited (``model.applying`` the sum
    of the previous edits: the base weights are never mutated) and the per-edit row scores the model with ALL
    edits so far, its locality against the ORIGINAL model. Each row then carries ``step`` (the batch count when it
    was made) and, at every checkpoint of :func:`checkpoint_schedule` (edit counts), :func:`retention` on every
    edit made so far is computed: kept in ``EvalResult.checkpoints`` and as ``es_after_<k>`` in the rows of those
    edits. The metrics gain the final ``retention_*`` scores.

    The probes of one edit (x_e, x'_e, x_loc and the ROME comparisons) share one forward pass before and one
    after the edit. The unedited model's probes are the same for every editor evaluated on this model and test
    set: with ``cache_pre`` they come from the keyed cache when an earlier evaluation stored them
    (:class:`PreEditProbes`; bit-identical to computing them). ``digest``: the current weights'
    :func:`~bench.models.weights_digest` when the caller has it (computed here otherwise).

    With ``generation`` (causal models, kinds that are asked) every edit is also scored by the generation
    protocol (``bench.answers``: the edited model's free answers to x_e, x'_e and x_loc, ``question_template``
    the card's), its unedited answers cached like the probes; ``gen_time_s`` is its share of the time."""
    if edit_batch_size < 1:
        raise ValueError(f"edit_batch_size must be >= 1, got {edit_batch_size}")
    if mode not in EDIT_MODES:
        raise ValueError(f"mode must be one of {', '.join(EDIT_MODES)}, got {mode!r}")
    # Every edit's memory measurement starts with a full garbage collection (PeakMemory). The objects alive now
    # (model, libraries: ~500k) outlive the loop, so they are frozen out of the collector's view for its length:
    # 0.3 s -> ~0.01 s per collection on SmolLM2, while garbage made during the loop is still collected. A caller
    # that froze objects itself (the test suite) keeps its freeze.
    ours = gc.get_freeze_count() == 0
    if ours:
        gc.collect()
        gc.freeze()
    try:
        return _evaluate(editor, model, records, edit_batch_size, rome_neighbourhood, progress, mode, checkpoints,
                         digest, cache_pre, question_template, generation)
    finally:
        if ours:
            gc.unfreeze()


def _known(recs: Sequence[EditRecord]) -> list[int]:
    """Indices of the records whose true answer is known, where their task kind compares against it (the ROME
    comparisons; never for classification)."""
    compares = kind_of(recs).compares_true_answer
    return [i for i, r in enumerate(recs) if r.true_answer is not None and compares]


def _probe_groups(recs: Sequence[EditRecord], rome_neighbourhood: bool
                  ) -> dict[str, tuple[list[str], list[Any], bool]]:
    """The (prompts, targets, space) groups :func:`evaluate` probes for one edit batch: x_e, x'_e and x_loc, and
    for the records :func:`_known` names the ROME comparisons (``true_e``, ``true_q``, CounterFact's ``nb_new``)."""
    kind = kind_of(recs)
    tgt = kind.targets(recs)
    known = _known(recs)
    sp = kind.spaced  # generated continuations (Wikitext) are kept verbatim, as edit_batch tokenises them
    return {
        "edit": ([r.prompt for r in recs], tgt, sp),
        "equiv": ([r.equiv_prompt for r in recs], tgt, sp),
        "loc": ([r.loc_prompt for r in recs], kind.loc_targets(recs), True),
        "true_e": ([recs[i].prompt for i in known], [recs[i].true_answer for i in known], True),
        "true_q": ([recs[i].equiv_prompt for i in known], [recs[i].true_answer for i in known], True),
        "nb_new": ([recs[i].loc_prompt for i in known] if rome_neighbourhood else [],
                   [recs[i].target for i in known] if rome_neighbourhood else [], True),
    }


def _timed_edit(editor: EditorLike, model: EditableModel, batch: EditBatch, on: Any) -> tuple[Any, float, float]:
    """``editor.edit(batch)`` computed on the model with the edit ``on`` applied (sequential mode; ``None``: the
    unedited model), with its wall time (seconds) and peak memory (MB)."""
    with PeakMemory(model.device) as mem:
        t0 = time.perf_counter()
        if on is not None:
            with model.applying(on.changes):  # the edit is computed on the model as already edited
                edit = editor.edit(batch)
        else:
            edit = editor.edit(batch)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    return edit, dt, mem.mb


def _rome_scores(post: dict[str, tuple[torch.Tensor, torch.Tensor]], n: int, known: list[int],
                 rome_neighbourhood: bool) -> dict[str, list[float]]:
    """Per record of a batch of ``n``, the ROME-style comparisons after the edit where the true answer is
    ``known`` (NaN elsewhere): p(new) on x_e, efficacy p(new) > p(true) on x_e, paraphrase the same on x'_e and,
    with ``rome_neighbourhood``, neighbourhood p(true) > p(new) on x_loc."""
    if not known:
        return {}
    lp = {k: seq_logprob(*post[k]).tolist() for k in post}
    names = ["efficacy", "paraphrase", "p_new"] + (["neighbourhood"] if rome_neighbourhood else [])
    out = {k: [float("nan")] * n for k in names}
    for j, i in enumerate(known):
        out["p_new"][i] = math.exp(lp["edit"][i])
        out["efficacy"][i] = float(lp["edit"][i] > lp["true_e"][j])
        out["paraphrase"][i] = float(lp["equiv"][i] > lp["true_q"][j])
        if rome_neighbourhood:
            out["neighbourhood"][i] = float(lp["loc"][i] > lp["nb_new"][j])
    return out


def _batch_rows(recs: list[EditRecord], batch: int, post: dict[str, tuple[torch.Tensor, torch.Tensor]],
                pre: tuple[torch.Tensor, torch.Tensor, torch.Tensor], cost: dict[str, float],
                rome: dict[str, list[float]]) -> list[dict[str, Any]]:
    """The per-edit rows of one edit batch: the scores after the edit (``post`` probes) against the unedited
    model's (``pre``: x'_e exact match, locality logits and labels), the edit's ``cost`` and the ROME scores."""
    pre_q_exact, pre_loc, loc_labels = pre
    e_exact, e_tok = argmax_scores(*post["edit"])
    q_exact, q_tok = argmax_scores(*post["equiv"])
    pre_loc_exact, _ = argmax_scores(pre_loc, loc_labels)
    post_loc_exact, _ = argmax_scores(*post["loc"])
    post_loc = post["loc"][0]
    ans_mask = loc_labels != -100
    agree = argmax_agreement(pre_loc, post_loc, ans_mask)
    kl = per_seq_kl(pre_loc, post_loc, ans_mask)
    extra = {**rome, **kind_of(recs).locality_scores(pre_loc, post_loc, loc_labels)}
    rows = []
    for i, r in enumerate(recs):
        rows.append({
            "case_id": r.case_id,
            "batch": batch,
            "prompt": r.prompt,
            "target": r.target if r.label is None else str(r.label),
            "has_rephrase": r.has_rephrase,
            "es": float(q_exact[i]),
            "es_pre": float(pre_q_exact[i]),
            "es_gain": float(q_exact[i]) - float(pre_q_exact[i]),
            "edit_acc": float(e_exact[i]),
            "token_acc_edit": float(e_tok[i]),
            "token_acc_rephrase": float(q_tok[i]),
            "loc_acc_pre": float(pre_loc_exact[i]),
            "loc_acc_post": float(post_loc_exact[i]),
            "loc_agree": float(agree[i]),
            "loc_kl": float(kl[i]),
            **cost,
            **{k: v[i] for k, v in extra.items()},
        })
    return rows


def _evaluate(editor: EditorLike, model: EditableModel, records: Sequence[EditRecord], edit_batch_size: int,
              rome_neighbourhood: bool, progress: Callable[[int, int], None] | None, mode: str,
              checkpoints: Sequence[int] | None, digest: str | None, cache_pre: bool, template: str | None,
              generation: bool) -> EvalResult:
    """:func:`evaluate`'s loop (arguments validated there)."""
    sequential = mode == "sequential"
    marks = checkpoint_schedule(len(records), checkpoints) if sequential else []
    done_marks: list[dict[str, float]] = []
    total: Any = None
    rows: list[dict[str, Any]] = []
    starts = list(range(0, len(records), edit_batch_size))
    all_groups = [_probe_groups(records[s : s + edit_batch_size], rome_neighbourhood) for s in starts]
    if cache_pre and digest is None:  # both caches key on the weights: hashed once
        digest = weights_digest(model)
    pres = PreEditProbes(model, [{k: g[k] for k in ("equiv", "loc")} for g in all_groups], digest, cache_pre)
    pre_answers = (answers.PreAnswers(model, [records[s : s + edit_batch_size] for s in starts], template, digest,
                                      cache_pre) if generation else None)
    gen_s = 0.0
    for b, start in enumerate(starts):
        recs = list(records[start : start + edit_batch_size])
        pre = pres.get(b)
        edit, dt, mb = _timed_edit(editor, model, edit_batch(model, recs), total if sequential else None)
        cost = {"edit_time_s": dt, "edit_steps": float(edit.steps), "edit_peak_mem_mb": mb}
        if sequential:
            total = edit.detach() if total is None else total + edit.detach()
            edit = total  # the rows score the model with every edit so far
        post = probes.probe(model, all_groups[b], edit.changes)
        new = _batch_rows(recs, b, post, pre, cost, _rome_scores(post, len(recs), _known(recs), rome_neighbourhood))
        if pre_answers is not None and pre_answers.asks[b]:
            t0 = time.perf_counter()
            said = answers.answer(model, recs, pre_answers.asks[b], edit.changes)
            for row, scored in zip(new, answers.scores(model, recs, pre_answers.get(b), said)):
                row.update(scored)
            gen_s += time.perf_counter() - t0
        for row in new if sequential else ():
            row["step"] = b + 1
        rows += new
        if sequential and any(len(rows) - len(recs) < k <= len(rows) for k in marks):
            scores, es_each = retention(model, records[: len(rows)], total.changes, template=template,
                                        generation=generation)
            size = change_size(dict(model.model.named_parameters()), total.changes)
            scores.update({f"retention_{k}": v for k, v in size.items()})
            gen_s += scores.pop("gen_time_s", 0.0)
            done_marks.append({"n_edits": float(len(rows)), **scores})
            for r, e in zip(rows, es_each):
                r[f"es_after_{len(rows)}"] = e
            log.info("sequential: after %d edits retention ES %.3f, loc_agree %.3f", len(rows),
                     scores["retention_es"], scores["retention_loc_agree"])
        if progress:
            progress(len(rows), len(records))
    if pres.save():
        log.info("pre-edit probes of %d batches cached for the next evaluation on this model and test set",
                 len(starts))
    metrics = aggregate(rows)
    if pre_answers is not None and any(pre_answers.asks):
        metrics["gen_time_s"] = gen_s
    if done_marks:
        metrics.update({k: v for k, v in done_marks[-1].items() if k != "n_edits"})
    return EvalResult(rows, metrics, done_marks)


def aggregate(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Means of every per-edit metric (with ``_ci95`` for the quality metrics) and the edit count.

    ``edit_time_s`` and ``edit_peak_mem_mb`` are averaged per edit call (batch), not per request.
    """
    out: dict[str, float] = {"n_edits": float(len(rows))}
    if not rows:
        return out
    per_batch = {r["batch"]: r for r in rows}
    for key in STYLES:
        if key in ("edit_time_s", "edit_peak_mem_mb", "edit_steps"):
            vals = [r[key] for r in per_batch.values()]
        else:
            vals = [r[key] for r in rows if key in r]
        if not vals:
            continue
        m, ci = mean_ci(vals)
        if math.isnan(m):
            continue
        out[key] = m
        if key in WITH_CI:
            out[f"{key}_ci95"] = ci
    for flag, name in ((True, "es_with_rephrase"), (False, "es_without_rephrase")):
        vals = [r["es"] for r in rows if r["has_rephrase"] is flag]
        if vals:
            out[name] = mean_ci(vals)[0]
            out[f"n_{name}"] = float(len(vals))
    return out
