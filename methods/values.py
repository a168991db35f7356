"""The value optimisation of the locate-then-edit editors (ROME's ``compute_v``, MEMIT's ``compute_z``): for each
fact, the vector added to a module's output at the subject's last token that makes the model say the new target.

:func:`optimise_values` optimises the vectors of several facts together, in one batched forward and backward pass
per step: the facts' prompts are stacked, each fact's vector is added on its own rows only, and the loss is the sum
of the per-fact losses, so every fact's gradient, Adam moments (elementwise), norm clamp and early stop are those
of optimising it alone (:func:`optimise_value`, the authors' one-fact-at-a-time loop); the results agree up to the
float noise of padding (``tests/test_rome_memit.py``). A fact that has stopped keeps its vector while the others
go on. ``bench.perf --values`` measures the speed-up per fact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from bench.data.batches import EditBatch, collate, stack_batches
from bench.data.records import EditRecord
from bench.models import EditableModel
from methods.locate import LocateHparams, lookup_index, subject_bounds

#: The loss below which a fact's optimisation stops (the authors' 5e-2).
STOP_LOSS = 5e-2


@dataclass
class ValueResult:
    """The optimised representation (``target_init + delta``) at the subject's last token, per record, with the
    initial one and the optimisation's last losses."""

    target: Tensor
    init: Tensor
    nll: float
    steps: int


def _value_prompts(model: EditableModel, record: EditRecord, templates: Sequence[str]) -> tuple[EditBatch, list[int]]:
    """The prompts a value vector is optimised on, as one batch: each template + the prompt with the target (the
    rewrite rows), then the "essence" prompt "{subject} is" -> "a"; and per row the token position whose
    module output the vector is added to (the subject's last token)."""
    rewrite = collate(model, [t.format(record.prompt) for t in templates], [record.target] * len(templates))
    at, end = subject_bounds(record)
    subj = record.prompt[at:end]
    essence = collate(model, [f"{subj} is"], ["a"])
    batch = stack_batches(rewrite, essence, model.tokenizer.pad_token_id)
    n_subj = len(model.tokenizer(subj, add_special_tokens=False)["input_ids"])
    return batch, [lookup_index(model, t, record) for t in templates] + [n_subj - 1]


def optimise_value(model: EditableModel, module: str, record: EditRecord, templates: Sequence[str],
                   hp: LocateHparams) -> ValueResult:
    """ROME's compute_v / MEMIT's compute_z for one request (:func:`optimise_values` of one fact)."""
    return optimise_values(model, module, [record], templates, hp)[0]


class _Facts:
    """The stacked prompts of several facts: rows, the subject position of each row, the fact each row belongs
    to, and the target / essence positions the losses read."""

    def __init__(self, model: EditableModel, records: Sequence[EditRecord], templates: Sequence[str]) -> None:
        parts = [_value_prompts(model, r, templates) for r in records]
        batch = parts[0][0]
        for b, _ in parts[1:]:
            batch = stack_batches(batch, b, model.tokenizer.pad_token_id)
        self.batch = batch
        self.n_rw = len(templates)
        per = self.n_rw + 1  # rewrite rows then the essence row, per fact
        dev = model.device
        self.idx = torch.tensor([i for _, idx in parts for i in idx], device=dev)
        self.rows = torch.arange(len(self.idx), device=dev)
        self.fact = self.rows // per
        self.first = torch.arange(len(records), device=dev) * per  # each fact's first rewrite row
        self.essence = self.first + self.n_rw
        rw = (self.rows % per) < self.n_rw
        labels = batch.labels.clone()
        labels[~rw] = -100  # the essence rows' "a" is not a target: only their next-token distribution counts
        self.t_rows, self.t_cols = (labels != -100).nonzero(as_tuple=True)
        self.t_labels = labels[self.t_rows, self.t_cols]
        self.n_tok = (labels != -100).float().sum(1).clamp(min=1)
        self.read_rows = torch.cat([self.t_rows, self.essence])
        self.read_cols = torch.cat([self.t_cols, self.idx[self.essence]])


def optimise_values(model: EditableModel, module: str, records: Sequence[EditRecord], templates: Sequence[str],
                    hp: LocateHparams) -> list[ValueResult]:
    """For each record, a vector delta added to ``module``'s output at the subject's last token of every prompt
    (each template + the prompt, and the "essence" prompt "{subject} is a") optimised with Adam (``v_lr``,
    ``v_num_grad_steps``, early stop below a loss of 0.05) to minimise the mean target NLL over the templates +
    ``kl_factor`` * KL(p_now || p_start) of the next token after the subject in the essence prompt +
    ``v_weight_decay`` * ||delta|| / ||v_init||^2 (the authors' form), with ||delta|| kept below
    ``clamp_norm_factor`` * ||v_init||. All records in one batch per step, each as if alone (module docstring).
    Runs on the model as already edited."""
    if not records:
        return []
    f = _Facts(model, records, templates)
    n = len(records)
    state: dict[str, Tensor | None] = {"delta": None, "init": None}

    def add_delta(name: str, out: Tensor) -> Tensor:
        if state["init"] is None:
            state["init"] = out[f.first, f.idx[f.first]].detach().clone()
        if state["delta"] is None:
            return out
        bump = torch.zeros_like(out)
        bump[f.rows, f.idx] = state["delta"][f.fact].to(out.dtype)
        return out + bump

    def losses() -> tuple[list[Tensor], Tensor]:
        """Per fact, the mean target NLL over its rewrite rows; and the essence rows' log-distributions."""
        logits = model.logits_at(f.batch.inputs, f.read_rows, f.read_cols).float()
        lp = torch.log_softmax(logits[: len(f.t_rows)], -1).gather(-1, f.t_labels.unsqueeze(-1)).squeeze(-1)
        per_row = -torch.zeros(len(f.rows), device=lp.device, dtype=lp.dtype).index_add(0, f.t_rows, lp) / f.n_tok
        nll = [per_row[int(s) : int(s) + f.n_rw].mean() for s in f.first]
        return nll, torch.log_softmax(logits[len(f.t_rows):], -1)

    # First pass (no delta): v_init and the essence prompts' starting distributions.
    with torch.no_grad(), model.trace([module], edit_output=add_delta):
        _, kl_init = losses()
    init = state["init"]
    assert init is not None
    delta, nlls, steps = _adam(model, module, add_delta, losses, kl_init, init, state, hp, n)
    return [ValueResult(target=(init[i] + delta[i]).detach(), init=init[i], nll=nlls[i], steps=steps[i])
            for i in range(n)]


def _adam(model: EditableModel, module: str, add_delta, losses, kl_init: Tensor, init: Tensor,  # noqa: ANN001
          state: dict[str, Tensor | None], hp: LocateHparams, n: int) -> tuple[Tensor, list[float], list[int]]:
    """The Adam loop on the facts' deltas (rows of one tensor placed in ``state``, where the module's hook adds
    them): per fact, target NLL + KL to its essence prompt's start + weight decay, its row clamped to
    ``clamp_norm_factor`` * ||v_init||, stopping below :data:`STOP_LOSS` or at the last step (no step taken then).
    A stopped fact's row is put back after each later step (Adam's momentum would move it). Returns the deltas,
    each fact's last NLL and the index of its last step."""
    delta = torch.zeros(n, init.shape[-1], device=init.device, requires_grad=True)
    state["delta"] = delta
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    max_norm = hp.clamp_norm_factor * init.norm(dim=-1)
    nlls, steps = [float("nan")] * n, [0] * n
    active = list(range(n))
    for it in range(hp.v_num_grad_steps):
        opt.zero_grad()
        with torch.enable_grad(), model.trace([module], edit_output=add_delta):
            nll, kl_lp = losses()
            total = []
            for i in active:
                kl = hp.kl_factor * torch.nn.functional.kl_div(kl_init[i : i + 1], kl_lp[i : i + 1],
                                                               log_target=True, reduction="batchmean")
                decay = hp.v_weight_decay * (delta[i].norm() / init[i].norm() ** 2)
                total.append((i, nll[i] + kl + decay))
        going = []
        for i, loss in total:
            nlls[i], steps[i] = float(nll[i].detach()), it
            if float(loss.detach()) >= STOP_LOSS and it < hp.v_num_grad_steps - 1:
                going.append((i, loss))
        if not going:
            break
        sum((loss for _, loss in going[1:]), going[0][1]).backward()
        kept = delta.detach().clone()
        opt.step()
        with torch.no_grad():
            active = [i for i, _ in going]
            stopped = [i for i in range(n) if i not in active]
            delta[stopped] = kept[stopped]
            for i in active:
                norm = delta[i].norm()
                if norm > max_norm[i]:
                    delta[i].mul_(max_norm[i] / norm)
    return delta.detach(), nlls, steps
