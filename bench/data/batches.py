"""Tokenised edit batches: what editors, losses and metrics consume."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor

log = logging.getLogger(__name__)

from bench.data.kinds import kind_of
from bench.data.records import DataError, EditRecord

if TYPE_CHECKING:
    from bench.models import EditableModel


@dataclass
class EditBatch:
    """Tokenised (prompt, target) pairs ready for :meth:`EditableModel.logits`.

    ``labels`` is aligned with the logits position by position: ``logits[b, t]`` predicts ``labels[b, t]``; -100
    marks positions that are not target tokens (prompt, padding). For classifiers labels are (B, 1).
    ``records`` are the edit requests the batch was built from (may be empty for probe batches).
    """

    inputs: dict[str, Tensor]
    labels: Tensor
    records: list[EditRecord] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def target_mask(self) -> Tensor:
        return self.labels != -100


def _with_space(text: str) -> str:
    """Targets follow the prompt after a space; BPE tokenizers encode that space into the first target token."""
    return text if text[:1].isspace() else " " + text


def collate(model: "EditableModel", prompts: Sequence[str], targets: Sequence[str] | Sequence[int],  # noqa: F821
            records: Sequence[EditRecord] = (), max_length: int = 256,
            space: bool | Sequence[bool] = True) -> EditBatch:
    """Tokenise prompt/target pairs for the model's kind.

    - causal: ``prompt + " " + target`` as ids of the prompt followed by ids of the spaced target (tokenised
      apart so the boundary is exact), right-padded; labels on target tokens only, shifted to align with logits.
      ``space=False`` keeps the target as given (generated continuations carry their own leading space, or none
      when they continue a word); a sequence gives the flag per row.
    - seq2seq: encoder gets the prompt, decoder the target (teacher forcing from the model's decoder start).
    - classifier: text and an integer label.
    """
    tok = model.tokenizer
    pad = tok.pad_token_id
    dev = model.device
    if len(prompts) != len(targets):
        raise ValueError(f"collate: {len(prompts)} prompts but {len(targets)} targets")
    spaces = [space] * len(prompts) if isinstance(space, bool) else list(space)
    if len(spaces) != len(prompts):
        raise ValueError(f"collate: {len(prompts)} prompts but {len(spaces)} space flags")
    if model.kind == "classifier":
        enc = tok(list(prompts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        labels = torch.tensor([int(t) for t in targets], dtype=torch.long).unsqueeze(1)
        return EditBatch({k: v.to(dev) for k, v in enc.items()}, labels.to(dev), list(records))
    if model.kind == "seq2seq":
        enc = tok(list(prompts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        tgt = tok([str(t).strip() for t in targets], padding=True, truncation=True, max_length=max_length,
                  return_tensors="pt")
        labels = tgt["input_ids"].masked_fill(tgt["attention_mask"] == 0, -100)
        dec_in = model.model.prepare_decoder_input_ids_from_labels(labels=labels)
        inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                  "decoder_input_ids": dec_in, "decoder_attention_mask": tgt["attention_mask"]}
        return EditBatch({k: v.to(dev) for k, v in inputs.items()}, labels.to(dev), list(records))
    rows, labs = [], []
    for p, t, sp in zip(prompts, targets, spaces):
        p_ids = tok(p, add_special_tokens=False)["input_ids"]
        t_ids = tok(_with_space(str(t)) if sp else str(t), add_special_tokens=False)["input_ids"]
        if not t_ids:
            raise DataError(f"target {t!r} tokenises to nothing")
        p_ids = p_ids[-(max_length - len(t_ids)):] if len(p_ids) + len(t_ids) > max_length else p_ids
        ids = p_ids + t_ids
        # logits at position j predict token j+1: the target tokens are predicted at positions
        # len(p)-1 .. len(ids)-2.
        lab = [-100] * len(ids)
        for j, tid in enumerate(t_ids):
            lab[len(p_ids) - 1 + j] = tid
        rows.append(ids)
        labs.append(lab)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (r, lab) in enumerate(zip(rows, labs)):
        input_ids[i, : len(r)] = torch.tensor(r)
        attn[i, : len(r)] = 1
        labels[i, : len(lab)] = torch.tensor(lab)
    return EditBatch({"input_ids": input_ids.to(dev), "attention_mask": attn.to(dev)}, labels.to(dev), list(records))


def stack_batches(a: EditBatch, b: EditBatch, pad_id: int) -> EditBatch:
    """One batch holding ``a``'s rows then ``b``'s, right-padded to a common width (ids with ``pad_id``, masks
    and type ids with 0, labels with -100), so two probes can share one forward pass. Slicing the result's
    logits to ``[:len(a), :a.labels.shape[1]]`` gives exactly ``a``'s logits (padding is masked)."""

    def pad(x: Tensor, width: int, value: int) -> Tensor:
        if x.dim() < 2 or x.shape[1] == width:
            return x
        return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)

    inputs = {}
    for k in a.inputs:
        value = pad_id if k.endswith("input_ids") else 0
        w = max(a.inputs[k].shape[-1], b.inputs[k].shape[-1])
        inputs[k] = torch.cat([pad(a.inputs[k], w, value), pad(b.inputs[k], w, value)])
    w = max(a.labels.shape[1], b.labels.shape[1])
    labels = torch.cat([pad(a.labels, w, -100), pad(b.labels, w, -100)])
    return EditBatch(inputs, labels, [*a.records, *b.records])


def edit_batch(model: "EditableModel", records: Sequence[EditRecord]) -> EditBatch:  # noqa: F821
    """x_e -> y_e for each record (targets as the records' task kind gives them)."""
    kind = kind_of(records)
    return collate(model, [r.prompt for r in records], kind.targets(records), records, space=kind.spaced)


def equiv_batch(model: "EditableModel", records: Sequence[EditRecord]) -> EditBatch:  # noqa: F821
    """x'_e -> y_e (x_e itself where the record has no rephrase)."""
    kind = kind_of(records)
    return collate(model, [r.equiv_prompt for r in records], kind.targets(records), records, space=kind.spaced)


def loc_batch(model: "EditableModel", records: Sequence[EditRecord]) -> EditBatch:  # noqa: F821
    """x_loc -> its answer."""
    return collate(model, [r.loc_prompt for r in records], kind_of(records).loc_targets(records), records)
