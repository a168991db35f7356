"""WISE: Rethinking the Knowledge Memory for Lifelong Model Editing (Wang, Li, Yao, Chen, Wang, Chen, Zhang, Zhang,
Chen, NeurIPS 2024, arXiv 2405.14768), after the authors' code as EasyEdit ships it (``easyeditor/models/wise``:
``WISE.py``, ``utils.py``; ``hparams/WISE/llama-7b.yaml``).

Edits go into a side copy of one MLP output projection, never into the model: a shard of the side memory
(:class:`~methods.wise_memory.SideMemory`, a module adaptor), which a router consults per sequence. One edit:

1. its rows: the prompt after each context template (the bare prompt and ten greedy continuations of "I", "You",
   "Because", "Yes", "Q: ", of 5 and of 10 tokens) followed by the target, and one out-of-scope row, a locality
   input with its answer drawn from the TRAINING split (EasyEdit appends the request's own locality prompt, the
   one its evaluation scores; this suite never trains on an evaluated input);
2. ``n_iter`` steps of SGD (``edit_lr``, weight decay on the whole side weight) on the current shard, its gradient
   masked to a random ``mask_ratio`` of the entries (one mask per shard: a new one every ``save_freq`` edits), the
   side weight clamped to within ``norm_constraint`` of W0 entrywise; the projection runs with the side weight
   on every row. Loss: the target NLL of the in-scope rows plus the activation margins on the distance between
   the side and original projections' activations (:func:`~methods.wise_memory.activation_distance`): in-scope
   rows above ``beta``, the out-of-scope row below ``alpha``, and every in-scope row ``gamma`` above it (each the
   mean of its positive violations). Stops early when the loss moved by at most 1e-4 and is at most 0.02;
3. the edit's in-scope distance (the last pass's mean) becomes the shard's ``min_act`` if smaller; the shard is
   saved every ``save_freq`` edits and the saved ones merged every ``merge_freq`` (TIES), by composition.

Defaults: EasyEdit ``hparams/WISE/llama-7b.yaml`` (mask 0.2, lr 1.0, 70 steps, norm constraint 1.0, margins
alpha/beta/gamma 5/20/10, act_ratio 0.88, save every 500, merge every 1000, TIES density 0.53, retrieve on,
replay off), the layer at its LLaMA-2-7B depth (block 27 of 32, as GRACE here). The margins are LLaMA-2-7B's
activation scale, kept as the paper's. Departures: the out-of-scope row (above); the NLL is each row's mean over
its target tokens (EasyEdit divides by the target length plus the last prompt token); distances leave padding
out; the masks are drawn from a generator seeded with ``seed`` and the shard index (EasyEdit: numpy's global RNG).
The blocks below the layer run once per edit (:meth:`~bench.models.EditableModel.upper_blocks_only`).
Causal models only.
"""

from __future__ import annotations

import hashlib
import random
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from pydantic import Field, model_validator
from torch import Tensor

from bench.data.batches import EditBatch, collate
from bench.data.kinds import kind_of
from bench.data.records import EditRecord
from bench.generation import greedy
from bench.models import EditableModel
from methods.adapted import AdaptorEditor, target_nll
from methods.base import Budget, Edit, FitResult, Hparams, StepLogger
from methods.wise_memory import SideMemory, activation_distance, side_output


class WISEHparams(Hparams):
    """EasyEdit ``hparams/WISE/llama-7b.yaml`` (see the module docstring for what departs)."""

    layer: int | None = Field(default=None, ge=0, description="block whose MLP output projection gets the memory")
    edit_lr: float = Field(default=1.0, gt=0)
    n_iter: int = Field(default=70, gt=0)
    mask_ratio: float = Field(default=0.2, gt=0, le=1)
    norm_constraint: float = Field(default=1.0, gt=0)
    weight_decay: float = Field(default=1e-5, ge=0)
    alpha: float = 5.0
    beta: float = 20.0
    gamma: float = 10.0
    act_ratio: float = Field(default=0.88, gt=0)
    save_freq: int = Field(default=500, gt=0)
    merge_freq: int = Field(default=1000, gt=0)
    density: float = Field(default=0.53, gt=0, le=1)
    template_starts: list[str] = Field(default=["I", "You", "Because", "Yes", "Q: "])
    template_lengths: list[int] = Field(default=[5, 10])
    seed: int = 0

    @model_validator(mode="after")
    def _merge_after_saves(self) -> "WISEHparams":
        if self.merge_freq % self.save_freq:
            raise ValueError(f"merge_freq ({self.merge_freq}) must be a multiple of save_freq ({self.save_freq}): "
                             f"a merge joins whole saved shards")
        return self


class WISE(AdaptorEditor):
    """A routed side memory at one MLP output projection; the model's weights are never changed."""

    name = "wise"
    Hparams = WISEHparams
    hparams: WISEHparams
    has_fit_step = True  # fit keeps the training records (out-of-scope rows) and writes the context templates
    uses_training_data_at_edit_time = True

    def __init__(self, model: EditableModel, hparams: Any = None, data_root: str | None = None) -> None:
        super().__init__(model, hparams, data_root)
        self.pool: list[EditRecord] = []
        self._templates: list[str] | None = None

    def fit(self, train: Sequence[EditRecord], val: Sequence[EditRecord], budget: Budget | None = None,
            log_fn: StepLogger | None = None, state_dir: str | Path | None = None) -> FitResult:
        """No training: keep the training records (the out-of-scope rows) and write the context templates."""
        t0 = time.time()
        self.pool = [r for r in train if r.loc_prompt]
        self.templates()
        return FitResult(seconds=time.time() - t0)

    def templates(self) -> list[str]:
        """"{}" and the greedy continuations of each start, of each length, on the unedited model (computed once)."""
        if self._templates is None:
            hp, out = self.hparams, ["{}"]
            with _bare(self.model):
                for n in hp.template_lengths:
                    said = greedy(self.model, hp.template_starts, n, stops=())
                    out += [(s + c).replace("{", " ").replace("}", " ") + " {}"
                            for s, c in zip(hp.template_starts, said)]
            self._templates = out
        return self._templates

    def _rows(self, batch: EditBatch) -> tuple[EditBatch, int]:
        """The in-scope rows (each record after each template, with its target) and one out-of-scope row per
        record (a training record's locality input and answer, drawn seeded by the edit's text)."""
        if not self.pool:
            raise RuntimeError("wise needs training records for its out-of-scope rows: call fit(train, val) first")
        recs = list(batch.records)
        if not recs:
            raise ValueError("wise: the edit batch carries no records (their prompts and targets are needed)")
        kind = kind_of(recs)
        prompts = [t.format(r.prompt) for r in recs for t in self.templates()]
        targets = [kind.target(r) for r in recs for _ in self.templates()]
        key = "\x1f".join(r.prompt for r in recs)
        rng = random.Random(int(hashlib.sha256(key.encode()).hexdigest()[:12], 16))
        out = rng.sample(self.pool, min(len(recs), len(self.pool)))
        rows = collate(self.model, prompts + [r.loc_prompt for r in out], targets + kind_of(out).loc_targets(out),
                       recs + out)
        return rows, len(prompts)

    def _mask(self, shard: int, like: Tensor) -> Tensor:
        """The shard's gradient mask: each entry kept with probability ``mask_ratio`` (seeded by the shard)."""
        gen = torch.Generator().manual_seed(self.hparams.seed * 1_000_003 + shard)
        return (torch.rand(like.shape, generator=gen) < self.hparams.mask_ratio).to(like)

    def edit(self, batch: EditBatch) -> Edit:
        m, hp, module = self.model, self.hparams, self.module
        w0 = m.weights()[m.edit_params[0]].detach()
        state = m.adaptors().get(module)
        count = state.count if isinstance(state, SideMemory) else 0
        current = state.shard if isinstance(state, SideMemory) else torch.zeros_like(w0)
        rows, n_in = self._rows(batch)
        mask = self._mask(count // hp.save_freq, w0)
        with _without(m, module), m.upper_blocks_only(rows.inputs, self.layer):
            delta, act, steps, loss = self._train(rows, n_in, w0, current.clone(), mask)
        settings = {"conv1d": m.conv1d, "act": _act_name(m), "act_ratio": hp.act_ratio, "save_freq": hp.save_freq,
                    "merge_freq": hp.merge_freq, "density": hp.density}
        memory = SideMemory(delta - current, act, [], [], 1, settings)
        return Edit({}, steps=steps, info={"wise_loss": loss, "in_scope_distance": act}, adaptors={module: memory})

    def _train(self, rows: EditBatch, n_in: int, w0: Tensor, delta: Tensor, mask: Tensor
               ) -> tuple[Tensor, float, int, float]:
        """The SGD loop (module docstring, step 2); returns the shard's new delta, the in-scope distance, the
        steps taken and the last loss."""
        hp, m = self.hparams, self.model
        delta.requires_grad_()
        seen: dict[str, Tensor] = {}

        def side(mod: torch.nn.Module, inp: tuple, out: Tensor) -> Tensor:
            seen["orig"], seen["new"] = out, out + side_output(inp[0], delta, m.conv1d)
            return seen["new"]

        losses: list[float] = []
        act = float("nan")
        handle = m.model.get_submodule(self.module).register_forward_hook(side)
        try:
            for _ in range(hp.n_iter):
                with torch.enable_grad():
                    nll = target_nll(m, rows.inputs, rows.labels, n_in)
                    dist = activation_distance(_act_name(m), seen["orig"], seen["new"], rows.inputs["attention_mask"])
                    loss = nll + _margins(dist[:n_in], dist[n_in:], hp)
                act = float(dist[:n_in].detach().mean())
                if len(losses) >= 2 and abs(losses[-1] - losses[-2]) <= 1e-4 and losses[-1] <= 0.02:
                    break
                (grad,) = torch.autograd.grad(loss, [delta])
                with torch.no_grad():
                    delta -= hp.edit_lr * (grad * mask + hp.weight_decay * (w0 + delta))
                    delta.clamp_(-hp.norm_constraint, hp.norm_constraint)
                losses.append(float(loss.detach()))
        finally:
            handle.remove()
        return delta.detach(), act, len(losses), losses[-1] if losses else float("nan")


def _margins(d_in: Tensor, d_out: Tensor, hp: WISEHparams) -> Tensor:
    """WISE's activation loss: the mean positive part of (d_out - d_in + gamma) over the pairs, of (d_out -
    alpha) and of (beta - d_in); a term with no positive part is 0."""
    def pos_mean(x: Tensor) -> Tensor:
        x = x[x > 0]
        return x.mean() if x.numel() else torch.zeros((), dtype=d_in.dtype, device=d_in.device)

    return pos_mean(d_out[:, None] - d_in[None, :] + hp.gamma) + pos_mean(d_out - hp.alpha) + pos_mean(hp.beta - d_in)


def _act_name(model: EditableModel) -> str:
    """The model's MLP activation (``hidden_act``, GPT-2's ``activation_function``)."""
    cfg = model.model.config
    return getattr(cfg, "hidden_act", None) or getattr(cfg, "activation_function", "gelu_new")


@contextmanager
def _without(model: EditableModel, module: str) -> Iterator[None]:
    """Within the block the applied adaptor of ``module`` is not hooked in (WISE edits with the side weight on
    every row, not through the router); restored on exit."""
    saved = model.applied.pop(module, None)
    try:
        yield
    finally:
        if saved is not None:
            model.applied[module] = saved


@contextmanager
def _bare(model: EditableModel) -> Iterator[None]:
    """Within the block nothing is applied (the templates are the unedited model's); restored on exit."""
    saved = dict(model.applied)
    model.applied.clear()
    try:
        yield
    finally:
        model.applied.update(saved)
