"""The editors on CUDA: the same numbers as on CPU, the gradient factorisation against autograd, learned-editor
training steps, evaluation with CUDA peak memory, and a checkpoint moved between devices.

Skipped where no CUDA device is present (CI); run on a GPU machine with ``pytest -m gpu``. Tolerances are those of
float32 kernels that differ between devices (CUDA matmuls sum in another order), not of TF32 (left off).
``EDITBENCH_TEST_DEVICE=cpu`` runs the same checks against the CPU itself (a dry run of the test logic).
"""

from __future__ import annotations

import os

import pytest
import torch

from bench.data import edit_batch
from bench.metrics import evaluate
from bench.models import load_model
from methods import REGISTRY, Budget
from methods.base import gradient_factors
from tests.conftest import autograd_weight_grads, greedy_es

DEV = os.environ.get("EDITBENCH_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(DEV == "cuda" and not torch.cuda.is_available(),
                                                  reason="needs a CUDA device")]

HP = {
    "ft": {"lr": 1e-2, "max_steps": 3, "early_stop": False},
    "ft_kl": {"lr": 1e-2, "max_steps": 3, "loc_batch_size": 2, "early_stop": False},
    "mend": {"lr": 1e-3, "rank": 8, "edit_lr": 1e-2},
    "enn": {"lr": 1e-3},
    "ke": {"lr": 1e-3, "hidden_dim": 16, "condition_dim": 16},
    "ft_l": {"lr": 1e-2, "max_steps": 3, "early_stop": False},
    "rome": {"mom2_n_tokens": 2000, "v_num_grad_steps": 4, "context_lengths": [[6, 2]]},
    "memit": {"mom2_n_tokens": 2000, "v_num_grad_steps": 4, "context_lengths": [[6, 2]], "layers": [0, 1]},
    "alphaedit": {"mom2_n_tokens": 2000, "v_num_grad_steps": 4, "context_lengths": [[6, 2]], "layers": [0, 1]},
    "grace": {"n_iter": 5},
    "wise": {"n_iter": 5, "template_lengths": [3]},
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm().clamp_min(1e-12))


@pytest.mark.parametrize("alias", ["tiny-gpt2", "tiny-llama", "tiny-t5", "tiny-bart", "tiny-bert"])
def test_factorised_gradient_on_cuda_equals_autograd(alias: str, zsre) -> None:
    m = load_model(alias, num_labels=2, device=DEV)
    assert m.device.type == DEV
    recs = zsre["test"][:4]
    if m.kind == "classifier":
        from dataclasses import replace

        recs = [replace(r, kind="classification", label=i % 2, loc_label=(i + 1) % 2) for i, r in enumerate(recs)]
    batch = edit_batch(m, recs)
    assert batch.labels.device.type == DEV
    factors = gradient_factors(m, batch)
    ref = autograd_weight_grads(m, batch)
    for n in m.edit_params:
        u, d = factors[n]
        assert u.device.type == DEV
        assert _rel(m.outer(u, d), ref[n]) < 1e-4, (alias, n)


@pytest.mark.parametrize("method", sorted(REGISTRY))  # every registered editor (its defaults where HP has none)
def test_every_editor_edits_on_cuda_as_on_cpu(method: str, zsre) -> None:
    cpu, gpu = load_model("tiny-gpt2"), load_model("tiny-gpt2", device=DEV)
    for n, w in cpu.weights().items():
        assert torch.equal(w, gpu.weights()[n].cpu())  # the tiny models are seeded
    editors = []
    for m in (cpu, gpu):
        torch.manual_seed(0)  # learned editors initialise on CPU, then move: same start on both devices
        ed = REGISTRY[method](m, HP.get(method, {}))
        if method in ("ft_kl", "wise"):  # their pools of training records; nothing is trained
            ed.fit(zsre["train"][:8], zsre["val"][:2])
        editors.append(ed)
    recs = zsre["test"][:2]
    e_cpu, e_gpu = (ed.edit(edit_batch(m, recs)) for ed, m in zip(editors, (cpu, gpu)))
    assert set(e_cpu.changes) == set(e_gpu.changes)
    chosen = editors[0].model.edit_params  # the weights it chose, or the modules that own them (adaptors)
    assert set(e_cpu.changes) in (set(chosen), {n.rsplit(".", 1)[0] for n in chosen})
    for n in e_cpu.deltas:
        assert e_gpu.deltas[n].device.type == DEV
        assert _rel(e_gpu.deltas[n], e_cpu.deltas[n]) < 1e-3, (method, n)
    lc = cpu.logits(edit_batch(cpu, recs).inputs, e_cpu.changes)
    lg = gpu.logits(edit_batch(gpu, recs).inputs, e_gpu.changes)
    assert _rel(lg, lc) < 1e-3


@pytest.mark.parametrize("method", ["mend", "enn", "ke"])
def test_learned_editor_trains_on_cuda_and_its_checkpoint_loads_on_cpu(method: str, zsre, tmp_path) -> None:
    gpu = load_model("tiny-gpt2", device=DEV)
    torch.manual_seed(0)
    ed = REGISTRY[method](gpu, HP[method])
    res = ed.fit(zsre["train"][:16], zsre["val"][:4], Budget(max_steps=6, val_every=3, val_edits=4))
    assert res.steps == 6
    for mod in ed.modules().values():
        assert all(p.device.type == DEV for p in mod.parameters())
    path = ed.save(tmp_path / "ckpt")
    cpu = load_model("tiny-gpt2")
    cpu_ed = REGISTRY[method](cpu, HP[method])
    cpu_ed.load(path)  # ENN's checkpoint carries its trained base weights too
    ed.train(False)
    cpu_ed.train(False)
    recs = zsre["test"][:1]
    e_gpu, e_cpu = ed.edit(edit_batch(gpu, recs)), cpu_ed.edit(edit_batch(cpu, recs))
    for n in e_cpu.deltas:
        assert _rel(e_gpu.deltas[n], e_cpu.deltas[n]) < 1e-3, (method, n)


def test_evaluation_on_cuda_reports_cuda_peak_memory(zsre) -> None:
    gpu = load_model("tiny-gpt2", device=DEV)
    ed = REGISTRY["ft"](gpu, HP["ft"])
    res = evaluate(ed, gpu, zsre["test"][:3])
    assert len(res.rows) == 3
    for row in res.rows:
        assert row["edit_peak_mem_mb"] > 0  # torch.cuda.max_memory_allocated above the level at entry
    recs = zsre["test"][:3]
    assert [r["es_pre"] for r in res.rows] == [greedy_es(gpu, r.equiv_prompt, r.target) for r in recs]
