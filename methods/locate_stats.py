"""The key second moment C = E[k k^T] that ROME and MEMIT (and AlphaEdit) weigh their updates with: the inputs of
an MLP output projection of the UNEDITED model over a text corpus, cached on disk per model, weights, module and
corpus."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from bench import progress
from bench.cache import cached
from bench.data import files
from bench.data.files import resolve_file
from bench.models import EditableModel, StopForward, weights_digest

if TYPE_CHECKING:
    from methods.locate import LocateHparams

log = logging.getLogger(__name__)


def _module_inputs(model: EditableModel, module: str, windows: list[list[int]]) -> Tensor:
    """The inputs (float64, one row per real token) of ``module`` of the UNEDITED model over token ``windows``;
    the forward pass stops after the module (the layers above are not run)."""
    enc = _encode_ids(model, windows)
    with torch.no_grad(), model.trace([module], stop_after=module) as io:
        try:
            model.model(**enc)  # the base module: the statistics of the unedited model
        except StopForward:  # ends the pass after the module
            pass
    return io[module].input[enc["attention_mask"].bool()].double()


def second_moment(model: EditableModel, module: str, hp: LocateHparams, data_root: str | None) -> tuple[Tensor, bool]:
    """E[k k^T] (float64, d_in x d_in) of ``module``'s input over the first ``mom2_n_tokens`` tokens of
    ``mom2_corpus`` in windows of ``mom2_seq_len`` tokens, on the UNEDITED model; cached on disk under the
    model name and weights digest, module, corpus content, token count and window. Returns (C, cache hit)."""
    path = resolve_file(hp.mom2_corpus, data_root)
    if "weights_sha256" not in model.meta:  # a trial sets it once when it loads the model (bench.trial)
        model.meta["weights_sha256"] = weights_digest(model)
    inputs = {"stat": "mom2", "model": model.name, "weights": model.meta["weights_sha256"], "module": module,
              "corpus": files.file_sha256(path), "n_tokens": hp.mom2_n_tokens, "seq_len": hp.mom2_seq_len}

    def compute() -> Tensor:
        t0 = time.time()
        ids = model.tokenizer(files.read_text(path), add_special_tokens=False)["input_ids"][: hp.mom2_n_tokens]
        if len(ids) < hp.mom2_n_tokens:
            log.warning("%s holds %d tokens, fewer than mom2_n_tokens=%d; using all", path, len(ids),
                        hp.mom2_n_tokens)
        L = hp.mom2_seq_len
        windows = [ids[i : i + L] for i in range(0, len(ids), L)]
        acc: Tensor | None = None
        n = 0
        assert module in dict(model.model.named_modules()), module
        with progress.step(f"key second moment of {module} over {len(ids)} tokens") as count:
            for b in range(0, len(windows), 8):
                k = _module_inputs(model, module, windows[b : b + 8])
                acc = k.T @ k if acc is None else acc + k.T @ k
                n += k.shape[0]
                count(min(b + 8, len(windows)), len(windows))
        assert acc is not None
        log.info("second moment of %s over %d tokens of %s in %.1fs", module, n, path.name, time.time() - t0)
        return acc / n

    return cached("stats", inputs, "safetensors", compute,
                  lambda v, p: save_file({"mom2": v.cpu().contiguous()}, str(p)),
                  lambda p: load_file(str(p))["mom2"].to(model.device))


def _encode_ids(model: EditableModel, rows: Sequence[Sequence[int]]) -> dict[str, Tensor]:
    width = max(len(r) for r in rows)
    x = torch.full((len(rows), width), model.tokenizer.pad_token_id, dtype=torch.long)
    m = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        x[i, : len(r)] = torch.tensor(list(r))
        m[i, : len(r)] = 1
    return {"input_ids": x.to(model.device), "attention_mask": m.to(model.device)}
