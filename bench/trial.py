"""One grid point end to end: load model and data, build and fit the editor, evaluate, log one MLflow run.

:func:`run_trial` knows nothing of Ray: ``bench.run`` calls it inside a Tune trial and passes ``report`` (Tune's
report function); tests call it directly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import gc
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from bench import progress, tracking
from bench.cache import cache_root
from bench.config import TrialSpec
from bench.data import apply_locality, load_card, load_task, task_kind
from bench.memory import PeakMemory, keep_freed_memory
from bench.metrics import evaluate
from bench.models import load_model
from bench.prepare import generation_targets, prepare_base
from bench.probes import base_correct
from bench.schema import METRICS, REQUIRED, STYLES, Param
from methods import Budget, FitResult, get_editor
from methods.base import weights_digest
from methods.budget import budget_digest_fields

log = logging.getLogger(__name__)

Reporter = Callable[[Mapping[str, float]], None]

#: Every trial's run carries at least these metrics (others may be added); declared in bench.schema.
REQUIRED_METRICS = REQUIRED


def pick_device(pref: str) -> str:
    """'cuda' when asked for (or 'auto' and available), else 'cpu'."""
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def _records_digest(records: Sequence[Any]) -> str:
    return hashlib.sha256(json.dumps([dataclasses.asdict(r) for r in records], sort_keys=True,
                                     default=str).encode()).hexdigest()


def training_keys(cfg: Mapping[str, Any], editor: Any, model: Any, task: Any, base_key: str | None
                  ) -> tuple[str, str]:
    """The training key and the convergence key of a learned editor.

    The training key digests everything that determines its training: method and its code version, the validated
    hyper-parameters (defaults included), budget, model (and prepared base model) and the resolved edited weights,
    seed, and the content of the train and val records as the editor sees them (after locality and target
    generation). Test-side settings (n_edits, batch size, test file) are not part of it.

    The convergence key is the same without the step cap, validation schedule and patience: of the budget only
    what defines the training objective (edits per step: ``batch_size``, ``grad_accum``) stays, so every fit of
    the same editor that converged on validation has it, whatever budget it ran under."""
    full = Budget(**(cfg.get("budget") or {})).model_dump()
    blob = {"method": cfg["method"], "code": type(editor).code_version(),
            "hparams": editor.hparams.model_dump(mode="json"), "budget": full,
            "model": cfg["model"]["name"], "base_model": base_key, "edit_params": list(model.edit_params),
            "seed": int(cfg["seed"]), "train": _records_digest(task["train"]), "val": _records_digest(task["val"])}
    # The checkpoint selection decides what "converged" kept: it stays in the convergence key (when not default).
    conv = {**blob, "budget": budget_digest_fields({k: full[k] for k in ("batch_size", "grad_accum", "select",
                                                                         "loc_floor")}), "key": "convergence"}
    blob["budget"] = budget_digest_fields(full)
    return tuple(hashlib.sha256(json.dumps(b, sort_keys=True).encode()).hexdigest()[:32]  # type: ignore[return-value]
                 for b in (blob, conv))


def _load_trained(editor: Any, uri: str, source: Any) -> FitResult:
    """Load ``source`` run's editor checkpoint into ``editor``; the FitResult says what that training did."""
    with tempfile.TemporaryDirectory() as tmp:
        editor.load(tracking.download_dir(uri, source.info.run_id, "editor", tmp))
    m, t = source.data.metrics, source.data.tags
    return FitResult(steps=int(m.get("train_steps", 0)), seconds=0.0, best_step=int(m.get("train_best_step", 0)),
                     best={k[len("best_"):]: v for k, v in m.items() if k.startswith("best_")},
                     stop_reason=t.get(tracking.FIT_STOP_TAG, "untrained"),
                     history=[{"step": 0.0, "val_loss": m["init_val_loss"], "val_es": m["init_val_es"]}]
                     if "init_val_loss" in m and "init_val_es" in m else [],
                     select=t.get(tracking.FIT_SELECT_TAG, "val_loss"))


@dataclass
class _Prepared:
    """What the data step hands on: the task (splits final), the model to edit, the prepared base model's key,
    the locality counts and the digest of the model's weights as loaded (hashed once per trial)."""

    task: Any
    model: Any
    prep_key: str | None
    loc_counts: dict[str, float]
    digest: str


def _prepare_data(spec: TrialSpec, run: Any, device: str, tracking_uri: str, experiment: str,
                  extra_tags: Mapping[str, str] | None) -> _Prepared:
    """Load the task's splits and the model (a prepared base model first where the card asks: FEVER), generate
    targets (Wikitext), choose locality prompts; log what was read."""
    ds, seed = spec.dataset, spec.seed
    task = load_task(ds.name, spec.data_root, seed=seed, source=ds.source,
                     sizes={"train": ds.n_train, "val": ds.n_val, "test": spec.n_edits}, paths=ds.paths)
    model_path, prep_key = spec.model.name, None
    if task.card.prepare:  # the task needs a base model trained for it first (FEVER's classifier)
        prep = prepare_base(spec.model.name, task, seed, ds.prepare, device)
        if prep.trained:
            with tracking.trial_run(tracking_uri, experiment, f"prepare/{spec.model.name}/{ds.name}",
                                    {tracking.KIND_TAG: "prepare", **tracking.environment_tags(device),
                                     **(extra_tags or {})}) as prun:
                prun.log_params({k: v for k, v in prep.info.items() if k != "val_accuracy"} | {"key": prep.key})
                prun.log_metrics({"val_accuracy": prep.info["val_accuracy"],
                                  "train_seconds": prep.info["train_seconds"]})
        prep_key = prep.key
        run.log_params({Param.BASE_MODEL_PATH: str(prep.path), "base_model.key": prep.key})
        run.log_metrics({"base_val_accuracy": prep.info["val_accuracy"]})
        model_path = str(prep.path)
    model = load_model(model_path, spec.model.edit_params, num_labels=max(2, len(task.card.labels)), device=device)
    model.name = spec.model.name
    if task_kind(task.card.kind).targets_generated:  # y_e sampled from the base model itself, cached per dataset
        over = ds.generate.model_dump() if ds.generate is not None else {}
        gen = {**task.card.generate, **{k: v for k, v in over.items() if v is not None}}
        run.log_params({f"generate.{k}": v for k, v in gen.items()})
        for split in ("train", "val", "test"):
            task.splits[split] = generation_targets(
                model, task.splits[split], seed,
                cache_tag=f"{task.refs[split].digest()[:16]}:{split}", **gen)
    run.log_params({Param.MODEL_PARAMS: model.meta["n_params"]})
    # One hash of the loaded weights serves the verdict cache, the before-digest and ROME/MEMIT's statistics key.
    digest = weights_digest(model)
    model.meta["weights_sha256"] = digest
    loc_counts = apply_locality(task, ds.locality or task.card.default_locality, task.root, seed,
                                correct=lambda pairs: base_correct(model, pairs, digest=digest))
    root = task.root or spec.data_root
    run.log_params({f"data.{s}_file": os.path.relpath(f, root) if root and f.startswith(str(root)) else f
                    for s, f in task.files.items()})
    run.log_dataset_inputs([(f"{ds.name}/{s}", s, ref.dataset(), ref.digest().rsplit(":", 1)[-1], ref.load_call())
                            for s, ref in task.refs.items()])
    run.log_params({f"data.sha256.{k}": v for k, v in spec.data_files.items()})
    run.log_params({f"data.n_{s}": len(v) for s, v in task.splits.items()})
    return _Prepared(task, model, prep_key, loc_counts, digest)


class _NoRun:
    """Takes the place of a trial's MLflow run where nothing is logged (:func:`prepare_shared`)."""

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Nothing is logged."""

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Nothing is logged."""

    def log_dataset_inputs(self, inputs: Sequence[Any]) -> None:
        """Nothing is logged."""


def data_step_key(spec: TrialSpec) -> str:
    """What decides a trial's data step (model, dataset entry, seed, test size, data root): trials with the same
    key load the same model and compute the same cached targets and locality verdicts."""
    return json.dumps({"model": spec.model.model_dump(mode="json"), "dataset": spec.dataset.model_dump(mode="json"),
                       "seed": spec.seed, "n_edits": spec.n_edits, "data_root": spec.data_root}, sort_keys=True)


def prepare_shared(cfgs: Sequence[TrialSpec | Mapping[str, Any]], tracking_uri: str, experiment: str,
                   extra_tags: Mapping[str, str] | None = None) -> list[str]:
    """Run each distinct data step of ``cfgs`` (:func:`data_step_key`) of CPU trials once, in this process and
    with its threads, before the trials start: the model's converted weights, generated targets (Wikitext), the
    base model's locality verdicts and a prepared base model (FEVER) are then in the cache when the trials ask,
    instead of two concurrent trials computing the same ones side by side at one thread each. Nothing is logged
    but a prepared base model's own run, as a trial would log it. Returns one line per step, with its time.

    Failures are logged and left to the trials: a data step that fails here fails the same way in each trial
    that needs it, whose run then records the error (FAILED), as without this step."""
    done: list[str] = []
    steps: dict[str, TrialSpec] = {}
    for cfg in cfgs:
        spec = cfg if isinstance(cfg, TrialSpec) else TrialSpec.model_validate(dict(cfg))
        # a CUDA context here would hold the trials' memory: GPU trials prepare their own
        if pick_device(spec.device) == "cpu":
            steps.setdefault(data_step_key(spec), spec)
    for n, spec in enumerate(steps.values(), 1):
        what = f"{spec.model.name} / {spec.dataset.name} (seed {spec.seed}, {spec.n_edits} test edits)"
        t0 = time.time()
        try:
            with progress.step(f"data step {n}/{len(steps)} before the trials: {what}"):
                data = _prepare_data(spec, _NoRun(), "cpu", tracking_uri, experiment, extra_tags)
        except Exception as e:  # the trials meet it again and record it in their runs
            log.warning("preparing %s before the trials failed (%s: %s); each trial prepares it itself",
                        what, type(e).__name__, e)
            continue
        del data
        gc.collect()  # the model's memory goes back before the trials start, not when the driver ends
        done.append(f"{what}: {time.time() - t0:.0f} s")
    return done


@dataclass
class _Fitted:
    """The editor after its fit step (or loaded from a run trained the same way), and what that cost."""

    editor: Any
    fit: FitResult
    seconds: float
    peak_mb: float
    source: Any
    state_dir: Path | None = None  #: where the fit kept its training state (removed once the run holds the editor)
    digest: str = ""  #: the base weights' digest after the fit (what the editor edits)


def _build_and_fit(spec: TrialSpec, data: _Prepared, run: Any, tracking_uri: str, report: Reporter | None
                   ) -> _Fitted:
    """Build the editor (it chooses its weights), then fit it, or load the checkpoint of a FINISHED run trained
    under the same training key (train once, evaluate many); tag base-weight digests and why the fit stopped."""
    editor_cls = get_editor(spec.method)
    model, task = data.model, data.task
    editor = editor_cls(model, spec.hparams, data_root=spec.data_root)
    run.log_params({Param.EDIT_PARAMS: ",".join(editor.model.edit_params)})  # the editor's choice of weights
    digest_before = data.digest
    source, state_dir = None, None
    if editor_cls.learned:  # train once: a FINISHED run trained the same way lends its checkpoint
        key, conv = training_keys(spec.model_dump(), editor, editor.model, task, data.prep_key)
        run.set_tags({tracking.TRAIN_KEY_TAG: key, tracking.CONVERGENCE_KEY_TAG: conv})
        # An interrupted training of this key left its state here: the fit continues from it.
        state_dir = cache_root() / "fit" / key
        if not spec.retrain:
            if spec.reuse_converged:  # the same editor trained to convergence, under whatever cap, comes first
                source = tracking.find_trained(tracking_uri, conv, converged=True)
            if source is None:
                source = tracking.find_trained(tracking_uri, key)

    def log_step(step: int, metrics: Mapping[str, float]) -> None:
        run.log_metrics(metrics, step=step)
        if report is not None and any(k.startswith("val_") for k in metrics):
            report({k: float(v) for k, v in metrics.items()})

    t_fit = time.time()
    with PeakMemory(model.device) as fit_mem:
        if source is not None:
            fit = _load_trained(editor, tracking_uri, source)
            same = source.data.tags.get(tracking.TRAIN_KEY_TAG) == key
            run.set_tags({tracking.TRAINED_FROM_TAG: source.info.run_id,
                          tracking.REUSE_TAG: "training key" if same else "converged"})
            log.info("%s: editor loaded from run %s (%s) instead of training", spec.run_name, source.info.run_id,
                     "same training key" if same else f"trained to convergence in {fit.steps} steps")
        else:
            if spec.retrain and state_dir is not None:
                shutil.rmtree(state_dir, ignore_errors=True)  # train from the start, not from a saved state
            fit = editor.fit(task["train"], task["val"], spec.budget, log_step, state_dir=state_dir)
            if fit.resumed_step:
                run.set_tags({tracking.FIT_RESUMED_TAG: str(fit.resumed_step)})
    # A resumed fit's own clock covers every piece of its training, this process's only the last.
    fit_s = 0.0 if source is not None else (fit.seconds if fit.resumed_step else time.time() - t_fit)
    digest_after = weights_digest(model)
    run.set_tags({"base_weights_sha256.before": digest_before, "base_weights_sha256.after": digest_after,
                  "base_model_changed": str(digest_before != digest_after), tracking.FIT_STOP_TAG: fit.stop_reason})
    if editor_cls.learned:
        run.set_tags({tracking.FIT_SELECT_TAG: fit.select})
        kept = (source.data.tags.get(tracking.FIT_KEPT_INITIAL_TAG, "") if source is not None
                else fit.kept_initial_text())
        if kept:
            run.set_tags({tracking.FIT_KEPT_INITIAL_TAG: kept})
    return _Fitted(editor, fit, fit_s, fit_mem.mb if editor_cls.has_fit_step else 0.0, source, state_dir,
                   digest_after)


def _log_results(spec: TrialSpec, run: Any, data: _Prepared, fitted: _Fitted, result: Any, t_start: float
                 ) -> dict[str, float]:
    """Log the final metrics (evaluation, locality counts, training cost; a reused training's cost from its source
    run), the retention history of sequential runs, the per-edit table and the editor checkpoint."""
    for mark in result.checkpoints:  # sequential: retention after k edits, as metric history at step k
        run.log_metrics({k: v for k, v in mark.items() if k != "n_edits"}, step=int(mark["n_edits"]))
    fit, source = fitted.fit, fitted.source
    metrics = dict(result.metrics)
    metrics.update(data.loc_counts)
    metrics.update({"train_time_s": fitted.seconds, "train_val_time_s": fit.val_seconds if source is None else 0.0,
                    "train_steps": float(fit.steps),
                    "train_best_step": float(fit.best_step), "train_peak_mem_mb": fitted.peak_mb,
                    "trial_time_s": time.time() - t_start})
    if source is not None:  # the cost of the training this trial reused, from its source run
        metrics.update({"source_train_time_s": source.data.metrics.get("train_time_s", float("nan")),
                        "train_peak_mem_mb": source.data.metrics.get("train_peak_mem_mb", float("nan"))})
    metrics.update({f"best_{k}": v for k, v in fit.best.items()})
    if fit.history:  # the untrained editor's validation: what the chosen checkpoint improved on
        metrics.update({"init_val_loss": fit.history[0]["val_loss"], "init_val_es": fit.history[0]["val_es"]})
    run.log_metrics(metrics)
    run.log_table(result.rows)
    if fitted.editor.modules():
        with tempfile.TemporaryDirectory() as tmp:
            run.log_artifact(fitted.editor.save(Path(tmp) / "editor"), "editor")
    if fitted.state_dir is not None:  # the run holds the trained editor now: its training state is not needed
        shutil.rmtree(fitted.state_dir, ignore_errors=True)
    log.info("%s: es=%.3f edit_acc=%.3f drawdown=%.3f loc_agree=%.3f (%.0fs)", spec.run_name,
             metrics.get("es", float("nan")), metrics.get("edit_acc", float("nan")),
             metrics.get("drawdown", float("nan")), metrics.get("loc_agree", float("nan")), metrics["trial_time_s"])
    return metrics


def _identity(spec: TrialSpec, device: str, extra_tags: Mapping[str, str] | None
              ) -> tuple[dict[str, Any], dict[str, str]]:
    """What a trial's run is: its params (:class:`~bench.schema.Param` names) and its tags (environment, the
    editor's flags, the metric styles, the config digest and, for a draw from a search space, its grid point)."""
    editor_cls = get_editor(spec.method)
    kind = task_kind(load_card(spec.dataset.name).kind)
    params = {Param.METHOD: spec.method_label, Param.METHOD_CLASS: spec.method, Param.MODEL: spec.model.name,
              Param.DATASET: spec.dataset.name, Param.N_EDITS: spec.n_edits,
              Param.EDIT_BATCH_SIZE: spec.edit_batch_size, Param.SEED: spec.seed, Param.HPARAMS: dict(spec.hparams),
              Param.BUDGET: spec.budget.model_dump(), Param.LOCALITY: spec.dataset.locality or "",
              Param.EDIT_MODE: spec.edit_mode}
    if spec.reuse_converged and editor_cls.learned:  # its editor may come from a longer training
        params[Param.REUSE_CONVERGED] = True
    tags = {
        **tracking.environment_tags(device),
        **(extra_tags or {}),
        "method": spec.method_label,
        "model": spec.model.name,
        "dataset": spec.dataset.name,
        "learned": str(editor_cls.learned),
        "has_fit_step": str(editor_cls.has_fit_step),
        "uses_training_data_at_edit_time": str(editor_cls.uses_training_data_at_edit_time),
        "modifies_base_model": str(editor_cls.modifies_base_model),
        **{f"style.{k}": v for k, v in STYLES.items()},
        # how each number was obtained on this task (a classifier's label is its free answer: "classifier")
        **{f"protocol.{m.name}": kind.protocol(m.protocol) for m in METRICS if m.name in STYLES},
    }
    if spec.config_digest:
        tags[tracking.CONFIG_DIGEST_TAG] = spec.config_digest
    if spec.sampled:  # a draw from a search space: the report's tuning table groups it with its point's samples
        tags[tracking.POINT_DIGEST_TAG] = spec.point_digest
        tags[tracking.SAMPLED_TAG] = json.dumps(spec.sampled, sort_keys=True)
    return params, tags


def run_trial(cfg: TrialSpec | Mapping[str, Any], tracking_uri: str, experiment: str,
              report: Reporter | None = None, extra_tags: Mapping[str, str] | None = None) -> dict[str, float]:
    """Run one trial (a :class:`~bench.config.TrialSpec`, or its dict from :func:`bench.config.plan` /
    :func:`bench.config.trials`) in four steps: prepare the data and model, build and fit the editor, evaluate,
    log.

    Logs exactly one MLflow run in ``experiment`` and returns its final metrics. Raises on failure (the run is
    then marked FAILED with the error as a tag).
    """
    spec = cfg if isinstance(cfg, TrialSpec) else TrialSpec.model_validate(dict(cfg))
    t_start = time.time()
    random.seed(spec.seed)
    torch.manual_seed(spec.seed)
    device = pick_device(spec.device)
    threads = int(os.environ.get("EDITBENCH_THREADS", "0"))
    if threads > 0:
        torch.set_num_threads(threads)
    keep_freed_memory()  # freed memory reused, not zero-filled again by the kernel (ENN's step ~25% faster)
    params, tags = _identity(spec, device, extra_tags)
    with tracking.trial_run(tracking_uri, experiment, spec.run_name, tags) as run:
        run.log_params(params)
        data = _prepare_data(spec, run, device, tracking_uri, experiment, extra_tags)
        prepare_s = time.time() - t_start
        fitted = _build_and_fit(spec, data, run, tracking_uri, report)

        def progress(done: int, total: int) -> None:
            if done == total or done % max(1, total // 10) == 0:
                log.info("%s: evaluated %d/%d edits", spec.run_name, done, total)

        t_eval = time.time()
        result = evaluate(fitted.editor, data.model, data.task["test"], spec.edit_batch_size,
                          rome_neighbourhood=data.task.card.rome_neighbourhood, progress=progress,
                          mode=spec.edit_mode, checkpoints=spec.checkpoints, digest=fitted.digest,
                          question_template=data.task.card.question_template, generation=spec.generation)
        result.metrics["eval_time_s"] = time.time() - t_eval
        result.metrics["prepare_time_s"] = prepare_s
        metrics = _log_results(spec, run, data, fitted, result, t_start)
    # Reported after the run is FINISHED: a scheduler may stop the trial at this report.
    if report is not None:
        report({k: float(v) for k, v in metrics.items()})
    return metrics
