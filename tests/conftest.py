"""Shared fixtures: tiny models are built once per session (they are deterministic, seeded)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from bench.models import EditableModel, load_model

REPO = Path(__file__).resolve().parent.parent
torch.set_num_threads(2)
logging.getLogger("bench").setLevel(logging.WARNING)

_CACHE: dict[str, EditableModel] = {}


def tiny(alias: str) -> EditableModel:
    """A session-cached tiny model (editors never mutate it; tests that need a mutable copy load their own)."""
    if alias not in _CACHE:
        _CACHE[alias] = load_model(alias)
    return _CACHE[alias]


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
