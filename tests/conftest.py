"""Shared fixtures: tiny models are built once per session (they are deterministic, seeded)."""

from __future__ import annotations

import gc
import importlib
import logging
from pathlib import Path

import pytest
import torch

from bench.models import EditableModel, load_model

REPO = Path(__file__).resolve().parent.parent
torch.set_num_threads(2)
logging.getLogger("bench").setLevel(logging.WARNING)

# The libraries' own objects (torch, transformers, MLflow, polars: a few million) never become garbage; freezing them
# out of the collector's view makes each full collection (PeakMemory runs one per measurement) ~0.6 s cheaper here.
# MLflow and polars are optional here: a GPU box with only torch, transformers and pytest runs `pytest -m gpu`.
for _lib in ("mlflow.tracking", "polars", "transformers"):
    try:
        importlib.import_module(_lib)
    except ImportError:
        pass

gc.collect()
gc.freeze()

_CACHE: dict[str, EditableModel] = {}


def tiny(alias: str) -> EditableModel:
    """A session-cached tiny model (editors never mutate it; tests that need a mutable copy load their own)."""
    if alias not in _CACHE:
        _CACHE[alias] = load_model(alias)
    return _CACHE[alias]


class NoOpEditor:
    """An editor whose edit changes nothing (no weight delta)."""

    def edit(self, batch):
        from methods.base import Edit

        return Edit({})


class NoiseEditor:
    """An editor whose edit adds seeded Gaussian noise (std 0.5) to every editable weight: damage to see."""

    def __init__(self, m: EditableModel) -> None:
        self.m = m

    def edit(self, batch):
        from methods.base import Edit

        g = torch.Generator().manual_seed(0)
        return Edit({n: 0.5 * torch.randn(w.shape, generator=g) for n, w in self.m.weights().items()}, steps=1)


def private_cache(monkeypatch: pytest.MonkeyPatch, path: Path) -> Path:
    """Point ``$EDITBENCH_CACHE`` at ``path`` for one test: generated targets, statistics and prepared base models
    start empty there, while the converted SmolLM2 (which tiny models take their tokenizer from; converting it
    takes ~40 s) and the empty MLflow schema are shared with the suite's cache by symlinks."""
    from bench.cache import cache_root
    from bench.models import smollm2_dir

    shared = cache_root()
    smollm2_dir()  # converted once, in the shared cache
    path.mkdir(parents=True, exist_ok=True)
    for namespace in ("models", "mlflow-schema"):
        (shared / namespace).mkdir(parents=True, exist_ok=True)
        link = path / namespace
        if not link.exists():
            link.symlink_to(shared / namespace, target_is_directory=True)
    monkeypatch.setenv("EDITBENCH_CACHE", str(path))
    return path


@pytest.fixture(params=["tiny-gpt2", "tiny-llama", "tiny-t5", "tiny-bart"])
def gen_model(request: pytest.FixtureRequest) -> EditableModel:
    """Every generative family: GPT-2 (Conv1D), Llama (Linear), T5 and BART (seq2seq)."""
    return tiny(request.param)


@pytest.fixture(scope="session")
def zsre():
    from bench.data import load_task

    return load_task("zsre", sizes={"train": 64, "val": 16, "test": 16})


def reap(procs: list) -> None:
    """Kill and wait for ``procs`` (psutil processes): every process a test started is gone after it (Ray's agents
    outlive a killed driver or node for a while)."""
    import psutil

    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def greedy_es(model: EditableModel, prompt: str, target: str, deltas: dict | None = None) -> float:
    """Edit success computed apart from the suite's scoring code: 1.0 when the causal model, fed ``prompt`` and
    then each target token in turn, predicts every next target token as its argmax (the same as greedy decoding
    producing `` target`` as a prefix), one forward pass per token on unpadded ids."""
    tok = model.tokenizer
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    want = tok(" " + target.lstrip(), add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        for t in want:
            x = torch.tensor([ids], device=model.device)
            logits = model.logits({"input_ids": x, "attention_mask": torch.ones_like(x)}, deltas)[0, -1]
            if int(logits.argmax()) != t:
                return 0.0
            ids = ids + [t]
    return 1.0


def target_logprob(model: EditableModel, prompt: str, target: str, deltas: dict | None = None) -> float:
    """Mean log-probability per token of `` target`` after ``prompt`` on a causal model, from one forward pass on
    unpadded ids (computed apart from the suite's batching and scoring)."""
    tok = model.tokenizer
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    t = tok(" " + target.lstrip(), add_special_tokens=False)["input_ids"]
    x = torch.tensor([p + t], device=model.device)
    with torch.no_grad():
        lp = torch.log_softmax(model.logits({"input_ids": x, "attention_mask": torch.ones_like(x)}, deltas)[0], -1)
    return float(sum(lp[len(p) - 1 + j, tid] for j, tid in enumerate(t)) / len(t))


def autograd_weight_grads(model: EditableModel, batch, shift: dict | None = None, reduce: str = "sum"
                          ) -> dict[str, torch.Tensor]:
    """d(loss)/dW of every edited weight by plain autograd, the reference the editors' gradients are checked
    against: the weights (plus ``shift``) as leaf tensors through ``torch.func.functional_call``, the loss each
    request's mean target-token NLL written out here (log-softmax and gather), summed (``reduce="sum"``: MEND's
    and KE's edit loss) or averaged (``"mean"``: ENN's) over requests. No trace, factorisation or loss of the
    suite is involved."""
    shift = shift or {}
    ws = {n: (w + shift[n] if n in shift else w).detach().clone().requires_grad_()
          for n, w in model.weights().items()}
    params = {n: ws.get(n, p) for n, p in model.model.named_parameters()}
    logits = torch.func.functional_call(model.model, params, args=(), kwargs=batch.inputs).logits
    if model.kind == "classifier":
        logits = logits.unsqueeze(1)
    mask = batch.labels != -100
    picked = torch.log_softmax(logits.float() if logits.dtype == torch.float16 else logits, -1).gather(
        -1, batch.labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    per_request = -picked.sum(-1) / mask.sum(-1)
    loss = per_request.sum() if reduce == "sum" else per_request.mean()
    return dict(zip(ws, torch.autograd.grad(loss, list(ws.values()))))
