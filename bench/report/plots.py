"""The report's plots (PNG): ES vs drawdown per task, ES vs batch size, memory per editor, retention vs number
of edits, validation curves of learned editors."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from bench.report.runs import num

log = logging.getLogger(__name__)


def plot_training(curves: dict[str, list[tuple[int, float, float]]], out: Path) -> Path:
    """Validation ES and loss against training step, one line per training."""
    import matplotlib  # heavy (~1 s): only when a report draws plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for label, pts in curves.items():
        steps = [k for k, _, _ in pts]
        a.plot(steps, [es for _, es, _ in pts], marker=".", label=label)
        b.plot(steps, [loss for _, _, loss in pts], marker=".", label=label)
    a.set(xlabel="training step", ylabel="validation ES", title="validation ES")
    b.set(xlabel="training step", ylabel="validation loss", title="validation loss (early-stop key)")
    b.set_yscale("log")
    a.legend(fontsize=7)
    return _save(fig, out / "training_curves.png")


def make_plots(df: Any, out: Path) -> dict[str, Path]:
    """ES vs drawdown per task, ES vs batch size, memory per editor."""
    import matplotlib  # heavy (~1 s): only when a report draws plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots: dict[str, Path] = {}
    rows = df.to_dicts()
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        if int(r["bs"]) != int(df["bs"].min()):
            continue
        ax.scatter(num(r, "drawdown"), num(r, "es"))
        ax.annotate(f"{r['method']} ({r['dataset']}/{r['model']})", (num(r, "drawdown"), num(r, "es")), fontsize=7)
    ax.set_xlabel("drawdown")
    ax.set_ylabel("edit success (ES)")
    ax.set_title("ES vs drawdown")
    plots["es_vs_drawdown"] = _save(fig, out / "es_vs_drawdown.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for key in sorted({(r["method"], r["dataset"], r["model"]) for r in rows}):
        pts = sorted((int(r["bs"]), num(r, "es")) for r in rows if (r["method"], r["dataset"], r["model"]) == key)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{key[0]} / {key[1]}")
    ax.set_xscale("log")
    ax.set_xlabel("edit batch size")
    ax.set_ylabel("ES")
    ax.legend(fontsize=7)
    ax.set_title("ES vs batch size")
    plots["es_vs_batch"] = _save(fig, out / "es_vs_batch.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    methods = sorted({r["method"] for r in rows})
    train = [max([num(r, "train_peak_mem_mb") for r in rows if r["method"] == m and
                  not math.isnan(num(r, "train_peak_mem_mb"))] or [0.0]) for m in methods]
    edit = [max([num(r, "edit_peak_mem_mb") for r in rows if r["method"] == m and
                 not math.isnan(num(r, "edit_peak_mem_mb"))] or [0.0]) for m in methods]
    xs = range(len(methods))
    ax.bar([x - 0.2 for x in xs], train, width=0.4, label="training")
    ax.bar([x + 0.2 for x in xs], edit, width=0.4, label="edit")
    ax.set_xticks(list(xs), methods)
    ax.set_ylabel("peak memory (MB)")
    ax.legend()
    ax.set_title("Memory per editor")
    plots["memory"] = _save(fig, out / "memory.png")
    return plots


def plot_retention(curves: dict[tuple[str, str, str], list[tuple[int, float, float]]], out: Path) -> Path:
    """ES on all edits so far against the number of sequential edits, one line per editor (and task/model)."""
    import matplotlib  # heavy (~1 s): only when a report draws plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    several = len({(d, mo) for _, d, mo in curves}) > 1
    for (m, ds, model), pts in sorted(curves.items()):
        ax.plot([k for k, _, _ in pts], [es for _, es, _ in pts], marker="o",
                label=f"{m} ({ds}/{model})" if several else m)
    ax.set_xscale("log")
    ax.set_xlabel("number of sequential edits")
    ax.set_ylabel("ES on all edits so far")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    ax.set_title("Retention under sequential editing")
    return _save(fig, out / "retention.png")


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
