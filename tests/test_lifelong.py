"""Lifelong editors and edits that are not weight deltas: GRACE's codebook adaptor (applied by hooks, composed by
GRACE's rules, saved with safetensors, scored like any edit) and AlphaEdit's null-space-projected solve (preserved
keys untouched, the keys of earlier edits carried through a stream only)."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import greedy_es, private_cache, target_logprob, tiny

from bench.data import edit_batch, load_task
from bench.generation import greedy
from bench.metrics import evaluate
from bench.models import Adaptor, load_adaptor
from methods.alphaedit import AlphaEdit, null_space_projection
from methods.base import Edit, weights_digest
from methods.ft import FT
from methods.adapted import default_layer
from methods.grace import GRACE, Codebook
from methods.wise import WISE
from methods.wise_memory import SideMemory, ties_merge

LOCATE_SMALL = {"mom2_n_tokens": 4000, "v_num_grad_steps": 6, "context_lengths": [[6, 2]], "layers": [1, 2]}
OTHER = ["The weather today is", "My favourite food is", "Paris is a city in"]


@pytest.fixture(scope="module")
def cf():
    return load_task("counterfact", sizes={"train": 8, "val": 4, "test": 6})


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    private_cache(monkeypatch, tmp_path_factory.getbasetemp() / "cache")


def _logits(m, text: str, changes=None) -> torch.Tensor:
    x = m.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return m.logits({"input_ids": x["input_ids"], "attention_mask": x["attention_mask"]}, changes)


@pytest.mark.parametrize("alias", ["tiny-llama", "tiny-gpt2"])  # nn.Linear and GPT-2's Conv1D projections
def test_grace_says_the_target_and_leaves_every_other_input_exactly_as_before(alias, cf) -> None:
    m = tiny(alias)
    rec = cf["test"][0]
    before = weights_digest(m)
    edit = GRACE(m, {"seed": 1}).edit(edit_batch(m, [rec]))
    assert edit.deltas == {} and list(edit.adaptors) == [m.mlp_out(default_layer(m))]
    assert weights_digest(m) == before
    assert greedy_es(m, rec.prompt, rec.target) == 0.0
    assert greedy_es(m, rec.prompt, rec.target, edit.changes) == 1.0
    for text in OTHER + [rec.loc_prompt]:
        assert torch.equal(_logits(m, text), _logits(m, text, edit.changes))  # no key within reach: untouched
    said = greedy(m, [rec.prompt], 4, edit.changes, stops=())[0]  # KV-cached decoding runs the adaptor too
    assert said.strip().startswith(rec.target.strip())


def _book(keys, values, eps, labels, init_eps=1.0, expand="coverage") -> Codebook:
    t = torch.tensor
    return Codebook(t(keys, dtype=torch.float), t(values, dtype=torch.float), t(eps, dtype=torch.float), labels,
                    init_eps, expand)


def test_a_codebook_joins_entries_by_grace_rules_without_touching_its_operands() -> None:
    base = _book([[0.0, 0.0]], [[1.0]], [1.0], [(7,)])
    far = base + _book([[5.0, 0.0]], [[2.0]], [1.0], [(8,)])  # 5 > 1 + 1: a new entry with the initial radius
    assert len(far) == 2 and far.eps.tolist() == [1.0, 1.0]
    clash = base + _book([[1.5, 0.0]], [[3.0]], [1.0], [(8,)])  # within reach, another target: radii halve
    assert len(clash) == 2 and clash.eps.tolist() == pytest.approx([0.75 - 1e-5, 0.75])
    same = base + _book([[1.5, 0.0]], [[4.0]], [1.0], [(7,)])  # the same target: the entry grows, value replaced
    assert len(same) == 1 and same.eps.tolist() == [1.5] and same.values.tolist() == [[4.0]]
    moved = _book([[0.0, 0.0]], [[1.0]], [1.0], [(7,)], expand="moving_average") + \
        _book([[1.5, 0.0]], [[4.0]], [1.0], [(7,)])
    assert moved.keys.tolist() == [[0.75, 0.0]] and moved.eps.tolist() == [1.5]
    inside = base + _book([[0.5, 0.0]], [[5.0]], [1.0], [(7,)])  # already covered: only the value changes
    assert inside.eps.tolist() == [1.0] and inside.values.tolist() == [[5.0]]
    assert len(base) == 1 and base.values.tolist() == [[1.0]]  # operands are never modified
    # forward: positions within the radius of their nearest key take its value, the others keep their output
    inputs = torch.tensor([[[0.2, 0.0], [3.0, 0.0], [1.4, 0.0]]])
    out = clash.forward(inputs, torch.full((1, 3, 1), -1.0), {})
    assert out.flatten().tolist() == [1.0, -1.0, 3.0]
    with pytest.raises(TypeError, match="composes with another codebook"):
        base + Adaptor()


def test_an_edit_with_deltas_and_adaptors_saves_and_loads_with_safetensors(tmp_path, cf) -> None:
    m = tiny("tiny-llama")
    rec = cf["test"][1]
    grace = GRACE(m, {"n_iter": 5}).edit(edit_batch(m, [rec]))
    both = FT(m, {"lr": 1e-2, "max_steps": 2}).edit(edit_batch(m, [rec])) + grace
    assert set(both.changes) == set(both.deltas) | set(both.adaptors) and both.deltas and both.adaptors
    back = Edit.load(both.save(tmp_path / "edit.safetensors"))
    assert back.steps == both.steps and set(back.deltas) == set(both.deltas)
    (module, book), = back.adaptors.items()
    assert isinstance(book, Codebook) and book.labels == grace.adaptors[module].labels
    for text in [rec.prompt, OTHER[0]]:
        assert torch.equal(_logits(m, text, back.changes), _logits(m, text, both.changes))
    with pytest.raises(ValueError, match="unknown adaptor kind 'nope'; known: .*grace_codebook"):
        load_adaptor("nope", {}, {})


def test_grace_in_a_sequential_stream_grows_its_codebook_and_logs_its_size(cf) -> None:
    m = tiny("tiny-llama")
    recs = list(cf["test"][:4])
    res = evaluate(GRACE(m, {"n_iter": 20}), m, recs, 1, mode="sequential", checkpoints=[2], generation=False)
    sizes = [(c["n_edits"], c["retention_adaptor_entries"], c["retention_delta_norm"]) for c in res.checkpoints]
    assert sizes == [(2.0, 2.0, 0.0), (4.0, 4.0, 0.0)]  # one entry per distinct prompt; no weight changed
    # every edit made so far is still said: its own key is matched exactly, the others' keys are far from it
    assert res.metrics["retention_edit_acc"] == 1.0
    ft = evaluate(FT(m, {"lr": 1e-2, "max_steps": 2}), m, recs, 1, mode="sequential", checkpoints=[2],
                  generation=False)
    norms = [c["retention_delta_norm"] for c in ft.checkpoints]
    assert 0 < norms[0] < norms[1] and ft.checkpoints[-1]["retention_adaptor_entries"] == 0.0
    assert ft.checkpoints[-1]["retention_delta_rel"] > 0


def test_alphaedit_leaves_what_the_model_computes_on_preserved_keys_unchanged(cf) -> None:
    """dW k0 = 0 for every k0 in the span the projection removes (P k0 = 0), while the edit raises its target."""
    m = tiny("tiny-llama")
    rec = cf["test"][2]
    ed = AlphaEdit(m, LOCATE_SMALL)
    moments = {n: ed.moment(n.rsplit(".", 1)[0]) for n in ed.model.edit_params}
    vals = torch.linalg.eigvalsh(next(iter(moments.values())).double())
    ed = AlphaEdit(m, {**LOCATE_SMALL, "v_num_grad_steps": 20, "nullspace_threshold": float(vals.median())})
    edit = ed.edit(edit_batch(m, [rec]))
    assert target_logprob(m, rec.prompt, rec.target, edit.deltas) > target_logprob(m, rec.prompt, rec.target) + 0.5
    for name, dw in edit.deltas.items():
        P, rank = null_space_projection(moments[name], ed.hparams.nullspace_threshold)
        assert 0 < rank < P.shape[0]
        k0 = (torch.eye(P.shape[0], dtype=P.dtype) - P) @ torch.randn(P.shape[0], 8, dtype=P.dtype)
        assert float((dw.double() @ k0).norm()) < 1e-6 * float(dw.double().norm() * k0.norm())
        assert float(dw.norm()) > 0


def test_alphaedit_carries_the_keys_of_earlier_edits_within_a_stream_only(cf, caplog) -> None:
    m = tiny("tiny-llama")
    recs = list(cf["test"][:3])
    ed = AlphaEdit(m, LOCATE_SMALL)
    first = ed.edit(edit_batch(m, recs[:1]))
    module = ed.model.edit_params[0].rsplit(".", 1)[0]
    k1 = ed._kp[module].clone()
    with m.applying(first.deltas):  # the stream's next edit: the keys of the first one are in the solve
        ed.edit(edit_batch(m, recs[1:2]))
    assert float(ed._kp[module].trace()) > float(k1.trace())
    ed.edit(edit_batch(m, recs[2:3]))  # nothing applied: an independent edit starts without K_p
    alone = AlphaEdit(m, LOCATE_SMALL)
    alone.edit(edit_batch(m, recs[2:3]))
    assert torch.allclose(ed._kp[module], alone._kp[module])
    noise = {n: 1e-3 * torch.ones_like(w) for n, w in ed.model.weights().items()}
    with caplog.at_level(logging.WARNING, logger="methods.alphaedit"), m.applying(noise):
        ed.edit(edit_batch(m, recs[:1]))  # deltas that are not its own edits: K_p unknown, said so
    assert "not this editor's last edits" in caplog.text


def test_lifelong_editors_refuse_models_they_cannot_edit() -> None:
    with pytest.raises(ValueError, match="grace edits causal models; tiny-t5 is seq2seq"):
        GRACE(tiny("tiny-t5"))
    with pytest.raises(ValueError, match="alphaedit edits causal models; tiny-bert is classifier"):
        AlphaEdit(tiny("tiny-bert"))


@pytest.mark.parametrize("alias", ["tiny-llama", "tiny-gpt2"])
def test_running_the_upper_blocks_only_equals_the_whole_pass_for_changes_above(alias, cf) -> None:
    """GRACE trains its values with the blocks below its layer replaced by their recorded outputs: the logits and
    the value's gradient equal those of the whole forward pass, and the blocks compute again afterwards."""
    m = tiny(alias)
    batch = edit_batch(m, list(cf["test"][:2]))
    module, layer = m.mlp_out(m.n_layers - 1), m.n_layers - 1
    v = torch.randn(m.io_dims(f"{module}.weight")[1], requires_grad=True)

    def put(name, out):
        return out + v

    def run():
        with torch.enable_grad(), m.trace([module], edit_output=put):
            logits = m.logits(batch.inputs)
            (g,) = torch.autograd.grad(logits.logsumexp(-1).sum(), [v])
        return logits.detach(), g

    whole = run()
    with m.upper_blocks_only(batch.inputs, layer):
        upper = run()
    assert torch.allclose(whole[0], upper[0], atol=1e-5) and torch.allclose(whole[1], upper[1], atol=1e-4)
    other = edit_batch(m, list(cf["test"][2:4]))
    assert not torch.allclose(m.logits(other.inputs)[0, 0], upper[0][0, 0])  # the lower blocks compute again


def test_ties_merge_keeps_the_largest_entries_and_averages_those_agreeing_with_the_elected_sign() -> None:
    a, b = torch.tensor([4.0, -2.0, 3.0, 0.5]), torch.tensor([2.0, 1.0, -1.0, 0.4])
    assert ties_merge([a, b], 1.0).tolist() == pytest.approx([3.0, -2.0, 3.0, 0.45])  # sum -0.5 elects "-" for #2
    # density 0.5: each keeps its two largest magnitudes (a: 4, 3; b: 2, 1)
    assert ties_merge([a, b], 0.5).tolist() == pytest.approx([3.0, 1.0, 3.0, 0.0])


def _memory(shard, act, settings=None) -> SideMemory:
    s = {"conv1d": False, "act": "relu", "act_ratio": 0.5, "save_freq": 2, "merge_freq": 4, "density": 1.0}
    return SideMemory(torch.tensor(shard, dtype=torch.float), act, [], [], 1, {**s, **(settings or {})})


def test_a_side_memory_saves_its_shard_every_save_freq_edits_and_merges_them_every_merge_freq() -> None:
    one = _memory([[1.0, 0.0]], 4.0)
    two = one + _memory([[0.0, 2.0]], 3.0)  # the second edit fills the shard: saved, a fresh one starts
    assert two.count == 2 and two.memories[0].tolist() == [[1.0, 2.0]] and two.memory_acts == [3.0]
    assert two.shard.abs().sum() == 0 and two.shard_act == float("inf")
    four = two + _memory([[-1.0, 0.0]], 5.0) + _memory([[0.0, 4.0]], 6.0)
    assert four.count == 4 and len(four.memories) == 1  # two saved shards merged into one (TIES)
    assert four.memories[0].tolist() == [[1.0, 3.0]] and four.memory_acts == [3.0]
    assert len(one.memories) == 0 and one.shard.tolist() == [[1.0, 0.0]]  # operands untouched
    with pytest.raises(TypeError, match="one edit's side memory at a time"):
        one + two


def test_the_router_sends_a_sequence_to_the_side_memory_only_when_its_activations_move_enough() -> None:
    """relu(W x) against relu(W x + dW x): the first row moves by 3 (>= 0.5 * 4), the second by 1 (< 2), so only
    the first takes the side output; a decoding step (one new token) keeps the routing of its sequence."""
    mem = _memory([[1.0, 0.0]], 4.0)
    x = torch.tensor([[[3.0, 0.0]], [[1.0, 0.0]]])
    out = torch.zeros(2, 1, 1)
    call: dict = {"attention_mask": torch.ones(2, 1)}
    got = mem.forward(x, out, call)
    assert got.flatten().tolist() == [3.0, 0.0] and call["route"].tolist() == [0, -1]
    step = mem.forward(torch.tensor([[[0.0, 0.0]], [[9.0, 0.0]]]), out, call)  # kept: row 2 stays original
    assert step.flatten().tolist() == [0.0, 0.0]


def test_wise_edits_a_masked_shard_of_a_side_copy_within_its_norm_constraint_and_trains_out_of_scope_on_train(
        cf, tmp_path) -> None:
    m = tiny("tiny-llama")
    before = weights_digest(m)
    ed = WISE(m, {"n_iter": 8, "template_lengths": [3]})
    with pytest.raises(RuntimeError, match="wise needs training records .* call fit"):
        ed.edit(edit_batch(m, [cf["test"][0]]))
    ed.fit(list(cf["train"]), [])
    rec = cf["test"][0]
    rows, n_in = ed._rows(edit_batch(m, [rec]))
    assert n_in == len(ed.templates()) == 6 and len(rows) == n_in + 1
    assert rows.records[-1] in list(cf["train"]) and rows.records[-1].loc_prompt != rec.loc_prompt
    edit = ed.edit(edit_batch(m, [rec]))
    (module, mem), = edit.adaptors.items()
    assert edit.deltas == {} and weights_digest(m) == before and mem.count == 1 and mem.shard_act > 0
    mask = ed._mask(0, mem.shard).bool()
    assert mem.shard.abs().max() <= ed.hparams.norm_constraint
    assert mem.shard[~mask].abs().max() < 1e-3 < mem.shard[mask].abs().max()  # outside the mask: weight decay only
    back = Edit.load(edit.save(tmp_path / "wise.safetensors"))
    for text in [rec.prompt + " " + rec.target, OTHER[0]]:
        assert torch.equal(_logits(m, text, back.changes), _logits(m, text, edit.changes))
