"""FT and FT+KL: reaching the target, locality, the contract's promises."""

from __future__ import annotations

import pytest
import torch

from bench.data import edit_batch, loc_batch
from bench.losses import kl_div, loc_mask, nll
from methods import REGISTRY, get_editor
from methods.base import Edit, weights_digest
from methods.ft import FT, FTKL
from tests.conftest import tiny


def test_registry_and_declared_properties() -> None:
    assert {"ft", "ft_kl"} <= set(REGISTRY)
    assert not FT.learned and not FT.uses_training_data_at_edit_time and not FT.modifies_base_model
    assert FTKL.uses_training_data_at_edit_time and not FTKL.learned
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


def test_ft_clips_each_step_like_the_official_code(zsre) -> None:
    """grad_clip bounds every step's gradient norm (official config: 100): one SGD step moves the weights by at most
    lr * grad_clip; without clipping the same step is larger."""
    m = tiny("tiny-gpt2")
    b = edit_batch(m, zsre["test"][:1])

    def step_norm(clip: float | None) -> float:
        e = FT(m, {"optimizer": "sgd", "lr": 1.0, "max_steps": 1, "early_stop": False, "grad_clip": clip}).edit(b)
        return float(torch.sqrt(sum((d ** 2).sum() for d in e.deltas.values())))

    assert FT.Hparams().grad_clip == 100.0
    free = step_norm(None)
    assert step_norm(free / 10) == pytest.approx(free / 10, rel=1e-4)


def test_ft_kl_draws_fresh_locality_inputs_at_every_step(zsre, monkeypatch) -> None:
    """Official FT+KL takes a new locality batch at each step (``next(loc_sampler)``); ``fresh_loc: false`` keeps one
    per edit. Either way the draws are seeded by the edit's own text."""
    import methods.ft

    m = tiny("tiny-gpt2")
    drawn: list[tuple[str, ...]] = []
    real = methods.ft.loc_batch

    def spy(model, recs):  # type: ignore[no-untyped-def]
        drawn.append(tuple(r.loc_prompt for r in recs))
        return real(model, recs)

    monkeypatch.setattr(methods.ft, "loc_batch", spy)
    b = edit_batch(m, zsre["test"][:1])
    for fresh, n_batches in ((True, 4), (False, 1)):
        drawn.clear()
        ed = FTKL(m, {"optimizer": "adam", "lr": 1e-3, "max_steps": 4, "early_stop": False, "loc_batch_size": 2,
                      "fresh_loc": fresh})
        ed.fit(zsre["train"], zsre["val"])
        ed.edit(b)
        assert len(set(drawn)) == n_batches and len(drawn) == n_batches
        first = list(drawn)
        drawn.clear()
        ed.edit(b)
        assert drawn == first  # seeded by the edit: the same draws again


def test_ft_l_tunes_only_its_layers_within_the_constraint(zsre) -> None:
    """FT-L (ROME/MEMIT's baseline): only the MLP output projections of ``layers`` change, never by more than
    norm_constraint per element; unconstrained it moves further and edits; it refuses models it cannot locate."""
    from methods.ftl import FTL

    m = tiny("tiny-llama")
    before = weights_digest(m)
    b = edit_batch(m, zsre["test"][:1])
    hp = {"layers": [1, 2], "lr": 1e-1, "max_steps": 10, "norm_constraint": 1e-3}
    e = FTL(m, hp).edit(b)
    assert sorted(e.deltas) == [f"model.layers.{i}.mlp.down_proj.weight" for i in (1, 2)]
    assert all(float(d.abs().max()) <= 1e-3 + 1e-9 for d in e.deltas.values())
    assert weights_digest(m) == before and e.steps == 10
    start = float(nll(m.logits(b.inputs), b.labels))
    free = FTL(m, {**hp, "norm_constraint": None, "max_steps": 30, "stop_loss": start - 1.0}).edit(b)
    assert max(float(d.abs().max()) for d in free.deltas.values()) > 1e-3
    assert 0 < free.steps < 30 and free.info["final_loss"] < start - 1.0  # stopped at the loss threshold
    assert FTL.Hparams().layers == [0] and FTL.Hparams().max_steps == 25 and FTL.Hparams().norm_constraint == 5e-4
    with pytest.raises(ValueError, match="causal"):
        FTL(tiny("tiny-t5"))


@pytest.mark.parametrize("alias", ["tiny-gpt2", "tiny-llama", "tiny-t5"])
def test_ft_kl_step_shares_one_forward_pass_with_the_same_values(zsre, alias) -> None:
    """FT+KL scores the edit input and its locality inputs in one forward pass: the edit logits, the KL term and
    its gradient equal those of two separate passes (the official code's), up to float rounding."""
    m = tiny(alias)
    ed = FTKL(m, {"lr": 1e-3, "loc_batch_size": 2, "c_loc": 1.0})
    ed.fit(zsre["train"], zsre["val"])
    b = edit_batch(m, zsre["test"][:2])
    ed._prepare(b)
    g = torch.Generator().manual_seed(0)
    deltas = {n: (1e-2 * torch.randn(w.shape, generator=g)).requires_grad_() for n, w in m.weights().items()}
    logits, kl = ed._step(deltas, b)
    lb, pre, mask = ed._loc
    assert torch.allclose(logits, m.logits(b.inputs, deltas), atol=1e-5)
    apart = kl_div(pre, m.logits(lb.inputs, deltas), mask)
    assert float(kl.detach()) > 0 and float(kl.detach()) == pytest.approx(float(apart.detach()), rel=1e-4, abs=1e-7)
    one = torch.autograd.grad(nll(logits, b.labels) + kl, list(deltas.values()))
    two = torch.autograd.grad(nll(m.logits(b.inputs, deltas), b.labels) + apart, list(deltas.values()))
    for x, y in zip(one, two):
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-6)


def test_ft_kl_reuses_unedited_locality_logits_without_changing_an_edit(zsre, monkeypatch) -> None:
    """Locality inputs drawn again get the unedited logits kept from their first draw: the edits are identical
    to recomputing them, with fewer forward passes of the unedited model; nothing is kept beyond the bound, and
    sequential editing (the "unedited" model moves) recomputes."""
    import methods.ft

    m = tiny("tiny-gpt2")
    pool = zsre["train"][:3]  # a small pool: draws repeat
    batches = [edit_batch(m, [r]) for r in zsre["test"][:4]]
    real = m.logits
    calls: list[bool] = []

    def counting(inputs, deltas=None):  # type: ignore[no-untyped-def]
        calls.append(deltas is None)
        return real(inputs, deltas)

    monkeypatch.setattr(m, "logits", counting)

    def run(memo_mb: float) -> tuple[list, int]:
        monkeypatch.setattr(methods.ft, "PRE_MEMO_MB", memo_mb)
        ed = FTKL(m, {"optimizer": "adam", "lr": 1e-3, "max_steps": 4, "early_stop": False})
        ed.fit(pool, zsre["val"])
        calls.clear()
        out = [ed.edit(b).deltas for b in batches]
        return out, sum(calls)

    fresh, n_fresh = run(0.0)
    kept, n_kept = run(512.0)
    assert n_fresh == 16 and n_kept <= 3  # 4 edits x 4 steps, against one pass per distinct locality input
    for a, b in zip(fresh, kept):
        assert all(torch.equal(a[k], b[k]) for k in a)
    ed = FTKL(m, {"optimizer": "adam", "lr": 1e-3, "max_steps": 2, "early_stop": False})
    ed.fit(pool, zsre["val"])
    with m.applying(fresh[0]):
        calls.clear()
        ed.edit(batches[1])
        ed.edit(batches[1])
    assert sum(calls) == 4 and not ed._pre
