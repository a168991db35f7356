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
