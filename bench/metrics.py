"""Evaluation of an editor on test edits: per-edit rows and aggregates, each metric labelled by its style.

- MEND style: ``es`` (edit success: every target token is the teacher-forced argmax on the equivalence input),
  ``edit_acc`` (the same on x_e), ``loc_acc_pre``/``loc_acc_post`` (exact match of the locality answer before and
  after) and ``drawdown`` = pre - post; generation tasks (Wikitext) use the relative perplexity increase on the
  locality passage instead, ``drawdown`` = ppl_post / ppl_pre - 1 (with ``ppl_pre``/``ppl_post``).
- EasyEdit style: token-level accuracy ``token_acc_edit`` (reliability), ``token_acc_rephrase`` (generalisation),
  ``loc_agree`` (share of locality answer tokens whose post-edit argmax equals the pre-edit one).
- ROME style, where the true answer is known: ``efficacy`` p(new) > p(true) on x_e, ``paraphrase`` the same on
  x'_e, ``neighbourhood`` p(true) > p(new) on x_loc (CounterFact).
- Cost: ``edit_time_s``, ``edit_steps``, ``edit_peak_mem_mb`` (CUDA: max_memory_allocated above the start;
  CPU: resident high-water mark above the start, reset before each edit).

Means come with 95% confidence intervals over edits (normal approximation, 1.96 standard errors).
"""

from __future__ import annotations

import gc
import logging
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import torch

from bench.data import EditBatch, EditRecord, collate, edit_batch, spaced
from bench.losses import argmax_agreement, argmax_scores, per_seq_kl, perplexity, seq_logprob
from bench.models import EditableModel
from bench.schema import STYLES, WITH_CI  # per-edit metric -> style, and those with CIs: declared once there

log = logging.getLogger(__name__)

def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{key}:\s+(\d+)", f.read(), re.M)
    return int(m.group(1)) if m else 0


def _libc() -> Any:
    """glibc, or None where the C library is another (macOS, musl): its heap calls are then skipped."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def _trim_heap() -> None:
    """Return freed memory to the OS (glibc) so the next allocations show up in the resident set."""
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


#: glibc's ``mallopt`` parameters (malloc.h) and the values :func:`keep_freed_memory` gives them: serve requests up
#: to 32 MiB (the most glibc accepts) from its heap instead of a fresh mmap each, never serve one by mmap while the
#: heap can grow (larger blocks: SmolLM2's 113 MB embedding gradient, ENN's at every step), and hand free memory at
#: the heap's top back to the OS only above 2 GiB (the most an ``int`` holds) instead of 2x the largest freed block.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
MMAP_THRESHOLD_BYTES, TRIM_THRESHOLD_BYTES = 32 * 2**20, 2**31 - 1

#: Environment of a process whose work runs outside its main thread (a Tune trial runs in a ``RunnerThread`` of its
#: Ray worker): with one malloc arena every thread allocates from the main heap, the one :func:`keep_freed_memory`
#: keeps. glibc reads it at process start, so it is given to the Ray workers' environment (``bench.run``).
ONE_ARENA_ENV = {"MALLOC_ARENA_MAX": "1"}


def keep_freed_memory() -> bool:
    """Make glibc reuse freed memory instead of returning it to the OS after every training step or edit.

    With glibc's defaults a process that frees and allocates gigabytes per step (ENN's dense gradients of every
    base weight, each edit's deltas) gets its pages back from the kernel each time, zero-filled on first touch:
    measured on SmolLM2-135M at one thread, 435k page faults and 1.5 s of the 4.6 s of an ENN training step in the
    kernel (MEND 0.08 s of 1.1 s, KE 0.22 of 1.3 s); with this setting 0.4-0.7 s (ENN), 0.00 (MEND), 0.05 (KE).
    Training steps, each setting in its own process, alternated: ENN 6.7 / 6.4 s -> 4.9 / 5.0 s, MEND 2.6 / 3.7 /
    3.1 s -> 2.3 / 2.1 / 2.3 s, KE 2.0 / 2.1 s -> 1.8 / 1.9 s; FT's evaluation unchanged (PeakMemory trims the heap
    before every edit). Blocks above 32 MiB come from the heap too (``M_MMAP_MAX`` 0; glibc still maps one when
    the heap cannot grow): a fresh 113 MB ``torch.zeros`` took 66 ms mapped, 7.5 ms from the heap; ENN steps
    2.38 -> 2.03 s, KE 0.80 -> 0.74 s, MEND unchanged (2026-12-06, one thread, alternated processes).

    The settings only reach the main heap: a thread with an arena of its own (a Tune trial's ``RunnerThread``)
    still maps and faults in every large block (ENN 3.4 s per step there; 2.1 s with :data:`ONE_ARENA_ENV` in the
    process's environment at start, KE 0.87 -> 0.73 s). Values are bit-identical: only where memory comes from
    changes. Memory measurements keep their meaning: :class:`PeakMemory` trims the heap before it resets the
    high-water mark. Applies to the whole process, from the call on; returns False (and changes nothing) where the
    C library is not glibc.
    """
    libc = _libc()
    if libc is None:
        return False
    ok = (bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
          and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)) and bool(libc.mallopt(M_MMAP_MAX, 0)))
    if not ok:
        log.debug("mallopt refused the heap settings; glibc's defaults stay")
    return ok


class PeakMemory:
    """Context manager measuring peak memory in MB above the level at entry.

    CUDA: ``torch.cuda.max_memory_allocated`` after resetting the peak. CPU: the process's resident high-water
    mark (VmHWM), reset at entry by writing 5 to /proc/self/clear_refs (Linux >= 4.0), after handing freed heap
    pages back to the OS (``malloc_trim``) so that reused memory counts too; where the reset is not possible
    it falls back to ``ru_maxrss`` and the value is an upper bound (``exact`` is False).
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
        _trim_heap()
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


@torch.no_grad()
def exact_match(model: EditableModel, batch: EditBatch, deltas: dict | None = None) -> torch.Tensor:
    """Per row of ``batch``, whether the teacher-forced argmax gives every target token (``argmax_scores``' exact
    match). Causal models run their output head on the target positions only (``logits_at``), not on every
    position of every row."""
    if model.kind != "causal":
        return argmax_scores(model.logits(batch.inputs, deltas), batch.labels)[0]
    rows, cols = (batch.labels != -100).nonzero(as_tuple=True)
    hit = model.logits_at(batch.inputs, rows, cols, deltas).argmax(-1) == batch.labels[rows, cols]
    missed = torch.zeros(len(batch.labels), dtype=torch.long, device=hit.device).index_add_(0, rows, (~hit).long())
    return missed == 0


@torch.no_grad()
def base_correct(model: EditableModel, pairs: Sequence[tuple[str, str]], batch_size: int = 32,
                 digest: str | None = None) -> list[bool]:
    """Whether the unedited model's teacher-forced argmax gives every answer token, per (prompt, answer).

    The verdicts are kept in the keyed cache (``bench.cache``, namespace ``verdicts``) under the model's name and
    weight digest and the pairs, so the trials of a sweep that choose locality prompts from the same pool run the
    model over it once. Pairs of similar length share a batch and the output head runs on the answer positions only
    (:func:`exact_match`): the 1209 known_1000 prompts take 31 s for SmolLM2-135M at 2 threads, against 50 s in the
    pool's order over every position, with the same 1209 verdicts (2026-12-06). ``digest``: the model's
    :func:`~bench.models.weights_digest` when the caller already has it (computed here otherwise)."""
    import json

    from bench.cache import cached
    from bench.models import weights_digest

    def compute() -> list[bool]:
        # Batches of pairs of similar length pad less; the verdicts come back in the pairs' order.
        order = sorted(range(len(pairs)), key=lambda i: (len(pairs[i][0]) + len(pairs[i][1]), i))
        out = [False] * len(pairs)
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            exact = exact_match(model, collate(model, [pairs[i][0] for i in idx], [pairs[i][1] for i in idx]))
            for i, x in zip(idx, exact.tolist()):
                out[i] = bool(x)
        return out

    inputs = {"model": model.name, "weights": digest or weights_digest(model), "pairs": [list(p) for p in pairs]}
    verdicts, _ = cached("verdicts", inputs, "json", compute, lambda v, f: f.write_text(json.dumps(v)),
                         lambda f: [bool(x) for x in json.loads(f.read_text())])
    if len(verdicts) != len(pairs):
        raise ValueError(f"cached verdicts: {len(verdicts)} for {len(pairs)} pairs")
    return verdicts


def _probe(model: EditableModel, groups: dict[str, tuple[list[str], list[Any], bool]], deltas: dict | None
           ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Run several (prompts, targets, space) groups through ONE forward pass, each group tokenised as
    :func:`bench.data.collate` would tokenise it alone (``space``: whether its targets follow after a space);
    returns (logits, labels) per group."""
    names = [k for k, (p, _, _) in groups.items() if p]
    prompts = [x for k in names for x in groups[k][0]]
    targets = [x for k in names for x in groups[k][1]]
    spaces = [groups[k][2] for k in names for _ in groups[k][0]]
    b = collate(model, prompts, targets, space=spaces)
    with torch.no_grad():
        logits = model.logits(b.inputs, deltas)
    out, i = {}, 0
    for k in names:
        n = len(groups[k][0])
        lab = b.labels[i : i + n]
        # Trim to this group's last target position so a group's tensors do not depend on what shared its batch.
        width = int((lab != -100).any(0).nonzero().max()) + 1
        out[k] = (logits[i : i + n, :width], lab[:, :width])
        i += n
    return out


#: Largest pre-edit probe entry kept in the cache (see :class:`PreEditProbes`); above it the probes are computed
#: per trial as before (Wikitext's long locality passages: hundreds of MB of logits).
PRE_CACHE_MAX_MB = 128.0


class PreEditProbes:
    """The unedited model's scores that every trial on the same model and test set computes alike: ES before the
    edit (x'_e) and the locality logits (x_loc) of each edit batch, computed once and kept in the keyed cache
    (``bench.cache``, namespace ``preedit``).

    A batch's probe is computed exactly as :func:`evaluate` always computed it (one forward over that batch's
    x'_e and x_loc), so a value served from the cache is bit-identical to a fresh one. What is kept: x'_e's exact
    match and x_loc's labels and logits at its answer positions; the logits elsewhere are served as zeros, which
    every locality score masks out (agreement, KL, drawdown, perplexity read answer positions only). The key holds
    the model's name and weight digest (an editor that changes the base model, ENN, gets its own entry), device,
    dtype, thread count, torch version and every probed text, so other inputs never share an entry. An entry over
    :data:`PRE_CACHE_MAX_MB` is not stored."""

    VERSION = 1

    def __init__(self, model: EditableModel, batches: Sequence[dict[str, tuple[list[str], list[Any], bool]]],
                 digest: str | None = None, use_cache: bool = True) -> None:
        self.model = model
        self.batches = batches
        self.hit = False
        self._fresh: list[dict[str, torch.Tensor]] = []
        self._path = None
        self._stored: list[dict[str, torch.Tensor]] | None = None
        if not use_cache:
            return
        from bench.cache import key_of, path_for
        from bench.models import weights_digest

        self._inputs = {"v": self.VERSION, "model": model.name, "weights": digest or weights_digest(model),
                        "device": model.device.type, "dtype": str(next(model.model.parameters()).dtype),
                        "threads": torch.get_num_threads(), "torch": torch.__version__,
                        "batches": [{k: [list(g[0]), [str(x) for x in g[1]], g[2]] for k, g in b.items()}
                                    for b in batches]}
        self._path = path_for("preedit", key_of(self._inputs), "pt")
        if self._path.exists():
            try:
                stored = torch.load(self._path, map_location="cpu", weights_only=True)
                if len(stored) == len(batches):
                    self._stored, self.hit = stored, True
            except Exception as e:  # a corrupt entry is recomputed, not fatal
                log.warning("pre-edit probe cache %s unreadable (%s); recomputing", self._path, e)

    def get(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Batch ``i``'s (x'_e exact match before the edit, x_loc logits, x_loc labels); call in batch order when
        the cache missed (the probes are computed as they are asked for)."""
        if self._stored is not None:
            e = self._stored[i]
            labels = e["loc_labels"]
            logits = torch.zeros(*labels.shape, e["loc_logits"].shape[-1], dtype=e["loc_logits"].dtype)
            logits[labels != -100] = e["loc_logits"]
            return e["equiv_exact"], logits.to(self.model.device), labels.to(self.model.device)
        pre = _probe(self.model, self.batches[i], None)
        exact, _ = argmax_scores(*pre["equiv"])
        logits, labels = pre["loc"]
        if self._path is not None:
            self._fresh.append({"equiv_exact": exact.cpu(), "loc_labels": labels.cpu(),
                                "loc_logits": logits[labels != -100].detach().cpu()})
        return exact, logits, labels

    def save(self) -> bool:
        """Store the probes computed by :meth:`get` (all batches, under the size bound); whether it stored."""
        if self._path is None or self.hit or len(self._fresh) != len(self.batches):
            return False
        mb = sum(e["loc_logits"].numel() * e["loc_logits"].element_size() for e in self._fresh) / 2**20
        if mb > PRE_CACHE_MAX_MB:
            log.info("pre-edit probes: %.0f MB of locality logits, over the %.0f MB bound: not cached", mb,
                     PRE_CACHE_MAX_MB)
            return False
        from bench.cache import store

        store(self._path, self._inputs, self._fresh, lambda v, f: torch.save(v, f))
        return True


@torch.no_grad()
def retention(model: EditableModel, records: Sequence[EditRecord], deltas: dict, chunk: int = 16
              ) -> tuple[dict[str, float], list[float]]:
    """Scores of the model with ``deltas`` on ALL of ``records`` (the edits made so far): ES (x'_e), edit
    accuracy (x_e), and, against the ORIGINAL model (no deltas), locality agreement, KL and drawdown (accuracy
    drawdown; for generation records the relative perplexity increase). Returns the means (``retention_*``) and
    each record's ES."""
    es: list[float] = []
    acc, agree, kl, draw = [], [], [], []
    classifier = model.kind == "classifier"
    for i in range(0, len(records), chunk):
        recs = list(records[i : i + chunk])
        tgt = [r.label for r in recs] if classifier else [r.target for r in recs]
        loc_tgt = [r.loc_label for r in recs] if classifier else [r.loc_answer for r in recs]
        sp = spaced(recs)
        groups = {"edit": ([r.prompt for r in recs], tgt, sp), "equiv": ([r.equiv_prompt for r in recs], tgt, sp),
                  "loc": ([r.loc_prompt for r in recs], loc_tgt, True)}
        post = _probe(model, groups, deltas)
        pre = _probe(model, {"loc": groups["loc"]}, None)
        es.extend(float(x) for x in argmax_scores(*post["equiv"])[0])
        acc.extend(float(x) for x in argmax_scores(*post["edit"])[0])
        (pre_l, lab), (post_l, _) = pre["loc"], post["loc"]
        mask = lab != -100
        agree.extend(argmax_agreement(pre_l, post_l, mask).tolist())
        kl.extend(per_seq_kl(pre_l, post_l, mask).tolist())
        if recs[0].kind == "generation":
            draw.extend((perplexity(post_l, lab) / perplexity(pre_l, lab) - 1.0).tolist())
        else:
            draw.extend((argmax_scores(pre_l, lab)[0].float() - argmax_scores(post_l, lab)[0].float()).tolist())
    means = {"retention_es": mean_ci(es)[0], "retention_edit_acc": mean_ci(acc)[0],
             "retention_loc_agree": mean_ci(agree)[0], "retention_loc_kl": mean_ci(kl)[0],
             "retention_drawdown": mean_ci(draw)[0]}
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
    :func:`~bench.models.weights_digest` when the caller has it (computed here otherwise)."""
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
                         digest, cache_pre)
    finally:
        if ours:
            gc.unfreeze()


def _known(recs: Sequence[EditRecord], classifier: bool) -> list[int]:
    """Indices of the records whose true answer is known (the ROME comparisons; never for classifiers)."""
    return [i for i, r in enumerate(recs) if r.true_answer is not None and not classifier]


def _probe_groups(recs: Sequence[EditRecord], classifier: bool, rome_neighbourhood: bool
                  ) -> dict[str, tuple[list[str], list[Any], bool]]:
    """The (prompts, targets, space) groups :func:`evaluate` probes for one edit batch: x_e, x'_e and x_loc, and
    for the records :func:`_known` names the ROME comparisons (``true_e``, ``true_q``, CounterFact's ``nb_new``)."""
    tgt = [r.label for r in recs] if classifier else [r.target for r in recs]
    loc_tgt = [r.loc_label for r in recs] if classifier else [r.loc_answer for r in recs]
    known = _known(recs, classifier)
    sp = spaced(recs)  # generated continuations (Wikitext) are kept verbatim, as edit_batch tokenises them
    return {
        "edit": ([r.prompt for r in recs], tgt, sp),
        "equiv": ([r.equiv_prompt for r in recs], tgt, sp),
        "loc": ([r.loc_prompt for r in recs], loc_tgt, True),
        "true_e": ([recs[i].prompt for i in known], [recs[i].true_answer for i in known], True),
        "true_q": ([recs[i].equiv_prompt for i in known], [recs[i].true_answer for i in known], True),
        "nb_new": ([recs[i].loc_prompt for i in known] if rome_neighbourhood else [],
                   [recs[i].target for i in known] if rome_neighbourhood else [], True),
    }


def _evaluate(editor: EditorLike, model: EditableModel, records: Sequence[EditRecord], edit_batch_size: int,
              rome_neighbourhood: bool, progress: Callable[[int, int], None] | None, mode: str,
              checkpoints: Sequence[int] | None, digest: str | None, cache_pre: bool) -> EvalResult:
    """:func:`evaluate`'s loop (arguments validated there)."""
    sequential = mode == "sequential"
    marks = checkpoint_schedule(len(records), checkpoints) if sequential else []
    done_marks: list[dict[str, float]] = []
    total: Any = None
    rows: list[dict[str, Any]] = []
    classifier = model.kind == "classifier"
    starts = list(range(0, len(records), edit_batch_size))
    all_groups = [_probe_groups(records[s : s + edit_batch_size], classifier, rome_neighbourhood) for s in starts]
    pres = PreEditProbes(model, [{k: g[k] for k in ("equiv", "loc")} for g in all_groups], digest, cache_pre)
    for b, start in enumerate(starts):
        recs = list(records[start : start + edit_batch_size])
        groups = all_groups[b]
        known = _known(recs, classifier)
        pre_q_exact, pre_loc, loc_labels = pres.get(b)
        eb = edit_batch(model, recs)
        with PeakMemory(model.device) as mem:
            t0 = time.perf_counter()
            if sequential and total is not None:
                with model.applying(total.deltas):  # the edit is computed on the model as already edited
                    edit = editor.edit(eb)
            else:
                edit = editor.edit(eb)
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
        edit_steps = edit.steps
        if sequential:
            edit = edit.detach()
            total = edit if total is None else total + edit
            edit = total  # the rows score the model with every edit so far
        post = _probe(model, groups, edit.deltas)
        e_exact, e_tok = argmax_scores(*post["edit"])
        q_exact, q_tok = argmax_scores(*post["equiv"])
        pre_loc_exact, _ = argmax_scores(pre_loc, loc_labels)
        post_loc_exact, _ = argmax_scores(*post["loc"])
        post_loc = post["loc"][0]
        ans_mask = loc_labels != -100
        agree = argmax_agreement(pre_loc, post_loc, ans_mask)
        kl = per_seq_kl(pre_loc, post_loc, ans_mask)
        generation = recs[0].kind == "generation"
        if generation:
            ppl_pre = perplexity(pre_loc, loc_labels).tolist()
            ppl_post = perplexity(post_loc, loc_labels).tolist()
        rome: dict[str, list[float]] = {}
        if known:
            nan = [float("nan")] * len(recs)
            rome["efficacy"], rome["paraphrase"], rome["p_new"] = list(nan), list(nan), list(nan)
            lp = {k: seq_logprob(*post[k]).tolist() for k in post}
            for j, i in enumerate(known):
                rome["p_new"][i] = math.exp(lp["edit"][i])
                rome["efficacy"][i] = float(lp["edit"][i] > lp["true_e"][j])
                rome["paraphrase"][i] = float(lp["equiv"][i] > lp["true_q"][j])
            if rome_neighbourhood:
                rome["neighbourhood"] = list(nan)
                for j, i in enumerate(known):
                    rome["neighbourhood"][i] = float(lp["loc"][i] > lp["nb_new"][j])
        for i, r in enumerate(recs):
            row: dict[str, Any] = {
                "case_id": r.case_id,
                "batch": start // edit_batch_size,
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
                "drawdown": float(pre_loc_exact[i]) - float(post_loc_exact[i]),
                "loc_agree": float(agree[i]),
                "loc_kl": float(kl[i]),
                "edit_time_s": dt,
                "edit_steps": float(edit_steps),
                "edit_peak_mem_mb": mem.mb,
            }
            for k, v in rome.items():
                row[k] = v[i]
            if generation:
                row.update(ppl_pre=ppl_pre[i], ppl_post=ppl_post[i], drawdown=ppl_post[i] / ppl_pre[i] - 1.0)
            if sequential:
                row["step"] = start // edit_batch_size + 1
            rows.append(row)
        if sequential and any(len(rows) - len(recs) < k <= len(rows) for k in marks):
            scores, es_each = retention(model, records[: len(rows)], total.deltas)
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
