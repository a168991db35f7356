"""ROME and MEMIT on tiny causal models: the closed form writes v* exactly, the key second moment is cached by
its inputs, base weights never change, MEMIT reduces to ROME for one edit in one layer and writes a batch in one
solve, and pairings they cannot edit are refused before any weight is loaded."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import private_cache, tiny

from bench.config import Sweep, SweepError, validate
from bench.data import DataError, edit_batch, load_task
from methods.base import weights_digest
from methods.locate import group_weights, io_at, keys_at, second_moment
from methods.values import optimise_value, optimise_values
from methods.memit import MEMIT, MEMITHparams, paper_hparams
from methods.rome import ROME

SMALL = {"mom2_n_tokens": 4000, "v_num_grad_steps": 6, "context_lengths": [[6, 2]]}


@pytest.fixture(scope="module")
def cf():
    return load_task("counterfact", sizes={"train": 16, "val": 4, "test": 4})


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    private_cache(monkeypatch, tmp_path_factory.getbasetemp() / "cache")


@pytest.mark.parametrize("alias", ["tiny-llama", "tiny-gpt2"])  # nn.Linear (out, in) and GPT-2's Conv1D (in, out)
def test_rome_writes_v_star_at_the_key_exactly(alias, cf) -> None:
    m = tiny(alias)
    rec = cf["test"][0]
    ed = ROME(m, SMALL)
    assert ed.model.edit_params == [f"{m.mlp_out(ed.layer)}.weight"]
    edit = ed.edit(edit_batch(m, [rec]))
    module = m.mlp_out(ed.layer)
    v = optimise_value(m, module, rec, ed.templates(), ed.hparams)  # deterministic: the same v* again
    k_before, out_before = io_at(m, module, [rec])
    k_after, out_after = io_at(m, module, [rec], edit.deltas)
    assert torch.allclose(k_after, k_before)  # the key is computed below the edited weight
    assert not torch.allclose(out_before[0], v.target, atol=1e-3)
    assert torch.allclose(out_after[0], v.target, atol=1e-4 * float(v.target.norm()) + 1e-5)
    (delta,) = edit.deltas.values()
    assert torch.linalg.matrix_rank(delta.double(), rtol=1e-6) == 1


def test_rome_never_mutates_base_weights_and_edits_only_its_layer(cf) -> None:
    m = tiny("tiny-llama")
    before = weights_digest(m)
    ed = ROME(m, {**SMALL, "layers": [2]})
    edit = ed.edit(edit_batch(m, list(cf["test"][:2])))
    assert weights_digest(m) == before
    assert list(edit.deltas) == ["model.layers.2.mlp.down_proj.weight"]
    assert m.edit_params != ed.model.edit_params  # the editor's view, not the model's default, chose the weight


def test_second_moment_is_cached_by_its_inputs(monkeypatch) -> None:
    import bench.data.files

    m = tiny("tiny-gpt2")
    hp = ROME.Hparams(mom2_n_tokens=1500, mom2_seq_len=64)
    module = m.mlp_out(1)
    c1, hit1 = second_moment(m, module, hp, None)
    assert c1.shape == (128, 128) and torch.allclose(c1, c1.T)
    assert torch.linalg.eigvalsh(c1).min() > -1e-8  # a second moment is positive semi-definite

    def no_corpus_pass(*a, **k):  # a cache hit must not read (or run) the corpus
        raise AssertionError("corpus read on a cache hit")

    with monkeypatch.context() as mp:
        mp.setattr(bench.data.files, "read_text", no_corpus_pass)
        c2, hit2 = second_moment(m, module, hp, None)
    assert not hit1 and hit2 and torch.equal(c1, c2)
    for changed in (hp.model_copy(update={"mom2_n_tokens": 1000}), hp.model_copy(update={"mom2_seq_len": 32})):
        c3, hit3 = second_moment(m, module, changed, None)
        assert not hit3 and not torch.equal(c1, c3)
    _, hit4 = second_moment(m, m.mlp_out(2), hp, None)  # another layer is another entry
    assert not hit4


def test_fit_step_prepares_what_edits_read_and_trains_nothing(cf, monkeypatch) -> None:
    """ROME/MEMIT have a fit step (their statistics) but are not learned: fit computes the key second moment of
    every edited module and the templates on the unedited model, and the edits then compute neither."""
    import methods.locate
    from methods import REGISTRY

    assert {n for n, c in REGISTRY.items() if c.learned} == {"mend", "enn", "ke"}
    assert {n for n, c in REGISTRY.items() if c.has_fit_step} == {"mend", "enn", "ke", "rome", "memit", "alphaedit",
                                                                  "ft_kl", "wise"}
    m = tiny("tiny-llama")
    ed = MEMIT(m, {**SMALL, "layers": [1, 2]})
    fit = ed.fit([], [])
    assert fit.steps == 0 and fit.stop_reason == "untrained" and not ed.modules()
    assert set(ed._moments) == {m.mlp_out(1), m.mlp_out(2)}

    def no_statistics(*a, **k):
        raise AssertionError("an edit recomputed what fit prepared")

    monkeypatch.setattr(methods.locate, "second_moment", no_statistics)
    monkeypatch.setattr(methods.locate, "context_templates", no_statistics)
    assert set(ed.edit(edit_batch(m, [cf["test"][0]])).deltas) == set(ed.model.edit_params)
    no_moment = ROME(m, {**SMALL, "mom2_adjustment": False})
    no_moment._groups = [["{}"]]
    no_moment.fit([], [])  # without the adjustment no statistic is read
    assert not no_moment._moments


def test_a_learned_editor_must_have_a_fit_step() -> None:
    from methods.base import Editor

    with pytest.raises(TypeError, match="has_fit_step"):
        type("Broken", (Editor,), {"learned": True})


def test_memit_with_one_edit_and_one_layer_is_rome(cf) -> None:
    """Sherman-Morrison: with lambda -> 0, no prefixes (k* = the bare prompt's key) and the same value objective
    (no weight decay or clamp, whose scales differ: MLP output vs residual norm), MEMIT's update is ROME's."""
    m = tiny("tiny-llama")
    same = {"layers": [1], "context_lengths": [], "v_weight_decay": 0.0, "clamp_norm_factor": 1e6,
            "mom2_n_tokens": 4000, "v_num_grad_steps": 8}
    rome = ROME(m, same).edit(edit_batch(m, cf["test"][:1]))
    memit = MEMIT(m, {**same, "mom2_update_weight": 1e-9}).edit(edit_batch(m, cf["test"][:1]))
    (name,) = rome.deltas
    assert list(memit.deltas) == [name]
    assert torch.allclose(memit.deltas[name], rome.deltas[name], atol=1e-5 * float(rome.deltas[name].abs().max()))


@pytest.mark.parametrize("alias", ["tiny-llama", "tiny-gpt2"])
def test_values_of_a_batch_of_facts_are_those_of_the_one_at_a_time_loop(alias, cf) -> None:
    """optimise_values on four facts at once gives each fact the vector, NLL and step count the authors' loop
    (optimise_value, one fact alone) gives it, up to float noise from padding; with a stop loss some facts reach
    early, a stopped fact keeps its vector while the others go on."""
    import methods.values

    m = tiny(alias)
    ed = ROME(m, SMALL)
    recs = list(cf["test"][:4])
    module = m.mlp_out(ed.layer)
    stop = methods.values.STOP_LOSS  # the authors' 0.05 first (tiny models never reach it in 6 steps) ...
    for _ in range(2):
        methods.values.STOP_LOSS = stop
        try:
            alone = [optimise_value(m, module, r, ed.templates(), ed.hparams) for r in recs]
            together = optimise_values(m, module, recs, ed.templates(), ed.hparams)
        finally:
            methods.values.STOP_LOSS = 5e-2
        assert [v.steps for v in together] == [v.steps for v in alone]
        for a, b in zip(alone, together):
            assert torch.allclose(a.init, b.init, atol=1e-5)
            assert torch.allclose(a.target, b.target, atol=1e-4 * float(a.target.norm()) + 1e-5)
            assert b.nll == pytest.approx(a.nll, rel=1e-4, abs=1e-5)
        nlls = sorted(v.nll for v in alone)
        stop = (nlls[1] + nlls[2]) / 2  # ... then a stop loss half the facts reach before the others
    assert len({v.steps for v in alone}) > 1, [v.nll for v in alone]  # facts stopped at different steps


def test_memit_writes_a_batch_in_one_solve_over_a_band(cf) -> None:
    """Three requests, layers 0-2: every request's last-layer output reaches its own z (lambda -> 0, keys of
    the bare prompts, so the last layer's least squares is exact) and every layer of the band is updated."""
    m = tiny("tiny-llama")
    hp = {"layers": [0, 1, 2], "context_lengths": [], "mom2_n_tokens": 4000, "v_num_grad_steps": 6,
          "mom2_update_weight": 1e-9}
    recs = list(cf["test"][:3])
    ed = MEMIT(m, hp)
    edit = ed.edit(edit_batch(m, recs))
    assert sorted(edit.deltas) == sorted(f"model.layers.{i}.mlp.down_proj.weight" for i in range(3))
    z_mod = m.block(2)
    zs = torch.stack([optimise_value(m, z_mod, r, ed.templates(), ed.hparams).target for r in recs])  # alone
    _, before = io_at(m, z_mod, recs)
    _, after = io_at(m, z_mod, recs, edit.deltas)
    assert (before - zs).norm() > 1e-2
    assert torch.allclose(after, zs, atol=1e-3 * float(zs.norm()))
    assert all(torch.linalg.matrix_rank(d.double(), rtol=1e-6) <= 3 for d in edit.deltas.values())


def test_records_without_a_subject_are_refused(cf) -> None:
    m = tiny("tiny-llama")
    rec = dataclasses.replace(cf["test"][0], subject=None)
    with pytest.raises(DataError, match="need the record's subject"):
        ROME(m, SMALL).edit(edit_batch(m, [rec]))
    rec = dataclasses.replace(cf["test"][0], subject="Nobody Atall")
    with pytest.raises(DataError, match="does not occur in the prompt"):
        MEMIT(m, SMALL).edit(edit_batch(m, [rec]))


@pytest.mark.parametrize("method", ["rome", "memit"])
def test_validation_refuses_models_and_tasks_they_cannot_edit(method) -> None:
    with pytest.raises(SweepError, match=rf"methods\.0 \({method}\) edits causal models; models\.0 \('tiny-t5'\) is "
                                         r"seq2seq"):
        validate(Sweep(name="x", n_edits=2, models=["tiny-t5"], datasets=["zsre"], methods=[{"name": method}]))
    with pytest.raises(SweepError, match=rf"methods\.0 \({method}\) edits causal models; datasets\.0 \(fever\) is a "
                                         r"classification task"):
        validate(Sweep(name="x", n_edits=2, models=["tiny-gpt2"], datasets=["fever"], methods=[{"name": method}]))
    with pytest.raises(SweepError, match=rf"methods\.0 \({method}\) reads nowhere/corpus\.txt"):
        validate(Sweep(name="x", n_edits=2, models=["tiny-gpt2"], datasets=["zsre"],
                       methods=[{"name": method, "hparams": {"mom2_corpus": "nowhere/corpus.txt"}}]))


def test_editor_refuses_a_model_kind_it_does_not_support() -> None:
    with pytest.raises(ValueError, match="rome edits causal models; tiny-t5 is seq2seq"):
        ROME(tiny("tiny-t5"))


def test_a_rome_run_edits_interactively_with_its_subject(tmp_path, capsys) -> None:
    """bench.edit rebuilds a ROME run (its layer and list-valued hparams from the logged params), needs --subject,
    and chains --then edits on the model as already edited without touching a weight."""
    from bench.config import plan
    from bench.edit import main as edit_main
    from bench.tracking import prepare_experiment, runs_frame
    from bench.trial import run_trial

    uri = f"sqlite:///{tmp_path / 'runs.db'}"
    sweep = Sweep(name="r", n_edits=2, models=["tiny-llama"],
                  datasets=[{"name": "counterfact", "n_train": 8, "n_val": 2}],
                  methods=[{"name": "rome", "hparams": {**SMALL, "layers": 2}}])
    (point,) = plan(sweep)
    prepare_experiment(uri, "r")
    run_trial(point, uri, "r")
    df = runs_frame(uri, "r")
    assert df["p.edit_params"][0] == "model.layers.2.mlp.down_proj.weight"
    from bench.report import build

    header, rows = build(uri, "r", tmp_path / "rep", ["md"]).tables["rome"]  # CounterFact: ROME-style table
    assert header[2:] == ["efficacy", "paraphrase", "neighbourhood", "p(new)", "ES (MEND)", "ES gain"]
    assert rows[0][1] == "rome"
    assert rows[0][2] == f"{df['efficacy'][0]:.3f} ± {df['efficacy_ci95'][0]:.3f}"
    rid = df["run_id"][0]
    args = ["--run", rid, "--tracking-uri", uri, "--prompt", "Paris is the capital of", "--target", "Italy",
            "--max-new-tokens", "2"]
    capsys.readouterr()  # the trial's own output
    assert edit_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --subject: rome needs the subject") and len(err.splitlines()) == 1
    assert edit_main([*args, "--subject", "Rome"]) == 2
    assert "does not occur in 'Paris is the capital of'" in capsys.readouterr().err
    assert edit_main([*args, "--subject", "Paris", "--then", "Paris is in=Spain"]) == 0
    out = capsys.readouterr().out
    assert "after edit 2 ('Paris is in' -> 'Spain')" in out


def test_memit_averages_keys_within_template_groups_then_across_them_and_rome_averages_flat(cf) -> None:
    """kmeng01/memit compute_ks: a fact's key is the mean over groups of the mean within each group, so with
    groups [["{}"], [p1, p2]] the bare prompt weighs 1/2 and each prefix 1/4; ROME's k* is the flat mean (1/3
    each). The keys per template are taken here by hand: one prompt at a time through a forward hook on the
    module, read at the subject's last token."""
    m = tiny("tiny-llama")
    rec = cf["test"][0]
    groups = [["{}"], ["Alpha beta. {}", "Gamma delta epsilon. {}"]]
    module = m.mlp_out(1)
    tok, mod = m.tokenizer, dict(m.model.named_modules())[module]
    end = rec.prompt.find(rec.subject) + len(rec.subject)
    by_hand = []
    for t in [t for g in groups for t in g]:
        ids = tok(t.format(rec.prompt), add_special_tokens=False)["input_ids"]
        last = len(tok(t.split("{}")[0] + rec.prompt[:end], add_special_tokens=False)["input_ids"]) - 1
        seen = {}

        def keep(_m, inp, _o, seen=seen):  # noqa: ANN001, ANN202 (returns None: the output stays as it was)
            seen["k"] = inp[0].detach()

        h = mod.register_forward_hook(keep)
        try:
            with torch.no_grad():
                m.model(input_ids=torch.tensor([ids]))
        finally:
            h.remove()
        by_hand.append(seen["k"][0, last])
    memit = MEMIT(m, {**SMALL, "layers": [1]})
    memit._groups = groups
    rome = ROME(m, {**SMALL, "layers": 1})
    rome._groups = groups
    flat = [t for g in groups for t in g]
    k_memit = keys_at(m, module, [rec], flat, weights=memit.key_weights())[0]
    k_rome = keys_at(m, module, [rec], flat, weights=rome.key_weights())[0]
    assert memit.key_weights() == [0.5, 0.25, 0.25] and rome.key_weights() is None
    assert torch.allclose(k_memit, 0.5 * by_hand[0] + 0.25 * by_hand[1] + 0.25 * by_hand[2], atol=1e-5)
    assert torch.allclose(k_rome, (by_hand[0] + by_hand[1] + by_hand[2]) / 3, atol=1e-5)
    assert (k_memit - k_rome).norm() > 1e-3 * k_rome.norm()  # the two weightings differ on this case
    # The authors' default: the bare prompt, then one group of five prefixes (1/10 each).
    assert group_weights([["{}"], ["a{}"] * 5]) == [0.5] + [0.1] * 5


def test_memit_takes_the_authors_settings_for_the_paper_models_unless_the_sweep_sets_them() -> None:
    """kmeng01/memit hparams/MEMIT/gpt2-xl.json takes 20 value steps and lambda 20000 on blocks 13-17;
    EleutherAI_gpt-j-6B.json 25 steps and 15000 on 3-8; a value the sweep gives wins; other models keep the
    class defaults (the GPT-J file's values, lambda scaled to the key size)."""
    for name, steps, lam, layers in (("gpt2-xl", 20, 20000.0, [13, 14, 15, 16, 17]),
                                     ("EleutherAI/gpt-j-6B", 25, 15000.0, [3, 4, 5, 6, 7, 8])):
        hp = paper_hparams(name, MEMITHparams())
        assert (hp.v_num_grad_steps, hp.mom2_update_weight, hp.layers) == (steps, lam, layers)
        assert (hp.clamp_norm_factor, hp.v_lr, hp.v_weight_decay, hp.kl_factor) == (0.75, 0.5, 0.5, 0.0625)
        mine = paper_hparams(name, MEMITHparams(v_num_grad_steps=7, mom2_update_weight=3.0))
        assert (mine.v_num_grad_steps, mine.mom2_update_weight, mine.layers) == (7, 3.0, layers)
    assert paper_hparams("tiny-llama", MEMITHparams()) == MEMITHparams()
    ed = MEMIT(tiny("tiny-llama"), {"layers": [1]})
    assert ed.hparams.v_num_grad_steps == 25 and ed.lam == pytest.approx(15000.0 * 64 / 16384)


def test_p_new_is_the_probability_of_the_new_target_after_the_edit(cf) -> None:
    """evaluate's ``p_new`` per edit equals the product of the softmax probabilities of the target's tokens on
    x_e, taken here by hand from the edited model's logits (``space + target`` tokens after the prompt)."""
    from bench.metrics import evaluate

    m = tiny("tiny-llama")
    rec = cf["test"][0]
    ed = ROME(m, {**SMALL, "layers": 1})
    ed.fit([], [])
    res = evaluate(ed, m, [rec], cache_pre=False)
    edit = ed.edit(edit_batch(m, [rec]))
    tok = m.tokenizer
    p_ids = tok(rec.prompt, add_special_tokens=False)["input_ids"]
    t_ids = tok(" " + rec.target, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p_ids + t_ids])
    with torch.no_grad(), m.applying(edit.deltas):
        logits = m.model(input_ids=ids).logits[0].float().log_softmax(-1)
    by_hand = float(sum(logits[len(p_ids) - 1 + j, t] for j, t in enumerate(t_ids)).exp())
    assert res.rows[0]["p_new"] == pytest.approx(by_hand, rel=1e-3, abs=1e-7)
    assert res.metrics["p_new"] == pytest.approx(by_hand, rel=1e-3, abs=1e-7)


def _out_in(m, delta: torch.Tensor) -> torch.Tensor:
    """A weight delta as (out, in), whatever the family's layout (GPT-2's Conv1D stores (in, out))."""
    return delta.T if m.conv1d else delta


def test_second_moment_is_the_mean_of_k_k_transposed_over_the_corpus_windows() -> None:
    """C against an explicit mean of k kᵀ: the module's inputs captured by a forward hook, one unpadded forward
    pass per window of the corpus's first tokens, the outer products summed in numpy."""
    import numpy as np

    from bench.data import resolve_file

    m = tiny("tiny-gpt2")
    hp = ROME.Hparams(mom2_n_tokens=1000, mom2_seq_len=64)
    module = m.mlp_out(1)
    text = resolve_file(hp.mom2_corpus, None).read_text(encoding="utf-8")
    ids = m.tokenizer(text, add_special_tokens=False)["input_ids"][:1000]
    seen: list[np.ndarray] = []
    mod = dict(m.model.named_modules())[module]
    hook = mod.register_forward_hook(lambda _m, inp, _o: seen.append(inp[0][0].double().numpy()))
    try:
        with torch.no_grad():
            for i in range(0, len(ids), 64):
                m.model(input_ids=torch.tensor([ids[i : i + 64]]))
    finally:
        hook.remove()
    k = np.concatenate(seen)
    assert k.shape[0] == 1000
    want = k.T @ k / k.shape[0]
    got, _ = second_moment(m, module, hp, None)
    assert np.allclose(got.numpy(), want, rtol=1e-6, atol=1e-9 * np.abs(want).max())


@pytest.mark.parametrize("alias", ["tiny-llama", "tiny-gpt2"])
def test_rome_updates_only_along_c_inverse_k_star_and_raises_the_target(alias, cf) -> None:
    """ROME's rank-one update is (v* - W k*) (C⁻¹k*)ᵀ / ((C⁻¹k*)ᵀ k*): any key k' with k'ᵀ C⁻¹ k* = 0 passes
    unchanged (C⁻¹k* solved here in numpy), keys along C⁻¹k* do not, and the target's probability after the
    prompt rises (one forward pass, apart from the suite's scoring)."""
    import numpy as np

    from conftest import target_logprob

    m = tiny(alias)
    rec = cf["test"][0]
    ed = ROME(m, SMALL)
    module = m.mlp_out(ed.layer)
    edit = ed.edit(edit_batch(m, [rec]))
    dw = _out_in(m, edit.deltas[f"{module}.weight"]).double().numpy()
    k_star = keys_at(m, module, [rec], ed.templates())[0].double().numpy()
    c = second_moment(m, module, ed.hparams, None)[0].numpy()
    u = np.linalg.solve(c, k_star)
    rng = np.random.default_rng(0)
    for _ in range(3):
        r = rng.standard_normal(u.shape)
        k_perp = r - (r @ u) / (u @ u) * u  # k'ᵀ C⁻¹ k* = 0
        assert np.linalg.norm(dw @ k_perp) < 1e-6 * np.linalg.norm(dw @ u) * np.linalg.norm(k_perp) / np.linalg.norm(u)
    before = target_logprob(m, rec.prompt, rec.target)
    after = target_logprob(m, rec.prompt, rec.target, edit.deltas)
    assert after > before + 0.1, (before, after)


def test_a_rome_batch_is_its_edits_composed_in_turn(cf) -> None:
    """A batch of two requests equals editing the first, then the second on the model with the first applied."""
    m = tiny("tiny-llama")
    recs = list(cf["test"][:2])
    ed = ROME(m, SMALL)
    both = ed.edit(edit_batch(m, recs))
    first = ed.edit(edit_batch(m, recs[:1]))
    with m.applying(first.deltas):
        second = ed.edit(edit_batch(m, recs[1:]))
    (name,) = both.deltas
    composed = first.deltas[name] + second.deltas[name]
    assert torch.allclose(both.deltas[name], composed, atol=1e-6 * float(composed.abs().max()))
    assert not torch.allclose(second.deltas[name], ed.edit(edit_batch(m, recs[1:])).deltas[name],
                              atol=1e-6 * float(composed.abs().max()))  # the second edit saw the first


def test_memit_with_lambda_matches_the_normal_equations_solved_in_numpy(cf) -> None:
    """MEMIT over two layers with λ > 0, replayed in numpy: layer i gets ΔW_i = R_i K_iᵀ (λ C_i + K_i K_iᵀ)⁻¹
    with K_i the keys and R_i = (Z - H_i) / (L - i) the residual at the top layer, both read with the updates of
    the layers below applied. λ is large enough here that dropping it changes the answer."""
    import numpy as np

    m = tiny("tiny-llama")
    recs = list(cf["test"][:3])
    ed = MEMIT(m, {**SMALL, "layers": [1, 2], "mom2_update_weight": 50.0})
    edit = ed.edit(edit_batch(m, recs))
    top = m.block(2)
    z = np.stack([optimise_value(m, top, r, ed.templates(), ed.hparams).target.double().numpy() for r in recs], 1)
    sofar: dict[str, torch.Tensor] = {}
    for i, layer in enumerate([1, 2]):
        module = m.mlp_out(layer)
        name = f"{module}.weight"
        with m.applying(sofar):
            k = keys_at(m, module, recs, ed.templates(), weights=ed.key_weights()).double().numpy().T
            h = io_at(m, top, recs)[1].double().numpy().T
        r = (z - h) / (2 - i)
        c = second_moment(m, module, ed.hparams, None)[0].numpy()
        want = np.linalg.solve(50.0 * c + k @ k.T, k @ r.T).T  # R Kᵀ (λC + KKᵀ)⁻¹, the matrix symmetric
        got = _out_in(m, edit.deltas[name]).double().numpy()
        assert np.allclose(got, want, rtol=1e-4, atol=1e-6 * np.abs(want).max()), (layer, np.abs(got - want).max())
        without = np.linalg.solve(k @ k.T + 1e-9 * c, k @ r.T).T
        assert not np.allclose(want, without, rtol=1e-2)
        sofar[name] = edit.deltas[name]
