"""One grid point end to end: load model and data, build and fit the editor, evaluate, log one MLflow run.

:func:`run_trial` knows nothing of Ray: ``bench.run`` calls it inside a Tune trial and passes ``report`` (Tune's
report function); tests call it directly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from bench import tracking
from bench.data import fetch_public, file_sha256, load_card, load_task, locality_pool, with_locality
from bench.metrics import STYLES, PeakMemory, base_correct, evaluate
from bench.models import load_model
from bench.prepare import generation_targets, prepare_base
from methods import Budget, FitResult, get_editor
from methods.base import weights_digest

log = logging.getLogger(__name__)

Reporter = Callable[[Mapping[str, float]], None]

# Every trial's run carries at least these metrics (others may be added).
REQUIRED_METRICS = (
    "es", "edit_acc", "loc_acc_pre", "loc_acc_post", "drawdown", "token_acc_rephrase", "edit_time_s",
    "edit_peak_mem_mb", "edit_steps", "loc_agree", "loc_kl", "es_ci95", "drawdown_ci95",
)


def pick_device(pref: str) -> str:
    """'cuda' when asked for (or 'auto' and available), else 'cpu'."""
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def _apply_locality(model: Any, task: Any, source: str, data_root: str | None, seed: int) -> dict[str, float]:
    """Swap each record's locality prompt for one from a file-based source of the card (filtered to prompts the
    base model answers right when the card says so). Returns counts for logging."""
    card = task.card
    src = card.locality[source]
    if src.source == "record":
        return {}
    pairs = locality_pool(card, source, data_root)
    kept = pairs
    if src.keep == "base_correct":
        ok = base_correct(model, pairs)
        kept = [p for p, good in zip(pairs, ok) if good]
    log.info("locality %s: %d of %d prompts kept", source, len(kept), len(pairs))
    # Disjoint pools per split so test locality prompts were never seen in training.
    order = list(range(len(kept)))
    random.Random(seed).shuffle(order)
    n = len(order)
    cuts = {"train": order[: int(0.7 * n)], "val": order[int(0.7 * n): int(0.8 * n)], "test": order[int(0.8 * n):]}
    for split, idx in cuts.items():
        task.splits[split] = with_locality(task.splits[split], [kept[i] for i in idx], seed)
    return {"loc_pool_size": float(len(pairs)), "loc_pool_kept": float(len(kept))}


def _records_digest(records: Sequence[Any]) -> str:
    return hashlib.sha256(json.dumps([dataclasses.asdict(r) for r in records], sort_keys=True,
                                     default=str).encode()).hexdigest()


def training_key(cfg: Mapping[str, Any], editor: Any, model: Any, task: Any, base_key: str | None) -> str:
    """Digest of everything that determines a learned editor's training: method and its code version, the
    validated hyper-parameters (defaults included), budget, model (and prepared base model) and the resolved
    edited weights, seed, and the content of the train and val records as the editor sees them (after locality
    and target generation). Test-side settings (n_edits, batch size, test file) are not part of it."""
    blob = {"method": cfg["method"], "code": type(editor).code_version(),
            "hparams": editor.hparams.model_dump(mode="json"),
            "budget": dataclasses.asdict(Budget(**(cfg.get("budget") or {}))),
            "model": cfg["model"]["name"], "base_model": base_key, "edit_params": list(model.edit_params),
            "seed": int(cfg["seed"]), "train": _records_digest(task["train"]), "val": _records_digest(task["val"])}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:32]


def _load_trained(editor: Any, uri: str, source: Any) -> FitResult:
    """Load ``source`` run's editor checkpoint into ``editor``; the FitResult says what that training did."""
    with tempfile.TemporaryDirectory() as tmp:
        editor.load(tracking.download_dir(uri, source.info.run_id, "editor", tmp))
    m, t = source.data.metrics, source.data.tags
    return FitResult(steps=int(m.get("train_steps", 0)), seconds=0.0, best_step=int(m.get("train_best_step", 0)),
                     best={k[len("best_"):]: v for k, v in m.items() if k.startswith("best_")},
                     stop_reason=t.get(tracking.FIT_STOP_TAG, "untrained"))


def run_trial(cfg: Mapping[str, Any], tracking_uri: str, experiment: str, report: Reporter | None = None,
              extra_tags: Mapping[str, str] | None = None) -> dict[str, float]:
    """Run one trial spec (a point of :func:`bench.config.plan`, with sampled values merged into ``hparams``).

    Logs exactly one MLflow run in ``experiment`` and returns its final metrics. Raises on failure (the run is
    then marked FAILED with the error as a tag).
    """
    t_start = time.time()
    seed = int(cfg["seed"])
    random.seed(seed)
    torch.manual_seed(seed)
    device = pick_device(cfg.get("device", "auto"))
    threads = int(os.environ.get("EDITBENCH_THREADS", "0"))
    if threads > 0:
        torch.set_num_threads(threads)
    method, model_spec, ds = cfg["method"], cfg["model"], cfg["dataset"]
    params = {
        "method": cfg.get("method_label", method),
        "method_class": method,
        "model": model_spec["name"],
        "dataset": ds["name"],
        "n_edits": cfg["n_edits"],
        "edit_batch_size": cfg["edit_batch_size"],
        "seed": seed,
        "hparams": dict(cfg["hparams"]),
        "budget": dict(cfg.get("budget") or {}),
        "locality": ds.get("locality") or "",
        "edit_mode": cfg.get("edit_mode", "independent"),
    }
    editor_cls = get_editor(method)
    tags = {
        **tracking.environment_tags(device),
        **(extra_tags or {}),
        "method": params["method"],
        "model": model_spec["name"],
        "dataset": ds["name"],
        "requires_training": str(editor_cls.requires_training),
        "uses_training_data_at_edit_time": str(editor_cls.uses_training_data_at_edit_time),
        "modifies_base_model": str(editor_cls.modifies_base_model),
        **{f"style.{k}": v for k, v in STYLES.items()},
    }
    if cfg.get("config_digest"):
        tags[tracking.CONFIG_DIGEST_TAG] = str(cfg["config_digest"])
    with tracking.trial_run(tracking_uri, experiment, cfg["run_name"], tags) as run:
        run.log_params(params)
        public = None
        if ds.get("source") == "public":  # the card's public files, fetched once into the cache
            card = load_card(ds["name"])
            public = {k: str(fetch_public(card, k)) for k in card.source["files"]}
        task = load_task(
            ds["name"], cfg.get("data_root"), seed=seed,
            sizes={"train": ds.get("n_train"), "val": ds.get("n_val"), "test": cfg["n_edits"]},
            paths=ds.get("paths") or {}, file_overrides=public,
        )
        model_path = model_spec["name"]
        prep_key = None
        if task.card.prepare:  # the task needs a base model trained for it first (FEVER's classifier)
            prep = prepare_base(model_spec["name"], task, seed, ds.get("prepare"), device)
            if prep.trained:
                with tracking.trial_run(tracking_uri, experiment, f"prepare/{model_spec['name']}/{ds['name']}",
                                        {tracking.KIND_TAG: "prepare", **tracking.environment_tags(device),
                                         **(extra_tags or {})}) as prun:
                    prun.log_params({k: v for k, v in prep.info.items() if k != "val_accuracy"} | {"key": prep.key})
                    prun.log_metrics({"val_accuracy": prep.info["val_accuracy"],
                                      "train_seconds": prep.info["train_seconds"]})
            prep_key = prep.key
            run.log_params({"base_model.path": str(prep.path), "base_model.key": prep.key})
            run.log_metrics({"base_val_accuracy": prep.info["val_accuracy"]})
            model_path = str(prep.path)
        model = load_model(model_path, model_spec.get("edit_params"), num_labels=max(2, len(task.card.labels)),
                           device=device)
        model.name = model_spec["name"]
        if task.card.kind == "generation":  # y_e sampled from the base model itself, cached per dataset
            gen = {**task.card.generate, **{k: v for k, v in (ds.get("generate") or {}).items() if v is not None}}
            run.log_params({f"generate.{k}": v for k, v in gen.items()})
            for split in ("train", "val", "test"):
                task.splits[split] = generation_targets(
                    model, task.splits[split], seed,
                    cache_tag=f"{file_sha256(Path(task.files[split]))[:16]}:{split}", **gen)
        run.log_params({"model_params": model.meta["n_params"]})
        loc_source = ds.get("locality") or task.card.default_locality
        loc_counts = _apply_locality(model, task, loc_source, cfg.get("data_root"), seed)
        root = cfg.get("data_root")
        run.log_params({f"data.{s}_file": os.path.relpath(f, root) if root and f.startswith(str(root)) else f
                        for s, f in task.files.items()})
        run.log_params({f"data.sha256.{k}": v for k, v in (cfg.get("data_files") or {}).items()})
        run.log_params({f"data.n_{s}": len(v) for s, v in task.splits.items()})

        editor = editor_cls(model, cfg["hparams"], data_root=cfg.get("data_root"))
        run.log_params({"edit_params": ",".join(editor.model.edit_params)})  # the editor's choice of weights
        digest_before = weights_digest(model)
        budget = Budget(**(cfg.get("budget") or {}))
        source = None
        if editor_cls.requires_training:  # train once: a FINISHED run trained the same way lends its checkpoint
            key = training_key(cfg, editor, editor.model, task, prep_key)
            run.set_tags({tracking.TRAIN_KEY_TAG: key})
            if not cfg.get("retrain"):
                source = tracking.find_trained(tracking_uri, key)

        def log_step(step: int, metrics: Mapping[str, float]) -> None:
            run.log_metrics(metrics, step=step)
            if report is not None and any(k.startswith("val_") for k in metrics):
                report({k: float(v) for k, v in metrics.items()})

        t_fit = time.time()
        with PeakMemory(model.device) as fit_mem:
            if source is not None:
                fit = _load_trained(editor, tracking_uri, source)
                run.set_tags({tracking.TRAINED_FROM_TAG: source.info.run_id})
                log.info("%s: editor loaded from run %s (same training key) instead of training", cfg["run_name"],
                         source.info.run_id)
            else:
                fit = editor.fit(task["train"], task["val"], budget, log_step)
        fit_s = 0.0 if source is not None else time.time() - t_fit
        digest_after = weights_digest(model)
        run.set_tags({"base_weights_sha256.before": digest_before, "base_weights_sha256.after": digest_after,
                      "base_model_changed": str(digest_before != digest_after),
                      tracking.FIT_STOP_TAG: fit.stop_reason})

        def progress(done: int, total: int) -> None:
            if done == total or done % max(1, total // 10) == 0:
                log.info("%s: evaluated %d/%d edits", cfg["run_name"], done, total)

        result = evaluate(editor, model, task["test"], int(cfg["edit_batch_size"]),
                          rome_neighbourhood=task.card.rome_neighbourhood, progress=progress,
                          mode=cfg.get("edit_mode", "independent"), checkpoints=cfg.get("checkpoints"))
        for mark in result.checkpoints:  # sequential: retention after k edits, as metric history at step k
            run.log_metrics({k: v for k, v in mark.items() if k != "n_edits"}, step=int(mark["n_edits"]))
        metrics = dict(result.metrics)
        metrics.update(loc_counts)
        metrics.update({"train_time_s": fit_s, "train_steps": float(fit.steps), "train_best_step": float(fit.best_step),
                        "train_peak_mem_mb": fit_mem.mb if editor_cls.requires_training else 0.0,
                        "trial_time_s": time.time() - t_start})
        if source is not None:  # the cost of the training this trial reused, from its source run
            metrics.update({"source_train_time_s": source.data.metrics.get("train_time_s", float("nan")),
                            "train_peak_mem_mb": source.data.metrics.get("train_peak_mem_mb", float("nan"))})
        metrics.update({f"best_{k}": v for k, v in fit.best.items()})
        run.log_metrics(metrics)
        run.log_table(result.rows)
        if editor.modules():
            with tempfile.TemporaryDirectory() as tmp:
                run.log_artifact(editor.save(Path(tmp) / "editor"), "editor")
        log.info("%s: es=%.3f edit_acc=%.3f drawdown=%.3f loc_agree=%.3f (%.0fs)", cfg["run_name"],
                 metrics.get("es", float("nan")), metrics.get("edit_acc", float("nan")),
                 metrics.get("drawdown", float("nan")), metrics.get("loc_agree", float("nan")),
                 metrics["trial_time_s"])
    # Reported after the run is FINISHED: a scheduler may stop the trial at this report.
    if report is not None:
        report({k: float(v) for k, v in metrics.items()})
    return metrics

