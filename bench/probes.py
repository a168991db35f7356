"""Probing the model without editing it: teacher-forced exact match, the unedited model's verdicts on locality
candidates (cached), several probe groups in one forward pass, and the pre-edit probes of an evaluation (cached
per model and test set)."""

from __future__ import annotations

import json
import logging
from typing import Any, Sequence

import torch

from bench import progress
from bench.cache import cached, key_of, path_for, store
from bench.data import EditBatch, collate
from bench.losses import argmax_scores
from bench.models import EditableModel, weights_digest

log = logging.getLogger(__name__)


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
    def compute() -> list[bool]:
        # Batches of pairs of similar length pad less; the verdicts come back in the pairs' order.
        order = sorted(range(len(pairs)), key=lambda i: (len(pairs[i][0]) + len(pairs[i][1]), i))
        out = [False] * len(pairs)
        with progress.step(f"locality verdicts of {model.name} on {len(pairs)} prompts") as count:
            for s in range(0, len(order), batch_size):
                idx = order[s : s + batch_size]
                exact = exact_match(model, collate(model, [pairs[i][0] for i in idx], [pairs[i][1] for i in idx]))
                for i, x in zip(idx, exact.tolist()):
                    out[i] = bool(x)
                count(s + len(idx), len(pairs))
        return out

    inputs = {"model": model.name, "weights": digest or weights_digest(model), "pairs": [list(p) for p in pairs]}
    verdicts, _ = cached("verdicts", inputs, "json", compute, lambda v, f: f.write_text(json.dumps(v)),
                         lambda f: [bool(x) for x in json.loads(f.read_text())])
    if len(verdicts) != len(pairs):
        raise ValueError(f"cached verdicts: {len(verdicts)} for {len(pairs)} pairs")
    return verdicts


def probe(model: EditableModel, groups: dict[str, tuple[list[str], list[Any], bool]], deltas: dict | None
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
        pre = probe(self.model, self.batches[i], None)
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
        store(self._path, self._inputs, self._fresh, lambda v, f: torch.save(v, f))
        return True
