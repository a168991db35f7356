"""The one declaration of every metric a trial logs: name, style, better direction, whether it has a 95% CI, what
it is a mean over, whether every trial run must carry it and whether the printed summary shows it.

``bench.metrics`` (aggregation, ``style.*`` tags), ``bench.trial`` (the required set) and ``bench.run`` (the
summary's columns) derive from :data:`METRICS`; the run params read back are :class:`Param`; tag names live in
``bench.tracking``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Style = Literal["mend", "easyedit", "rome", "generation", "cost", "sequential", "training"]

#: How a number was obtained; numbers of different protocols are never pooled, ranked or compared. A task kind may
#: rename one for its tasks (a classifier's teacher-forced label is its free answer: ``classifier``).
PROTOCOLS: dict[str, str] = {
    "teacher-forced": "the gold target is fed; its tokens are checked against the argmax (or their probability)",
    "probability": "the probabilities of two answers compared (ROME's scores)",
    "classifier": "the predicted label: a classifier's free answer",
    "generation": "the edited model answers freely and its whole answer is scored",
    "cost": "time and memory",
}
#: The protocol of each style's metrics.
STYLE_PROTOCOL: dict[str, str] = {"mend": "teacher-forced", "easyedit": "teacher-forced",
                                  "sequential": "teacher-forced", "training": "teacher-forced",
                                  "rome": "probability", "generation": "generation", "cost": "cost"}


@dataclass(frozen=True)
class Metric:
    """One logged metric. ``per``: ``edit`` (mean over test edits), ``batch`` (mean over edit calls), ``run`` (one
    value per trial); ``higher``: True when higher is better, False when lower is, None when neither."""

    name: str
    style: Style
    higher: bool | None
    ci: bool = False
    per: Literal["edit", "batch", "run"] = "edit"
    required: bool = False
    summary: bool = False
    description: str = ""
    #: the metric of another protocol this one answers to (shown beside it, never pooled with it)
    pair: str = ""
    #: the protocol where it is not the style's (retention under the generation protocol)
    proto: str = ""

    @property
    def protocol(self) -> str:
        """How the number is obtained (:data:`PROTOCOLS`): ``proto``, else as its style implies."""
        return self.proto or STYLE_PROTOCOL[self.style]


METRICS: tuple[Metric, ...] = (
    Metric("es", "mend", True, ci=True, required=True, summary=True,
           description="edit success: every target token is the argmax on x'_e"),
    Metric("edit_acc", "mend", True, ci=True, required=True, summary=True, description="the same on x_e"),
    Metric("loc_acc_pre", "mend", None, required=True, description="locality answer exact match before the edit"),
    Metric("loc_acc_post", "mend", True, required=True, description="... after the edit"),
    Metric("drawdown", "mend", False, ci=True, required=True, summary=True,
           description="loc_acc_pre - loc_acc_post (generation: ppl_post / ppl_pre - 1)"),
    Metric("es_pre", "mend", None, description="ES of the unedited model"),
    Metric("es_gain", "mend", True, ci=True, summary=True,
           description="es - es_pre on the same edit: what the edit added over the unedited model (0: no edit)"),
    Metric("ppl_pre", "mend", None, description="locality passage perplexity before (generation)"),
    Metric("ppl_post", "mend", False, description="... after (generation)"),
    Metric("token_acc_edit", "easyedit", True, ci=True, description="token accuracy on x_e (reliability)"),
    Metric("token_acc_rephrase", "easyedit", True, ci=True, required=True,
           description="token accuracy on x'_e (generalisation)"),
    Metric("loc_agree", "easyedit", True, ci=True, required=True, summary=True,
           description="locality answer tokens whose argmax is unchanged"),
    Metric("loc_kl", "easyedit", False, ci=True, required=True, summary=True,
           description="KL(pre || post) on the locality answer tokens"),
    Metric("efficacy", "rome", True, ci=True, description="p(new) > p(true) on x_e"),
    Metric("paraphrase", "rome", True, ci=True, description="p(new) > p(true) on x'_e"),
    Metric("neighbourhood", "rome", True, ci=True, description="p(true) > p(new) on x_loc"),
    Metric("p_new", "rome", True, ci=True, description="probability of the whole new target on x_e after the edit "
                                                        "(where the true answer is known)"),
    Metric("gen_edit_em", "generation", True, ci=True, summary=True, pair="edit_acc",
           description="the free answer to x_e (question form) is y_e: normalised exact match"),
    Metric("gen_edit_contains", "generation", True, ci=True, description="... contains y_e (whole words)"),
    Metric("gen_edit_em_pre", "generation", None, description="... before the edit"),
    Metric("gen_edit_plain_em", "generation", True, ci=True,
           description="x_e continued as it is (no question form) gives y_e: exact match"),
    Metric("gen_edit_plain_contains", "generation", True, ci=True, description="... contains y_e"),
    Metric("gen_rephrase_em", "generation", True, ci=True, summary=True, pair="es",
           description="the free answer to x'_e is y_e: exact match"),
    Metric("gen_rephrase_contains", "generation", True, ci=True, description="... contains y_e"),
    Metric("gen_loc_agree", "generation", True, ci=True, summary=True, pair="loc_agree",
           description="the free locality answer after the edit is the unedited model's (normalised)"),
    Metric("gen_loc_em_pre", "generation", None, description="free locality answer is the gold answer, before"),
    Metric("gen_loc_em_post", "generation", True, description="... after the edit"),
    Metric("gen_prefix", "generation", True, ci=True, pair="token_acc_edit",
           description="continuations: share of y_e's tokens reproduced before the first wrong one"),
    Metric("edit_time_s", "cost", False, per="batch", required=True, summary=True, description="seconds per edit call"),
    Metric("edit_steps", "cost", False, per="batch", required=True, description="optimiser steps per edit call"),
    Metric("edit_peak_mem_mb", "cost", False, per="batch", required=True, summary=True,
           description="peak memory of an edit call above its start"),
    Metric("retention_es", "sequential", True, per="run", summary=True,
           description="sequential: ES on every edit made so far, at a checkpoint"),
    Metric("retention_edit_acc", "sequential", True, per="run", description="... edit accuracy"),
    Metric("retention_loc_agree", "sequential", True, per="run", description="... locality agreement with the original"),
    Metric("retention_loc_kl", "sequential", False, per="run", description="... locality KL against the original"),
    Metric("retention_drawdown", "sequential", False, per="run", description="... drawdown against the original"),
    Metric("retention_delta_norm", "sequential", None, per="run",
           description="Frobenius norm of the accumulated weight change (adaptors: what they amount to as weights)"),
    Metric("retention_delta_rel", "sequential", None, per="run",
           description="... of the weight deltas over the norm of the original weights they change"),
    Metric("retention_adaptor_entries", "sequential", None, per="run",
           description="entries of the accumulated module adaptors (GRACE: codebook entries)"),
    Metric("retention_gen_edit_em", "sequential", True, per="run", proto="generation", pair="retention_edit_acc",
           description="... free answers to x_e that are y_e"),
    Metric("retention_gen_rephrase_em", "sequential", True, per="run", proto="generation", pair="retention_es",
           summary=True, description="... free answers to x'_e that are y_e"),
    Metric("retention_gen_loc_agree", "sequential", True, per="run", proto="generation",
           pair="retention_loc_agree", description="... free locality answers equal to the original model's"),
    Metric("train_time_s", "training", False, per="run", summary=True, description="editor training wall time"),
    Metric("train_val_time_s", "training", False, per="run", description="... of it, time spent validating"),
    Metric("prepare_time_s", "cost", False, per="run",
           description="loading data and model, generating targets, choosing locality prompts"),
    Metric("eval_time_s", "cost", False, per="run", description="editing and scoring every test edit"),
    Metric("gen_time_s", "cost", False, per="run",
           description="... of it, the generation protocol (the unedited answers too, unless cached)"),
)

BY_NAME: dict[str, Metric] = {m.name: m for m in METRICS}
#: Per-edit metrics aggregated by ``bench.metrics.aggregate`` (name -> style; logged as ``style.<name>`` tags).
STYLES: dict[str, str] = {m.name: m.style for m in METRICS if m.per in ("edit", "batch")}
#: Aggregates that get a ``<name>_ci95`` half-width.
WITH_CI: tuple[str, ...] = tuple(m.name for m in METRICS if m.ci)
#: Every trial's run carries at least these, with the CI half-widths of those that have one (others may be added).
REQUIRED: tuple[str, ...] = tuple(m.name for m in METRICS if m.required) + tuple(
    f"{m.name}_ci95" for m in METRICS if m.required and m.ci)
#: Metrics paired with another protocol's, by the metric they answer to.
PAIRED: dict[str, str] = {m.pair: m.name for m in METRICS if m.pair}


def _summary() -> tuple[str, ...]:
    """The summary's columns: each summary metric (ES and its gain with their CIs) followed by the summary
    metric of another protocol paired with it (ES's free-answer counterpart beside ES), never in place of it."""
    shown = {m.name for m in METRICS if m.summary}
    out: list[str] = []
    for m in METRICS:
        if not m.summary or (m.pair and m.pair in shown):
            continue
        out += [m.name, f"{m.name}_ci95"] if m.name in ("es", "es_gain") else [m.name]
        twin = PAIRED.get(m.name)
        if twin in shown:
            out += [twin, f"{twin}_ci95"] if m.name == "es" else [twin]
    return tuple(out)


#: Metrics shown in ``bench.run``'s printed summary, in this order.
SUMMARY: tuple[str, ...] = _summary()


class Param:
    """The MLflow params of a trial run that are read back (the report, the printed summary, ``bench.edit``),
    declared once: ``bench.trial`` writes them under these names. Nested values are flattened with dots
    (``hparams.lr``, ``budget.max_steps``); :meth:`col` is a param's column in ``bench.tracking.runs_frame``."""

    METHOD = "method"  #: the method's label in the sweep (its registered name unless ``label`` is set)
    METHOD_CLASS = "method_class"  #: the registered editor (``methods.REGISTRY``)
    MODEL = "model"
    DATASET = "dataset"
    N_EDITS = "n_edits"
    EDIT_BATCH_SIZE = "edit_batch_size"
    EDIT_MODE = "edit_mode"
    SEED = "seed"
    HPARAMS = "hparams"  #: prefix: ``hparams.<key>``
    BUDGET = "budget"  #: prefix: ``budget.<key>``
    REUSE_CONVERGED = "reuse_converged"
    LOCALITY = "locality"
    EDIT_PARAMS = "edit_params"  #: the weights the editor edits, comma-separated
    MODEL_PARAMS = "model_params"  #: the model's parameter count
    BASE_MODEL_PATH = "base_model.path"  #: a prepared base model (FEVER's classifier) the trial edited
    N_TEST = "data.n_test"

    @staticmethod
    def col(name: str) -> str:
        """The column of param ``name`` in a runs frame (``p.<name>``)."""
        return f"p.{name}"


def metrics_table() -> str:
    """The metric schema as the Markdown table ``docs/metrics.md`` shows (a test keeps the page equal to it;
    ``python -m bench.schema`` prints it)."""
    better = {True: "higher", False: "lower", None: "-"}
    rows = ["| metric | style | protocol | better | 95% CI | mean over | in every run | description |",
            "|---|---|---|---|---|---|---|---|"]
    for m in METRICS:
        rows.append(f"| `{m.name}` | {m.style} | {m.protocol} | {better[m.higher]} | {'yes' if m.ci else ''} | "
                    f"{m.per} | "
                    f"{'yes' if m.required else ''} | {m.description.replace('|', '/')} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(metrics_table())
