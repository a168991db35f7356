"""The report's plots (PNG): edit success against drawdown (teacher-forced and free answers), edit success against
batch size, memory per editor, retention against the number of edits, validation curves of learned editors.

One colour per editor in every plot (:func:`editor_colours`); a plot is drawn only when it compares something
(ES against batch size needs two batch sizes, retention two checkpoints); points are named by the legend, not by
labels on them."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Iterable

from bench.report.runs import num

log = logging.getLogger(__name__)

#: The plots' headings, in words (the report shows them above each plot).
PLOT_TITLES = {"es_vs_drawdown": "Edit success against drawdown", "es_vs_batch": "Edit success against edit batch size",
               "memory": "Peak memory per editor", "retention": "Retention over sequential edits",
               "training_curves": "Validation curves of the learned editors"}


def editor_colours(methods: Iterable[str]) -> dict[str, Any]:
    """One colour per editor, the same in every plot of a report: the editors in sorted order on matplotlib's
    qualitative palette (tab10, then tab20 for more than ten)."""
    import matplotlib  # heavy (~1 s): only when a report draws plots

    names = sorted(set(methods))
    cmap = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {m: cmap(i % cmap.N) for i, m in enumerate(names)}


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


MARKERS = "os^Dv<>Pp*"


def make_plots(df: Any, out: Path, colours: dict[str, Any] | None = None) -> dict[str, Path]:
    """ES against drawdown (beside it the free answers' exact match on x'_e where runs have the generation
    protocol), ES against batch size (two batch sizes or more), memory per editor; ``colours`` from
    :func:`editor_colours` (made here from ``df``'s editors when not given)."""
    import matplotlib  # heavy (~1 s): only when a report draws plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = colours or editor_colours(df["method"].unique().to_list())
    plots: dict[str, Path] = {}
    rows = df.to_dicts()
    tasks = sorted({(r["dataset"], r["model"]) for r in rows})
    smallest = [r for r in rows if int(r["bs"]) == int(df["bs"].min())]
    panels = [("es", "edit success (ES, teacher-forced)")]
    if any(not math.isnan(num(r, "gen_rephrase_em")) for r in smallest):
        panels.append(("gen_rephrase_em", "free answer exact match on x'_e (generation)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        for r in smallest:
            ax.scatter(num(r, "drawdown"), num(r, key), color=colours[r["method"]],
                       marker=MARKERS[tasks.index((r["dataset"], r["model"])) % len(MARKERS)],
                       label=r["method"] + (f" ({r['dataset']}/{r['model']})" if len(tasks) > 1 else ""))
        ax.set(xlabel="drawdown", ylabel=label, ylim=(-0.02, 1.02))
        _legend(ax)
    plots["es_vs_drawdown"] = _save(fig, out / "es_vs_drawdown.png")

    if len({int(r["bs"]) for r in rows}) > 1:  # one batch size compares nothing
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in sorted({(r["method"], r["dataset"], r["model"]) for r in rows}):
            pts = sorted((int(r["bs"]), num(r, "es")) for r in rows if (r["method"], r["dataset"], r["model"]) == key)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=colours[key[0]],
                    marker=MARKERS[tasks.index(key[1:]) % len(MARKERS)],
                    label=key[0] + (f" ({key[1]}/{key[2]})" if len(tasks) > 1 else ""))
        ax.set_xscale("log")
        ax.set(xlabel="edit batch size", ylabel="ES")
        _legend(ax)
        plots["es_vs_batch"] = _save(fig, out / "es_vs_batch.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    methods = sorted({r["method"] for r in rows})
    train = [max([num(r, "train_peak_mem_mb") for r in rows if r["method"] == m and
                  not math.isnan(num(r, "train_peak_mem_mb"))] or [0.0]) for m in methods]
    edit = [max([num(r, "edit_peak_mem_mb") for r in rows if r["method"] == m and
                 not math.isnan(num(r, "edit_peak_mem_mb"))] or [0.0]) for m in methods]
    xs = range(len(methods))
    ax.bar([x - 0.2 for x in xs], train, width=0.4, color=[colours[m] for m in methods], hatch="//",
           edgecolor="white", label="training (hatched)")
    ax.bar([x + 0.2 for x in xs], edit, width=0.4, color=[colours[m] for m in methods], label="edit")
    ax.set_xticks(list(xs), methods)
    ax.set_ylabel("peak memory (MB)")
    ax.legend()
    plots["memory"] = _save(fig, out / "memory.png")
    return plots


def _legend(ax: Any) -> None:
    """One legend entry per label (a scatter point per run repeats them), in the labels' order."""
    handles, labels = ax.get_legend_handles_labels()
    seen = dict(zip(labels, handles))
    if seen:
        ax.legend([seen[k] for k in sorted(seen)], sorted(seen), fontsize=7)


def plot_retention(curves: dict[tuple[str, str, str], list[tuple[int, float, float, float]]], out: Path,
                   colours: dict[str, Any] | None = None) -> Path | None:
    """ES on all edits so far against the number of sequential edits (log scale), one colour per editor: solid
    teacher-forced ES, dashed the free answers' exact match on x'_e (generation protocol) where runs have it.
    None (no plot) when no curve has two checkpoints."""
    if not any(len(pts) > 1 for pts in curves.values()):
        return None
    import matplotlib  # heavy (~1 s): only when a report draws plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = colours or editor_colours(m for m, _, _ in curves)
    tasks = sorted({(d, mo) for _, d, mo in curves})
    fig, ax = plt.subplots(figsize=(6, 4))
    for (m, ds, model), pts in sorted(curves.items()):
        name = m + (f" ({ds}/{model})" if len(tasks) > 1 else "")
        mark = MARKERS[tasks.index((ds, model)) % len(MARKERS)]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=mark, color=colours[m], label=f"{name}: ES")
        if any(not math.isnan(p[3]) for p in pts):
            ax.plot([p[0] for p in pts], [p[3] for p in pts], marker=mark, color=colours[m], linestyle="--",
                    label=f"{name}: free EM")
    ax.set_xscale("log")
    ax.set(xlabel="number of sequential edits", ylabel="score on all edits so far", ylim=(-0.02, 1.02))
    _legend(ax)
    return _save(fig, out / "retention.png")


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
