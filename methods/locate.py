"""Shared pieces of the locate-then-edit editors ROME (Meng et al. 2022) and MEMIT (Meng et al. 2023), after the
authors' code (kmeng01/rome, kmeng01/memit): context templates, the subject's last token, keys (MLP
projection inputs) averaged over templates and the second moment of keys C = E[k k^T] over a text corpus, cached
on disk. The value optimisation itself lives in :mod:`methods.values`.

Everything runs through :class:`~bench.models.EditableModel` (``trace``/``capture``/``logits``), so it sees the
model as already edited (``applied``) in sequential editing and never mutates a weight. Neither editor imports
the other: both import this module.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import torch
from pydantic import Field, PositiveInt, conlist, field_validator
from torch import Tensor

from bench.data.records import DataError, EditRecord
from bench.models import EditableModel
from methods.base import Editor, FitResult, Hparams, StepLogger
from methods.budget import Budget
from methods.locate_stats import second_moment

log = logging.getLogger(__name__)


class LocateHparams(Hparams):
    """The value optimisation and covariance settings both papers share (ROME's GPT-2 XL / GPT-J values)."""

    layers: list[int] | None = Field(default=None, description="edited blocks; None: the model's default")
    v_num_grad_steps: PositiveInt = 20
    v_lr: float = Field(default=0.5, gt=0)
    v_weight_decay: float = Field(default=0.5, ge=0)
    clamp_norm_factor: float = Field(default=4.0, gt=0)
    kl_factor: float = Field(default=0.0625, ge=0)
    context_lengths: list[conlist(PositiveInt, min_length=2, max_length=2)] = Field(
        default=[[5, 10], [10, 10]], description="(tokens, count) of the random prefixes averaged over; [] for the "
                                                 "bare prompt alone")
    context_starts: list[str] | None = Field(default=None, description="texts the prefixes are sampled after; "
                                             "None: the method's (ROME: <|endoftext|>; MEMIT: The, Therefore, ...)")
    template_seed: int = 0
    mom2_corpus: str = Field(default="wikitext/wiki2_valid.txt",
                             description="text file (relative to the data root) the key second moment is taken on")
    mom2_n_tokens: PositiveInt = Field(default=100_000, description="corpus tokens in the second moment")
    mom2_seq_len: PositiveInt = 256

    # In a sweep file a list is a grid axis: ``layers: [5, 8]`` runs layer 5 and layer 8, and a band is written
    # ``layers: [[3, 4, 5]]``; likewise ``context_lengths: [[10, 5]]`` is one setting of one (length, count) pair.
    @field_validator("layers", mode="before")
    @classmethod
    def _one_layer(cls, v: Any) -> Any:
        return [v] if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("context_lengths", mode="before")
    @classmethod
    def _one_pair(cls, v: Any) -> Any:
        return [v] if isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) for x in v) else v


#: ROME's edited block per model (kmeng01/rome hparams/ROME/*.json) and this suite's measured choice for
#: SmolLM2-135M (see ``methods/rome.py``); MEMIT's default band ends there.
DEFAULT_LAYER: dict[str, int] = {"gpt2-medium": 8, "gpt2-large": 12, "gpt2-xl": 17, "EleutherAI/gpt-j-6B": 5,
                                 "smollm2-135m": 5}


def default_layer(model: EditableModel) -> int:
    """ROME's layer for the paper's models, the suite's measured choice for SmolLM2, else 30% of the depth (the
    paper's GPT-2 XL fraction, 17 of 48)."""
    if model.name in DEFAULT_LAYER:
        return DEFAULT_LAYER[model.name]
    return int(round(0.3 * (model.n_layers - 1)))


def require_causal(model: EditableModel, method: str) -> None:
    """Locate-then-edit methods need a decoder-only model with a block / MLP table entry."""
    if model.kind != "causal" or not model.spec.mlp_out:
        raise ValueError(f"{method} edits decoder-only (causal) models; {model.name} is {model.kind} "
                         f"({model.family})")


# ------------------------------------------------------------------------------------------- prompts


def context_templates(model: EditableModel, hp: LocateHparams, starts: Sequence[str]) -> list[list[str]]:
    """The context templates in the authors' groups: ``[["{}"], then for each (length, count) one group of
    ``count`` texts sampled (top-5, seeded by ``template_seed``) from the UNEDITED model after each start text
    (``hp.context_starts`` when set), ``length`` tokens in all, each followed by ``". {}"``]``."""
    starts = hp.context_starts or starts
    tok = model.tokenizer
    gen = torch.Generator().manual_seed(hp.template_seed)
    out = [["{}"]]
    for length, count in hp.context_lengths:
        per = [s for s in starts for _ in range(max(1, count // len(starts)))][:count]
        ids = [tok(s, add_special_tokens=False)["input_ids"] for s in per]
        width = max(len(i) for i in ids)
        seqs = [i + [tok.pad_token_id] * (width - len(i)) for i in ids]
        lens = [len(i) for i in ids]
        with torch.no_grad():
            while min(lens) < length:
                x = torch.tensor(seqs, device=model.device)
                att = torch.tensor([[1] * n + [0] * (len(s) - n) for s, n in zip(seqs, lens)], device=model.device)
                logits = model.model(input_ids=x, attention_mask=att).logits  # the base module: never edited
                last = logits[torch.arange(len(seqs)), torch.tensor(lens) - 1].float().softmax(-1).cpu()
                top = last.topk(5, dim=-1)
                pick = torch.multinomial(top.values, 1, generator=gen).squeeze(-1)
                nxt = top.indices[torch.arange(len(seqs)), pick].tolist()
                for r, t in enumerate(nxt):
                    if lens[r] < length:
                        if lens[r] == len(seqs[r]):
                            for s in seqs:
                                s.append(tok.pad_token_id)
                        seqs[r][lens[r]] = t
                        lens[r] += 1
        group = []
        for s, n in zip(seqs, lens):
            text = tok.decode(s[:n], skip_special_tokens=True).replace("{", " ").replace("}", " ")
            group.append(text.strip() + ". {}")
        out.append(group)
    return out


def group_weights(groups: Sequence[Sequence[str]]) -> list[float]:
    """One weight per template of ``groups`` (flattened in order) that averages within each group, then across
    groups: MEMIT's ``compute_ks`` (kmeng01/memit), where the bare prompt ``["{}"]`` weighs 1/2 beside one group
    of five prefixes (each 1/10)."""
    return [1.0 / (len(groups) * len(g)) for g in groups for _ in g]


def default_starts(model: EditableModel) -> list[str]:
    """ROME samples its prefixes after ``<|endoftext|>``; models without that token start from their BOS/EOS."""
    tok = model.tokenizer
    vocab = tok.get_vocab() if hasattr(tok, "get_vocab") else {}
    if "<|endoftext|>" in vocab:
        return ["<|endoftext|>"]
    return [tok.bos_token or tok.eos_token or "The"]


def subject_bounds(record: EditRecord) -> tuple[int, int]:
    """Character span of the record's subject in its prompt (first occurrence; case-insensitive when the exact
    case does not occur). Refuses records without a subject or whose prompt does not contain it."""
    subj = (record.subject or "").strip()
    if not subj:
        raise DataError(f"record {record.case_id}: ROME/MEMIT need the record's subject (dataset field "
                        f"'subject'); this record has none")
    at = record.prompt.find(subj)
    if at < 0:
        at = record.prompt.lower().find(subj.lower())
    if at < 0:
        raise DataError(f"record {record.case_id}: subject {subj!r} does not occur in the prompt "
                        f"{record.prompt!r}")
    return at, at + len(subj)


def _n_tokens(model: EditableModel, text: str) -> int:
    return len(model.tokenizer(text, add_special_tokens=False)["input_ids"])


def lookup_index(model: EditableModel, template: str, record: EditRecord) -> int:
    """Position of the subject's last token in ``template.format(record.prompt)`` (ROME's "subject_last")."""
    _, end = subject_bounds(record)
    prefix = template.split("{}")[0]
    return _n_tokens(model, prefix + record.prompt[:end]) - 1


# ------------------------------------------------------------------------------------------- keys


def keys_at(model: EditableModel, module: str, records: Sequence[EditRecord], templates: Sequence[str],
            deltas: dict[str, Tensor] | None = None, weights: Sequence[float] | None = None) -> Tensor:
    """(n_records, d_in): the input of ``module`` at the subject's last token, averaged over ``templates`` with
    ``weights`` (one per template, summing to 1; ``None``: a flat mean, ROME's k*; MEMIT's compute_ks passes
    :func:`group_weights`), in the model as edited by ``applied`` (+ ``deltas``)."""
    prompts = [t.format(r.prompt) for r in records for t in templates]
    idx = [lookup_index(model, t, r) for r in records for t in templates]
    enc = _encode(model, prompts)
    k = model.capture(enc, [module], deltas)[module].input
    rows = k[torch.arange(len(prompts), device=k.device), torch.tensor(idx, device=k.device)]
    rows = rows.reshape(len(records), len(templates), -1)
    if weights is None:
        return rows.mean(1)
    if len(weights) != len(templates):
        raise ValueError(f"keys_at: {len(weights)} weights for {len(templates)} templates")
    w = torch.tensor(list(weights), dtype=rows.dtype, device=rows.device)
    return (rows * w[None, :, None]).sum(1)


def io_at(model: EditableModel, module: str, records: Sequence[EditRecord],
          deltas: dict[str, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """(inputs, outputs) of ``module`` at the subject's last token of each bare prompt, one row per record."""
    enc = _encode(model, [r.prompt for r in records])
    idx = torch.tensor([lookup_index(model, "{}", r) for r in records], device=model.device)
    io = model.capture(enc, [module], deltas)[module]
    rows = torch.arange(len(records), device=model.device)
    return io.input[rows, idx], io.output[rows, idx]


def _encode(model: EditableModel, texts: Sequence[str]) -> dict[str, Tensor]:
    """Right-padded ids and mask, tokenised as :func:`bench.data.collate` tokenises prompts (no special tokens)."""
    tok = model.tokenizer
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(len(i) for i in ids)
    x = torch.full((len(ids), width), tok.pad_token_id, dtype=torch.long)
    m = torch.zeros((len(ids), width), dtype=torch.long)
    for r, i in enumerate(ids):
        x[r, : len(i)] = torch.tensor(i)
        m[r, : len(i)] = 1
    return {"input_ids": x.to(model.device), "attention_mask": m.to(model.device)}


# ------------------------------------------------------------------------------------------- statistics


def as_weight(model: EditableModel, name: str, upd_out_in: Tensor) -> Tensor:
    """An update computed as (out, in) laid out like the stored weight ((in, out) for GPT-2's Conv1D)."""
    w = dict(model.model.named_parameters())[name]
    upd = upd_out_in.T if model.conv1d else upd_out_in
    if upd.shape != w.shape:
        raise ValueError(f"update of shape {tuple(upd.shape)} does not fit {name} {tuple(w.shape)}")
    return upd.to(w.dtype)


class LocateEditor(Editor):
    """What ROME and MEMIT share as editors: causal models only, requests must name their subject, the context
    templates sampled once from the unedited model (after :meth:`starts`), the corpus file of the key statistics,
    and those statistics kept in memory once loaded (the disk cache is read once per module, not once per edit)."""

    supported_kinds: ClassVar[tuple[str, ...]] = ("causal",)
    needs_subject = True
    has_fit_step = True  # not learned: fit computes the templates and key statistics every edit reads
    hparams: LocateHparams

    def __init__(self, model: EditableModel, hparams: Hparams | Mapping[str, Any] | None = None,
                 data_root: str | None = None) -> None:
        super().__init__(model, hparams, data_root)
        self._groups: list[list[str]] | None = None
        self._moments: dict[str, Tensor] = {}

    def uses_moment(self) -> bool:
        """Whether edits read the key second moment (ROME can do without: ``mom2_adjustment: false``)."""
        return True

    def fit(self, train: Sequence[EditRecord], val: Sequence[EditRecord], budget: Budget | None = None,
            log_fn: StepLogger | None = None, state_dir: str | Path | None = None) -> FitResult:
        """Sample the context templates and load (or compute and cache) the key second moment of every edited
        module, on the unedited model, so that no edit pays for them. Trains nothing; the splits are not read."""
        t0 = time.time()
        self.templates()
        if self.uses_moment():
            for name in self.model.edit_params:
                self.moment(name.rsplit(".", 1)[0])
        return FitResult(seconds=time.time() - t0)

    def starts(self) -> list[str]:
        """Texts the prefixes are sampled after (ROME: the BOS-like token; MEMIT overrides)."""
        return default_starts(self.model)

    def template_groups(self) -> list[list[str]]:
        """The context templates in their groups (``[["{}"], [sampled prefixes], ...]``), computed at the first
        edit (or fit) and kept."""
        if self._groups is None:
            self._groups = context_templates(self.model, self.hparams, self.starts())
        return self._groups

    def templates(self) -> list[str]:
        """The context templates ("{}" plus sampled prefixes), flattened: the prompts values are optimised on."""
        return [t for g in self.template_groups() for t in g]

    def key_weights(self) -> list[float] | None:
        """How the editor averages a key over :meth:`templates`: ``None`` is a flat mean (ROME's authors);
        MEMIT overrides with its authors' group average."""
        return None

    def moment(self, module: str) -> Tensor:
        """C = E[k k^T] of ``module``'s input (:func:`second_moment`), loaded once per editor."""
        if module not in self._moments:
            self._moments[module] = second_moment(self.model, module, self.hparams, self.data_root)[0]
        return self._moments[module]

    @classmethod
    def data_files(cls, hparams: Mapping[str, Any]) -> list[str]:
        return [cls.Hparams(**dict(hparams)).mom2_corpus]
