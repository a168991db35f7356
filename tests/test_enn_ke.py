"""ENN and KE: differentiable inner step, base-model anchoring, conditioning, checkpoints, statelessness."""

from __future__ import annotations

import pytest
import torch

from bench.data import collate, edit_batch, equiv_batch, loc_batch
from bench.losses import kl_div, loc_mask, nll
from bench.models import load_model
from methods import Budget
from methods.base import weights_digest
from methods.enn import ENN
from methods.ke import KE
from tests.conftest import autograd_weight_grads, tiny

KE_SMALL = {"hidden_dim": 32, "condition_dim": 32, "lr": 1e-2}


def test_declared_properties() -> None:
    assert ENN.learned and ENN.modifies_base_model and not ENN.uses_training_data_at_edit_time
    assert KE.learned and not KE.modifies_base_model
    assert ENN.Hparams().lr == 1e-5 and ENN.Hparams().step_lr == 1e-3 and ENN.Hparams().inner_lr == 1e-2
    assert ENN.Hparams().c_edit == 0.1 and ENN.Hparams().c_base == 1.0 and KE.Hparams().lr == 1e-5


def test_enn_inner_step_gradient_matches_finite_differences(zsre) -> None:
    m = load_model("tiny-gpt2", dtype=torch.float64)
    ed = ENN(m, {"inner_lr": 0.05})
    recs = zsre["test"][:1]
    eb, qb = edit_batch(m, recs), equiv_batch(m, recs)

    def post_loss() -> torch.Tensor:
        return nll(m.logits(qb.inputs, ed.edit(eb).deltas), qb.labels)

    ed.train(True)
    (grad,) = torch.autograd.grad(post_loss(), [ed.steps.lr])
    ed.train(False)
    eps = 1e-5
    for i in (0, 3, 5):
        with torch.no_grad():
            ed.steps.lr[i] += eps
        up = float(post_loss())
        with torch.no_grad():
            ed.steps.lr[i] -= 2 * eps
        down = float(post_loss())
        with torch.no_grad():
            ed.steps.lr[i] += eps
        fd = (up - down) / (2 * eps)
        assert grad[i].item() == pytest.approx(fd, rel=1e-4, abs=1e-8), i


def _kl_to_original(m, original_logits, probe, mask) -> float:
    return float(kl_div(original_logits, m.logits(probe.inputs), mask))


def test_enn_training_changes_the_base_and_c_base_keeps_it_close(zsre) -> None:
    results = {}
    for c_base in (0.0, 1.0):
        m = load_model("tiny-gpt2")
        probe = loc_batch(m, zsre["val"][:8])
        mask = loc_mask(probe.inputs, probe.labels, m.kind)
        with torch.no_grad():
            orig = m.logits(probe.inputs)
        before = weights_digest(m)
        torch.manual_seed(0)
        ed = ENN(m, {"lr": 3e-3, "c_loc": 0.0, "c_edit": 1.0, "c_base": c_base})
        fit = ed.fit(zsre["train"], zsre["val"][:4], Budget(max_steps=30, val_every=30, patience=10))
        ed.train(False)
        # fit keeps the best state: the trained one in both runs, so the anchors are compared fairly
        assert fit.best_step == 30 and weights_digest(m) != before
        results[c_base] = _kl_to_original(m, orig, probe, mask)
        assert all(not w.requires_grad for w in m.weights().values())
    assert results[1.0] < results[0.0], results


def test_enn_edit_leaves_no_state_and_round_trips(tmp_path, zsre) -> None:
    m = load_model("tiny-gpt2")
    ed = ENN(m, {"lr": 1e-3})
    ed.fit(zsre["train"], zsre["val"][:4], Budget(max_steps=5, val_every=5))
    a, b = edit_batch(m, zsre["test"][:1]), edit_batch(m, zsre["test"][1:2])
    alone = ed.edit(b)
    ed.edit(a)
    again = ed.edit(b)
    assert all(torch.equal(alone.deltas[n], again.deltas[n]) for n in m.edit_params)
    path = ed.save(tmp_path / "enn")
    fresh = load_model("tiny-gpt2")
    other = ENN(fresh, {"lr": 1e-3})
    other.load(path)  # carries the trained base weights and the step sizes
    assert weights_digest(fresh) == weights_digest(m)
    e2 = other.edit(b)
    assert all(torch.allclose(alone.deltas[n], e2.deltas[n]) for n in m.edit_params)


@pytest.mark.parametrize("alias", ["tiny-gpt2", "tiny-llama"])  # Conv1D and Linear
def test_ke_update_is_the_conditioned_mask_and_shift_of_the_gradient_by_hand(alias, zsre) -> None:
    """KE's update for each request, by hand: its condition c, the conditioner net's outputs split into col_a,
    row_a, col_b, row_b and n, a = softmax(row_a)ᵀ col_a, b = softmax(row_b)ᵀ col_b and
    dW = max_scale · σ(n) · (∇W · a + b) with ∇W the request's own loss gradient by autograd; a batch of two is
    the sum of the two requests' updates computed that way."""
    m = tiny(alias)
    torch.manual_seed(0)
    ed = KE(m, {**KE_SMALL, "max_scale": 0.5})
    recs = list(zsre["test"][:2])
    got = ed.edit(edit_batch(m, recs)).deltas
    want = {n: torch.zeros_like(w) for n, w in m.weights().items()}
    for r in recs:
        one = edit_batch(m, [r])
        grads = autograd_weight_grads(m, one)
        with torch.no_grad():
            c = ed.condition(one)
            for n, w in m.weights().items():
                rows, cols = w.shape
                out = ed.params[n.replace(".", "__")].net(c)[0]
                col_a, row_a = out[:cols], out[cols : cols + rows]
                col_b, row_b = out[cols + rows : 2 * cols + rows], out[2 * cols + rows : 2 * (cols + rows)]
                a = torch.outer(row_a.softmax(0), col_a)
                b = torch.outer(row_b.softmax(0), col_b)
                want[n] += 0.5 * torch.sigmoid(out[-1]) * (grads[n] * a + b)
    for n in m.edit_params:
        scale = float(want[n].abs().max())
        assert scale > 0 and torch.allclose(got[n], want[n], atol=1e-5 * scale), n


@pytest.mark.parametrize("n_steps", [1, 2])
def test_enn_edit_is_gradient_descent_with_its_learned_step_sizes(n_steps: int, zsre) -> None:
    """ENN's edit is n_steps of W <- W - lr_i ∇W L_e with each weight's learned step size, the gradient taken
    by autograd on a copy of the network at the weights reached so far (independent of ENN's functional path)."""
    m = load_model("tiny-gpt2", dtype=torch.float64)
    ed = ENN(m, {"inner_lr": 0.05, "n_steps": n_steps})
    with torch.no_grad():  # distinct step sizes, so a weight paired with another's lr shows
        ed.steps.lr.copy_(torch.linspace(0.02, 0.08, len(ed.steps.lr), dtype=ed.steps.lr.dtype))
    b = edit_batch(m, zsre["test"][:2])
    got = ed.edit(b).deltas
    want = {n: torch.zeros_like(w) for n, w in m.weights().items()}
    for _ in range(n_steps):
        grads = autograd_weight_grads(m, b, shift=want, reduce="mean")
        want = {n: want[n] - ed.steps.lr[i].detach() * grads[n] for i, n in enumerate(m.edit_params)}
    for n in m.edit_params:
        assert torch.allclose(got[n], want[n], rtol=1e-6, atol=1e-10 * float(want[n].abs().max())), n
    if n_steps == 2:  # the second step's gradient is taken at W + the first step (not at W again)
        first = {n: -ed.steps.lr[i].detach() * g for i, (n, g) in enumerate(autograd_weight_grads(m, b, reduce="mean").items())}
        assert not all(torch.allclose(got[n], 2 * first[n], rtol=1e-3) for n in m.edit_params)


def test_ke_conditioner_depends_on_the_edit_text() -> None:
    m = tiny("tiny-gpt2")
    ed = KE(m, KE_SMALL)
    c = ed.condition(collate(m, ["Who wrote Hamlet?", "What is the capital of Peru?"], ["Marlowe", "Cusco"]))
    assert c.shape == (2, 32) and not torch.allclose(c[0], c[1])


def test_ke_short_training_improves_validation_and_round_trips(tmp_path, zsre) -> None:
    m = tiny("tiny-llama")
    before = weights_digest(m)
    torch.manual_seed(0)
    ed = KE(m, KE_SMALL)
    val = zsre["val"][:8]
    untrained = ed.validate(val)
    ed.fit(zsre["train"], val, Budget(max_steps=40, val_every=20, patience=5))
    trained = ed.validate(val)
    # (ES stays 0 on a tiny random model in 40 steps; the losses are what can move)
    assert trained["val_loss"] < untrained["val_loss"] and trained["val_L_e"] < untrained["val_L_e"]
    assert weights_digest(m) == before
    b = edit_batch(m, zsre["test"][:2])
    path = ed.save(tmp_path / "ke")
    other = KE(m, KE_SMALL)
    other.load(path)
    e1, e2 = ed.edit(b), other.edit(b)
    assert all(torch.equal(e1.deltas[n], e2.deltas[n]) for n in m.edit_params)


def test_enn_meta_trains_every_base_weight_or_only_the_edited_ones(zsre) -> None:
    """train_base: all (ENN, the official runs) optimises every base weight, and the training loss reaches them all;
    edited only the matrices the inner step edits. Both checkpoints carry what they train."""
    assert ENN.Hparams().train_base == "all"
    m = load_model("tiny-gpt2")
    every = {n for n, _ in m.model.named_parameters()}
    for which, expected in (("all", every), ("edited", set(m.edit_params))):
        ed = ENN(m, {"lr": 1e-2, "train_base": which})
        optimised = {id(p) for g in ed.param_groups() for p in g["params"]}
        assert {n for n, p in m.model.named_parameters() if id(p) in optimised} == expected
        ed.train(True)
        ed._losses(list(zsre["train"][:1]))["loss"].backward()
        reached = {n for n, p in m.model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        ed.train(False)
        m.model.zero_grad(set_to_none=True)
        assert reached <= expected and set(m.edit_params) <= reached
        assert bool(reached - set(m.edit_params)) == (which == "all")  # gradient beyond the edited matrices
        assert {k[len("base.w."):].replace("__", ".") for k in ed.state_dict() if k.startswith("base.")} == expected
        assert all(not p.requires_grad for p in m.model.parameters())


def test_ke_condition_is_the_official_edit_text_with_the_new_answer() -> None:
    """KE reads "{old} >> {new} || {input}": on a seq2seq model the input ids are the question alone, so two requests
    that differ only in the new answer condition differently from the text and identically from the input ids."""
    from bench.data import EditRecord

    m = tiny("tiny-t5")
    recs = [EditRecord(case_id=str(i), task="zsre", kind="qa", prompt="Who wrote Hamlet?", target=t,
                       true_answer="Shakespeare") for i, t in enumerate(["Marlowe", "Bacon"])]
    assert KE.condition_text(recs[0]) == "Shakespeare >> Marlowe || Who wrote Hamlet?"
    b = edit_batch(m, recs)
    text = KE(m, KE_SMALL).condition(b)
    ids = KE(m, {**KE_SMALL, "condition": "input_ids"}).condition(b)
    assert not torch.allclose(text[0], text[1]) and torch.allclose(ids[0], ids[1])
