"""The report's tables, each ``(header, rows, note)`` from the runs: results (Tables 3/4), the protocols side by
side, ROME-style scores, batch size (Table 5), cost, retention, training and tuning.

Numbers of different protocols (``bench.schema.PROTOCOLS``) sit side by side, each with its own CI; nothing pools,
ranks or bolds across them (the bold best ES is teacher-forced ES against teacher-forced ES)."""

from __future__ import annotations

import json
import math
from typing import Any, Mapping

from bench.report.runs import (BUDGET_MARK, UNTRAINED_MARK, Marks, cell_runs, chosen_sample, gain, glossary, num,
                               pm, pooled)
from bench.schema import PAIRED, Param
from bench.tracking import (END_REASON_TAG, FIT_KEPT_INITIAL_TAG, FIT_SELECT_TAG, FIT_STOP_TAG, POINT_DIGEST_TAG,
                            REUSE_TAG, SAMPLED_TAG, TRAINED_FROM_TAG)
from methods.base import BUDGET_LIMITED


def table_results(df: Any) -> tuple[list[str], list[list[str]], str]:
    """Table 3/4 style at the smallest batch size of each column."""
    cols = sorted({(r["dataset"], r["model"]) for r in df.select("dataset", "model").to_dicts()})
    methods = sorted(df["method"].unique().to_list())
    best: dict[tuple, str] = {}
    cells: dict[tuple, tuple[float, str]] = {}
    marks = Marks()
    for ds, model in cols:
        bs = int(df.filter((df["dataset"] == ds) & (df["model"] == model))["bs"].min())
        for m in methods:
            runs = cell_runs(df, method=m, dataset=ds, model=model, bs=bs)
            if not runs:
                continue
            es, es_ci, n = pooled(runs, "es")
            dd, dd_ci, _ = pooled(runs, "drawdown")
            agree, _, _ = pooled(runs, "loc_agree")
            text = (f"ES {pm(es, es_ci)}{free(runs, 'es')}; gain {gain(runs)}; DD {pm(dd, dd_ci)}; agree {agree:.3f}"
                    f"{free(runs, 'loc_agree')} (n={n})")
            cells[(m, ds, model)] = (es, text + marks.of(runs))
        col_cells = [(es, m) for (m, d, mo), (es, _) in cells.items() if (d, mo) == (ds, model) and not math.isnan(es)]
        if col_cells:
            best[(ds, model)] = max(col_cells)[1]
    header = ["editor"] + [f"{ds} / {model}" for ds, model in cols]
    rows = []
    for m in methods:
        row = [m]
        for ds, model in cols:
            c = cells.get((m, ds, model))
            text = "-" if c is None else c[1]
            row.append(f"**{text}**" if best.get((ds, model)) == m and c else text)
        rows.append(row)
    note = ("ES = edit success on the equivalence input (MEND style); gain = ES minus the unedited model's ES on the "
            "same edits (0 = the editor changed nothing; FEVER's labels already hold for about half the claims); "
            "DD = drawdown (QA and classification: locality "
            "accuracy before minus after; generation: relative perplexity increase on locality passages, "
            "ppl_after / ppl_before - 1); agree = share of locality answer tokens whose argmax is unchanged; "
            "mean ± 95% CI over n edits; bold = best ES in the column; smallest edit batch size of each column. "
            + FREE_NOTE + marks.footnote())
    return header, rows, note


#: What "free" means wherever a table shows it.
FREE_NOTE = ("(free ...) = the same question under the generation protocol: the edited model answers x'_e (for agree: "
             "the locality input) freely and its whole answer is scored (exact match; agreement with the unedited "
             "model's answer), a different protocol, never pooled or ranked with the teacher-forced number.")


def free(runs: list[dict], key: str, digits: int = 3) -> str:
    """`` (free m ± ci)``: the generation-protocol metric paired with ``key`` (``bench.schema.PAIRED``) over
    ``runs``, or "" where the runs have none (the protocol off, a classifier, runs logged before it)."""
    twin = PAIRED.get(key)
    if twin is None:
        return ""
    m, ci, _ = pooled(runs, twin)
    return "" if math.isnan(m) else f" (free {pm(m, ci, digits)})"


def smallest_batch_cells(df: Any) -> list[tuple[str, str, str, list[dict]]]:
    """(dataset, model, editor, runs) for every editor of every dataset / model, at that column's smallest edit
    batch size, sorted."""
    out = []
    for ds, model, m in sorted({(r["dataset"], r["model"], r["method"])
                                for r in df.select("dataset", "model", "method").to_dicts()}):
        bs = int(df.filter((df["dataset"] == ds) & (df["model"] == model))["bs"].min())
        out.append((ds, model, m, cell_runs(df, method=m, dataset=ds, model=model, bs=bs)))
    return out


def table_protocols(df: Any) -> tuple[list[str], list[list[str]], str]:
    """The teacher-forced and generation protocols side by side, per dataset / model and editor at the smallest
    batch size: ES and the free answer's exact match on x'_e with the gap between them, edit accuracy and the
    free answers on x_e (question form, plain continuation, contained), locality agreement under each. Empty
    when no run has the generation protocol."""
    header = ["dataset / model", "editor", "ES (x'_e)", "free EM (x'_e)", "gap", "edit acc (x_e)",
              "free EM (x_e)", "free EM (x_e, plain)", "free contains (x_e)", "free contains (x_e, plain)",
              "loc agree", "free loc agree", "free EM before (x_e)"]
    rows = []
    marks = Marks()
    for ds, model, m, runs in smallest_batch_cells(df):
        free_es = pooled(runs, "gen_rephrase_em")[0]
        if math.isnan(free_es):
            continue
        es = pooled(runs, "es")[0]
        cells = [pm(*pooled(runs, k)[:2]) for k in ("es", "gen_rephrase_em")]
        cells.append(f"{es - free_es:+.3f}" if not math.isnan(es) else "-")
        cells += [pm(*pooled(runs, k)[:2]) for k in ("edit_acc", "gen_edit_em", "gen_edit_plain_em",
                                                     "gen_edit_contains", "gen_edit_plain_contains", "loc_agree",
                                                     "gen_loc_agree")]
        cells.append(pm(pooled(runs, "gen_edit_em_pre")[0], float("nan")))
        rows.append([f"{ds} / {model}", m + marks.of(runs), *cells])
    return header, rows, ("Teacher-forced (ES, edit acc, loc agree: the gold target fed, every token the argmax) "
                          "beside the generation protocol (free: the edited model answers by itself, greedy, stopping "
                          "at EOS, '.' or a new line or at the target's tokens + 5; scored on the whole answer after "
                          "SQuAD normalisation). x_e and x'_e are asked in the card's question template inside the "
                          "chat template where the model has one; plain = x_e continued as it is; contains = the "
                          "answer holds y_e as whole words. gap = ES - free EM on x'_e: what teacher forcing adds. free EM before = the unedited model's. Mean ± 95% CI."
                          + marks.footnote())


def table_rome(df: Any) -> tuple[list[str], list[list[str]], str]:
    """ROME-style scores (efficacy, paraphrase, neighbourhood, mean p(new)) beside the MEND-style ES, per editor and
    dataset / model, at the smallest batch size, for the tasks that have ROME's neighbourhood score
    (CounterFact); empty when no run has it ("-" for p(new) in runs logged before it existed)."""
    keys = ("efficacy", "paraphrase", "neighbourhood", "p_new")
    header = ["dataset / model", "editor", "efficacy", "paraphrase", "neighbourhood", "p(new)", "ES (MEND)",
              "ES gain"]
    rows = []
    marks = Marks()
    for ds, model, m, runs in smallest_batch_cells(df):
        if not any(r.get("neighbourhood") is not None for r in runs):
            continue
        cells = [pm(*pooled(runs, k)[:2]) for k in (*keys, "es")]
        rows.append([f"{ds} / {model}", m + marks.of(runs), *cells, gain(runs)])
    return header, rows, ("ROME style (Meng et al. 2022), where the true answer is known (CounterFact): "
                          + glossary(*keys) + "; ES (MEND) = " + glossary("es").split(" = ", 1)[1]
                          + ", for comparison; ES gain = " + glossary("es_gain").split(" = ", 1)[1]
                          + "; mean ± 95% CI." + marks.footnote())


def table_batch(df: Any) -> tuple[list[str], list[list[str]], str]:
    """Table 5 style: ES / drawdown per editor and edit batch size, per dataset / model."""
    sizes = sorted(df["bs"].unique().to_list())
    header = ["dataset / model", "editor"] + [f"B={b}" for b in sizes]
    rows = []
    marks = Marks()
    for key in sorted({(r["dataset"], r["model"], r["method"]) for r in df.select("dataset", "model", "method").to_dicts()}):
        ds, model, m = key
        row = [f"{ds} / {model}", m]
        for b in sizes:
            runs = cell_runs(df, method=m, dataset=ds, model=model, bs=b)
            if not runs:
                row.append("-")
                continue
            es, _, _ = pooled(runs, "es")
            gain, _, _ = pooled(runs, "es_gain")
            dd, _, _ = pooled(runs, "drawdown")
            gain_text = f" (gain {gain:+.3f})" if not math.isnan(gain) else ""
            free_es, _, _ = pooled(runs, "gen_rephrase_em")
            free_text = f" / free {free_es:.3f}" if not math.isnan(free_es) else ""
            row.append(f"ES {es:.3f}{gain_text} / DD {dd:.3f}{free_text}" + marks.of(runs))
        rows.append(row)
    return header, rows, ("Each batch is one edit call on B requests; ES and drawdown are over all B requests; gain "
                          "= ES minus the unedited model's ES on the same requests; free = the free answers' exact "
                          "match on x'_e (generation protocol), beside ES, not compared with it." + marks.footnote())


def table_cost(df: Any) -> tuple[list[str], list[list[str]], str]:
    header = ["editor", "model", "train time (s)", "train peak mem (MB)", "edit time (s)", "edit peak mem (MB)",
              "steps / edit", "evaluation (s)", "of it free answers (s)"]
    rows = []
    for key in sorted({(r["method"], r["model"]) for r in df.select("method", "model").to_dicts()}):
        runs = cell_runs(df, method=key[0], model=key[1])

        def mean(k: str, rs: list[dict] = runs) -> float:
            vals = [num(r, k) for r in rs if not math.isnan(num(r, k))]
            return sum(vals) / len(vals) if vals else float("nan")

        # A run that loaded an editor trained elsewhere did not train: its training is counted once, at its source.
        trained = [r for r in runs if not r.get(f"t.{TRAINED_FROM_TAG}")]
        rows.append([key[0], key[1], f"{mean('train_time_s', trained):.1f}", f"{mean('train_peak_mem_mb'):.0f}",
                     f"{mean('edit_time_s'):.3f}", f"{mean('edit_peak_mem_mb'):.0f}", f"{mean('edit_steps'):.2f}",
                     f"{mean('eval_time_s'):.0f}", f"{mean('gen_time_s'):.0f}".replace("nan", "-")])
    return header, rows, ("Means over runs (train time over the runs that trained: a run that loaded an editor "
                          "trained under the same training key is left out of it). Peak memory above the level at "
                          "the start of fit / edit (CUDA: max_memory_allocated; CPU: resident high-water mark). "
                          "Evaluation: editing and scoring every test edit; of it, the generation protocol's free "
                          "answers (the unedited model's too, where they were not cached yet).")


def table_retention(curves: dict[tuple[str, str, str], list[tuple[int, float, float, float]]],
                    unedited: Mapping[tuple[str, str, str], float] | None = None
                    ) -> tuple[list[str], list[list[str]], str]:
    """Sequential editing: ES on all edits so far after k edits, per editor, at every checkpoint (with the free
    answers' exact match on x'_e beside it where the run has the generation protocol), beside the unedited
    model's ES on the same test edits (``unedited``: (method, dataset, model) -> mean ``es_pre``)."""
    unedited = unedited or {}
    ks = sorted({p[0] for pts in curves.values() for p in pts})
    header = ["dataset / model", "editor", "unedited ES"] + [f"k={k}" for k in ks] + ["loc agree (last)"]
    rows = []
    for (m, ds, model), pts in sorted(curves.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        at = {p[0]: (f"{p[1]:.3f}" + ("" if math.isnan(p[3]) else f" (free {p[3]:.3f})")) for p in pts}
        pre = unedited.get((m, ds, model), float("nan"))
        rows.append([f"{ds} / {model}", m, "-" if math.isnan(pre) else f"{pre:.3f}"]
                    + [at.get(k, "-") for k in ks] + [f"{pts[-1][2]:.3f}"])
    return header, rows, ("Sequential editing: the test edits are applied one batch after another, each computed on "
                          "the model as already edited; k=N is ES (x'_e, MEND style) on ALL N edits made so far "
                          "(retention), after the N-th; unedited ES: the unedited model's ES on all the run's test "
                          "edits, the level that means no edit is left. loc agree: locality argmax agreement with the "
                          "ORIGINAL model after the last edit. (free ...): the free answers' exact match on x'_e over "
                          "the same edits (generation protocol), beside ES, never pooled with it.")


#: The lifelong table's columns: (header, checkpoint metric, format).
LIFELONG_COLUMNS = (("ES (x'_e)", "retention_es", ".3f"), ("edit acc (x_e)", "retention_edit_acc", ".3f"),
                    ("loc agree", "retention_loc_agree", ".3f"), ("free EM (x'_e)", "retention_gen_rephrase_em", ".3f"),
                    ("free EM (x_e)", "retention_gen_edit_em", ".3f"),
                    ("free loc agree", "retention_gen_loc_agree", ".3f"), ("||dW||", "retention_delta_norm", ".3g"),
                    ("||dW|| / ||W||", "retention_delta_rel", ".3g"), ("adaptor entries", "retention_adaptor_entries",
                                                                         ".0f"))


def table_lifelong(marks: Mapping[tuple[str, str, str], Mapping[int, Mapping[str, float]]]
                   ) -> tuple[list[str], list[list[str]], str]:
    """Sequential streams checkpoint by checkpoint: one row per (editor, task, edits so far) with every score on
    all edits so far and the size of the accumulated change."""
    header = ["dataset / model", "editor", "edits"] + [h for h, _, _ in LIFELONG_COLUMNS]
    rows = []
    for (m, ds, model), pts in sorted(marks.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        for k, v in pts.items():
            cells = ["-" if math.isnan(v.get(n, math.nan)) else format(v[n], f) for _, n, f in LIFELONG_COLUMNS]
            rows.append([f"{ds} / {model}", m, str(k)] + cells)
    return header, rows, ("Sequential streams at every checkpoint, on ALL edits made so far: ES and edit accuracy "
                          "(teacher-forced; edit accuracy on x_e is the lifelong papers' reliability, ES on x'_e "
                          "their generalisation), locality agreement with the ORIGINAL model, the same under the "
                          "generation protocol (free answers; '-' where the sweep turned it off), and the size of the "
                          "accumulated change: the Frobenius norm of all weight deltas (a side memory counts as its "
                          "distance from the weights it copies; GRACE's codebook changes no weight), relative to the "
                          "norm of the original weights changed, and the entries of module adaptors (GRACE: codebook "
                          "entries; WISE: side-memory shards).")


def table_training(runs: list[dict]) -> tuple[list[str], list[list[str]], str]:
    """One row per training of a learned editor: why the fit stopped (‡ when it kept its untrained state), its
    steps, the step of its chosen checkpoint and the selection that chose it, that checkpoint's validation ES and
    loss beside the untrained editor's validation ES (step 0), the training's wall time, and the run it was
    loaded from when the trial did not train."""
    header = ["editor", "dataset / model", "fit", "steps", "chosen step", "chosen by", "val ES", "val ES (step 0)",
              "val loss", "train time (s)", "loaded from"]
    rows = []
    for r in runs:
        why = r.get(f"t.{FIT_STOP_TAG}")
        src = r.get(f"t.{TRAINED_FROM_TAG}")
        t = num(r, "source_train_time_s") if src else num(r, "train_time_s")
        fit = f"budget-limited ({why}) {BUDGET_MARK}" if why in BUDGET_LIMITED else str(why)
        if r.get(f"t.{FIT_KEPT_INITIAL_TAG}"):
            fit += f" {UNTRAINED_MARK}"
        init = num(r, "init_val_es")
        rows.append([r["method"], f"{r['dataset']} / {r['model']}", fit,
                     f"{num(r, 'train_steps'):.0f}", f"{num(r, 'train_best_step'):.0f}",
                     (r.get(f"t.{FIT_SELECT_TAG}") or "val_loss (not recorded)").split(" (")[0],
                     f"{num(r, 'best_val_es'):.3f}", "-" if math.isnan(init) else f"{init:.3f}",
                     f"{num(r, 'best_val_loss'):.3f}", f"{t:.0f}",
                     f"{src[:12]} ({r.get(f't.{REUSE_TAG}') or 'training key'})" if src else "-"])
    return header, rows, (
        "Learned editors' trainings. fit: converged = the selection key did not improve for `patience` "
        "validations after improving on step 0; diverged = it never improved on step 0 (the editor kept its "
        f"untrained state {UNTRAINED_MARK}); budget-limited {BUDGET_MARK} = the step or time budget ended it first "
        f"(the editor is not finished; {UNTRAINED_MARK} when its best validation was still step 0's). chosen by: "
        "val_loss = the lowest c_edit * L_e + c_loc * L_loc (the authors' key), val_es = the highest validation ES "
        "above the budget's locality floor (budget `select` / `loc_floor`); chosen step: the checkpoint the editor "
        "keeps; val ES / loss: at that checkpoint; val ES (step 0): the untrained editor's. loaded from: the run "
        "whose training the trial reused (same training key, or the same editor trained to convergence), whose "
        "time is shown. Validation curves: training_curves.png.")


def table_tuning(runs: list[dict]) -> tuple[list[str], list[list[str]], str]:
    """One row per sample of every tuned grid point: the values drawn, whether it finished or the scheduler
    stopped it, its validation ES / loss (the fit's chosen checkpoint; for a stopped trial, its last validation),
    training steps, test ES and its gain over the unedited model; the chosen sample of each point in bold."""
    points: dict[str, list[dict]] = {}
    for r in runs:
        points.setdefault(r.get(f"t.{POINT_DIGEST_TAG}") or r["run_name"], []).append(r)
    header = ["editor / model / dataset", "sample", "status", "val ES", "val loss", "steps", "test ES", "test ES gain"]
    rows, chosen_by = [], []
    method, model, dataset = (Param.col(x) for x in (Param.METHOD, Param.MODEL, Param.DATASET))
    for _, rs in sorted(points.items(), key=lambda kv: (kv[1][0][method], kv[1][0][model], kv[1][0][dataset])):
        best, how = chosen_sample(rs)
        first = rs[0]
        where = f"{first[method]} / {first[model]} / {first[dataset]}"
        chosen_by.append(f"{first[method]}: {how}")
        for r in sorted(rs, key=lambda r: json.loads(r[f"t.{SAMPLED_TAG}"]).get("lr", 0.0)):
            drawn = json.loads(r[f"t.{SAMPLED_TAG}"])
            sample = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in drawn.items())
            done = r["status"] == "FINISHED"
            val_es = num(r, "best_val_es" if done else "val_es")
            val_loss = num(r, "best_val_loss" if done else "val_loss")
            why = r.get(f"t.{END_REASON_TAG}") or ""
            status = ("finished" if done else "stopped by the scheduler" if "scheduler" in why
                      else f"killed ({why})" if why else "killed")
            row = [where, sample, status,
                   "-" if math.isnan(val_es) else f"{val_es:.3f}", "-" if math.isnan(val_loss) else f"{val_loss:.3f}",
                   f"{num(r, 'train_steps'):.0f}" if done and r.get(f"t.{FIT_STOP_TAG}") not in (None, "untrained")
                   else "-",
                   pm(num(r, "es"), num(r, "es_ci95")) if done else "-",
                   pm(num(r, "es_gain"), num(r, "es_gain_ci95")) if done else "-"]
            rows.append([f"**{c}**" for c in row] if r is best else row)
    note = ("Each tuned grid point's samples (values drawn from the sweep's search spaces); bold = the chosen "
            "sample of its point, by " + "; ".join(chosen_by) + ". val ES / loss: the fit's chosen checkpoint "
            "(a stopped trial: its last validation). Editors without validation are compared on the test edits "
            "of this sweep: use a test set the tuned values are not then reported on.")
    return header, rows, note
