"""Evaluation of an editor on test edits: per-edit rows and aggregates, each metric labelled by its style.

- MEND style: ``es`` (edit success: every target token is the teacher-forced argmax on the equivalence input),
  ``edit_acc`` (the same on x_e), ``loc_acc_pre``/``loc_acc_post`` (exact match of the locality answer before and
  after) and ``drawdown`` = pre - post; generation tasks use relative perplexity increase instead.
- EasyEdit style: token-level accuracy ``token_acc_edit`` (reliability), ``token_acc_rephrase`` (generalisation),
  ``loc_agree`` (share of locality answer tokens whose post-edit argmax equals the pre-edit one).
- ROME style, where the true answer is known: ``efficacy`` p(new) > p(true) on x_e, ``paraphrase`` the same on
  x'_e, ``neighbourhood`` p(true) > p(new) on x_loc (CounterFact).
- Cost: ``edit_time_s``, ``edit_steps``, ``edit_peak_mem_mb`` (CUDA: max_memory_allocated above the start;
  CPU: resident high-water mark above the start, reset before each edit).

Means come with 95% confidence intervals over edits (normal approximation, 1.96 standard errors).
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from bench.data import EditRecord, collate, edit_batch, equiv_batch, loc_batch
from bench.losses import argmax_agreement, argmax_scores, per_seq_kl, seq_logprob
from bench.models import EditableModel

log = logging.getLogger(__name__)

# Aggregated metric -> style label (logged as MLflow tags and shown in reports).
STYLES: dict[str, str] = {
    "es": "mend", "edit_acc": "mend", "loc_acc_pre": "mend", "loc_acc_post": "mend", "drawdown": "mend",
    "es_pre": "mend",
    "token_acc_edit": "easyedit", "token_acc_rephrase": "easyedit", "loc_agree": "easyedit", "loc_kl": "easyedit",
    "efficacy": "rome", "paraphrase": "rome", "neighbourhood": "rome",
    "edit_time_s": "cost", "edit_steps": "cost", "edit_peak_mem_mb": "cost",
}
# Aggregates that get a `<name>_ci95` half-width.
WITH_CI = ("es", "edit_acc", "drawdown", "token_acc_edit", "token_acc_rephrase", "loc_agree", "loc_kl",
           "efficacy", "paraphrase", "neighbourhood")


def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{key}:\s+(\d+)", f.read(), re.M)
    return int(m.group(1)) if m else 0


class PeakMemory:
    """Context manager measuring peak memory in MB above the level at entry.

    CUDA: ``torch.cuda.max_memory_allocated`` after resetting the peak. CPU: the process's resident high-water
    mark (VmHWM), reset at entry by writing 5 to /proc/self/clear_refs (Linux >= 4.0); where that is not
    possible it falls back to ``ru_maxrss`` and the value is an upper bound (``exact`` is False).
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.cuda = torch.device(device).type == "cuda" if device is not None else False
        self.mb = 0.0
        self.exact = True

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = _proc_status_kb("VmRSS") * 1024
        except OSError:
            self.exact = False
            self.base = _proc_status_kb("VmRSS") * 1024
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        elif self.exact:
            peak = _proc_status_kb("VmHWM") * 1024
        else:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.mb = max(0.0, (peak - self.base) / 2**20)


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


@dataclass
class EvalResult:
    """Per-edit rows (one dict per test edit) and the aggregated metrics."""

    rows: list[dict[str, Any]]
    metrics: dict[str, float]


@torch.no_grad()
def _scores(model: EditableModel, batch: EditBatch, deltas: dict | None) -> tuple[torch.Tensor, ...]:
    logits = model.logits(batch.inputs, deltas)
    exact, tok = argmax_scores(logits, batch.labels)
    return logits, exact, tok


@torch.no_grad()
def base_correct(model: EditableModel, pairs: Sequence[tuple[str, str]], batch_size: int = 32) -> list[bool]:
    """Whether the unedited model's teacher-forced argmax gives every answer token, per (prompt, answer)."""
    out: list[bool] = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        _, exact, _ = _scores(model, collate(model, [p for p, _ in chunk], [a for _, a in chunk]), None)
        out.extend(bool(x) for x in exact.tolist())
    return out


def evaluate(
    editor: Any,
    model: EditableModel,
    records: Sequence[EditRecord],
    edit_batch_size: int = 1,
    rome_neighbourhood: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> EvalResult:
    """Edit the model once per batch of ``edit_batch_size`` test records (from the unedited model each time) and
    score every record of the batch. ``editor`` is any object with ``edit(EditBatch) -> Edit``."""
    if edit_batch_size < 1:
        raise ValueError(f"edit_batch_size must be >= 1, got {edit_batch_size}")
    rows: list[dict[str, Any]] = []
    classifier = model.kind == "classifier"
    for start in range(0, len(records), edit_batch_size):
        recs = list(records[start : start + edit_batch_size])
        eb, qb, lb = edit_batch(model, recs), equiv_batch(model, recs), loc_batch(model, recs)
        pre_loc, pre_loc_exact, _ = _scores(model, lb, None)
        _, pre_q_exact, _ = _scores(model, qb, None)
        with PeakMemory(model.device) as mem:
            t0 = time.perf_counter()
            edit = editor.edit(eb)
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
        d = edit.deltas
        post_e, e_exact, e_tok = _scores(model, eb, d)
        post_q, q_exact, q_tok = _scores(model, qb, d)
        post_loc, post_loc_exact, _ = _scores(model, lb, d)
        ans_mask = lb.labels != -100
        agree = argmax_agreement(pre_loc, post_loc, ans_mask)
        kl = per_seq_kl(pre_loc, post_loc, ans_mask)
        rome: dict[str, torch.Tensor] = {}
        known = [r.true_answer is not None and not classifier for r in recs]
        if any(known):
            with torch.no_grad():
                idx = [i for i, k in enumerate(known) if k]
                sub = [recs[i] for i in idx]
                trues = [r.true_answer or "" for r in sub]
                lp_new_e = seq_logprob(post_e, eb.labels)[idx]
                lp_new_q = seq_logprob(post_q, qb.labels)[idx]
                tb_e = collate(model, [r.prompt for r in sub], trues)
                tb_q = collate(model, [r.equiv_prompt for r in sub], trues)
                lp_true_e = seq_logprob(model.logits(tb_e.inputs, d), tb_e.labels)
                lp_true_q = seq_logprob(model.logits(tb_q.inputs, d), tb_q.labels)
                rome["efficacy"] = torch.zeros(len(recs)).fill_(float("nan"))
                rome["paraphrase"] = torch.zeros(len(recs)).fill_(float("nan"))
                rome["efficacy"][idx] = (lp_new_e > lp_true_e).float().cpu()
                rome["paraphrase"][idx] = (lp_new_q > lp_true_q).float().cpu()
                if rome_neighbourhood:
                    nb_new = collate(model, [r.loc_prompt for r in sub], [r.target for r in sub])
                    lp_nb_new = seq_logprob(model.logits(nb_new.inputs, d), nb_new.labels)
                    lp_nb_true = seq_logprob(post_loc, lb.labels)[idx]
                    rome["neighbourhood"] = torch.zeros(len(recs)).fill_(float("nan"))
                    rome["neighbourhood"][idx] = (lp_nb_true > lp_nb_new).float().cpu()
        for i, r in enumerate(recs):
            row: dict[str, Any] = {
                "case_id": r.case_id,
                "batch": start // edit_batch_size,
                "prompt": r.prompt,
                "target": r.target if r.label is None else str(r.label),
                "has_rephrase": r.has_rephrase,
                "es": float(q_exact[i]),
                "es_pre": float(pre_q_exact[i]),
                "edit_acc": float(e_exact[i]),
                "token_acc_edit": float(e_tok[i]),
                "token_acc_rephrase": float(q_tok[i]),
                "loc_acc_pre": float(pre_loc_exact[i]),
                "loc_acc_post": float(post_loc_exact[i]),
                "drawdown": float(pre_loc_exact[i]) - float(post_loc_exact[i]),
                "loc_agree": float(agree[i]),
                "loc_kl": float(kl[i]),
                "edit_time_s": dt,
                "edit_steps": float(edit.steps),
                "edit_peak_mem_mb": mem.mb,
            }
            for k, v in rome.items():
                row[k] = float(v[i])
            rows.append(row)
        if progress:
            progress(len(rows), len(records))
    return EvalResult(rows, aggregate(rows))


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
