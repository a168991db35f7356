"""Base-model preparation: tasks whose base model must first be trained for the task (FEVER's classifier, as in
the MEND paper) go through :func:`prepare_base`, which fine-tunes once and caches the result.

The cache key covers the model, the data files (path, size, mtime), the seed and every training setting, so a
changed input retrains and an unchanged one reuses the folder without training.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from bench import progress
from bench.cache import cache_root, cached, rng_kept
from bench.cli import slug
from bench.data import TaskData, collate
from bench.models import load_model

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """Where the prepared model lives, its held-out accuracy, and whether this call trained it."""

    path: Path
    key: str
    info: dict[str, Any]
    trained: bool


def prepare_key(model: str, task: TaskData, seed: int, settings: dict[str, Any]) -> str:
    """Cache key of a prepared base model (changes with any of its inputs)."""
    files = []
    for split in ("train", "val"):  # by content: the same data shipped to another folder or node is the same key
        ref = task.refs[split]
        files.append([ref.path.name if ref.path is not None else ref.where, ref.digest(), len(task.splits[split])])
    blob = json.dumps({"model": model, "task": task.card.name, "files": files, "seed": seed, **settings},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@torch.no_grad()
def accuracy(model: Any, records: list, labels: list[str], batch_size: int = 64) -> float:
    """Share of records whose argmax class is the gold label (the id of ``true_answer`` in ``labels``)."""
    hits = 0
    for i in range(0, len(records), batch_size):
        chunk = records[i : i + batch_size]
        gold = [_gold(r, labels) for r in chunk]
        b = collate(model, [r.prompt for r in chunk], gold)
        hits += int((model.logits(b.inputs)[:, 0].argmax(-1) == b.labels[:, 0]).sum())
    return hits / max(len(records), 1)


def _gold(rec: Any, labels: list[str]) -> int:
    return labels.index(rec.true_answer)


def prepare_base(model_name: str, task: TaskData, seed: int, settings: dict[str, Any] | None = None,
                 device: str | None = None) -> Prepared:
    """Fine-tune ``model_name`` as a classifier on the train split's gold labels (``card.prepare`` settings:
    steps, lr, batch_size), report accuracy on the val split, and cache it; a cached result is reused with no
    training."""
    settings = {**task.card.prepare, **(settings or {})}
    steps, lr, bs = int(settings.get("steps", 300)), float(settings.get("lr", 5e-5)), int(settings.get("batch_size", 32))
    key = prepare_key(model_name, task, seed, {"steps": steps, "lr": lr, "batch_size": bs})
    folder = cache_root() / "prepared" / slug(f"{Path(model_name).name}-{task.card.name}-{key}")
    meta_file = folder / "prepared.json"
    if meta_file.exists():
        info = json.loads(meta_file.read_text())
        log.info("prepared base model %s reused (val accuracy %.3f)", folder.name, info["val_accuracy"])
        return Prepared(folder, key, info, trained=False)
    labels = list(task.card.labels)
    # The caller's random state ends the same whether this trains (head init, batches) or the cache serves it.
    with rng_kept():
        model, seconds = _train_classifier(model_name, task, labels, seed, steps, lr, bs, device)
    acc = accuracy(model, list(task["val"]), labels)
    info = {"model": model_name, "task": task.card.name, "seed": seed, "steps": steps, "lr": lr, "batch_size": bs,
            "val_accuracy": acc, "n_val": len(task["val"]), "train_seconds": seconds, "labels": labels}
    net = model.model
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    net.config.id2label = dict(enumerate(labels))
    net.config.label2id = {n: i for i, n in enumerate(labels)}
    net.save_pretrained(tmp)
    model.tokenizer.save_pretrained(tmp)
    (tmp / "prepared.json").write_text(json.dumps(info, indent=2))
    if folder.exists():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.replace(folder)
    log.info("prepared base model %s: val accuracy %.3f in %.0fs", folder.name, acc, info["train_seconds"])
    return Prepared(folder, key, info, trained=True)


def _train_classifier(model_name: str, task: TaskData, labels: list[str], seed: int, steps: int, lr: float, bs: int,
                      device: str | None) -> tuple[Any, float]:
    """``model_name`` with a fresh ``len(labels)``-way head, fine-tuned for ``steps`` AdamW steps on batches of the
    train split's gold labels (seeded by ``seed``), frozen and in eval mode; and the seconds its training took."""
    model = load_model(model_name, num_labels=len(labels), device=device)
    net = model.model
    for p in net.parameters():
        p.requires_grad_(True)
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=lr)
    rng = random.Random(seed)
    train = list(task["train"])
    t0 = time.time()
    torch.manual_seed(seed)
    for step in range(steps):
        chunk = rng.sample(train, min(bs, len(train)))
        b = collate(model, [r.prompt for r in chunk], [_gold(r, labels) for r in chunk])
        loss = torch.nn.functional.cross_entropy(model.logits(b.inputs)[:, 0], b.labels[:, 0])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 50 == 0:
            log.info("prepare %s: step %d/%d loss %.3f", model_name, step + 1, steps, loss.item())
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return model, time.time() - t0


def generation_targets(model: Any, records: list, seed: int, n_tokens: int = 10, max_prompt_tokens: int = 200,
                       cache_tag: str = "") -> list:
    """Turn WikiText paragraphs into generation edits, once per (model, records, seed) and cached.

    x_e = the paragraph's first ``max_prompt_tokens`` tokens; y_e = ``n_tokens`` tokens sampled from the base
    model after x_e (seeded per record, multinomial at temperature 1); x'_e = x_e with a random-length prefix of
    whole words removed (seeded). Deterministic: the same inputs give the same records, from the cache when
    present.
    """
    tok = model.tokenizer
    inputs = {"model": model.name, "tag": cache_tag, "seed": seed, "n": n_tokens, "max": max_prompt_tokens,
              "ids": [r.case_id for r in records],
              "h": hashlib.sha256("\x1f".join(r.prompt for r in records).encode()).hexdigest()}

    def with_rows(rows: list[dict]) -> list:
        return [replace(r, prompt=c["prompt"], target=c["target"], rephrases=(c["rephrase"],))
                for r, c in zip(records, rows)]

    def generate() -> list[dict]:
        rows: list[dict] = []
        with progress.step(f"generated targets of {len(records)} passages") as count:
            for r in records:
                rows.append(one(r))
                count(len(rows), len(records))
        return rows

    def one(r: Any) -> dict:
        """One passage's generation edit (its prompt, sampled continuation and rephrase)."""
        ids = tok(r.prompt, add_special_tokens=False)["input_ids"][:max_prompt_tokens]
        prompt = tok.decode(ids)
        rng = random.Random(f"{seed}:{r.case_id}")
        words = prompt.split(" ")
        cut = rng.randint(1, max(1, len(words) // 2))
        rephrase = " ".join(words[cut:])
        torch.manual_seed(int(hashlib.sha256(f"{seed}:{r.case_id}".encode()).hexdigest()[:8], 16))
        cur = torch.tensor([ids], device=model.device)
        with torch.no_grad():  # multinomial sampling at temperature 1 over the full vocabulary, KV-cached
            seq = model.model.generate(cur, attention_mask=torch.ones_like(cur), do_sample=True, top_k=0,
                                       top_p=1.0, temperature=1.0, max_new_tokens=n_tokens,
                                       min_new_tokens=n_tokens, pad_token_id=tok.pad_token_id)
        new = seq[0, cur.shape[1]:].tolist()
        return {"prompt": prompt, "target": tok.decode(new), "rephrase": rephrase}

    with rng_kept():  # sampling reseeds per passage; the caller's random state stays as its seed made it
        rows, _ = cached("generated", inputs, "json", generate, lambda v, p: p.write_text(json.dumps(v)),
                         lambda p: json.loads(p.read_text()))
    return with_rows(rows)
