"""Model loading, the family table, weight layouts and functional application of deltas."""

from __future__ import annotations

import copy

import pytest
import torch

from bench.data import edit_batch
from bench.models import ModelSpecError, load_model, resolve_model_source, select_edit_params
from methods.base import weights_digest
from tests.conftest import tiny

EXPECTED = {
    "tiny-gpt2": [f"transformer.h.{i}.mlp.{w}.weight" for i in (1, 2, 3) for w in ("c_fc", "c_proj")],
    "tiny-llama": [f"model.layers.{i}.mlp.{w}.weight" for i in (1, 2, 3) for w in ("gate_proj", "up_proj", "down_proj")],
    "tiny-t5": [f"encoder.block.{i}.layer.1.DenseReluDense.{w}.weight" for i in (1, 2) for w in ("wi", "wo")]
    + [f"decoder.block.{i}.layer.2.DenseReluDense.{w}.weight" for i in (1, 2) for w in ("wi", "wo")],
    "tiny-bart": [f"model.{s}.layers.{i}.{w}.weight" for s in ("encoder", "decoder") for i in (1, 2)
                  for w in ("fc1", "fc2")],
    "tiny-bert": [f"bert.encoder.layer.{i}.{w}.weight" for i in (1, 2, 3)
                  for w in ("intermediate.dense", "output.dense")],
}


@pytest.mark.parametrize("alias", sorted(EXPECTED))
def test_family_default_selects_mlps_of_last_blocks(alias: str) -> None:
    m = tiny(alias)
    assert m.edit_params == EXPECTED[alias]
    assert all(not p.requires_grad for p in m.model.parameters())
    assert not m.model.training


def test_globs_override_the_family_default() -> None:
    m = tiny("tiny-gpt2")
    names = [n for n, _ in m.model.named_parameters()]
    assert select_edit_params(names, "gpt2", ["transformer.h.0.mlp.c_fc.weight", "*.h.3.mlp.c_proj.weight"]) == [
        "transformer.h.0.mlp.c_fc.weight", "transformer.h.3.mlp.c_proj.weight"]
    with pytest.raises(ModelSpecError, match="matches no parameter"):
        select_edit_params(names, "gpt2", ["transformer.h.9.*"])


def test_unknown_model_names_what_is_valid() -> None:
    with pytest.raises(ModelSpecError, match=r"unknown model 'no such model!': not an alias \(smollm2-135m, .*\), no "
                                             r"folder at /.*/no such model!, and not a Hugging Face id like 'org/name'"):
        resolve_model_source("no such model!")
    assert resolve_model_source("facebook/bart-base") == "hub id"
    assert resolve_model_source("tiny-t5") == "alias"


def test_conv1d_and_linear_layouts_of_the_outer_product() -> None:
    u, delta = torch.randn(5, 32), torch.randn(5, 64)
    g = tiny("tiny-gpt2")
    w = g.weights()["transformer.h.3.mlp.c_fc.weight"]
    assert tuple(w.shape) == (32, 128) and g.io_dims("transformer.h.3.mlp.c_fc.weight") == (32, 128)
    assert torch.allclose(g.outer(u, delta), sum(torch.outer(u[i], delta[i]) for i in range(5)), atol=1e-5)
    lm = tiny("tiny-llama")
    assert lm.io_dims("model.layers.3.mlp.up_proj.weight") == (32, 64)
    assert torch.allclose(lm.outer(u, delta), sum(torch.outer(delta[i], u[i]) for i in range(5)), atol=1e-5)


def _logits_of_a_copy(m, inputs, weights=None, deltas=None) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Logits of a deep copy of ``m``'s module whose parameters are set to ``weights``, then moved by ``deltas``,
    in place."""
    clone = copy.deepcopy(m.model)
    with torch.no_grad():
        named = dict(clone.named_parameters())
        for n, w in (weights or {}).items():
            named[n].copy_(w)
        for n, d in (deltas or {}).items():
            named[n].add_(d)
        return clone(**inputs).logits


@pytest.mark.parametrize("alias", ["tiny-gpt2", "tiny-llama", "tiny-t5", "tiny-bart"])
def test_functional_deltas_equal_an_in_place_edit_of_a_copy(alias: str, zsre) -> None:
    m = tiny(alias)
    before = weights_digest(m)
    batch = edit_batch(m, zsre["test"][:3])
    torch.manual_seed(1)
    deltas = {n: 0.05 * torch.randn_like(w) for n, w in m.weights().items()}
    functional = m.logits(batch.inputs, deltas)
    in_place = _logits_of_a_copy(m, batch.inputs, deltas=deltas)
    assert torch.allclose(functional, in_place, atol=1e-5)
    assert not torch.allclose(functional, m.logits(batch.inputs), atol=1e-3)
    assert weights_digest(m) == before, "functional application mutated the base model"


@pytest.mark.parametrize("alias", ["tiny-gpt2", "tiny-llama"])
def test_other_base_weights_with_deltas_equal_a_copy_that_holds_them(alias: str, zsre) -> None:
    """``weights`` replaces the named base parameters (ENN's original weights), deltas add on top of them; the
    model's own parameters are untouched."""
    m = tiny(alias)
    before = weights_digest(m)
    batch = edit_batch(m, zsre["test"][:3])
    torch.manual_seed(2)
    other = {n: w.detach() + 0.1 * torch.randn_like(w) for n, w in m.model.named_parameters()}
    deltas = {n: 0.05 * torch.randn_like(w) for n, w in m.weights().items()}
    held = _logits_of_a_copy(m, batch.inputs, weights=other)
    held_edited = _logits_of_a_copy(m, batch.inputs, weights=other, deltas=deltas)
    assert torch.equal(m.logits(batch.inputs, weights=other), held)
    assert torch.allclose(m.logits(batch.inputs, deltas, weights=other), held_edited, atol=1e-5)
    assert not torch.allclose(held, m.logits(batch.inputs), atol=1e-3)
    assert weights_digest(m) == before


def test_bad_edit_param_is_refused() -> None:
    with pytest.raises(ModelSpecError, match="matches no parameter"):
        load_model("tiny-gpt2", edit_params=["nope.*"])


@pytest.mark.parametrize("alias", ["tiny-gpt2", "tiny-llama", "tiny-t5", "tiny-bart", "tiny-bert"])
def test_stacked_batches_give_each_batch_its_own_logits(alias: str, zsre) -> None:
    from bench.data import collate, equiv_batch, loc_batch, stack_batches

    m = tiny(alias)
    if m.kind == "classifier":
        a = collate(m, ["a short claim"], [1])
        b = collate(m, ["a much longer claim about several different things"], [0])
    else:
        a, b = equiv_batch(m, zsre["test"][:2]), loc_batch(m, zsre["test"][2:5])
    both = m.logits(stack_batches(a, b, m.tokenizer.pad_token_id).inputs)
    la, lb = m.logits(a.inputs), m.logits(b.inputs)
    got_a = both[: len(a), : a.labels.shape[1]]
    got_b = both[len(a):, : b.labels.shape[1]]
    for got, ref, batch in ((got_a, la, a), (got_b, lb, b)):
        mask = batch.labels != -100
        assert torch.allclose(got[mask], ref[mask], atol=1e-4)


def test_gguf_is_parsed_once_inside_the_conversion_block_and_gguf_is_restored_after(tmp_path) -> None:
    """The SmolLM2 conversion lets transformers' three readers of the GGUF file share one parse and its 397
    tensor-name maps one build; outside the block (and after an error in it) gguf is as it was."""
    import gguf
    import numpy as np

    from bench.models.weights import _gguf_parsed_once

    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_tensor("token_embd.weight", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    before = (gguf.GGUFReader, gguf.get_tensor_name_map)
    with _gguf_parsed_once():
        r = gguf.GGUFReader(path)
        assert gguf.GGUFReader(str(path)) is r
        assert r.tensors[0].name == "token_embd.weight" and r.tensors[0].data.sum() == 66
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is names
        assert names.get_name("model.embed_tokens") == "token_embd"
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == before
    assert gguf.GGUFReader(path) is not gguf.GGUFReader(path)
    with pytest.raises(RuntimeError, match="inside"):
        with _gguf_parsed_once():
            raise RuntimeError("inside")
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == before
