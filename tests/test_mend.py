"""MEND against the math: gradient factorisation, identity init, normaliser, sharing, training, checkpoints,
batched edits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.data import collate, edit_batch
from bench.models import load_model
from methods import Budget
from methods.base import weights_digest
from methods.base import gradient_factors
from methods.mend import MEND, MENDHparams
from methods.nets import LowRankMLP, RunningNorm
from tests.conftest import autograd_weight_grads, tiny

SMALL = {"rank": 16, "lr": 1e-3, "edit_lr": 1e-2}


def test_factorised_gradient_equals_autograd_with_padding(gen_model, zsre) -> None:
    m = gen_model
    recs = zsre["test"][:6]  # different lengths -> padded rows
    batch = edit_batch(m, recs)
    pads = [v for k, v in batch.inputs.items() if k.endswith("attention_mask")]
    assert any((v == 0).any() for v in pads)
    factors = gradient_factors(m, batch)
    ref = autograd_weight_grads(m, batch)
    for n in m.edit_params:
        u, d = factors[n]
        assert u.shape[1] == m.io_dims(n)[0] and d.shape[1] == m.io_dims(n)[1]
        g = m.outer(u, d)
        rel = (g - ref[n]).norm() / ref[n].norm()
        assert rel < 1e-5, (m.name, n, float(rel))
    n_real = int(batch.inputs["attention_mask"].sum()) if m.kind == "causal" else None
    if n_real is not None:  # padding rows dropped
        assert all(factors[n][0].shape[0] <= n_real for n in m.edit_params)


def test_identity_init_with_unit_stats_is_minus_alpha_times_gradient(gen_model, zsre) -> None:
    m = gen_model
    ed = MEND(m, {**SMALL, "edit_lr": 1e-3})
    for gt in ed.nets.values():  # mu = 0, sigma = 1
        for norm in (gt.norm_u, gt.norm_d):
            norm.count.fill_(3.0)
            norm.mean.zero_()
            norm.m2.fill_(2.0)
    batch = edit_batch(m, zsre["test"][:2])
    e = ed.edit(batch)
    ref = autograd_weight_grads(m, batch)
    for n in m.edit_params:
        expected = m.weights()[n] - 1e-3 * ref[n]
        got = m.weights()[n] + e.deltas[n]
        assert torch.allclose(got, expected, atol=1e-6, rtol=0), n


def test_running_norm_matches_numpy_and_is_frozen_in_eval() -> None:
    torch.manual_seed(0)
    chunks = [torch.randn(n, 7) * 3 + 1 for n in (1, 5, 12)]
    rn = RunningNorm(7)
    for c in chunks:
        rn.update(c)
    allx = torch.cat(chunks).double().numpy()
    assert np.allclose(rn.mean.numpy(), allx.mean(0), atol=1e-12)
    assert np.allclose(rn.var.numpy(), allx.var(0, ddof=1), atol=1e-10)
    m = tiny("tiny-gpt2")
    ed = MEND(m, SMALL)
    batch = edit_batch(m, [*tiny_records()[:1]])
    ed.train(False)
    ed.edit(batch)
    assert all(float(g.norm_u.count) == 0 for g in ed.nets.values()), "eval edit changed the statistics"
    ed.train(True)
    ed.edit(batch)
    assert all(float(g.norm_u.count) > 0 for g in ed.nets.values())


def tiny_records():
    from bench.data import load_task

    return load_task("zsre", sizes={"train": 8, "val": 4, "test": 4})["test"]


def test_one_network_per_shape_with_distinct_film_per_layer() -> None:
    m = tiny("tiny-llama")  # gate/up (in 32, out 64) x3 layers and down (in 64, out 32) x3
    ed = MEND(m, SMALL)
    assert set(ed.groups) == {"32x64", "64x32"}
    assert len(ed.groups["32x64"]) == 6 and len(ed.groups["64x32"]) == 3
    layer = ed.nets["32x64"].net.layers[0]
    assert layer.scale.shape == (6, 96) and layer.shift.shape == (6, 96)
    unshared = MEND(m, {**SMALL, "shared": False})
    assert len(unshared.nets) == 9


def test_u_gets_gradient_at_identity_init() -> None:
    net = LowRankMLP(8, 4, n_modes=2)
    x = torch.randn(5, 8)
    out = net(x, torch.tensor([0, 1, 0, 1, 0]))
    assert torch.equal(out, x)  # identity at init
    (out * torch.randn_like(out)).sum().backward()
    assert net.layers[0].u.grad is not None and net.layers[0].u.grad.abs().sum() > 0


def test_variant_flags_validate() -> None:
    with pytest.raises(ValueError, match="needs combine: false"):
        MENDHparams(x_only=True)
    with pytest.raises(ValueError, match="at most one"):
        MENDHparams(combine=False, x_only=True, delta_only=True)
    m = tiny("tiny-gpt2")
    one = MEND(m, {**SMALL, "combine": False, "one_sided": True})
    gt = one.nets["32x128"]  # u has 32 dims < delta 128 -> the u side is transformed
    assert gt.u_net is not None and gt.d_net is None and gt.net is None
    assert MEND(m, {**SMALL, "combine": False, "delta_only": True}).nets["32x128"].u_net is None


def test_short_training_improves_validation_and_keeps_base_model(zsre) -> None:
    m = tiny("tiny-llama")
    before = weights_digest(m)
    torch.manual_seed(0)
    ed = MEND(m, {**SMALL, "lr": 1e-3, "edit_lr": 1e-2})
    val = zsre["val"][:8]
    untrained = ed.validate(val)
    logged = []
    fit = ed.fit(zsre["train"], val, Budget(max_steps=60, val_every=20, patience=10),
                 log_fn=lambda step, mets: logged.append((step, dict(mets))))
    trained = ed.validate(val)
    # (ES on a tiny random model need not move in 60 steps; the losses must, and the kept state is a trained one)
    assert trained["val_L_e"] < untrained["val_L_e"]
    assert trained["val_loss"] < untrained["val_loss"]
    assert fit.best_step > 0 and not fit.kept_initial
    assert fit.steps > 0 and any("train_L_e" in m_ for _, m_ in logged) and any("val_es" in m_ for _, m_ in logged)
    ed.edit(edit_batch(m, zsre["test"][:2]))
    assert weights_digest(m) == before


def test_checkpoint_round_trip_and_mismatch(tmp_path, zsre) -> None:
    m = tiny("tiny-gpt2")
    ed = MEND(m, SMALL)
    ed.fit(zsre["train"], zsre["val"][:4], Budget(max_steps=5, val_every=5))
    ed.train(True)  # make sure the normaliser holds statistics, whichever state fit kept
    ed.edit(edit_batch(m, zsre["train"][:3]))
    ed.train(False)
    path = ed.save(tmp_path / "ck")
    again = MEND(m, SMALL)
    again.load(path)
    b = edit_batch(m, zsre["test"][:2])
    e1, e2 = ed.edit(b), again.edit(b)
    assert all(torch.equal(e1.deltas[n], e2.deltas[n]) for n in m.edit_params)
    counts = [float(g.norm_u.count) for g in again.nets.values()]
    assert counts == [float(g.norm_u.count) for g in ed.nets.values()] and min(counts) > 0  # normaliser travels
    other = load_model("tiny-gpt2", edit_params=["transformer.h.3.mlp.*.weight"])
    with pytest.raises(ValueError, match="edited parameter names differ"):
        MEND(other, SMALL).load(path)
    with pytest.raises(ValueError, match="family is 'gpt2'"):
        MEND(tiny("tiny-llama"), SMALL).load(path)


@pytest.mark.parametrize("alias", ["tiny-gpt2", "tiny-t5"])
def test_batched_edit_is_the_sum_of_single_edits(alias, zsre) -> None:
    m = tiny(alias)
    torch.manual_seed(0)
    ed = MEND(m, {**SMALL, "id_init": False})  # a non-trivial network
    recs = zsre["test"][:4]
    batched = ed.edit(edit_batch(m, recs))
    singles = [ed.edit(edit_batch(m, [r])) for r in recs]
    assert ed.edit(edit_batch(m, recs[:1])).deltas  # B = 1 runs
    for n in m.edit_params:
        total = sum(s.deltas[n] for s in singles)
        assert torch.allclose(batched.deltas[n], total, atol=1e-5 * float(total.abs().max()) + 1e-7), n


def test_edit_is_stateless(zsre) -> None:
    m = tiny("tiny-gpt2")
    ed = MEND(m, {**SMALL, "id_init": False})
    a, b = edit_batch(m, zsre["test"][:1]), edit_batch(m, zsre["test"][1:2])
    alone = ed.edit(b)
    ed.edit(a)
    again = ed.edit(b)
    assert all(torch.equal(alone.deltas[n], again.deltas[n]) for n in m.edit_params)


def test_classifier_edit_factorisation() -> None:
    m = tiny("tiny-bert")
    batch = collate(m, ["a short claim", "a somewhat longer claim about things"], [1, 0])
    factors = gradient_factors(m, batch)
    ref = autograd_weight_grads(m, batch)
    for n in m.edit_params:
        g = m.outer(*factors[n])
        assert (g - ref[n]).norm() / ref[n].norm() < 1e-5


def test_editor_network_is_the_official_one_at_init() -> None:
    """Official LRLinear(init="id"): U = 0, V standard normal, and clamp(min=0) after EVERY layer (its ``relu`` flag
    is ignored), as Eq. 3b writes it; the alternatives are options."""
    torch.manual_seed(0)
    net = LowRankMLP(256, 64, n_modes=1)
    assert all(layer.act for layer in net.layers)
    v = net.layers[0].v.detach()
    assert abs(float(v.std()) - 1.0) < 0.05 and abs(float(v.mean())) < 0.05
    assert all(float(layer.u.detach().abs().sum()) == 0 for layer in net.layers)
    x = torch.randn(5, 256)
    assert torch.equal(net(x, torch.zeros(5, dtype=torch.long)), x)
    linear_out = LowRankMLP(256, 64, n_modes=1, output_act=False, v_init="xavier")
    assert not linear_out.layers[-1].act and float(linear_out.layers[0].v.detach().std()) < 0.2
    hp = MENDHparams()
    assert hp.output_act and hp.v_init == "randn"
    with pytest.raises(ValueError, match="v_init"):
        LowRankMLP(8, 4, n_modes=1, v_init="uniform")
