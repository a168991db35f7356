"""FT and FT+KL: reaching the target, locality, the contract's promises."""

from __future__ import annotations

import pytest
import torch

from bench.data import edit_batch, loc_batch
from bench.losses import kl_div, loc_mask
from methods import REGISTRY, get_editor
from methods.base import Edit, weights_digest
from methods.ft import FT, FTKL
from tests.conftest import tiny


def test_registry_and_declared_properties() -> None:
    assert {"ft", "ft_kl"} <= set(REGISTRY)
    assert not FT.requires_training and not FT.uses_training_data_at_edit_time and not FT.modifies_base_model
    assert FTKL.uses_training_data_at_edit_time and not FTKL.requires_training
    with pytest.raises(KeyError, match="unknown method 'nope'; valid: .*ft"):
        get_editor("nope")


def test_hparams_defaults_and_validation() -> None:
    hp = FT.Hparams()
    assert (hp.optimizer, hp.lr, hp.max_steps) == ("rmsprop", 1e-6, 100)
    assert FTKL.Hparams().c_edit == 1e-2
    with pytest.raises(ValueError, match="greater than 0"):
        FT.Hparams(lr=0)
    with pytest.raises(ValueError, match="Extra inputs"):
        FT.Hparams(learning_rate=1.0)


def test_ft_reaches_the_target_and_leaves_the_base_model(gen_model, zsre) -> None:
    m = gen_model
    before = weights_digest(m)
    batch = edit_batch(m, zsre["test"][:1])
    ed = FT(m, {"optimizer": "adam", "lr": 1e-2, "max_steps": 100})
    e = ed.edit(batch)
    exact = (m.logits(batch.inputs, e.deltas).argmax(-1) == batch.labels)[batch.target_mask].all()
    assert bool(exact), f"{m.name}: target not reached in {e.steps} steps"
    assert 0 < e.steps < 100
    assert set(e.deltas) == set(m.edit_params)
    assert all(e.deltas[n].shape == w.shape for n, w in m.weights().items())
    assert weights_digest(m) == before


def test_ft_kl_keeps_locality_kl_lower_than_ft_at_the_same_steps(zsre) -> None:
    m = tiny("tiny-llama")
    batch = edit_batch(m, zsre["test"][:1])
    common = {"optimizer": "adam", "lr": 3e-3, "max_steps": 15, "early_stop": False}
    ft = FT(m, common)
    ftkl = FTKL(m, {**common, "c_edit": 1.0, "c_loc": 10.0, "loc_batch_size": 8})
    ftkl.fit(zsre["train"], zsre["val"])
    e_ft, e_kl = ft.edit(batch), ftkl.edit(batch)
    assert e_ft.steps == e_kl.steps == 15
    probe = loc_batch(m, zsre["val"][:8])  # locality inputs neither editor trained on
    pre = m.logits(probe.inputs)
    mask = loc_mask(probe.inputs, probe.labels, m.kind)
    kl_ft = kl_div(pre, m.logits(probe.inputs, e_ft.deltas), mask).item()
    kl_kl = kl_div(pre, m.logits(probe.inputs, e_kl.deltas), mask).item()
    assert kl_kl < kl_ft, (kl_kl, kl_ft)


def test_ft_kl_without_training_data_says_so(zsre) -> None:
    m = tiny("tiny-gpt2")
    with pytest.raises(RuntimeError, match="call fit"):
        FTKL(m, {"lr": 1e-3}).edit(edit_batch(m, zsre["test"][:1]))


def test_ft_kl_edit_does_not_depend_on_earlier_edits(zsre) -> None:
    m = tiny("tiny-gpt2")
    ed = FTKL(m, {"optimizer": "adam", "lr": 1e-3, "max_steps": 3, "early_stop": False})
    ed.fit(zsre["train"], zsre["val"])
    a, b = edit_batch(m, zsre["test"][:1]), edit_batch(m, zsre["test"][1:2])
    alone = ed.edit(b)
    ed.edit(a)
    again = ed.edit(b)
    assert all(torch.equal(alone.deltas[n], again.deltas[n]) for n in alone.deltas)


def test_edits_compose() -> None:
    x, y = torch.ones(2, 2), torch.full((2, 2), 2.0)
    c = Edit({"a": x}, steps=1) + Edit({"a": y, "b": x}, steps=2)
    assert torch.equal(c.deltas["a"], x + y) and torch.equal(c.deltas["b"], x) and c.steps == 3
